"""The time a workload cannot beat on this device, to put measured times in proportion.

An estimate, stated as such in every report. The model:
- Device: the measured copy bandwidth (bytes read + written per second, median of 5 copies of
  1 GiB on GPU, 64 MiB on CPU unless the caller sizes the copy to its working set, as `bench latency`
  does on CPU, where caches make the size matter) and the measured matmul rate (median of 5 square matmuls, 8192 on
  GPU, 1024 on CPU, in the engine's dtype: bf16 on GPU unless float32 was asked for). Real kernels
  rarely beat these, but can come close, so ratios near 1 are possible and below 1 means the
  model is off, not that the engine broke physics.
- Weights: every weight used in a matmul is read once per forward step (the input embedding is a
  lookup of a few rows, so it counts only when tied to the LM head). FLOPs = 2 x those
  parameters x tokens, plus attention: 4 x layers x heads x head_dim per (query, key) pair.
- KV cache: a decode token at context c reads c tokens of KV, each
  layers x 2 x kv_heads x head_dim x dtype bytes.
- A phase's floor is max(bytes / bandwidth, FLOPs / matmul rate).

Offline throughput (`throughput_floor`): the decode phase produces sum(output_len - 1) tokens
(the prefill step yields each first token) in at least max(ceil(tokens / concurrency),
max(output_len) - 1) steps, each reading all weights; concurrency = max_num_seqs, capped by the
number of prompts and by how many of the shortest sequences fit in the KV cache (without prefix
caching). KV reads and FLOPs do not depend on the schedule. The prefill phase computes the
uncached prompt tokens in at least ceil(tokens / max_num_batched_tokens) steps. floor_s is the sum
of the two phases. The engine mixes prefill chunks into decode steps, where the two phases
overlap; `overlap_floor_s` = max(all bytes / bandwidth, all FLOPs / rate) is the bound if they
overlapped perfectly, so the truth lies between the two. Not modelled: activations, sampling,
host overhead, preemption recompute (all of which the engine pays and the floor does not).

Latency (`decode_step_floor`, `prefill_floor`): one decode step of a batch of b sequences reads
the weights plus the KV of the b contexts; TTFT of a batch is its prefill phase.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch

GiB = 1 << 30
MiB = 1 << 20


@dataclass(frozen=True)
class DeviceRates:
    bandwidth_Bps: float  # bytes read + written per second by a device-to-device copy
    matmul_flops: float  # FLOP/s of a large square matmul in `matmul_dtype`
    device: str  # e.g. "NVIDIA H100 80GB HBM3" or "cpu"
    matmul_dtype: str = ""
    copy_bytes: int = 0
    matmul_size: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


def measure_device(device: str, dtype: torch.dtype, copy_bytes: int | None = None) -> DeviceRates:
    """A quick measurement (about a second): one copy and one matmul size, median of 5 each."""
    on_gpu = device == "cuda"
    nbytes = copy_bytes or (GiB if on_gpu else 64 * MiB)
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy_s = _median_seconds(lambda: dst.copy_(src), on_gpu)
    src = dst = None  # freed before the matmul's buffers
    n = 8192 if on_gpu else 1024
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    mm_s = _median_seconds(lambda: torch.mm(a, b), on_gpu)
    a = b = None
    if on_gpu:
        torch.cuda.empty_cache()  # give the memory back before the engine sizes its KV cache
    name = torch.cuda.get_device_name() if on_gpu else "cpu"
    return DeviceRates(bandwidth_Bps=2 * nbytes / copy_s, matmul_flops=2 * n ** 3 / mm_s, device=name,
                       matmul_dtype=str(dtype).removeprefix("torch."), copy_bytes=nbytes, matmul_size=n)


def _median_seconds(fn, on_gpu: bool, reps: int = 5) -> float:
    fn()  # first call: allocator, cuBLAS handles, clocks
    times = []
    for _ in range(reps):
        if on_gpu:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if on_gpu:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


@dataclass(frozen=True)
class ModelShape:
    matmul_params: int  # weights read and multiplied per forward step (input embedding excluded unless tied)
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    dtype_bytes: int
    # The bytes those weights take when they are not all in the compute dtype (AWQ/GPTQ: packed codes,
    # scales and zeros); None: matmul_params x dtype_bytes.
    stored_weight_bytes: int | None = None

    @property
    def weight_bytes(self) -> int:
        if self.stored_weight_bytes is not None:
            return self.stored_weight_bytes
        return self.matmul_params * self.dtype_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        return self.layers * 2 * self.kv_heads * self.head_dim * self.dtype_bytes

    def attention_flops(self, query_key_pairs: float) -> float:
        return 4 * self.layers * self.heads * self.head_dim * query_key_pairs  # QK^T and PV, 2 FLOPs per MAC

    @classmethod
    def from_engine(cls, engine) -> ModelShape:
        from engine.models.llama import head_dim_of

        hf, dtype = engine.config.hf_config, engine.config.torch_dtype
        elem = torch.empty(0, dtype=dtype).element_size()
        if engine.runner is not None:
            model = engine.runner.model
            params, nbytes = _logical_params_and_bytes(model)  # a tied LM head counts once
            embed_elem = model.model.embed_tokens.weight.element_size()
        else:  # worker processes hold the (sharded, dense: quantization is one rank only) weights
            params, embed_elem = config_params(hf), elem
            nbytes = params * elem
        if not getattr(hf, "tie_word_embeddings", False):
            params -= hf.vocab_size * hf.hidden_size  # the input embedding is a row lookup, not a matmul
            nbytes -= hf.vocab_size * hf.hidden_size * embed_elem
        return cls(matmul_params=params, layers=hf.num_hidden_layers, heads=hf.num_attention_heads,
                   kv_heads=getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads,
                   head_dim=head_dim_of(hf), dtype_bytes=elem,
                   stored_weight_bytes=None if engine.config.quant_config is None else nbytes)


def _logical_params_and_bytes(model) -> tuple[int, int]:
    """(parameters as a dense model counts them, bytes the tensors take): a quantized linear layer
    counts in x out parameters whatever its packed tensors' element counts."""
    from engine.layers.linear import Linear, UnquantizedMethod

    params = nbytes = 0
    quantized = set()
    for module in model.modules():
        if isinstance(module, Linear) and not isinstance(module.method, UnquantizedMethod):
            params += module.in_features * sum(module.out_sizes)
            quantized |= {id(p) for p in module.parameters(recurse=False)}
            if module.bias is not None:
                params += module.bias.numel()
    for p in model.parameters():  # parameters() yields a shared (tied) tensor once
        nbytes += p.numel() * p.element_size()
        if id(p) not in quantized:
            params += p.numel()
    return params, nbytes


