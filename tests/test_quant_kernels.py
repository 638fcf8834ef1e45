"""The quantized GEMM kernels (kernels/quant_gemm.py) against their torch reference on small odd shapes
under Triton's CPU interpreter, and the int32 packing against hand-worked words."""
import os

import pytest
import torch

triton = pytest.importorskip("triton")  # tests/conftest.py turns on its CPU interpreter when there is no GPU

from kernels import quant_gemm as qg  # noqa: E402 (after the importorskip)

ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
DEVICE = "cuda" if ON_GPU else "cpu"


def random_quantized(k, n, bits, group_size, shuffled_groups=False, dtype=torch.float32, seed=0, device=DEVICE):
    """Random q, z, s packed as the contract says; g_idx a permutation of the groups (GPTQ desc_act)."""
    gen = torch.Generator().manual_seed(seed)
    groups = -(-k // group_size)
    q = torch.randint(0, 1 << bits, (k, n), generator=gen)
    z = torch.randint(0, 1 << bits, (groups, n), generator=gen)
    s = (torch.rand(groups, n, generator=gen) * 0.02 + 0.001).to(dtype)
    g_idx = None
    if shuffled_groups:
        g_idx = (torch.arange(k) // group_size)[torch.randperm(k, generator=gen)].to(torch.int32).to(device)
    return (qg.pack_along_k(q, bits).to(device), s.to(device), qg.pack_along_n(z, bits).to(device), g_idx)


def assert_matches(out, ref):
    """fp32: rounding only. fp16: the tensor-core path rounds W to fp16 before its dot (2**-11)."""
    tol = 1e-5 if ref.dtype == torch.float32 else 4e-3
    scale = ref.float().abs().max().item()
    assert out.dtype == ref.dtype and out.shape == ref.shape
    torch.testing.assert_close(out.float(), ref.float(), atol=tol * scale, rtol=tol)


# ----------------------------------------------------------------------------- packing, by hand
def test_pack_along_k_hand_worked():
    # Column 0 holds k = 0..7 -> 1..8: nibble k of the word is q[k], so the word reads 0x87654321
    # (above 2**31: stored as the int32 0x87654321 - 2**32). Column 1: only k = 0 (15); column 2: only k = 7.
    q = torch.zeros(8, 3, dtype=torch.int32)
    q[:, 0] = torch.arange(1, 9)
    q[0, 1] = 15
    q[7, 2] = 15
    expected = torch.tensor([[0x87654321 - (1 << 32), 0x0000000F, 0xF0000000 - (1 << 32)]], dtype=torch.int32)
    assert torch.equal(qg.pack_along_k(q, 4), expected)
    assert torch.equal(qg.unpack_along_k(expected, 4), q)


def test_pack_8bit_hand_worked():
    # 8-bit: four bytes per word, k = 0 in the low byte. [1, 2, 3, 4] -> 0x04030201, [255, 0, 0, 128] -> 0x800000FF.
    q = torch.tensor([[1, 255], [2, 0], [3, 0], [4, 128]], dtype=torch.int32)
    expected = torch.tensor([[0x04030201, 0x800000FF - (1 << 32)]], dtype=torch.int32)
    assert torch.equal(qg.pack_along_k(q, 8), expected)
    assert torch.equal(qg.unpack_along_k(expected, 8), q)


def test_pack_along_n_hand_worked():
    # Zero points pack along N: z[g, n] sits in word n // 8 at nibble n % 8.
    z = torch.tensor([[8, 7, 6, 5, 4, 3, 2, 1, 0, 0, 0, 0, 0, 0, 0, 9]], dtype=torch.int32)
    expected = torch.tensor([[0x12345678, 0x90000000 - (1 << 32)]], dtype=torch.int32)
    assert torch.equal(qg.pack_along_n(z, 4), expected)
    assert torch.equal(qg.unpack_along_n(expected, 4), z)
    assert torch.equal(qg.pack_along_n(torch.tensor([[0x11, 0x22, 0x33, 0xAB]]), 8),
                       torch.tensor([[0xAB332211 - (1 << 32)]], dtype=torch.int32))


@pytest.mark.parametrize("bits", [4, 8])
def test_pack_round_trips(bits):
    gen = torch.Generator().manual_seed(bits)
    q = torch.randint(0, 1 << bits, (64, 24), generator=gen, dtype=torch.int32)
    assert torch.equal(qg.unpack_along_k(qg.pack_along_k(q, bits), bits), q)
    assert torch.equal(qg.unpack_along_n(qg.pack_along_n(q, bits), bits), q)
    assert qg.pack_along_k(q, bits).shape == (64 * bits // 32, 24)
    assert qg.pack_along_n(q, bits).shape == (64, 24 * bits // 32)


def test_pack_refuses_what_does_not_fit():
    with pytest.raises(ValueError, match="bits=3"):
        qg.pack_along_k(torch.zeros(32, 4, dtype=torch.int32), 3)
    with pytest.raises(ValueError, match="outside"):
        qg.pack_along_k(torch.full((8, 1), 16), 4)
    with pytest.raises(ValueError, match="multiple of 8"):
        qg.pack_along_n(torch.zeros(2, 12, dtype=torch.int32), 4)


def test_dequantize_hand_worked():
    # K = 8, one column, group_size 4: groups (z=1, s=0.5) and (z=3, s=2).
    q = torch.tensor([[0], [1], [2], [3], [4], [5], [6], [7]], dtype=torch.int32)
    z = torch.tensor([[1], [3]], dtype=torch.int32)
    s = torch.tensor([[0.5], [2.0]])
    zeros = qg.pack_along_n(torch.cat([z, torch.zeros(2, 7, dtype=torch.int32)], 1), 4)  # N padded to one word
    qweight = qg.pack_along_k(torch.cat([q, torch.zeros(8, 7, dtype=torch.int32)], 1), 4)
    scales = torch.cat([s, torch.ones(2, 7)], 1)
    w = qg.dequantize(qweight, scales, zeros, 4, 4)[:, 0]
    assert w.tolist() == [-0.5, 0.0, 0.5, 1.0, 2.0, 4.0, 6.0, 8.0]
    g_idx = torch.tensor([1, 1, 1, 1, 0, 0, 0, 0], dtype=torch.int32)  # desc_act: the other way round
    assert qg.dequantize(qweight, scales, zeros, 4, 4, g_idx)[:, 0].tolist() == [-6, -4, -2, 0, 1.5, 2, 2.5, 3]


# ----------------------------------------------------------------------------- kernels against the reference
SHAPES = [  # (group_size, K, N): K = 3 groups, or K = one group for -1; N odd multiples of 8
    (32, 96, 40),
    (64, 192, 72),
    (128, 384, 40),
    (-1, 160, 72),
]


@pytest.mark.parametrize("group_size,k,n", SHAPES)
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("shuffled", [False, True], ids=["in-order", "g_idx"])
def test_quant_matmul_matches_reference(group_size, k, n, bits, shuffled):
    gs = k if group_size == -1 else group_size
    for m, dtype in [(1, torch.float16), (3, torch.float32), (17, torch.float16), (33, torch.float32)]:
        qweight, scales, qzeros, g_idx = random_quantized(k, n, bits, gs, shuffled, dtype=dtype, seed=m)
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(dtype).to(DEVICE)
        ref = qg.quant_matmul_reference(x, qweight, scales, qzeros, bits, gs, g_idx)
        assert_matches(qg.quant_matmul(x, qweight, scales, qzeros, bits, gs, g_idx), ref)


@pytest.mark.parametrize("group_size,k,n", SHAPES[:3])
@pytest.mark.parametrize("bits", [4, 8])
def test_split_k_partials_sum_to_reference(group_size, k, n, bits):
    """Both kernels with K split over programs (the decode shapes do it; these tiny ones would not),
    several rows through the GEMV (one program per row), and fp32 scales under fp16 activations."""
    qweight, scales, qzeros, _ = random_quantized(k, n, bits, group_size, seed=7)
    x = torch.randn(2, k, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    ref = qg.quant_matmul_reference(x, qweight, scales, qzeros, bits, group_size)
    assert_matches(qg.gemv_quant_matmul(x, qweight, scales, qzeros, bits, group_size, splits=3), ref)
    assert_matches(qg.dot_quant_matmul(x, qweight, scales, qzeros, bits, group_size, splits=2), ref)
    x16 = x.half()
    ref16 = qg.quant_matmul_reference(x16, qweight, scales, qzeros, bits, group_size)
    assert_matches(qg.gemv_quant_matmul(x16, qweight, scales, qzeros, bits, group_size, splits=2), ref16)


def test_strided_activations():
    qweight, scales, qzeros, _ = random_quantized(128, 40, 4, 32)
    x = torch.randn(5, 256).to(DEVICE)[:, ::2]  # column stride 2: copied once; row stride: passed through
    rows = torch.randn(5, 200).to(DEVICE)[:, :128]
    for act in (x, rows, rows[:1]):
        assert_matches(qg.quant_matmul(act, qweight, scales, qzeros, 4, 32),
                       qg.quant_matmul_reference(act.contiguous(), qweight, scales, qzeros, 4, 32))


def test_zero_rows():
    qweight, scales, qzeros, _ = random_quantized(64, 40, 4, 32)
    out = qg.quant_matmul(torch.empty(0, 64, device=DEVICE), qweight, scales, qzeros, 4, 32)
    assert out.shape == (0, 40)


def test_cpu_without_interpreter_runs_the_reference(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    qweight, scales, qzeros, _ = random_quantized(64, 40, 4, 32, device="cpu")
    x = torch.randn(3, 64)
    assert torch.equal(qg.quant_matmul(x, qweight, scales, qzeros, 4, 32),
                       qg.quant_matmul_reference(x, qweight, scales, qzeros, 4, 32))


def test_out_of_contract_arguments_are_named():
    qweight, scales, qzeros, _ = random_quantized(64, 40, 4, 32, device="cpu")
    x = torch.randn(3, 64)
    with pytest.raises(ValueError, match="bits=3"):
        qg.quant_matmul_reference(x, qweight, scales, qzeros, 3, 32)
    with pytest.raises(ValueError, match="qweight"):
        qg.quant_matmul_reference(torch.randn(3, 72), qweight, scales, qzeros, 4, 32)
    with pytest.raises(ValueError, match="groups of scales"):
        qg.quant_matmul_reference(x, qweight, scales, qzeros, 4, 64)
    with pytest.raises(ValueError, match="group_size=12"):
        qg.quant_matmul_reference(x, qweight, scales, qzeros, 4, 12)
    with pytest.raises(ValueError, match="g_idx"):
        qg.quant_matmul_reference(x, qweight, scales, qzeros, 4, 32, torch.zeros(64, dtype=torch.int64))
    with pytest.raises(ValueError, match="x must be"):
        qg.quant_matmul_reference(x.long(), qweight, scales, qzeros, 4, 32)


def test_split_heuristic_fills_the_gpu_on_7b_shapes():
    """At M = 1 on the 7B MLP shapes the GEMV splits K until about four programs per SM exist, each
    with at least MIN_TILES_PER_SPLIT tiles; a long N needs few splits, a long K many."""
    block_n = qg.GEMV_COLS_PER_THREAD * 32 * qg.GEMV_WARPS
    block_k = qg.GEMV_ROWS * 8
    for k, n in [(3584, 18944), (18944, 3584)]:
        n_blocks = -(-n // block_n)
        splits, per_split = qg.split_k(k // block_k, n_blocks, qg.DECODE_PROGRAMS)
        assert n_blocks * splits >= qg.DECODE_PROGRAMS / 2
        assert per_split >= qg.MIN_TILES_PER_SPLIT and (splits - 1) * per_split < k // block_k
    assert qg.split_k(4, 1000, qg.DECODE_PROGRAMS) == (1, 4)  # enough programs already: no split
