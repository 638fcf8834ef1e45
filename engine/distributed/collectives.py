"""The collectives a tensor-parallel model needs, no-ops for a single rank. The model calls these with
its ParallelRank; torch.distributed runs them (gloo on CPU, NCCL on GPU)."""
from __future__ import annotations

import torch
import torch.distributed as dist

from engine.distributed.state import ParallelRank


def tp_all_reduce(x: torch.Tensor, par: ParallelRank) -> torch.Tensor:
    """Sum over the tensor-parallel group, in place (every rank gets the same bits)."""
    if par.tp_size > 1:
        dist.all_reduce(x, group=par.tp_group)
    return x


def tp_all_gather(x: torch.Tensor, par: ParallelRank) -> torch.Tensor:
    """Concatenate every rank's x along the last dimension, in rank order."""
    if par.tp_size == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(par.tp_size)]
    dist.all_gather(parts, x, group=par.tp_group)
    return torch.cat(parts, dim=-1)
