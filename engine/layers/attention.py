"""Attention over the paged KV cache, and the per-step metadata that drives it."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kernels import kv_cache as kv_kernels
from kernels import paged_attention as decode_kernels
from kernels import prefill_attention as prefill_kernels


@dataclass
class AttentionMetadata:
    """The step's batch, flattened: sequence i owns query rows cu_seqlens_q[i]:cu_seqlens_q[i+1].
    The first `num_decode_seqs` sequences feed one token each and go to the decode kernel; the
    rest (prefill chunks) go to the prefill kernel."""
    slot_mapping: torch.Tensor  # [num_tokens] int64: cache slot for each new token's K/V (-1: skip)
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32
    context_lens: torch.Tensor  # [num_seqs] int32: tokens in cache after this step
    cu_seqlens_q: torch.Tensor  # [num_seqs + 1] int32
    num_decode_seqs: int
    max_query_len: int
    max_context_len: int  # an upper bound; CUDA graphs pass max_model_len

    @property
    def num_seqs(self) -> int:
        return self.context_lens.shape[0]


class Attention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int):
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = head_dim ** -0.5
        # Set by the model runner once the cache is allocated: [num_blocks, block_size, kv_heads, head_dim].
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """q: [tokens, heads, head_dim]; k, v: [tokens, kv_heads, head_dim]."""
        on_gpu = q.is_cuda
        store = kv_kernels.store_kvcache if on_gpu else kv_kernels.store_kvcache_ref
        store(k, v, self.k_cache, self.v_cache, meta.slot_mapping)
        nd = meta.num_decode_seqs
        if nd == meta.num_seqs:  # a pure decode step (every CUDA-graph step)
            return self._decode(q, meta.block_tables, meta.context_lens, meta.max_context_len, on_gpu)
        out = torch.empty_like(q)
        if nd:
            out[:nd] = self._decode(q[:nd], meta.block_tables[:nd], meta.context_lens[:nd], meta.max_context_len,
                                    on_gpu)
        cu = meta.cu_seqlens_q[nd:] - nd  # decode rows come first, one token each
        if on_gpu:
            out[nd:] = prefill_kernels.paged_prefill_attention(
                q[nd:], self.k_cache, self.v_cache, meta.block_tables[nd:], cu, meta.context_lens[nd:], self.scale,
                max_query_len=meta.max_query_len)
        else:
            out[nd:] = prefill_kernels.paged_prefill_attention_ref(
                q[nd:], self.k_cache, self.v_cache, meta.block_tables[nd:], cu, meta.context_lens[nd:], self.scale)
        return out

    def _decode(self, q, block_tables, context_lens, max_context_len, on_gpu):
        if on_gpu:
            return decode_kernels.paged_decode_attention(q, self.k_cache, self.v_cache, block_tables, context_lens,
                                                         self.scale, max_context_len=max_context_len)
        return decode_kernels.paged_decode_attention_ref(q, self.k_cache, self.v_cache, block_tables, context_lens,
                                                         self.scale)
