"""GPTQ (Frantar et al. 2022, arXiv:2210.17323): columns quantized one by one, each one's rounding
error spread over the columns not yet quantized through the inverse Hessian of the layer's inputs,
H = 2 X^T X / T. As the reference implementation (AutoGPTQ/GPTQModel `GPTQ.fasterquant`,
ModelCloud/GPTQModel gptqmodel/quantization/gptq.py): dampening 1% of the mean diagonal, blocks of 128
columns with lazy updates, the upper Cholesky factor of H^-1, group parameters found when a group's
first column is reached (from the weights as updated so far), optional act-order (columns in
decreasing diag(H), which makes g_idx a non-trivial map from input row to group).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

from engine.quantization.formats import QuantWeights, num_groups
from workbench.quantize.rtn import Grid

DAMP = 0.01
BLOCK = 128


def hessian(x: torch.Tensor) -> torch.Tensor:
    """2 X^T X / T for inputs x [T, K], in float64 for a stable factorisation."""
    x = x.double()
    return 2.0 * x.t() @ x / x.shape[0]


def _inverse_cholesky(h: torch.Tensor) -> torch.Tensor:
    damp = DAMP * torch.mean(torch.diag(h))
    h = h + damp * torch.eye(h.shape[0], dtype=h.dtype)
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)


@contextmanager
def one_thread():
    """The column loop is thousands of small ops: with more threads each pays the pool's synchronisation
    (measured on 2 loaded cores: a [128, 1536] rank-1 update took 66 ms on 2 threads, 0.47 ms on one)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@torch.no_grad()
def gptq(weight: torch.Tensor, h: torch.Tensor, grid: Grid, group_size: int, act_order: bool) -> QuantWeights:
    """weight [N, K] (a Hugging Face linear's), h [K, K] -> the codes of W^T [K, N]."""
    with one_thread():
        return _gptq(weight, h, grid, group_size, act_order)


def _gptq(weight: torch.Tensor, h: torch.Tensor, grid: Grid, group_size: int, act_order: bool) -> QuantWeights:
    w = weight.double().clone()
    n, k = w.shape
    h = h.clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(k)
    w, h = w[:, perm], h[perm][:, perm]
    hinv = _inverse_cholesky(h)
    groups = num_groups(k, group_size)
    codes = torch.zeros(n, k, dtype=torch.int32)
    scales = torch.zeros(groups, n, dtype=torch.float32)
    zeros = torch.zeros(groups, n, dtype=torch.int32)
    scale = zero = None
    for i1 in range(0, k, BLOCK):
        i2 = min(i1 + BLOCK, k)
        w1, err1, hinv1 = w[:, i1:i2].clone(), torch.zeros(n, i2 - i1, dtype=w.dtype), hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % group_size == 0:  # a group starts: its parameters from the columns as updated so far
                ahead = torch.cat([w1[:, i:], w[:, i2:]], dim=1)[:, :group_size]
                s, z = grid.params(ahead.t().float())
                scale, zero = s.half().double(), z  # quantize against the fp16 scales the file stores
                scales[col // group_size], zeros[col // group_size] = scale.float(), zero
            q = torch.clamp(torch.round(w1[:, i] / scale) + zero, 0, grid.maxq)
            codes[:, col] = q.to(torch.int32)
            err = (w1[:, i] - (q - zero) * scale) / hinv1[i, i]
            w1[:, i:] -= err.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
            err1[:, i] = err
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    inverse = torch.argsort(perm)
    g_idx = (inverse // group_size).to(torch.int32) if act_order else None
    return QuantWeights(codes[:, inverse].t().contiguous(), zeros, scales, grid.bits, group_size, g_idx)
