"""Prefill / extend attention over the paged KV cache: a varlen batch of new tokens per sequence,
causal, with any already-cached prefix in front of them. The new tokens' K/V are stored first."""
import torch

from kernels.paged_attention import gather_kv


def paged_prefill_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor, context_lens: torch.Tensor,
                                scale: float) -> torch.Tensor:
    """q: [num_tokens, num_heads, head_dim], sequence i owns rows cu_seqlens_q[i]:cu_seqlens_q[i+1];
    context_lens[i]: its cached tokens after this step (prefix + new). The new tokens sit at the end
    of the context, so query j of sequence i sees keys 0 .. context_len - query_len + j."""
    out = torch.empty_like(q)
    num_heads = q.shape[1]
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    starts = cu_seqlens_q.tolist()
    lengths = context_lens.tolist()
    for i, ctx in enumerate(lengths):
        lo, hi = starts[i], starts[i + 1]
        if hi == lo:
            continue
        query = q[lo:hi].float().transpose(0, 1)  # [heads, q_len, d]
        keys = gather_kv(k_cache, block_tables[i], ctx).float().repeat_interleave(group, dim=1).transpose(0, 1)
        values = gather_kv(v_cache, block_tables[i], ctx).float().repeat_interleave(group, dim=1).transpose(0, 1)
        q_len = hi - lo
        q_pos = torch.arange(ctx - q_len, ctx, device=q.device)
        visible = torch.arange(ctx, device=q.device)[None, :] <= q_pos[:, None]
        attn = torch.nn.functional.scaled_dot_product_attention(query, keys, values, attn_mask=visible, scale=scale)
        out[lo:hi] = attn.transpose(0, 1).to(q.dtype)
    return out


try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs use the references
    triton = None

if triton is not None:
    from kernels.paged_attention import load_kv_tile, online_softmax_step

    @triton.jit(do_not_specialize=["stride_bt"])  # the table width changes every step: no recompiles
    def _prefill_kernel(q_ptr, k_ptr, v_ptr, out_ptr, tables_ptr, cu_ptr, lens_ptr, stride_qt, stride_qh,
                        stride_ot, stride_oh, stride_kt, stride_kh, stride_bt, scale, group,
                        BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
        """One program: a tile of BLOCK_M new tokens of sequence s, query head h. Keys come from the
        paged cache (prefix + the new tokens, already stored); causal within the sequence."""
        tile = tl.program_id(0)
        h = tl.program_id(1)
        s = tl.program_id(2)
        q_start = tl.load(cu_ptr + s)
        q_len = tl.load(cu_ptr + s + 1) - q_start
        ctx = tl.load(lens_ptr + s)
        prefix = ctx - q_len
        offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        mask_m = offs_m < q_len
        q = tl.load(q_ptr + (q_start + offs_m)[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
                    mask=mask_m[:, None], other=0.0)
        q_pos = prefix + offs_m
        # Keys this tile can see; none when the tile lies past this sequence's new tokens.
        kv_end = tl.where(tile * BLOCK_M < q_len, tl.minimum(ctx, prefix + (tile + 1) * BLOCK_M), 0)
        kh = h // group
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        for n0 in range(0, kv_end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            mask_n = offs_n < kv_end
            k, v = load_kv_tile(k_ptr, v_ptr, tables_ptr, s * stride_bt, offs_n, mask_n, offs_d, kh, stride_kt,
                                stride_kh, BLOCK_SIZE)
            qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
            visible = mask_n[None, :] & (offs_n[None, :] <= q_pos[:, None])
            qk = tl.where(visible, qk, float("-inf"))
            m_i, l_i, acc = online_softmax_step(qk, v, m_i, l_i, acc, PRECISION)
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(out_ptr + (q_start + offs_m)[:, None] * stride_ot + h * stride_oh + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=mask_m[:, None])


def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                            cu_seqlens_q: torch.Tensor, context_lens: torch.Tensor, scale: float,
                            max_query_len: int | None = None) -> torch.Tensor:
    """Triton version of paged_prefill_attention_ref (flash attention over the paged cache)."""
    num_tokens, num_heads, head_dim = q.shape
    out = torch.empty_like(q)
    num_seqs = context_lens.shape[0]
    if num_tokens == 0 or num_seqs == 0:
        return out
    if max_query_len is None:
        max_query_len = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max().item())
    num_kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    block_m = 64 if max_query_len > 32 else 16
    block_n = 64 if head_dim <= 128 else 32
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    grid = (triton.cdiv(max_query_len, block_m), num_heads, num_seqs)
    _prefill_kernel[grid](q, k_cache, v_cache, out, block_tables, cu_seqlens_q, context_lens, q.stride(0), q.stride(1),
                          out.stride(0), out.stride(1), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
                          scale, num_heads // num_kv_heads, BLOCK_SIZE=block_size, HEAD_DIM=head_dim, BLOCK_M=block_m,
                          BLOCK_N=block_n, PRECISION=precision, num_warps=4, num_stages=2)
    return out
