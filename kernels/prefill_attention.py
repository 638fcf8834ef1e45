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
