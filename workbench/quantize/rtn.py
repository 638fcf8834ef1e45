"""The quantization grid of each format, and round-to-nearest.

Per group of `group_size` input rows and per output column:
- asymmetric (AWQ; GPTQ sym=False): scale = (max - min) / (2**bits - 1), zero = round(-min / scale),
  as AutoAWQ's `pseudo_quantize_tensor` (casper-hansen/AutoAWQ awq/quantize/quantizer.py). GPTQ's
  quantizer also widens the range to include 0; GPTQ v1 cannot store a zero of 0 (see
  engine/quantization/formats.py), so its zeros are clamped to [1, 2**bits - 1].
- symmetric (GPTQ sym=True): scale = 2 * max|w| / (2**bits - 1), zero = 2**(bits - 1), as GPTQ's
  `Quantizer.find_params`.
Weights here are [K, N] (in x out), the transpose of a Hugging Face weight.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.quantization.formats import QuantWeights, num_groups


@dataclass(frozen=True)
class Grid:
    bits: int
    sym: bool = False
    min_zero: int = 0  # 1 for GPTQ v1
    include_zero: bool = False  # GPTQ's range always contains 0

    @property
    def maxq(self) -> int:
        return 2 ** self.bits - 1

    def params(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero) per column of w [rows, N], both [N]."""
        if self.sym:
            absmax = w.abs().amax(dim=0).clamp(min=1e-8)
            return 2 * absmax / self.maxq, torch.full_like(absmax, 2 ** (self.bits - 1)).to(torch.int32)
        lo, hi = w.amin(dim=0), w.amax(dim=0)
        if self.include_zero:
            lo, hi = lo.clamp(max=0), hi.clamp(min=0)
        scale = (hi - lo).clamp(min=1e-5) / self.maxq
        zero = torch.round(-lo / scale).clamp(self.min_zero, self.maxq).to(torch.int32)
        return scale, zero

    def codes(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        return torch.clamp(torch.round(w / scale) + zero, 0, self.maxq).to(torch.int32)

    def fake(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        return (self.codes(w, scale, zero) - zero) * scale


def grid_for(method: str, bits: int, sym: bool) -> Grid:
    if method == "awq":
        return Grid(bits)
    return Grid(bits, sym=sym, min_zero=1, include_zero=True)


def group_of(k: int, group_size: int) -> slice:
    return slice(k * group_size, (k + 1) * group_size)


def rtn(w: torch.Tensor, grid: Grid, group_size: int) -> QuantWeights:
    """Round to nearest: w [K, N] float -> codes per group."""
    k, n = w.shape
    groups = num_groups(k, group_size)
    q = torch.empty(k, n, dtype=torch.int32)
    zeros = torch.empty(groups, n, dtype=torch.int32)
    scales = torch.empty(groups, n, dtype=torch.float32)
    for g in range(groups):
        rows = group_of(g, group_size)
        scale, zero = grid.params(w[rows].float())
        scale = scale.half().float()  # the file stores fp16 scales: quantize against what is stored
        scales[g], zeros[g] = scale, zero
        q[rows] = grid.codes(w[rows].float(), scale, zero)
    return QuantWeights(q, zeros, scales, grid.bits, group_size)


def fake_quantize(w: torch.Tensor, grid: Grid, group_size: int) -> torch.Tensor:
    """w [K, N] quantized and dequantized (for the AWQ search's losses)."""
    k, n = w.shape
    pad = (-k) % group_size
    wp = torch.cat([w, w[-1:].expand(pad, n)]) if pad else w
    g = wp.view(-1, group_size, n)
    if grid.sym:
        absmax = g.abs().amax(dim=1, keepdim=True).clamp(min=1e-8)
        scale, zero = 2 * absmax / grid.maxq, 2 ** (grid.bits - 1)
    else:
        lo, hi = g.amin(dim=1, keepdim=True), g.amax(dim=1, keepdim=True)
        if grid.include_zero:
            lo, hi = lo.clamp(max=0), hi.clamp(min=0)
        scale = (hi - lo).clamp(min=1e-5) / grid.maxq
        zero = torch.round(-lo / scale).clamp(grid.min_zero, grid.maxq)
    out = (torch.clamp(torch.round(g / scale) + zero, 0, grid.maxq) - zero) * scale
    return out.view(-1, n)[:k]
