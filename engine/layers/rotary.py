"""Rotary position embedding with the scalings Llama 3 and friends use."""
from __future__ import annotations

import math

import torch
from torch import nn

from kernels import rotary as rotary_kernels


def rope_settings(config) -> tuple[float, dict | None]:
    """(theta, scaling) from a Hugging Face config: transformers 5 keeps both in `rope_parameters`,
    transformers 4 has `rope_theta` and `rope_scaling`."""
    params = getattr(config, "rope_parameters", None) or {}
    theta = getattr(config, "rope_theta", None) or params.get("rope_theta") or 10000.0
    scaling = getattr(config, "rope_scaling", None) or params or None
    return float(theta), scaling


def inv_frequencies(head_dim: int, theta: float, rope_scaling: dict | None) -> torch.Tensor:
    # Computed in float32 exactly as transformers does, so that positions match it bit for bit.
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    kind = (rope_scaling or {}).get("rope_type", (rope_scaling or {}).get("type", "default"))
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / rope_scaling["factor"]
    if kind == "llama3":
        return _llama3_inv_freq(inv_freq, rope_scaling)
    raise ValueError(f"rope_scaling type {kind!r} is not supported (supported: default, linear, llama3)")


def _llama3_inv_freq(inv_freq: torch.Tensor, cfg: dict) -> torch.Tensor:
    """Llama 3.1's frequency-dependent scaling: long wavelengths divided by `factor`, short ones kept,
    a smooth blend between."""
    factor, low, high = cfg["factor"], cfg.get("low_freq_factor", 1.0), cfg.get("high_freq_factor", 4.0)
    old_len = cfg["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    is_medium = (wavelen <= old_len / low) & (wavelen >= old_len / high)
    return torch.where(is_medium, blended, scaled)


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_position: int, theta: float, rope_scaling: dict | None):
        super().__init__()
        inv_freq = inv_frequencies(head_dim, theta, rope_scaling)
        angles = torch.outer(torch.arange(max_position, dtype=torch.float32), inv_freq)
        # Buffers, not parameters: the loader skips them and .to(device) moves them.
        self.register_buffer("cos_cache", angles.cos(), persistent=False)
        self.register_buffer("sin_cache", angles.sin(), persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        fn = rotary_kernels.rotary_embedding if q.is_cuda else rotary_kernels.rotary_ref
        return fn(positions, q, k, self.cos_cache, self.sin_cache)
