"""Every Triton kernel against its torch reference, on small shapes through Triton's CPU interpreter."""
import os
import random

import pytest
import torch

triton = pytest.importorskip("triton")  # tests/conftest.py turns on its CPU interpreter when there is no GPU

from kernels import activation, kv_cache, paged_attention, prefill_attention, rmsnorm, rotary  # noqa: E402

ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
DEVICE = "cuda" if ON_GPU else "cpu"


def paged_setup(lengths, num_kv_heads, head_dim, block_size, dtype=torch.float32, seed=0):
    """A cache whose blocks are handed out in shuffled order, filled with random K/V."""
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [(n + block_size - 1) // block_size for n in lengths]
    total = sum(blocks_per_seq) + 3
    order = list(range(total))
    random.Random(seed).shuffle(order)
    tables, it = [], iter(order)
    for b in blocks_per_seq:
        tables.append([next(it) for _ in range(b)])
    width = max(blocks_per_seq)
    table_t = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=DEVICE)
    shape = (total, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen).to(dtype).to(DEVICE)
    v_cache = torch.randn(shape, generator=gen).to(dtype).to(DEVICE)
    return k_cache, v_cache, table_t


@pytest.mark.parametrize("head_dim,num_heads,num_kv_heads", [(32, 4, 4), (64, 8, 2), (128, 7, 1), (64, 8, 1)])
@pytest.mark.parametrize("block_size", [16, 32])
def test_decode_attention(head_dim, num_heads, num_kv_heads, block_size):
    lengths = [1, 17, 33, 70][: 3 if head_dim == 128 else 4]
    k_cache, v_cache, tables = paged_setup(lengths, num_kv_heads, head_dim, block_size)
    q = torch.randn(len(lengths), num_heads, head_dim, device=DEVICE)
    lens = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
    scale = head_dim ** -0.5
    ref = paged_attention.paged_decode_attention_ref(q, k_cache, v_cache, tables, lens, scale)
    out = paged_attention.paged_decode_attention(q, k_cache, v_cache, tables, lens, scale)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    # A padded upper bound (what CUDA graphs pass) gives the same answer.
    out = paged_attention.paged_decode_attention(q, k_cache, v_cache, tables, lens, scale, max_context_len=200)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


def test_decode_partition_fills_the_gpu():
    assert paged_attention.decode_partition(1, 4, 4096, 64) < 4096  # batch 1 splits the context
    assert paged_attention.decode_partition(256, 8, 4096, 64) == 4096  # big batches need no split


@pytest.mark.parametrize("head_dim,num_heads,num_kv_heads", [(32, 4, 2), (64, 4, 4), (128, 8, 1), (64, 7, 1)])
@pytest.mark.parametrize("block_size", [16, 32])
def test_prefill_attention_with_cached_prefix(head_dim, num_heads, num_kv_heads, block_size):
    # (new tokens, cached prefix) per sequence: plain prefill, odd lengths, chunks behind a prefix.
    shapes = [(5, 0), (19, 13), (1, 40), (33, 16)]
    lengths = [n + p for n, p in shapes]
    k_cache, v_cache, tables = paged_setup(lengths, num_kv_heads, head_dim, block_size, seed=1)
    cu = torch.tensor([0] + list(torch.tensor([n for n, _ in shapes]).cumsum(0)), dtype=torch.int32, device=DEVICE)
    q = torch.randn(int(cu[-1]), num_heads, head_dim, device=DEVICE)
    lens = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
    scale = head_dim ** -0.5
    ref = prefill_attention.paged_prefill_attention_ref(q, k_cache, v_cache, tables, cu, lens, scale)
    out = prefill_attention.paged_prefill_attention(q, k_cache, v_cache, tables, cu, lens, scale)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_store_kvcache(dtype):
    k_cache = torch.zeros(6, 16, 2, 32, dtype=dtype, device=DEVICE)
    v_cache = torch.zeros_like(k_cache)
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    qkv = torch.randn(7, 3 * 2 * 32).to(dtype).to(DEVICE)  # strided views, as the model passes them
    key = qkv[:, :64].view(7, 2, 32)
    value = qkv[:, 64:128].view(7, 2, 32)
    slots = torch.tensor([3, 17, -1, 40, 95, 0, 50], dtype=torch.int64, device=DEVICE)
    kv_cache.store_kvcache_ref(key, value, ref_k, ref_v, slots)
    kv_cache.store_kvcache(key, value, k_cache, v_cache, slots)
    assert torch.equal(k_cache, ref_k) and torch.equal(v_cache, ref_v)


@pytest.mark.parametrize("hidden", [64, 100, 896])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_and_fused_add(hidden, dtype):
    x = torch.randn(5, hidden).to(dtype).to(DEVICE)
    r = torch.randn(5, hidden).to(dtype).to(DEVICE)
    w = (torch.rand(hidden) + 0.5).to(dtype).to(DEVICE)
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    torch.testing.assert_close(rmsnorm.rmsnorm(x, w, 1e-6), rmsnorm.rmsnorm_ref(x, w, 1e-6), **tol)
    out, summed = rmsnorm.fused_add_rmsnorm(x, r, w, 1e-6)
    ref_out, ref_sum = rmsnorm.fused_add_rmsnorm_ref(x, r, w, 1e-6)
    torch.testing.assert_close(out, ref_out, **tol)
    torch.testing.assert_close(summed, ref_sum, **tol)


@pytest.mark.parametrize("rows,d", [(1, 8), (5, 100), (3, 1500)])  # d past one block, and odd
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_and_mul(rows, d, dtype):
    x = (torch.randn(rows, 2 * d) * 4).to(dtype).to(DEVICE)
    expected = activation.silu_and_mul_ref(x)
    # bf16: within one rounding step (the interpreter rounds conversions toward zero, the GPU to nearest).
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-3, "rtol": 1.6e-2}
    torch.testing.assert_close(activation.silu_and_mul(x), expected, **tol)


@pytest.mark.parametrize("head_dim,heads,kv_heads", [(32, 4, 2), (64, 7, 1), (128, 3, 3)])
def test_rotary(head_dim, heads, kv_heads):
    from engine.layers.rotary import RotaryEmbedding

    rope = RotaryEmbedding(head_dim, 300, 1e6, None).to(DEVICE)
    qkv = torch.randn(9, (heads + 2 * kv_heads) * head_dim, device=DEVICE)
    q = qkv[:, :heads * head_dim].view(9, heads, head_dim)
    k = qkv[:, heads * head_dim:(heads + kv_heads) * head_dim].view(9, kv_heads, head_dim)
    pos = torch.tensor([0, 1, 5, 17, 64, 65, 128, 250, 299], device=DEVICE)
    rq, rk = rotary.rotary_ref(pos, q, k, rope.cos_cache, rope.sin_cache)
    tq, tk = rotary.rotary_embedding(pos, q, k, rope.cos_cache, rope.sin_cache)
    torch.testing.assert_close(tq, rq, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tk, rk, atol=1e-5, rtol=1e-5)
