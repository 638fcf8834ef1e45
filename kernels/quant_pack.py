"""Packing of 4- and 8-bit integers into int32 words, and dequantization, in plain torch.

One layout for every weight-only quantized linear (see kernels/quant_gemm.py for the full contract):
P = 32 // bits values per word, value i of a word in bits [i * bits, (i + 1) * bits) (GPTQ v1 order).
`qweight` packs along K (the input dimension, rows of W = [K, N]); `qzeros` packs along N.
The loaders of AWQ and GPTQ checkpoints convert into this; the kernels and the tests read it.
"""
from __future__ import annotations

import torch

SUPPORTED_BITS = (4, 8)


def values_per_word(bits: int) -> int:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits}: only 4 and 8 are supported")
    return 32 // bits


def _pack_last(q: torch.Tensor, bits: int) -> torch.Tensor:
    """q [..., L * P] -> int32 [..., L]: value i of each run of P goes to bits [i*bits, (i+1)*bits)."""
    p = values_per_word(bits)
    if q.shape[-1] % p:
        raise ValueError(f"cannot pack {q.shape[-1]} values {bits}-bit: not a multiple of {p} per int32 word")
    q = q.to(torch.int64)
    if q.numel() and (int(q.min()) < 0 or int(q.max()) >= 1 << bits):
        raise ValueError(f"values outside [0, {(1 << bits) - 1}] cannot be packed {bits}-bit")
    shifts = torch.arange(p, device=q.device, dtype=torch.int64) * bits
    words = (q.unflatten(-1, (-1, p)) << shifts).sum(-1)  # disjoint bit fields: sum == or
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)  # as two's-complement int32


def _unpack_last(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [..., L] -> int32 [..., L * P] (inverse of _pack_last)."""
    p = values_per_word(bits)
    if packed.dtype != torch.int32:
        raise ValueError(f"packed words must be int32, got {packed.dtype}")
    shifts = torch.arange(p, device=packed.device, dtype=torch.int32) * bits
    # Arithmetic shift of a negative word drags its sign in from the left; the mask drops it.
    return ((packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).flatten(-2)


def pack_along_k(q: torch.Tensor, bits: int) -> torch.Tensor:
    """q [K, N] integers in [0, 2**bits) -> qweight int32 [K // P, N]."""
    return _pack_last(q.t(), bits).t().contiguous()


def unpack_along_k(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """qweight int32 [K // P, N] -> q int32 [K, N]."""
    return _unpack_last(qweight.t(), bits).t().contiguous()


def pack_along_n(z: torch.Tensor, bits: int) -> torch.Tensor:
    """z [G, N] integers in [0, 2**bits) -> qzeros int32 [G, N // P]."""
    return _pack_last(z, bits).contiguous()


def unpack_along_n(qzeros: torch.Tensor, bits: int) -> torch.Tensor:
    """qzeros int32 [G, N // P] -> z int32 [G, N]."""
    return _unpack_last(qzeros, bits).contiguous()


def group_index(k: int, group_size: int, g_idx: torch.Tensor | None, device) -> torch.Tensor:
    """g(k) for every input row: g_idx (GPTQ desc_act) when given, else k // group_size."""
    if g_idx is not None:
        return g_idx.long()
    return torch.arange(k, device=device) // group_size


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor, bits: int, group_size: int,
               g_idx: torch.Tensor | None = None) -> torch.Tensor:
    """W [K, N] float32: W[k, n] = (q[k, n] - z[g(k), n]) * s[g(k), n]."""
    q = unpack_along_k(qweight, bits)
    z = unpack_along_n(qzeros, bits)
    g = group_index(q.shape[0], group_size, g_idx, q.device)
    return (q - z[g]).float() * scales[g].float()
