"""A pipeline stage's link to its neighbours: the hidden states and residual of a step's tokens go from
stage to stage with point-to-point sends (torch.distributed send/recv; gloo on CPU, NCCL on GPU).

Every stage applies the same step plan, so each knows how many tokens a step has and receives into a
buffer of that shape. Stages process steps in the order the engine sent them, so a send is always
matched by the next stage's receive of the same step; sends are asynchronous, so a stage starts its
next step while the previous step's activations are still on the wire (the in-flight steps of the
engine core, engine/core.py, then keep every stage busy).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from engine.distributed.state import ParallelRank


@dataclass
class IntermediateTensors:
    """What one stage hands the next: [tokens, hidden] each."""
    hidden: torch.Tensor
    residual: torch.Tensor


class PipelineStage:
    def __init__(self, par: ParallelRank, hidden_size: int, dtype: torch.dtype, device: torch.device):
        self.par = par
        self.hidden_size = hidden_size
        self.dtype = dtype
        self.device = device
        self._sends: list = []  # the previous step's send requests, waited on before the next send

    @property
    def is_first(self) -> bool:
        return self.par.is_first_stage

    @property
    def is_last(self) -> bool:
        return self.par.is_last_stage

    def receive(self, num_tokens: int) -> IntermediateTensors:
        src = self.par.stage_rank(self.par.pp_rank - 1)
        shape = (num_tokens, self.hidden_size)
        hidden = torch.empty(shape, dtype=self.dtype, device=self.device)
        residual = torch.empty(shape, dtype=self.dtype, device=self.device)
        dist.recv(hidden, src, group=self.par.pp_group)
        dist.recv(residual, src, group=self.par.pp_group)
        return IntermediateTensors(hidden, residual)

    def send(self, out: IntermediateTensors) -> None:
        self.wait_sends()
        dst = self.par.stage_rank(self.par.pp_rank + 1)
        # The tensors must outlive the asynchronous sends: the requests hold them until waited on.
        tensors = [out.hidden.contiguous(), out.residual.contiguous()]
        self._sends = [(dist.isend(t, dst, group=self.par.pp_group), t) for t in tensors]

    def wait_sends(self) -> None:
        for request, _ in self._sends:
            request.wait()
        self._sends = []
