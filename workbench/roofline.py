"""The floor a workload cannot beat on this device, to put measured times in proportion.

Model (an estimate, stated as such in every report):
- the device's measured copy bandwidth (bytes read + written per second) and bf16 matmul rate;
- each decode step reads every weight once, plus the KV cache of every running sequence;
- prefill costs 2 x params FLOPs per prompt token (attention FLOPs added);
- a step's floor is max(bytes / bandwidth, FLOPs / matmul rate); the workload's floor is the sum.
Offline throughput runs are modelled as ceil(num_prompts / max_num_seqs) waves of output_len decode
steps at full batch, plus the prefill of every prompt.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch


@dataclass
class DeviceRates:
    bandwidth_Bps: float
    matmul_flops: float
    device: str

    def as_dict(self) -> dict:
        return asdict(self)


def measure_device(device: str) -> DeviceRates:
    """A quick measurement: a ~1 GiB copy and a large bf16 matmul (smaller on CPU), median of 5."""
    on_gpu = device == "cuda"
    nbytes = (1 << 30) if on_gpu else (1 << 27)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy_s = _median_seconds(lambda: dst.copy_(src), on_gpu)
    n = 8192 if on_gpu else 1024
    dtype = torch.bfloat16 if on_gpu else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    mm_s = _median_seconds(lambda: a @ b, on_gpu)
    name = torch.cuda.get_device_name() if on_gpu else "cpu"
    del src, dst, a, b
    return DeviceRates(bandwidth_Bps=2 * nbytes / copy_s, matmul_flops=2 * n ** 3 / mm_s, device=name)


def _median_seconds(fn, on_gpu: bool, reps: int = 5) -> float:
    fn()
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


@dataclass
class ModelShape:
    params: int
    weight_bytes: int
    layers: int
    kv_heads: int
    head_dim: int
    heads: int
    dtype_bytes: int

    @classmethod
    def from_engine(cls, engine) -> "ModelShape":
        hf = engine.config.hf_config
        params = sum(p.numel() for p in engine.runner.model.parameters())
        dtype_bytes = torch.empty(0, dtype=engine.config.torch_dtype).element_size()
        heads = hf.num_attention_heads
        return cls(params=params, weight_bytes=params * dtype_bytes, layers=hf.num_hidden_layers,
                   kv_heads=getattr(hf, "num_key_value_heads", heads) or heads,
                   head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // heads, heads=heads,
                   dtype_bytes=dtype_bytes)

    def kv_bytes_per_token(self) -> int:
        return self.layers * 2 * self.kv_heads * self.head_dim * self.dtype_bytes


def decode_step_floor(shape: ModelShape, rates: DeviceRates, batch: int, context_tokens: int) -> float:
    """One decode step of `batch` sequences holding `context_tokens` KV tokens in all."""
    nbytes = shape.weight_bytes + shape.kv_bytes_per_token() * context_tokens
    flops = 2 * shape.params * batch + 4 * shape.layers * shape.heads * shape.head_dim * context_tokens
    return max(nbytes / rates.bandwidth_Bps, flops / rates.matmul_flops)


def prefill_floor(shape: ModelShape, rates: DeviceRates, prompt_lens: list[int]) -> float:
    tokens = sum(prompt_lens)
    attn = sum(2 * shape.layers * shape.heads * shape.head_dim * n * n for n in prompt_lens)
    return (2 * shape.params * tokens + attn) / rates.matmul_flops


def throughput_floor(shape: ModelShape, rates: DeviceRates, prompt_lens: list[int], output_len: int,
                     max_num_seqs: int) -> dict:
    waves = math.ceil(len(prompt_lens) / max_num_seqs)
    batch = min(max_num_seqs, len(prompt_lens))
    mean_prompt = sum(prompt_lens) / len(prompt_lens)
    decode = 0.0
    for step in range(output_len):
        decode += decode_step_floor(shape, rates, batch, int(batch * (mean_prompt + step)))
    decode *= waves
    prefill = prefill_floor(shape, rates, prompt_lens)
    return {"model": "waves of full-batch decode steps + prefill FLOPs (see workbench/roofline.py)",
            "decode_floor_s": decode, "prefill_floor_s": prefill, "floor_s": decode + prefill, "waves": waves,
            "rates": rates.as_dict(), "weight_bytes": shape.weight_bytes,
            "kv_bytes_per_token": shape.kv_bytes_per_token()}
