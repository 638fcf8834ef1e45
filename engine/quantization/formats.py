"""The checkpoint formats' tensors, to and from integer codes, and to the engine's internal layout.

A quantized linear layer y = x @ W (W [K = in, N = out]) is, in every format here,
    W[k, n] = (q[k, n] - z[g(k), n]) * s[g(k), n],   g(k) = k // group_size, or g_idx[k] (GPTQ desc_act)
with q and z unsigned `bits`-bit codes and s the scales [G, N], G = ceil(K / group_size).

On disk:
- AWQ GEMM (casper-hansen/AutoAWQ awq/modules/linear/gemm.py `WQLinear_GEMM`): qweight int32 [K, N/8]
  and qzeros int32 [G, N/8], both packed along N in AutoAWQ's interleaved order (packing.AWQ_ORDER),
  zeros stored as they are; scales fp16 [G, N]. AutoAWQ asserts K % group_size == 0; we also read and
  write a shorter last group (shapes ceil(K / group_size), as GPTQ's), which AutoAWQ and vLLM refuse.
- GPTQ v1 (ModelCloud/GPTQModel gptqmodel/nn_modules/qlinear/qlinear_cuda_old.py `pack`; vLLM
  vllm/model_executor/layers/quantization/gptq.py): qweight int32 [K*bits/32, N] packed along K; qzeros
  int32 [G, N*bits/32] packed along N holding zero - 1 (readers add 1: vLLM's `zeros = zeros + 1`);
  scales fp16 [G, N]; g_idx int32 [K]. Symmetric checkpoints have zero 2**(bits-1) everywhere.
  A v1 zero of 0 is stored as an all-ones field (AutoGPTQ's `zeros -= 1` then wraps); we read a field
  modulo 2**bits (so all ones is zero 0 again) and our writer never emits zero 0 for v1 (see
  engine/quantization/rtn.py), so the files mean the same to vLLM's readers and to ours.

Internal (the contract of kernels/quant_gemm.py `quant_matmul`): qweight [K/P, N] packed along K
(GPTQ's own order), qzeros [G, N/P] packed along N holding the actual zero points, scales [G, N],
g_idx [K] or None.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from engine.quantization.packing import (
    AWQ_ORDER,
    pack_cols,
    pack_rows,
    unpack_cols,
    unpack_rows,
)


@dataclass
class QuantWeights:
    """One layer's codes, unpacked: q [K, N], zeros [G, N] (actual zero points), scales [G, N]."""
    q: torch.Tensor
    zeros: torch.Tensor
    scales: torch.Tensor
    bits: int
    group_size: int  # the effective size (K for -1)
    g_idx: torch.Tensor | None = None  # [K] for act-order; None: k // group_size

    def group_index(self) -> torch.Tensor:
        if self.g_idx is not None:
            return self.g_idx.long()
        return torch.arange(self.q.shape[0], device=self.q.device) // self.group_size

    def dequantize(self) -> torch.Tensor:
        """W [K, N] in float32."""
        g = self.group_index()
        return (self.q - self.zeros[g]).float() * self.scales[g].float()


def num_groups(in_features: int, group_size: int) -> int:
    return math.ceil(in_features / group_size)


def trivial_g_idx(in_features: int, group_size: int, device=None) -> torch.Tensor:
    return (torch.arange(in_features, device=device) // group_size).to(torch.int32)


# ---------------------------------------------------------------- AWQ GEMM
def to_awq(w: QuantWeights) -> dict[str, torch.Tensor]:
    if w.bits != 4 or w.g_idx is not None:
        raise ValueError("AWQ GEMM holds 4-bit codes in natural group order (no g_idx)")
    return {"qweight": pack_cols(w.q, 4, AWQ_ORDER), "qzeros": pack_cols(w.zeros, 4, AWQ_ORDER),
            "scales": w.scales.to(torch.float16)}


def from_awq(t: dict[str, torch.Tensor], group_size: int) -> QuantWeights:
    q = unpack_cols(t["qweight"], 4, AWQ_ORDER)
    return QuantWeights(q, unpack_cols(t["qzeros"], 4, AWQ_ORDER), t["scales"], 4,
                        group_size if group_size != -1 else q.shape[0])


def awq_qweight_to_internal(qweight: torch.Tensor) -> torch.Tensor:
    return pack_rows(unpack_cols(qweight, 4, AWQ_ORDER), 4)


def awq_qzeros_to_internal(qzeros: torch.Tensor) -> torch.Tensor:
    return pack_cols(unpack_cols(qzeros, 4, AWQ_ORDER), 4)


# ---------------------------------------------------------------- GPTQ v1
def to_gptq(w: QuantWeights) -> dict[str, torch.Tensor]:
    mask = 2 ** w.bits - 1
    if int(w.zeros.min()) < 1:
        raise ValueError("a GPTQ v1 zero point of 0 is ambiguous on disk (stored as all ones); quantize with "
                         "zeros in [1, 2**bits - 1]")
    g_idx = w.g_idx if w.g_idx is not None else trivial_g_idx(w.q.shape[0], w.group_size, w.q.device)
    return {"qweight": pack_rows(w.q, w.bits), "qzeros": pack_cols((w.zeros - 1) & mask, w.bits),
            "scales": w.scales.to(torch.float16), "g_idx": g_idx.to(torch.int32)}


def from_gptq(t: dict[str, torch.Tensor], bits: int, group_size: int) -> QuantWeights:
    q = unpack_rows(t["qweight"], bits)
    g_idx = t.get("g_idx")
    size = group_size if group_size != -1 else q.shape[0]
    if g_idx is not None and torch.equal(g_idx.to(torch.int32), trivial_g_idx(q.shape[0], size, g_idx.device)):
        g_idx = None
    return QuantWeights(q, gptq_zeros(t["qzeros"], bits), t["scales"], bits, size, g_idx)


def gptq_zeros(qzeros: torch.Tensor, bits: int) -> torch.Tensor:
    return (unpack_cols(qzeros, bits) + 1) & (2 ** bits - 1)


def gptq_qzeros_to_internal(qzeros: torch.Tensor, bits: int) -> torch.Tensor:
    return pack_cols(gptq_zeros(qzeros, bits), bits)


# ---------------------------------------------------------------- internal
def to_internal(w: QuantWeights) -> dict[str, torch.Tensor]:
    out = {"qweight": pack_rows(w.q, w.bits), "qzeros": pack_cols(w.zeros, w.bits), "scales": w.scales}
    if w.g_idx is not None:
        out["g_idx"] = w.g_idx.to(torch.int32)
    return out


def from_internal(qweight, qzeros, scales, bits: int, group_size: int, g_idx=None) -> QuantWeights:
    return QuantWeights(unpack_rows(qweight, bits), unpack_cols(qzeros, bits), scales, bits, group_size, g_idx)
