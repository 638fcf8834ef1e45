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


try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs use the references
    triton = None

if triton is not None:
    @triton.jit
    def _rmsnorm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, sum_ptr, stride_x, stride_r, n, eps,
                        HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
        if HAS_RESIDUAL:
            r = tl.load(res_ptr + row * stride_r + offs, mask=mask, other=0.0)
            x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
            tl.store(sum_ptr + row * n + offs, x, mask=mask)
        xf = x.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / n + eps)
        w = tl.load(w_ptr + offs, mask=mask, other=0.0)
        # Round to the input dtype before the weight, as transformers does.
        y = (xf * rstd).to(x.dtype).to(tl.float32) * w.to(tl.float32)
        tl.store(out_ptr + row * n + offs, y.to(x.dtype), mask=mask)


def _launch(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float):
    n = x.shape[-1]
    x2 = x.reshape(-1, n)
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    summed = torch.empty_like(out) if residual is not None else out
    res2 = residual.reshape(-1, n) if residual is not None else x2
    if x2.shape[0]:
        _rmsnorm_kernel[(x2.shape[0],)](x2, res2, weight, out, summed, x2.stride(0), res2.stride(0), n, eps,
                                        HAS_RESIDUAL=residual is not None, BLOCK=triton.next_power_of_2(n),
                                        num_warps=4 if n <= 2048 else 8)
    return out.view(x.shape), summed.view(x.shape)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _launch(x, None, weight, eps)[0]


def fused_add_rmsnorm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                      eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass: (rmsnorm(x + residual), x + residual)."""
    return _launch(x, residual, weight, eps)
