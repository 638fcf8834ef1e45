"""Megatron-style tensor-parallel layers. Each rank holds a slice of the weights and reads only that
slice from the checkpoint (`load_checkpoint` gets a lazy tensor and reads its part).

- ColumnParallelLinear: output features split (each merged shard -- q/k/v, gate/up -- split on its
  own), no communication; the activations stay split for the next layer.
- RowParallelLinear: input features split, one all-reduce of the partial outputs. Its bias is held by
  tensor rank 0 alone, so that the sum adds it once.
- VocabParallelEmbedding / ParallelLMHead: vocabulary rows split into equal shards (the last padded
  with zero rows); a lookup masks the ids of other shards and all-reduces, the LM head's logits are
  gathered on every rank (each rank samples the same tokens from the same logits, so each keeps the
  sampled tokens on its own device for the next step's inputs).

With one rank they are the plain layers (same parameters, same names, no communication).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from engine.distributed.collectives import tp_all_gather, tp_all_reduce
from engine.distributed.state import SINGLE, ParallelRank
from engine.layers.linear import Linear


@dataclass(frozen=True)
class Slice:
    """Rows [start, start + size) of a full dimension."""
    start: int
    size: int


def even_slice(full: int, par: ParallelRank) -> Slice:
    if full % par.tp_size:
        raise ValueError(f"{full} features do not split evenly over tensor_parallel_size={par.tp_size}")
    size = full // par.tp_size
    return Slice(par.tp_rank * size, size)


def head_slice(num_heads: int, head_dim: int, par: ParallelRank) -> Slice:
    """The heads this rank holds, in features. Fewer heads than ranks (KV heads under GQA): each head is
    replicated on tp_size / num_heads consecutive ranks, so every rank holds the head its queries use."""
    if num_heads >= par.tp_size:
        s = even_slice(num_heads, par)
        return Slice(s.start * head_dim, s.size * head_dim)
    if par.tp_size % num_heads:
        raise ValueError(f"{num_heads} KV heads cannot be replicated evenly over tensor_parallel_size={par.tp_size}")
    head = par.tp_rank // (par.tp_size // num_heads)
    return Slice(head * head_dim, head_dim)


class LazyTensor:
    """A checkpoint tensor not read yet (a safetensors slice, or a tensor already in memory)."""

    def __init__(self, source, shape: tuple[int, ...]):
        self.source = source
        self.shape = tuple(shape)

    @staticmethod
    def of(tensor: torch.Tensor) -> LazyTensor:
        return LazyTensor(tensor, tensor.shape)

    def read(self, dim: int | None = None, part: Slice | None = None) -> torch.Tensor:
        """The whole tensor, or `part` of dimension `dim` (0 or 1): only that part is read from disk."""
        if dim is None:
            return self.source[:]
        end = min(part.start + part.size, self.shape[dim])
        index = (slice(part.start, end),) if dim == 0 else (slice(None), slice(part.start, end))
        return self.source[index]


def _copy_rows(param: torch.Tensor, tensor: torch.Tensor, name: str) -> None:
    """Copy a (possibly short: the vocabulary's last shard) slice into the leading rows of a parameter."""
    if tensor.shape[1:] != param.shape[1:] or tensor.shape[0] > param.shape[0]:
        raise ValueError(f"checkpoint slice of shape {tuple(tensor.shape)} does not fit {name} {tuple(param.shape)}")
    param.data[:tensor.shape[0]].copy_(tensor)


class ColumnParallelLinear(Linear):
    """Output features split over the ranks: shard i holds `slices[i]` of the full shard i."""

    def __init__(self, in_features: int, full_sizes: list[int], par: ParallelRank = SINGLE, bias: bool = False,
                 method=None, slices: list[Slice] | None = None):
        self.slices = slices or [even_slice(n, par) for n in full_sizes]
        super().__init__(in_features, [s.size for s in self.slices], bias=bias, method=method)
        self.par = par

    def load_checkpoint(self, param_name: str, shard: int, tensor: LazyTensor) -> None:
        self.load_shard(param_name, shard, tensor.read(0, self.slices[shard]))


def qkv_parallel_linear(hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int, par: ParallelRank,
                        bias: bool, method=None) -> ColumnParallelLinear:
    q = head_slice(num_heads, head_dim, par)
    kv = head_slice(num_kv_heads, head_dim, par)
    return ColumnParallelLinear(hidden_size, [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim],
                                par, bias, method=method, slices=[q, kv, kv])


class RowParallelLinear(Linear):
    """Input features split over the ranks; the partial outputs are summed (one all-reduce)."""

    def __init__(self, full_in_features: int, out_features: int, par: ParallelRank = SINGLE, bias: bool = False,
                 method=None):
        self.in_slice = even_slice(full_in_features, par)
        super().__init__(self.in_slice.size, [out_features], bias=bias and par.tp_rank == 0, method=method)
        self.par = par

    def forward(self, x: torch.Tensor, lora=None) -> torch.Tensor:
        return tp_all_reduce(super().forward(x, lora), self.par)

    def load_checkpoint(self, param_name: str, shard: int, tensor: LazyTensor) -> None:
        if param_name == "bias":
            if self.bias is not None:  # tensor rank 0 only
                self.load_shard("bias", 0, tensor.read())
            return
        self.load_shard(param_name, shard, tensor.read(1, self.in_slice))


def vocab_shard(vocab_size: int, par: ParallelRank) -> Slice:
    """This rank's rows of the (padded) vocabulary: equal shards of ceil(vocab / tp) rows."""
    size = -(-vocab_size // par.tp_size)
    return Slice(par.tp_rank * size, size)


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, par: ParallelRank = SINGLE):
        super().__init__()
        self.par = par
        self.shard = vocab_shard(vocab_size, par)
        self.weight = nn.Parameter(torch.zeros(self.shard.size, hidden_size), requires_grad=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.par.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.shard.start
        outside = (local < 0) | (local >= self.shard.size)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out.masked_fill_(outside.unsqueeze(-1), 0)
        return tp_all_reduce(out, self.par)

    def load_checkpoint(self, param_name: str, shard: int, tensor: LazyTensor) -> None:
        _copy_rows(self.weight, tensor.read(0, self.shard), "embedding weight")


class ParallelLMHead(Linear):
    """The vocabulary projection, rows split like VocabParallelEmbedding (so the two can be tied)."""

    def __init__(self, hidden_size: int, vocab_size: int, par: ParallelRank = SINGLE):
        self.shard = vocab_shard(vocab_size, par)
        super().__init__(hidden_size, [self.shard.size], bias=False)
        self.par = par
        self.vocab_size = vocab_size

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[rows, vocab] float32 on every rank (the padding columns cut off)."""
        return tp_all_gather(self(hidden).float(), self.par)[:, :self.vocab_size]

    def load_checkpoint(self, param_name: str, shard: int, tensor: LazyTensor) -> None:
        _copy_rows(self.weight, tensor.read(0, self.shard), "lm_head weight")
