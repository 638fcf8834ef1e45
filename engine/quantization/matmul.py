"""y = x @ W for a quantized W in the internal layout (engine/quantization/formats.py), the one seam
where the engine calls the quantized matmul. The torch reference here unpacks, dequantizes and
multiplies; kernels/quant_gemm.py (Triton, fused dequantization) computes the same with the same
signature, and the lead points `quant_matmul` at it on CUDA when it lands."""
from __future__ import annotations

import torch

from engine.quantization.packing import unpack_cols, unpack_rows


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor, bits: int, group_size: int,
               g_idx: torch.Tensor | None = None) -> torch.Tensor:
    """W [K, N] in float32: (q - z[g(k)]) * s[g(k)]."""
    q = unpack_rows(qweight, bits)
    z = unpack_cols(qzeros, bits)
    k = q.shape[0]
    g = g_idx.long() if g_idx is not None else torch.arange(k, device=q.device) // group_size
    return (q - z[g]).float() * scales[g].float()


def quant_matmul_ref(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor,
                     bits: int, group_size: int, g_idx: torch.Tensor | None = None) -> torch.Tensor:
    w = dequantize(qweight, scales, qzeros, bits, group_size, g_idx)
    return (x.float() @ w).to(x.dtype) if x.dtype != torch.float32 else x @ w


def quant_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor, bits: int,
                 group_size: int, g_idx: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] -> [M, N] in x's dtype."""
    return quant_matmul_ref(x, qweight, scales, qzeros, bits, group_size, g_idx)
