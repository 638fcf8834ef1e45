"""A rank's place in the tensor x pipeline grid, passed explicitly to the model and its layers (no
global parallel state to chase).

Ranks are laid out as vLLM lays them out: rank = pp_rank * tp_size + tp_rank, so the ranks of one
pipeline stage (one tensor-parallel group) are consecutive, and on one host each rank drives GPU
`rank`. Every rank creates every group, in the same order, as torch.distributed requires.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class ParallelRank:
    tp_rank: int = 0
    tp_size: int = 1
    pp_rank: int = 0
    pp_size: int = 1
    tp_group: Any = field(default=None, compare=False, repr=False)  # torch ProcessGroup; None when tp_size == 1
    pp_group: Any = field(default=None, compare=False, repr=False)

    @property
    def rank(self) -> int:
        return self.pp_rank * self.tp_size + self.tp_rank

    @property
    def world_size(self) -> int:
        return self.tp_size * self.pp_size

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    def stage_rank(self, pp_rank: int) -> int:
        """The global rank of the same tensor-parallel position in stage `pp_rank`."""
        return pp_rank * self.tp_size + self.tp_rank

    def layer_range(self, num_layers: int) -> range:
        return stage_layers(num_layers, self.pp_size)[self.pp_rank]


SINGLE = ParallelRank()


def stage_layers(num_layers: int, pp_size: int) -> list[range]:
    """Contiguous layer ranges, one per stage, as even as can be. The extra layers of an uneven split go
    to the stages before the last (as vLLM does), since the last stage also runs the LM head."""
    sizes = [num_layers // pp_size] * pp_size
    for i in range(num_layers % pp_size):
        sizes[-2 - i] += 1
    starts = [sum(sizes[:i]) for i in range(pp_size)]
    return [range(s, s + n) for s, n in zip(starts, sizes)]


def output_rank(tp_size: int, pp_size: int) -> int:
    """The rank whose sampled tokens the engine reads: tensor rank 0 of the last stage."""
    return (pp_size - 1) * tp_size


def init_distributed(rank: int, tp_size: int, pp_size: int, backend: str, init_method: str,
                     device: torch.device) -> ParallelRank:
    """Join the process group (every rank of the world calls this) and build the tp and pp groups."""
    import torch.distributed as dist

    world = tp_size * pp_size
    kwargs = {"device_id": device} if backend == "nccl" else {}
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world, **kwargs)
    tp_group = pp_group = None
    for stage in range(pp_size):  # a tp group per stage
        ranks = list(range(stage * tp_size, (stage + 1) * tp_size))
        group = dist.new_group(ranks) if tp_size > 1 else None
        if rank in ranks:
            tp_group = group
    for tp_rank in range(tp_size):  # a pp group per tensor position
        ranks = [stage * tp_size + tp_rank for stage in range(pp_size)]
        group = dist.new_group(ranks) if pp_size > 1 else None
        if rank in ranks:
            pp_group = group
    return ParallelRank(rank % tp_size, tp_size, rank // tp_size, pp_size, tp_group, pp_group)
