"""Run in the processes that tests/test_parallel.py spawns (importable, so spawn can find them)."""
from __future__ import annotations

import torch
import torch.distributed as dist

from engine.distributed.state import init_distributed
from engine.layers.linear import Linear
from engine.layers.parallel import (
    ColumnParallelLinear,
    LazyTensor,
    ParallelLMHead,
    RowParallelLinear,
    VocabParallelEmbedding,
    qkv_parallel_linear,
)


def _loaded(layer, full: Linear, shards: list[int] | None = None):
    """`layer` loaded from the full layer's tensors, as from a checkpoint (each merged shard on its own)."""
    offsets = [0]
    for size in full.out_sizes:
        offsets.append(offsets[-1] + size)
    for name in ("weight", "bias"):
        tensor = getattr(full, name, None)
        if tensor is None:
            continue
        for i in shards or [0]:
            part = tensor[offsets[i]:offsets[i + 1]] if shards else tensor
            layer.load_checkpoint(name, i, LazyTensor.of(part.clone()))
    return layer


def _full(in_features: int, out_sizes: list[int], bias: bool, seed: int) -> Linear:
    torch.manual_seed(seed)
    layer = Linear(in_features, out_sizes, bias=bias)
    layer.weight.data.normal_()
    if bias:
        layer.bias.data.normal_()
    return layer


def sharded_layers_match(rank: int, world: int, init_method: str) -> None:
    """Every tensor-parallel layer on 2 gloo ranks against the plain one on the full tensors."""
    par = init_distributed(rank, world, 1, "gloo", init_method, torch.device("cpu"))
    try:
        torch.manual_seed(0)
        x = torch.randn(5, 12)

        # Column-parallel, merged (gate/up): each rank holds its half of each shard.
        full = _full(12, [8, 8], True, 1)
        col = _loaded(ColumnParallelLinear(12, [8, 8], par, bias=True), full, [0, 1])
        want = full(x).split([8, 8], dim=-1)
        got = col(x).split([4, 4], dim=-1)
        for w, g in zip(want, got):
            torch.testing.assert_close(g, w[:, rank * 4:(rank + 1) * 4])

        # QKV with one KV head over two ranks: the KV head is replicated, the 4 query heads split.
        head_dim = 3
        full = _full(12, [4 * head_dim, head_dim, head_dim], True, 2)
        qkv = _loaded(qkv_parallel_linear(12, 4, 1, head_dim, par, True), full, [0, 1, 2])
        q, k, v = full(x).split([4 * head_dim, head_dim, head_dim], dim=-1)
        gq, gk, gv = qkv(x).split([2 * head_dim, head_dim, head_dim], dim=-1)
        torch.testing.assert_close(gq, q[:, rank * 2 * head_dim:(rank + 1) * 2 * head_dim])
        torch.testing.assert_close(gk, k)
        torch.testing.assert_close(gv, v)

        # Row-parallel: the input split, the partial outputs summed; the bias added once.
        full = _full(12, [7], True, 3)
        row = _loaded(RowParallelLinear(12, 7, par, bias=True), full)
        assert (row.bias is not None) == (rank == 0)
        torch.testing.assert_close(row(x[:, rank * 6:(rank + 1) * 6]), full(x), rtol=1e-5, atol=1e-5)

        # Vocabulary-parallel embedding and LM head, 11 rows: the last shard padded; tied weights.
        torch.manual_seed(4)
        table = torch.randn(11, 12)
        emb = VocabParallelEmbedding(11, 12, par)
        emb.load_checkpoint("weight", 0, LazyTensor.of(table))
        ids = torch.tensor([0, 5, 6, 10, 3])
        torch.testing.assert_close(emb(ids), table[ids])
        head = ParallelLMHead(12, 11, par)
        head.weight = emb.weight
        logits = head.logits(x)
        assert logits.shape == (5, 11)
        torch.testing.assert_close(logits, x @ table.T, rtol=1e-5, atol=1e-5)
    finally:
        dist.destroy_process_group()


def kv1_llama_dir():
    """A small untied Llama (varied greedy tokens) with 4 query heads and one KV head, so that under
    tensor_parallel_size=2 the KV head is replicated; 3 layers, so that 2 stages split unevenly."""
    import dataclasses
    from pathlib import Path

    from engine.presets import PRESETS, resolve_model, write_checkpoint

    out = Path(resolve_model("tiny")).parent / "test-tp-llama"
    if not (out / "config.json").exists():
        spec = dataclasses.replace(PRESETS["tiny-llama"], name="tp-llama", hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1,
                                   tie_word_embeddings=False)
        write_checkpoint(spec, out, seed=3)
    return out
