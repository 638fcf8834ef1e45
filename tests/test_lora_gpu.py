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


# ---------------------------------------------------------------- the engine on the GPU
def peft_greedy_gpu(model: str, name: str | None, prompts, new_tokens: int, dtype=torch.float32):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tests.engine_helpers import model_dir
    from tests.lora_helpers import adapter_dir

    base = AutoModelForCausalLM.from_pretrained(str(model_dir(model)), dtype=dtype).cuda().eval()
    m = base if name is None else PeftModel.from_pretrained(base, str(adapter_dir(model, name))).cuda().eval()
    out = []
    for p in prompts:
        with torch.no_grad():
            ids = m.generate(input_ids=torch.tensor([p], device="cuda"), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
        out.append(ids[0, len(p):].tolist())
    return out


@pytest.mark.parametrize("enforce_eager", [False, True])
@pytest.mark.parametrize("model", ["tiny", "qwen2.5-0.5b"])
def test_float32_lora_greedy_equals_peft(model, enforce_eager):
    """Mixed adapters and the base, decode steps in CUDA graphs (or eager), Triton LoRA kernels:
    token for token against transformers + PEFT in float32."""
    from engine import LLM, LoRARequest, SamplingParams
    from tests.engine_helpers import random_prompts
    from tests.lora_helpers import adapter_dir

    names = ["qv8", "all16", "mlp4rs", "k1"]
    requests = {n: LoRARequest(n, i + 1, str(adapter_dir(model, n))) for i, n in enumerate(names)}
    prompts = random_prompts(10, 4000, seed=8, lo=5, hi=200)
    under = [names[i % 4] if i % 5 else None for i in range(10)]
    llm = LLM(model, dtype="float32", enforce_eager=enforce_eager, enable_lora=True, max_loras=3, max_cpu_loras=4,
              max_model_len=1024, max_num_seqs=16, max_num_batched_tokens=256, gpu_memory_utilization=0.5,
              enable_prefix_caching=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True), use_tqdm=False,
                        lora_request=[requests[n] if n else None for n in under])
    for name in set(under):
        picked = [i for i, n in enumerate(under) if n == name]
        expected = peft_greedy_gpu(model, name, [prompts[i] for i in picked], 16)
        for i, e in zip(picked, expected):
            assert outs[i].outputs[0].token_ids == e, f"prompt {i} under {name} diverges"


def test_bfloat16_graphs_equal_eager_with_eight_adapters(tmp_path):
    """The 0.5B shape in bfloat16, 8 rank-16 adapters mixed with the base: the CUDA-graph decode path
    gives the same tokens as the eager one (both run the same Triton kernels)."""
    from engine import LLM, LoRARequest, SamplingParams
    from engine.lora.synthetic import write_adapter
    from engine.presets import resolve_model
    from tests.engine_helpers import random_prompts

    base = resolve_model("qwen2.5-0.5b", with_weights=False)
    requests = [LoRARequest(f"a{i}", i + 1, str(write_adapter(base, tmp_path / f"a{i}", 16, seed=i)))
                for i in range(8)]
    prompts = random_prompts(32, 4000, seed=1, lo=5, hi=300)
    under = [requests[i % 9] if i % 9 < 8 else None for i in range(32)]
    results = []
    for eager in (False, True):
        llm = LLM("qwen2.5-0.5b", load_format="dummy", dtype="bfloat16", enforce_eager=eager, enable_lora=True,
                  max_loras=8, max_num_seqs=32, max_model_len=1024, gpu_memory_utilization=0.4)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                            SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True), use_tqdm=False,
                            lora_request=under)
        results.append([o.outputs[0].token_ids for o in outs])
        llm.llm_engine.shutdown()
    same = sum(a == b for a, b in zip(*results))
    assert same >= 30, f"only {same} of 32 prompts agree between graphs and eager"
