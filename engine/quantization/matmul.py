"""y = x @ W for a quantized W in the internal layout (engine/quantization/formats.py): the one seam
where the engine calls the quantized matmul. On CUDA the fused dequant-GEMM kernels of
kernels/quant_gemm.py (Triton; a split-K GEMV for decode, a tiled GEMM for prefill); elsewhere their
torch reference (dequantize to float32, then matmul), since the Triton interpreter is for kernel tests."""
from __future__ import annotations

import torch

from kernels.quant_gemm import dequantize, quant_matmul_reference
from kernels.quant_gemm import quant_matmul as fused_quant_matmul

__all__ = ["dequantize", "quant_matmul"]


def quant_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor, bits: int,
                 group_size: int, g_idx: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] -> [M, N] in x's dtype."""
    if x.is_cuda:
        return fused_quant_matmul(x, qweight, scales, qzeros, bits, group_size, g_idx)
    return quant_matmul_reference(x, qweight, scales, qzeros, bits, group_size, g_idx)
