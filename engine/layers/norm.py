"""RMSNorm with the residual add fused in, as every decoder layer runs it."""
from __future__ import annotations

import torch
from torch import nn

from kernels import rmsnorm as rmsnorm_kernels


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """Without a residual: rmsnorm(x). With one: (rmsnorm(x + residual), x + residual)."""
        if residual is None:
            fn = rmsnorm_kernels.rmsnorm if x.is_cuda else rmsnorm_kernels.rmsnorm_ref
            return fn(x, self.weight, self.eps)
        fn = rmsnorm_kernels.fused_add_rmsnorm if x.is_cuda else rmsnorm_kernels.fused_add_rmsnorm_ref
        return fn(x, residual, self.weight, self.eps)
