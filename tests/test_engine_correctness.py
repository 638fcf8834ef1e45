"""The engine's greedy output equals transformers' token for token, whatever the batching."""
import pytest
import torch

from engine import LLM, SamplingParams
from engine.presets import PRESETS
from tests.engine_helpers import hf_greedy, hf_model, model_dir, random_prompts, shared_prefix_prompts

MODELS = ["tiny", "tiny-llama", "random-qwen2", "random-llama"]
NEW_TOKENS = 20
GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)

SETTINGS = {
    "plain": {},
    "chunked-small": {"max_num_batched_tokens": 16, "max_num_seqs": 4},
    "preempting": {"num_gpu_blocks_override": 14, "block_size": 16, "max_model_len": 160, "max_num_seqs": 8},
    "prefix-cache": {"enable_prefix_caching": True, "block_size": 16},
}


def vocab_of(name: str) -> int:
    return hf_model(name).config.vocab_size


def prompts_for(name: str, setting: str) -> list[list[int]]:
    vocab = min(vocab_of(name), 4000)
    if setting == "prefix-cache":
        return shared_prefix_prompts(8, vocab, prefix_len=40) + random_prompts(2, vocab, seed=3)
    return random_prompts(9, vocab, seed=1)


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("name", MODELS)
def test_greedy_matches_transformers(name, setting):
    prompts = prompts_for(name, setting)
    expected = [hf_greedy(name, p, NEW_TOKENS) for p in prompts]
    llm = LLM(str(model_dir(name)), dtype="float32", **SETTINGS[setting])
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    got = [o.outputs[0].token_ids for o in outs]
    for i, (g, e) in enumerate(zip(got, expected)):
        assert g == e, f"prompt {i} (len {len(prompts[i])}) diverges from transformers"
    stats = llm.llm_engine.get_stats()
    if setting == "preempting":
        assert stats.num_preemptions_total > 0, "the small cache was meant to force preemption"
    if setting == "prefix-cache":
        assert stats.prefix_cache_hits_total >= 2 * 16, "shared 40-token prefixes should hit two blocks"
    if setting == "chunked-small":
        assert stats.num_steps_total > NEW_TOKENS + 5, "prompts longer than the budget must take several steps"
    assert stats.kv_cache_usage == 0.0 and stats.num_running == 0 and stats.num_waiting == 0


@pytest.mark.parametrize("name", MODELS)
def test_prefill_logits_match_transformers(name):
    llm = LLM(str(model_dir(name)), dtype="float32")
    engine = llm.llm_engine
    prompts = random_prompts(5, min(vocab_of(name), 4000), seed=5, lo=1, hi=70)
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, SamplingParams(max_tokens=1))
    step = engine.scheduler.schedule()
    inputs, logits = engine.runner.forward_step(step.plan)  # one logits row per batch row
    assert inputs.samples.all() and len(logits) == len(prompts)
    model = hf_model(name)
    for rid, row in zip(engine.runner.batch.req_ids, logits):
        with torch.no_grad():
            ref = model(torch.tensor([prompts[int(rid)]])).logits[0, -1]
        rel = (row - ref).norm() / ref.norm()
        assert rel < 1e-3, f"relative error {rel:.2e}"
    engine.abort_request([str(i) for i in range(len(prompts))])


def test_presets_have_decisive_logits():
    """Greedy comparisons are only meaningful when the top-1 token is clear of the runner-up."""
    model = hf_model("tiny")
    prompt = torch.tensor([random_prompts(1, 4000, seed=9, lo=30, hi=30)[0]])
    with torch.no_grad():
        logits = model(prompt).logits[0]
    top2 = logits.topk(2, dim=-1).values
    assert (top2[:, 0] - top2[:, 1]).median() > 1e-3
    assert "tiny" in PRESETS