def config_params(hf) -> int:
    """The model's parameters from its config (the matmuls, norms and one vocabulary matrix; as
    counting the parameters of a model whose tied LM head counts once)."""
    from engine.models.llama import head_dim_of

    hidden, inter, hd = hf.hidden_size, hf.intermediate_size, head_dim_of(hf)
    heads = hf.num_attention_heads
    kv_heads = getattr(hf, "num_key_value_heads", None) or heads
    qkv_bias = "Qwen2ForCausalLM" in (hf.architectures or []) or bool(getattr(hf, "attention_bias", False))
    per_layer = ((hidden + qkv_bias) * (heads + 2 * kv_heads) * hd + heads * hd * hidden + 3 * hidden * inter
                 + 2 * hidden)
    vocab = hf.vocab_size * hidden * (1 if getattr(hf, "tie_word_embeddings", False) else 2)
    return hf.num_hidden_layers * per_layer + vocab + hidden


def phase_floor(rates: DeviceRates, nbytes: float, flops: float) -> float:
    return max(nbytes / rates.bandwidth_Bps, flops / rates.matmul_flops)


def decode_step_floor(shape: ModelShape, rates: DeviceRates, batch: int, context_tokens: int) -> float:
    """One decode step of `batch` sequences whose contexts hold `context_tokens` KV tokens in all."""
    nbytes = shape.weight_bytes + shape.kv_bytes_per_token * context_tokens
    flops = 2 * shape.matmul_params * batch + shape.attention_flops(context_tokens)
    return phase_floor(rates, nbytes, flops)


