"""Refuse configurations that cannot start before paying for a server launch: the engine's own
rules on the token budget, and a memory estimate (weights + one full sequence of KV against the
memory the configuration may use). Conservative: activations and CUDA graphs are left out, so a
configuration refused here would certainly fail, while one let through may still run out of memory
(the launch then tells, and the trial becomes infeasible all the same)."""
from __future__ import annotations

import json
import math
from dataclasses import asdict, fields
from pathlib import Path
from types import SimpleNamespace

from engine.config import DTYPES, ConfigError, EngineConfig, check_parallel_shapes
from engine.presets import PRESETS, PresetSpec, estimate_params, tensor_shapes
from engine.server.args import byte_size
from workbench.bench.roofline import ModelShape

ENGINE_DEFAULTS = {f.name: f.default for f in fields(EngineConfig) if not callable(f.default)}


def model_spec(model: str) -> PresetSpec | None:
    """The shapes of a preset or of a local Hugging Face directory; None when unknown (e.g. a hub id)."""
    if model in PRESETS:
        return PRESETS[model]
    path = Path(model).expanduser() / "config.json"
    if not path.is_file():
        return None
    c = json.loads(path.read_text())
    try:
        return PresetSpec(model, c["architectures"][0], c["hidden_size"], c["intermediate_size"],
                          c["num_hidden_layers"], c["num_attention_heads"],
                          c.get("num_key_value_heads") or c["num_attention_heads"], c["vocab_size"],
                          c.get("max_position_embeddings", 2048), c.get("rope_theta", 1e4),
                          bool(c.get("tie_word_embeddings", False)), dtype=c.get("torch_dtype") or "bfloat16")
    except (KeyError, IndexError, TypeError):
        return None


def estimate(spec: PresetSpec, flags: dict, on_gpu: bool, quant=None) -> dict:
    """Weights and KV bytes per token in the dtype the engine would pick; `quant`: the checkpoint's
    QuantConfig (its decoder linears count their packed codes, fp16 scales and packed zeros)."""
    dtype = flags.get("dtype", "auto")
    if dtype == "auto":
        dtype = "float32" if not on_gpu else ("bfloat16" if spec.dtype in ("float32", None) else spec.dtype)
    nbytes = DTYPES[dtype].itemsize
    params = estimate_params(spec)
    stored = None
    if quant is not None:
        shapes = tensor_shapes(spec)
        linear = {n: s for n, s in shapes.items() if ".layers." in n and n.endswith("_proj.weight")}
        stored = (params - sum(math.prod(s) for s in linear.values())) * nbytes
        for out_f, in_f in linear.values():
            groups = math.ceil(in_f / quant.group_size_for(in_f))
            stored += out_f * in_f * quant.bits // 8 + groups * out_f * (2 + quant.bits / 8)
        stored = int(stored)
    shape = ModelShape(params, spec.num_hidden_layers, spec.num_attention_heads, spec.num_key_value_heads,
                       spec.head_dim, nbytes, stored)
    return {"weight_bytes": shape.weight_bytes, "kv_bytes_per_token": shape.kv_bytes_per_token, "dtype": dtype}


def model_quantization(model: str):
    """A model directory's QuantConfig (None when dense, a preset, or unreadable: the launch will tell)."""
    from types import SimpleNamespace

    from engine.config import ConfigError
    from engine.quantization.config import from_hf_config

    path = Path(model).expanduser() / "config.json"
    if model in PRESETS or not path.is_file():
        return None
    try:
        return from_hf_config(SimpleNamespace(**json.loads(path.read_text())))
    except (ConfigError, json.JSONDecodeError, TypeError):
        return None


def refuse(model: str, flags: dict, device_memory: int | None) -> tuple[str | None, dict]:
    """(why this configuration cannot run, or None; the estimate behind the answer)."""
    cfg = ENGINE_DEFAULTS | flags
    seqs, tokens = cfg["max_num_seqs"], cfg["max_num_batched_tokens"]
    if tokens is not None and tokens < seqs:
        return f"max_num_batched_tokens ({tokens}) < max_num_seqs ({seqs}): the engine refuses it", {}
    spec = model_spec(model)
    if spec is None:
        return None, {}
    tp, pp = cfg["tensor_parallel_size"], cfg["pipeline_parallel_size"]
    try:
        check_parallel_shapes(SimpleNamespace(**asdict(spec)), tp, pp)
    except ConfigError as exc:
        return str(exc), {}
    model_len = cfg["max_model_len"] or spec.max_position_embeddings
    if tokens is not None and not cfg["enable_chunked_prefill"] and tokens < model_len:
        return f"max_num_batched_tokens ({tokens}) < max_model_len ({model_len}) without chunked prefill", {}
    est = estimate(spec, flags, on_gpu=device_memory is not None, quant=model_quantization(model))
    if tp * pp > 1:  # each rank holds its share of the weights and of every token's KV (the figures below)
        est["weight_bytes"] //= tp * pp
        est["kv_bytes_per_token"] //= tp * pp
    block = cfg["block_size"]
    one_seq = math.ceil(model_len / block) * block * est["kv_bytes_per_token"]
    est["one_sequence_kv_bytes"] = one_seq
    kv = cfg["kv_cache_memory"]
    kv = byte_size(kv) if isinstance(kv, str) else kv
    gib = lambda b: f"{b / (1 << 30):.2f} GiB" if b >= 1 << 30 else f"{b / (1 << 20):.1f} MiB"  # noqa: E731
    if kv is not None:
        est["kv_cache_bytes"] = kv
        if kv < one_seq:
            return (f"kv_cache_memory {gib(kv)} holds fewer than max_model_len ({model_len}) tokens "
                    f"({gib(one_seq)})"), est
        if device_memory is not None and kv + est["weight_bytes"] > device_memory:
            return (f"weights {gib(est['weight_bytes'])} + KV cache {gib(kv)} exceed the device's "
                    f"{gib(device_memory)}"), est
        return None, est
    if device_memory is None:
        return None, est
    usable = cfg["gpu_memory_utilization"] * device_memory - est["weight_bytes"]
    logits = min(seqs, tokens or seqs) * spec.vocab_size * 4  # float32 logits of the sampled rows, at least
    est["kv_budget_upper_bound"] = int(usable - logits)
    if usable - logits < one_seq:
        return (f"at gpu_memory_utilization {cfg['gpu_memory_utilization']:.2f} of {gib(device_memory)}, weights "
                f"{gib(est['weight_bytes'])} and logits {gib(logits)} leave less than one sequence of KV "
                f"({model_len} tokens, {gib(one_seq)})"), est
    return None, est


def device_memory(configured: str | int | None) -> int | None:
    """The study's device_memory if set, else this machine's first CUDA device, else None (CPU)."""
    if configured is not None:
        return byte_size(configured) if isinstance(configured, str) else int(configured)
    import torch

    return torch.cuda.mem_get_info()[1] if torch.cuda.is_available() else None
