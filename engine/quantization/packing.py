"""Bit packing of integer weight codes into int32 words, in the orders the checkpoint formats use.

Two directions, both little-end first (field i of a word sits at bits [i*bits, (i+1)*bits)):
- along K (dim 0): word [k // P, n] holds q[k, n] at field k % P, P = 32 // bits. GPTQ's qweight and
  our internal qweight (AutoGPTQ/GPTQModel `QuantLinear.pack`: `qweight[row] |= intweight[j] << (bits * (j - i))`,
  ModelCloud/GPTQModel gptqmodel/nn_modules/qlinear/qlinear_cuda_old.py).
- along N (dim 1): word [r, n // P] holds z[r, n] at field n % P. GPTQ's qzeros, our internal qzeros.

AWQ (AutoAWQ's GEMM layout) packs along N too, but field i of word j holds column j*8 + AWQ_ORDER[i]
(casper-hansen/AutoAWQ awq/modules/linear/gemm.py `WQLinear_GEMM.from_linear`, order_map
[0, 2, 4, 6, 1, 3, 5, 7]; the inverse AWQ_REVERSE_ORDER is in awq/utils/packing_utils.py).

Packing works in int64 and wraps to int32 at the end, so a field in the top bits (a code >= 8 in the
last nibble) gives a negative int32 exactly as numpy's uint32 -> int32 view in those writers does.
"""
from __future__ import annotations

import torch

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # field i of an AWQ word holds column AWQ_ORDER[i] of its 8
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)  # column c of the 8 sits in field AWQ_REVERSE_ORDER[c]


def fields_per_word(bits: int) -> int:
    if bits not in (4, 8):
        raise ValueError(f"only 4- and 8-bit codes pack into whole int32 words here, got {bits} bits")
    return 32 // bits


def _shifts(bits: int, device) -> torch.Tensor:
    return torch.arange(0, 32, bits, dtype=torch.int64, device=device)


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 words in [0, 2**32) to int32 with the same bits."""
    return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)


def _check_codes(codes: torch.Tensor, bits: int) -> None:
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= 2 ** bits):
        raise ValueError(f"codes must lie in [0, {2 ** bits - 1}] for {bits}-bit packing, got "
                         f"[{int(codes.min())}, {int(codes.max())}]")


def pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """[K, N] codes -> [K / P, N] int32 words, packed along K."""
    p = fields_per_word(bits)
    k, n = codes.shape
    if k % p:
        raise ValueError(f"{k} rows do not fill whole {bits}-bit words of {p} fields")
    _check_codes(codes, bits)
    c = codes.to(torch.int64).view(k // p, p, n)
    return _to_int32((c << _shifts(bits, codes.device).view(1, p, 1)).sum(dim=1))


def unpack_rows(words: torch.Tensor, bits: int) -> torch.Tensor:
    """[K / P, N] int32 words -> [K, N] int32 codes."""
    p = fields_per_word(bits)
    w = words.to(torch.int64) & 0xFFFFFFFF
    codes = (w.unsqueeze(1) >> _shifts(bits, words.device).view(1, p, 1)) & (2 ** bits - 1)
    return codes.reshape(-1, words.shape[1]).to(torch.int32)


def pack_cols(codes: torch.Tensor, bits: int, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """[R, N] codes -> [R, N / P] int32 words, packed along N; `order[i]` is the column (of each
    word's P) that field i holds (None: field i holds column i)."""
    p = fields_per_word(bits)
    r, n = codes.shape
    if n % p:
        raise ValueError(f"{n} columns do not fill whole {bits}-bit words of {p} fields")
    _check_codes(codes, bits)
    c = codes.to(torch.int64).view(r, n // p, p)
    if order is not None:
        c = c[:, :, list(order)]
    return _to_int32((c << _shifts(bits, codes.device).view(1, 1, p)).sum(dim=2))


def unpack_cols(words: torch.Tensor, bits: int, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """[R, N / P] int32 words -> [R, N] int32 codes (the inverse of pack_cols with the same order)."""
    p = fields_per_word(bits)
    w = words.to(torch.int64) & 0xFFFFFFFF
    fields = (w.unsqueeze(2) >> _shifts(bits, words.device).view(1, 1, p)) & (2 ** bits - 1)
    if order is not None:
        inverse = [0] * p
        for i, col in enumerate(order):
            inverse[col] = i
        fields = fields[:, :, inverse]
    return fields.reshape(words.shape[0], -1).to(torch.int32)
