"""The LoRA kernels at real shapes on the GPU (bfloat16; the CPU interpreter cannot do bf16 dots), and
under a captured CUDA graph replayed with a different mix of adapters each time."""
import pytest
import torch

from kernels import lora
from tests.test_lora_kernels import stacked_adapters

pytestmark = pytest.mark.gpu

QWEN_05B = {"qkv": (896, [896, 128, 128]), "o": (896, [896]), "gate_up": (896, [4864, 4864]), "down": (4864, [896])}


@pytest.mark.parametrize("layer", list(QWEN_05B))
@pytest.mark.parametrize("num_tokens", [1, 200, 8192])
def test_real_shapes_bfloat16(layer, num_tokens):
    in_features, slices = QWEN_05B[layer]
    a, b, offsets = stacked_adapters(8, [16, 8, 1, 16, 16, 4, 16, 12], 16, in_features, slices,
                                     dtype=torch.bfloat16)
    a, b = a * 0.05, b * 0.05
    gen = torch.Generator(device="cuda").manual_seed(0)
    slots = torch.randint(-1, 8, (num_tokens,), device="cuda", generator=gen)
    x = torch.randn(num_tokens, in_features, device="cuda", generator=gen).to(torch.bfloat16)
    base = torch.randn(num_tokens, sum(slices), device="cuda", generator=gen).to(torch.bfloat16)
    ref, out = base.clone(), base.clone()
    lora.add_lora_ref(x, a, b, slots, offsets, ref)
    lora.add_lora(x, a, b, lora.lora_indices(slots, 8), torch.tensor(offsets, dtype=torch.int32, device="cuda"),
                  max(slices), out)
    torch.testing.assert_close(out.float(), ref.float(), atol=3e-2, rtol=3e-2)
    assert torch.equal(out[slots < 0], base[slots < 0])


def test_cuda_graph_replays_any_adapter_mix():
    in_features, slices = QWEN_05B["qkv"]
    a, b, offsets = stacked_adapters(4, [16, 8, 16, 1], 16, in_features, slices, dtype=torch.bfloat16)
    bs = 64
    static_slots = torch.full((bs,), -1, dtype=torch.int32, device="cuda")
    idx = lora.lora_indices(static_slots, 4)
    x = torch.randn(bs, in_features, device="cuda").to(torch.bfloat16)
    base = torch.randn(bs, sum(slices), device="cuda").to(torch.bfloat16)
    out = base.clone()
    offsets_t = torch.tensor(offsets, dtype=torch.int32, device="cuda")
    lora.add_lora(x, a, b, idx, offsets_t, max(slices), out)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out.copy_(base)
        lora.add_lora(x, a, b, idx, offsets_t, max(slices), out)
    for seed in range(4):
        slots = torch.randint(-1, 4 if seed else 1, (bs,), device="cuda")
        fresh = lora.lora_indices(slots, 4)
        idx.token_slots.copy_(fresh.token_slots)
        idx.sorted_tokens.copy_(fresh.sorted_tokens)
        idx.slot_starts.copy_(fresh.slot_starts)
        graph.replay()
        ref = base.clone()
        lora.add_lora_ref(x, a, b, slots, offsets, ref)
        torch.testing.assert_close(out.float(), ref.float(), atol=3e-2, rtol=3e-2)
