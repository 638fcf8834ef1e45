"""Speculative decoding in the engine: greedy output identical to the plain engine token for token
(n-gram, a draft model that is the target itself, a different draft model) under continuous
batching, chunked prefill, prefix caching and preemption; acceptance when the draft is the target;
stops inside an accepted run; the block pools' invariants after rejections; the metrics."""
import random
from functools import cache

import pytest

from engine import LLM, SamplingParams
from engine.config import ConfigError
from engine.presets import PRESETS, resolve_model, write_checkpoint

K = 3
NEW_TOKENS = 1 + 3 * (K + 1)  # the prefill's token, then three steps of k + 1 when every draft is accepted
GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
# Chunked prefill (prompts span several steps), prefix caching (a shared 32-token head) and a KV cache
# small enough that the batch preempts.
TIGHT = {"max_num_batched_tokens": 32, "max_num_seqs": 4, "enable_prefix_caching": True,
         "num_gpu_blocks_override": 10, "block_size": 16, "max_model_len": 160}


@cache
def other_draft() -> str:
    """The tiny preset's shapes with other random weights: a draft that is mostly rejected."""
    out = resolve_model("tiny").parent / "test-tiny-seed7"
    if not (out / "config.json").exists():
        write_checkpoint(PRESETS["tiny"], out, seed=7)
    return str(out)


PROPOSERS = {
    "ngram": lambda: {"method": "ngram", "num_speculative_tokens": K, "prompt_lookup_min": 1},
    "draft-self": lambda: {"model": "tiny", "num_speculative_tokens": K},
    "draft-other": lambda: {"model": other_draft(), "num_speculative_tokens": K},
}


def prompts() -> list[list[int]]:
    """Copy-heavy prompts (a phrase repeated, so that n-gram drafts are found) behind a shared head."""
    rng = random.Random(0)
    head = [rng.randrange(10, 4000) for _ in range(32)]
    out = []
    for _ in range(3):
        phrase = [rng.randrange(10, 4000) for _ in range(6)]
        out.append(head + phrase * 3 + [rng.randrange(10, 4000) for _ in range(rng.randint(1, 4))])
    out.append([rng.randrange(10, 4000) for _ in range(20)])
    return out


@cache
def reference() -> tuple:
    llm = LLM("tiny", dtype="float32")
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts()], GREEDY, use_tqdm=False)
    return tuple(tuple(o.outputs[0].token_ids) for o in outs)


def run_checked(llm: LLM, params: SamplingParams) -> list[list[int]]:
    """Generate step by step, checking the block pools' invariants after every step."""
    engine = llm.llm_engine
    core = engine.core
    ids = [f"r{i}" for i in range(len(prompts()))]
    for rid, p in zip(ids, prompts()):
        engine.add_request(rid, p, params)
    got = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                got[out.request_id] = list(out.outputs[0].token_ids)
        core.block_manager.check_invariants(core.scheduler.running)
        core.runner.batch.check()
        draft = core.executor.worker.draft
        if draft is not None:
            draft.blocks.check_invariants(list(draft.states.values()))
    core.step()  # the finished requests' rows (and draft blocks) are dropped with the next plan
    bm = core.block_manager
    assert bm.num_free_blocks == bm.num_blocks, "a block leaked"
    draft = core.executor.worker.draft
    if draft is not None:
        assert not draft.states and draft.blocks.num_free_blocks == draft.blocks.num_blocks, "a draft block leaked"
    return [got[r] for r in ids]


@pytest.mark.parametrize("setting", ["plain", "tight"])
@pytest.mark.parametrize("proposer", PROPOSERS)
def test_greedy_output_identical_to_plain_engine(proposer, setting):
    llm = LLM("tiny", dtype="float32", speculative_config=PROPOSERS[proposer](),
              **(TIGHT if setting == "tight" else {}))
    got = run_checked(llm, GREEDY)
    for i, (g, e) in enumerate(zip(got, reference())):
        assert g == list(e), f"prompt {i} diverges from the plain engine"
    stats = llm.llm_engine.get_stats()
    assert stats.spec_decode_num_drafts_total > 0
    if setting == "tight":
        assert stats.num_preemptions_total > 0, "the small cache was meant to force preemption"
        assert stats.prefix_cache_hits_total >= 32
    if proposer != "draft-self":  # rejections happened, so the rollback ran
        assert stats.spec_decode_num_accepted_tokens_total < stats.spec_decode_num_draft_tokens_total


def test_draft_equal_to_target_accepts_everything():
    llm = LLM("tiny", dtype="float32", speculative_config=PROPOSERS["draft-self"]())
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts()[:2]], GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [list(r) for r in reference()[:2]]
    s = llm.llm_engine.get_stats()
    assert s.num_steps_total == 1 + 3, "tokens per target forward must be k + 1"
    assert s.spec_decode_num_drafts_total == 2 * 3
    assert s.spec_decode_num_accepted_tokens_total == s.spec_decode_num_draft_tokens_total == 2 * 3 * K
    assert s.spec_decode_num_accepted_tokens_per_pos == [2 * 3] * K


def test_stops_inside_an_accepted_run():
    """EOS / stop ids and max_tokens cut an accepted run where the plain engine would stop."""
    plain = LLM("tiny", dtype="float32")
    spec = LLM("tiny", dtype="float32", speculative_config=PROPOSERS["draft-self"]())
    # A prompt whose output has a token first seen past its first accepted run's start.
    i, at = next((i, at) for i, ref in enumerate(reference()) for at in range(2, len(ref))
                 if ref[at] not in ref[:at])
    stop = reference()[i][at]
    cases = [SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, stop_token_ids=[stop]),
             SamplingParams(temperature=0.0, max_tokens=at + 1, ignore_eos=True)]
    for params in cases:
        a = plain.generate({"prompt_token_ids": prompts()[i]}, params, use_tqdm=False)[0].outputs[0]
        b = spec.generate({"prompt_token_ids": prompts()[i]}, params, use_tqdm=False)[0].outputs[0]
        assert (b.token_ids, b.finish_reason) == (a.token_ids, a.finish_reason)
        assert len(b.token_ids) == at + 1


def test_seeded_sampling_is_reproducible():
    llm = LLM("tiny", dtype="float32", speculative_config=PROPOSERS["ngram"]())
    p = {"prompt_token_ids": prompts()[0]}
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=123, max_tokens=12, ignore_eos=True)
    alone = llm.generate(p, params, use_tqdm=False)[0].outputs[0].token_ids
    crowd = llm.generate([p, {"prompt_token_ids": prompts()[1]}, {"prompt_token_ids": prompts()[2]}],
                         [params, SamplingParams(temperature=0.8, max_tokens=12), GREEDY], use_tqdm=False)
    assert crowd[0].outputs[0].token_ids == alone


def test_mismatched_draft_vocabulary_is_refused():
    with pytest.raises(ConfigError, match="vocab_size"):
        LLM("tiny", load_format="dummy", speculative_config={"model": "qwen2.5-0.5b", "num_speculative_tokens": 2})
