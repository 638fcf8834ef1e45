"""RMSNorm, and the fused residual-add + RMSNorm that every decoder layer runs twice."""
import torch


def rmsnorm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf.to(x.dtype) * weight).to(x.dtype)


def fused_add_rmsnorm_ref(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                          eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (rmsnorm(x + residual), x + residual), as the next layer needs both."""
    summed = (x.float() + residual.float()).to(x.dtype)
    return rmsnorm_ref(summed, weight, eps), summed
