"""Decode attention over the paged KV cache: one new query token per sequence."""
import torch


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` cached tokens of one sequence: [length, num_kv_heads, head_dim]."""
    block_size = cache.shape[1]
    num_blocks = (length + block_size - 1) // block_size
    return cache[block_table[:num_blocks].long()].flatten(0, 1)[:length]


def paged_decode_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """q: [num_seqs, num_heads, head_dim]; block_tables: [num_seqs, max_blocks] int32;
    context_lens: [num_seqs] (tokens in cache, the new one included). Returns [num_seqs, num_heads, head_dim]."""
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    block_size = k_cache.shape[1]
    max_len = int(context_lens.max().item()) if num_seqs else 0
    num_blocks = (max_len + block_size - 1) // block_size
    # Gather every sequence's blocks at once: [num_seqs, max_len, kv_heads, head_dim].
    table = block_tables[:, :num_blocks].long().clamp(min=0)
    keys = k_cache[table].flatten(1, 2)[:, :max_len].float()
    values = v_cache[table].flatten(1, 2)[:, :max_len].float()
    keys = keys.repeat_interleave(group, dim=2)
    values = values.repeat_interleave(group, dim=2)
    positions = torch.arange(max_len, device=q.device)
    beyond = positions[None, :] >= context_lens[:, None]  # [num_seqs, max_len]
    # Slots past a sequence's end hold whatever the cache had (possibly NaN bits): zero them so that a
    # masked position contributes exactly nothing (0 * NaN would still be NaN).
    values = values.masked_fill(beyond[:, :, None, None], 0.0)
    scores = torch.einsum("shd,slhd->shl", q.float(), keys.masked_fill(beyond[:, :, None, None], 0.0)) * scale
    scores.masked_fill_(beyond[:, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("shl,slhd->shd", probs, values).to(q.dtype)
