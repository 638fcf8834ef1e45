"""Rotary position embedding, NeoX/HF layout (the two halves of each head rotate together)."""
import torch


def rotary_ref(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_cache: torch.Tensor,
               sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """positions: [num_tokens]; q: [num_tokens, num_heads, head_dim]; k: [num_tokens, num_kv_heads, head_dim];
    cos_cache/sin_cache: [max_position, head_dim // 2] float32. Returns rotated (q, k)."""
    cos = cos_cache[positions].unsqueeze(1)
    sin = sin_cache[positions].unsqueeze(1)

    def rotate(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)

    return rotate(q), rotate(k)


try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs use the references
    triton = None

if triton is not None:
    @triton.jit
    def _rotary_kernel(pos_ptr, x_ptr, out_ptr, cos_ptr, sin_ptr, stride_xt, stride_xh, heads,
                       HALF: tl.constexpr, BLOCK_H: tl.constexpr):
        token = tl.program_id(0)
        pos = tl.load(pos_ptr + token)
        offs_h = tl.arange(0, BLOCK_H)
        offs_d = tl.arange(0, HALF)
        mask = (offs_h < heads)[:, None]
        cos = tl.load(cos_ptr + pos * HALF + offs_d)[None, :]
        sin = tl.load(sin_ptr + pos * HALF + offs_d)[None, :]
        base = token * stride_xt + offs_h[:, None] * stride_xh + offs_d[None, :]
        x1 = tl.load(x_ptr + base, mask=mask, other=0.0)
        x2 = tl.load(x_ptr + base + HALF, mask=mask, other=0.0)
        o1 = x1.to(tl.float32) * cos - x2.to(tl.float32) * sin
        o2 = x2.to(tl.float32) * cos + x1.to(tl.float32) * sin
        out = token * heads * 2 * HALF + offs_h[:, None] * 2 * HALF + offs_d[None, :]
        tl.store(out_ptr + out, o1.to(x1.dtype), mask=mask)
        tl.store(out_ptr + out + HALF, o2.to(x1.dtype), mask=mask)


def _rotate(positions: torch.Tensor, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    tokens, heads, dim = x.shape
    out = torch.empty((tokens, heads, dim), dtype=x.dtype, device=x.device)
    if tokens:
        assert x.stride(2) == 1
        _rotary_kernel[(tokens,)](positions, x, out, cos, sin, x.stride(0), x.stride(1), heads, HALF=dim // 2,
                                  BLOCK_H=triton.next_power_of_2(heads))
    return out


def rotary_embedding(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_cache: torch.Tensor,
                     sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of rotary_ref: one program per token rotates all its heads."""
    return _rotate(positions, q, cos_cache, sin_cache), _rotate(positions, k, cos_cache, sin_cache)
