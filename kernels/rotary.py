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
    def _rotate_heads(token, pos, x_ptr, out_ptr, cos_ptr, sin_ptr, stride_xt, stride_xh, heads,
                      HALF: tl.constexpr, BLOCK_H: tl.constexpr):
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

    @triton.jit
    def _rotary_kernel(pos_ptr, q_ptr, k_ptr, q_out_ptr, k_out_ptr, cos_ptr, sin_ptr, stride_qt, stride_qh,
                       stride_kt, stride_kh, q_heads, k_heads, HALF: tl.constexpr, BLOCK_H: tl.constexpr):
        """Program (token, 0) rotates the token's query heads, (token, 1) its key heads: one launch."""
        token = tl.program_id(0)
        pos = tl.load(pos_ptr + token)
        if tl.program_id(1) == 0:
            _rotate_heads(token, pos, q_ptr, q_out_ptr, cos_ptr, sin_ptr, stride_qt, stride_qh, q_heads, HALF, BLOCK_H)
        else:
            _rotate_heads(token, pos, k_ptr, k_out_ptr, cos_ptr, sin_ptr, stride_kt, stride_kh, k_heads, HALF, BLOCK_H)


def rotary_embedding(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_cache: torch.Tensor,
                     sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of rotary_ref: queries and keys of every token in one launch."""
    tokens, q_heads, dim = q.shape
    k_heads = k.shape[1]
    q_out = torch.empty((tokens, q_heads, dim), dtype=q.dtype, device=q.device)
    k_out = torch.empty((tokens, k_heads, dim), dtype=k.dtype, device=k.device)
    if tokens:
        assert q.stride(2) == 1 and k.stride(2) == 1
        _rotary_kernel[(tokens, 2)](positions, q, k, q_out, k_out, cos_cache, sin_cache, q.stride(0), q.stride(1),
                                    k.stride(0), k.stride(1), q_heads, k_heads, HALF=dim // 2,
                                    BLOCK_H=triton.next_power_of_2(max(q_heads, k_heads)))
    return q_out, k_out
