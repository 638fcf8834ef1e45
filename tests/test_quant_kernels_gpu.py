"""The quantized GEMM kernels at Qwen2.5-7B's MLP shapes on the GPU, eager and replayed from a CUDA graph."""
import pytest
import torch

from kernels import quant_gemm as qg
from tests.test_quant_kernels import random_quantized

pytestmark = pytest.mark.gpu

MLP_7B = [(3584, 18944), (18944, 3584)]  # gate/up (K, N) and down


def assert_close_bf16(out, ref):
    """bf16 output (and, on the tensor-core path, bf16 weights): relative error of a few 2**-9 roundings."""
    rel = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    assert rel < 1e-2, rel
    assert out.dtype == ref.dtype and out.shape == ref.shape


@pytest.mark.parametrize("k,n", MLP_7B)
@pytest.mark.parametrize("m", [1, 8, 64, 512])
def test_w4a16_mlp_shapes(k, n, m):
    qweight, scales, qzeros, _ = random_quantized(k, n, 4, 128, dtype=torch.bfloat16, device="cuda")
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    assert_close_bf16(qg.quant_matmul(x, qweight, scales, qzeros, 4, 128),
                      qg.quant_matmul_reference(x, qweight, scales, qzeros, 4, 128))


@pytest.mark.parametrize("bits,group_size,shuffled", [(8, 128, False), (4, 32, False), (4, -1, False),
                                                      (4, 128, True), (8, 128, True)])
@pytest.mark.parametrize("m", [1, 8, 64])
def test_other_formats_at_7b_shape(bits, group_size, shuffled, m):
    k, n = MLP_7B[0]
    gs = k if group_size == -1 else group_size
    qweight, scales, qzeros, g_idx = random_quantized(k, n, bits, gs, shuffled, dtype=torch.float16, device="cuda")
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    assert_close_bf16(qg.quant_matmul(x, qweight, scales, qzeros, bits, gs, g_idx),
                      qg.quant_matmul_reference(x, qweight, scales, qzeros, bits, gs, g_idx))


@pytest.mark.parametrize("m", [1, 8, 64])
@pytest.mark.parametrize("shuffled", [False, True], ids=["in-order", "g_idx"])
def test_cuda_graph_replay(m, shuffled):
    """Captured once, replayed on new activations: the split-K workspace and the sum are inside the graph."""
    k, n = MLP_7B[1]
    qweight, scales, qzeros, g_idx = random_quantized(k, n, 4, 128, shuffled, dtype=torch.bfloat16, device="cuda")
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # compile outside the capture
        qg.quant_matmul(x, qweight, scales, qzeros, 4, 128, g_idx)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = qg.quant_matmul(x, qweight, scales, qzeros, 4, 128, g_idx)
    for seed in range(3):
        x.copy_(torch.randn(m, k, generator=torch.Generator(device="cuda").manual_seed(seed), device="cuda"))
        graph.replay()
        assert_close_bf16(y, qg.quant_matmul_reference(x, qweight, scales, qzeros, 4, 128, g_idx))


def test_repeated_calls_are_deterministic():
    """Split-K partials are summed in a fixed order (no atomics): the same input gives the same bits."""
    k, n = MLP_7B[1]
    qweight, scales, qzeros, _ = random_quantized(k, n, 4, 128, dtype=torch.bfloat16, device="cuda")
    x = torch.randn(8, k, device="cuda", dtype=torch.bfloat16)
    first = qg.quant_matmul(x, qweight, scales, qzeros, 4, 128)
    assert all(torch.equal(first, qg.quant_matmul(x, qweight, scales, qzeros, 4, 128)) for _ in range(3))
