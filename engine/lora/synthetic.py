"""Random, seeded PEFT LoRA adapters for any Llama/Qwen2 model directory (presets included), so that
tests and benchmarks need no downloads. Shapes come from the model's config.json.

Real training starts B at zero; here both A and B are random, sized so that the adapter's delta is
about half the base projection's output: greedy text visibly differs from the base model's, and
adapters of different seeds differ from each other.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

from engine.lora.layers import SUPPORTED_MODULES
from engine.lora.peft import CONFIG_FILE, PREFIX, WEIGHTS_FILE

STRENGTH = 0.5  # the delta's size relative to the base projection's output
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def projection_shapes(config: dict) -> dict[str, tuple[str, int, int]]:
    """PEFT module piece -> (parent, in_features, out_features) for one decoder layer."""
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    q, kv = heads * head_dim, kv_heads * head_dim
    return {"q_proj": ("self_attn", hidden, q), "k_proj": ("self_attn", hidden, kv),
            "v_proj": ("self_attn", hidden, kv),
            "o_proj": ("self_attn", q, hidden), "gate_proj": ("mlp", hidden, inter), "up_proj": ("mlp", hidden, inter),
            "down_proj": ("mlp", inter, hidden)}


def write_adapter(model_dir: str | Path, out: str | Path, rank: int, targets: list[str] | None = None,
                  alpha: float | None = None, seed: int = 0, use_rslora: bool = False,
                  base_model_name: str | None = None, dtype: str | None = None) -> Path:
    """Write a PEFT adapter directory for the model in `model_dir`; returns `out`. `targets` defaults to
    every projection, `alpha` to 2 x rank."""
    if rank < 1:
        raise ValueError(f"rank must be at least 1, got {rank}")
    targets = list(targets or SUPPORTED_MODULES)
    bad = [t for t in targets if t not in SUPPORTED_MODULES]
    if bad or not targets:
        raise ValueError(f"unknown target module(s) {', '.join(bad) or '(none)'}; choose from "
                         f"{', '.join(SUPPORTED_MODULES)}")
    config = json.loads((Path(model_dir) / "config.json").read_text())
    alpha = float(2 * rank if alpha is None else alpha)
    scaling = alpha / math.sqrt(rank) if use_rslora else alpha / rank
    torch_dtype = DTYPES[dtype or config.get("torch_dtype") or "float32"]
    shapes = projection_shapes(config)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(config["num_hidden_layers"]):
        for piece in targets:
            parent, fan_in, fan_out = shapes[piece]
            key = f"{PREFIX}model.layers.{layer}.{parent}.{piece}"
            # A keeps the activations' scale (x ~ 1 per element after the norm): A x ~ 1 per rank row.
            a = torch.randn(rank, fan_in, generator=gen) / math.sqrt(fan_in)
            # The base projections are ~1 per output element; B makes the scaled delta ~STRENGTH of it.
            b = torch.randn(fan_out, rank, generator=gen) * (STRENGTH / (scaling * math.sqrt(rank)))
            tensors[f"{key}.lora_A.weight"] = a.to(torch_dtype).contiguous()
            tensors[f"{key}.lora_B.weight"] = b.to(torch_dtype).contiguous()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    adapter_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha, "target_modules": targets,
        "lora_dropout": 0.0, "bias": "none", "use_rslora": use_rslora, "use_dora": False, "fan_in_fan_out": False,
        "modules_to_save": None, "inference_mode": True, "init_lora_weights": True,
        "base_model_name_or_path": base_model_name or str(model_dir)}
    (out / CONFIG_FILE).write_text(json.dumps(adapter_config, indent=2))
    return out