def prefill_cost(shape: ModelShape, prompt_lens: list[int], max_num_batched_tokens: int,
                 cached_tokens: int = 0) -> tuple[float, float]:
    """(bytes, FLOPs) of prefilling these prompts: causal attention over each prompt, weights read once
    per step of max_num_batched_tokens, new KV written. Cached prefix tokens are not computed (their
    share of attention is taken off proportionally: an approximation)."""
    total = sum(prompt_lens)
    computed = max(0, total - cached_tokens)
    if computed == 0:
        return 0.0, 0.0
    steps = math.ceil(computed / max_num_batched_tokens)
    pairs = sum(n * (n + 1) / 2 for n in prompt_lens) * computed / total
    nbytes = steps * shape.weight_bytes + computed * shape.kv_bytes_per_token
    return nbytes, 2 * shape.matmul_params * computed + shape.attention_flops(pairs)


def prefill_floor(shape: ModelShape, rates: DeviceRates, prompt_lens: list[int], max_num_batched_tokens: int,
                  cached_tokens: int = 0) -> float:
    return phase_floor(rates, *prefill_cost(shape, prompt_lens, max_num_batched_tokens, cached_tokens))


def throughput_floor(shape: ModelShape, rates: DeviceRates, prompt_lens: list[int], output_lens: list[int],
                     max_num_seqs: int, max_num_batched_tokens: int, kv_capacity_tokens: int | None = None,
                     cached_prompt_tokens: int = 0) -> dict:
    """The floor of an offline run (see the module docstring); every term is returned for the report."""
    if len(prompt_lens) != len(output_lens) or not prompt_lens:
        raise ValueError("throughput_floor needs one output length per prompt, and at least one prompt")
    concurrency = min(max_num_seqs, len(prompt_lens))
    if kv_capacity_tokens is not None:
        shortest = min(p + o for p, o in zip(prompt_lens, output_lens))
        concurrency = max(1, min(concurrency, kv_capacity_tokens // shortest))
    decode_tokens = sum(o - 1 for o in output_lens)
    decode_steps = max(math.ceil(decode_tokens / concurrency), max(output_lens) - 1) if decode_tokens else 0
    # Sum over decode tokens of their context: request i reads p_i + s tokens at its s-th decode step.
    kv_read_tokens = sum((o - 1) * p + (o - 1) * o / 2 for p, o in zip(prompt_lens, output_lens))
    decode_bytes = decode_steps * shape.weight_bytes + kv_read_tokens * shape.kv_bytes_per_token
    decode_flops = 2 * shape.matmul_params * decode_tokens + shape.attention_flops(kv_read_tokens)
    prefill_bytes, prefill_flops = prefill_cost(shape, prompt_lens, max_num_batched_tokens, cached_prompt_tokens)
    decode_s = phase_floor(rates, decode_bytes, decode_flops)
    prefill_s = phase_floor(rates, prefill_bytes, prefill_flops)
    return {
        "model": "decode phase (weights once per step + KV reads) + prefill phase (FLOPs), each "
                 "max(bytes / bandwidth, FLOPs / matmul rate); an estimate, see workbench/bench/roofline.py",
        "floor_s": decode_s + prefill_s, "decode_floor_s": decode_s, "prefill_floor_s": prefill_s,
        "overlap_floor_s": phase_floor(rates, decode_bytes + prefill_bytes, decode_flops + prefill_flops),
        "decode_bound": "bandwidth" if decode_bytes / rates.bandwidth_Bps >= decode_flops / rates.matmul_flops
        else "compute",
        "decode_steps": decode_steps, "decode_tokens": decode_tokens, "concurrency": concurrency,
        "decode_bytes": decode_bytes, "decode_flops": decode_flops, "prefill_bytes": prefill_bytes,
        "prefill_flops": prefill_flops, "cached_prompt_tokens": cached_prompt_tokens,
        "weight_bytes": shape.weight_bytes, "kv_bytes_per_token": shape.kv_bytes_per_token,
        "rates": rates.as_dict()}
