"""The Triton kernels against their references at realistic shapes, on the GPU."""
import pytest
import torch

from kernels import activation, paged_attention, prefill_attention
from tests.test_kernels import paged_setup

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(28, 4, 128), (14, 2, 64), (32, 8, 128)])
def test_decode_realistic(num_heads, num_kv_heads, head_dim):
    lengths = [4096] * 8 + [1, 15, 17, 1000, 3001, 4095] * 4
    k_cache, v_cache, tables = paged_setup(lengths, num_kv_heads, head_dim, 16, dtype=torch.bfloat16)
    q = torch.randn(len(lengths), num_heads, head_dim, device="cuda", dtype=torch.bfloat16)
    lens = torch.tensor(lengths, dtype=torch.int32, device="cuda")
    ref = paged_attention.paged_decode_attention_ref(q, k_cache, v_cache, tables, lens, head_dim ** -0.5)
    out = paged_attention.paged_decode_attention(q, k_cache, v_cache, tables, lens, head_dim ** -0.5,
                                                 max_context_len=8192)
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(28, 4, 128), (14, 2, 64)])
def test_prefill_realistic(num_heads, num_kv_heads, head_dim):
    shapes = [(512, 0), (300, 700), (1, 2000), (1000, 24)]
    lengths = [n + p for n, p in shapes]
    k_cache, v_cache, tables = paged_setup(lengths, num_kv_heads, head_dim, 16, dtype=torch.bfloat16)
    cu = torch.tensor([0] + list(torch.tensor([n for n, _ in shapes]).cumsum(0)), dtype=torch.int32, device="cuda")
    q = torch.randn(int(cu[-1]), num_heads, head_dim, device="cuda", dtype=torch.bfloat16)
    lens = torch.tensor(lengths, dtype=torch.int32, device="cuda")
    ref = prefill_attention.paged_prefill_attention_ref(q, k_cache, v_cache, tables, cu, lens, head_dim ** -0.5)
    out = prefill_attention.paged_prefill_attention(q, k_cache, v_cache, tables, cu, lens, head_dim ** -0.5)
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("rows", [1, 64, 8192])
def test_silu_and_mul_realistic(rows):  # Qwen2.5-7B's intermediate size
    x = (torch.randn(rows, 2 * 18944, device="cuda") * 4).to(torch.bfloat16)
    out, ref = activation.silu_and_mul(x), activation.silu_and_mul_ref(x)
    torch.testing.assert_close(out, ref, atol=1e-3, rtol=1.6e-2)  # one bf16 rounding step (exp differs)
    assert (out == ref).float().mean() > 0.99
