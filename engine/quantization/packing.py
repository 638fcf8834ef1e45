"""AutoAWQ's interleaved nibble order, on top of the one GPTQ-order packing (kernels/quant_pack.py:
field i of an int32 word in bits [i*bits, (i+1)*bits); `pack_along_k` for GPTQ's and our internal
qweight, `pack_along_n` for the qzeros).

AWQ's GEMM layout packs along N like qzeros, but field i of word j holds column j*8 + AWQ_ORDER[i]
(casper-hansen/AutoAWQ awq/modules/linear/gemm.py `WQLinear_GEMM.from_linear`, order_map
[0, 2, 4, 6, 1, 3, 5, 7]; the inverse AWQ_REVERSE_ORDER is in awq/utils/packing_utils.py). So an AWQ
word is a plain word of the columns permuted within each run of 8.
"""
from __future__ import annotations

import torch

from kernels.quant_pack import pack_along_n, unpack_along_n

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # field i of an AWQ word holds column AWQ_ORDER[i] of its 8
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)  # column c of the 8 sits in field AWQ_REVERSE_ORDER[c]


def pack_awq(codes: torch.Tensor) -> torch.Tensor:
    """[R, N] 4-bit codes -> [R, N / 8] int32 words in AutoAWQ's order."""
    r, n = codes.shape
    if n % 8:
        raise ValueError(f"{n} columns do not fill whole AWQ words of 8 nibbles")
    return pack_along_n(codes.reshape(r, n // 8, 8)[:, :, list(AWQ_ORDER)].reshape(r, n), 4)


def unpack_awq(words: torch.Tensor) -> torch.Tensor:
    """[R, N / 8] int32 words in AutoAWQ's order -> [R, N] codes (the inverse of pack_awq)."""
    fields = unpack_along_n(words, 4)
    r, n = fields.shape
    return fields.reshape(r, n // 8, 8)[:, :, list(AWQ_REVERSE_ORDER)].reshape(r, n).contiguous()
