"""Scheduler and block-manager invariants under random load, aborts and preemption."""
import random

import pytest

from engine.block_manager import BlockManager
from engine.config import EngineConfig
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.scheduler_output import RequestSampling
from engine.sequence import Sequence, SequenceStatus


def make_seq(i, tokens, max_tokens=5):
    return Sequence(str(i), tokens, SamplingParams(max_tokens=max_tokens), RequestSampling(), 0.0,
                    max_num_tokens=len(tokens) + max_tokens)


def sample_and_stop(sched, step, token):
    """What output handling does with a step: each sequence that sampled gets `token`; length stops."""
    finished = []
    for seq in step.seqs:
        if seq.num_pending_tokens:
            seq.token_ids.append(token() if callable(token) else token)
            if len(seq.token_ids) >= seq.max_num_tokens:
                sched.finish(seq, "length")
                finished.append(seq)
    return finished


class FakeConfig:
    def __init__(self, **kw):
        self.max_num_seqs = kw.get("max_num_seqs", 4)
        self.max_num_batched_tokens = kw.get("max_num_batched_tokens", 32)
        self.enable_chunked_prefill = kw.get("enable_chunked_prefill", True)
        self.enable_lora = kw.get("enable_lora", False)
        self.max_loras = kw.get("max_loras", 1)
        self.pipeline_parallel_size = kw.get("pipeline_parallel_size", 1)


def test_prefix_hits_counted_exactly():
    bm = BlockManager(num_blocks=16, block_size=4, enable_prefix_caching=True)
    a = make_seq(0, list(range(100, 111)))  # 11 tokens: 2 full blocks + 3
    assert bm.match_prefix(a) == 0
    bm.allocate(a, len(a.token_ids))
    bm.register_full_blocks(a, len(a.token_ids))
    b = make_seq(1, list(range(100, 108)) + [7, 7, 7])  # shares the 2 full blocks
    assert bm.match_prefix(b) == 8
    assert b.block_table == a.block_table[:2]
    assert bm.blocks[a.block_table[0]].ref_count == 2
    c = make_seq(2, list(range(100, 108)))  # exactly 2 blocks: the last token must still be computed
    assert bm.match_prefix(c) == 4
    assert (bm.prefix_queries, bm.prefix_hits) == (11 + 11 + 8, 0 + 8 + 4)
    for s in (a, b, c):
        bm.free(s)
    bm.check_invariants([])
    assert bm.num_free_blocks == 16
    # Freed blocks stay cached until evicted.
    d = make_seq(3, list(range(100, 111)))
    assert bm.match_prefix(d) == 8


def test_lru_eviction_prefers_tail_blocks():
    bm = BlockManager(num_blocks=4, block_size=2, enable_prefix_caching=True)
    a = make_seq(0, [1, 2, 3, 4, 5, 6, 9])
    bm.allocate(a, len(a.token_ids))
    bm.register_full_blocks(a, len(a.token_ids))
    bm.free(a)
    x = make_seq(1, [8])
    bm.allocate(x, 1)  # takes one block: the tail one goes first
    y = make_seq(2, [1, 2, 3, 4, 7])
    assert bm.match_prefix(y) == 4  # the head blocks survived


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("prefix", [False, True])
def test_random_load_never_leaks(seed, prefix):
    rng = random.Random(seed)
    bm = BlockManager(num_blocks=24, block_size=4, enable_prefix_caching=prefix)
    sched = Scheduler(FakeConfig(max_num_seqs=5, max_num_batched_tokens=20), bm)
    live = []
    shared = [rng.randrange(50) for _ in range(9)]
    for i in range(30):
        tokens = (shared if rng.random() < 0.5 else []) + [rng.randrange(50) for _ in range(rng.randint(1, 30))]
        seq = make_seq(i, tokens, max_tokens=rng.randint(1, 12))
        sched.add(seq)
        live.append(seq)
    steps = 0
    while sched.has_unfinished() and steps < 2000:
        steps += 1
        step = sched.schedule()
        assert step.num_tokens <= 20 and len(step.seqs) <= 5
        for seq, _n in zip(step.seqs, step.num_new_tokens):
            assert len(seq.block_table) * 4 >= seq.num_computed_tokens  # advanced by the scheduler itself
            assert seq.num_computed_tokens <= seq.num_tokens
        sample_and_stop(sched, step, lambda: rng.randrange(50))
        if rng.random() < 0.05:  # abort a random live request
            victims = [s for s in live if s.status != SequenceStatus.FINISHED]
            if victims:
                sched.finish(rng.choice(victims), "abort")
        bm.check_invariants([s for s in live if s.status != SequenceStatus.FINISHED])
        assert all(b.ref_count >= 0 for b in bm.blocks)
    assert not sched.has_unfinished(), "the scheduler stalled"
    assert bm.num_free_blocks == bm.num_blocks


def test_small_cache_preempts_newest_and_recovers():
    bm = BlockManager(num_blocks=6, block_size=4, enable_prefix_caching=False)
    sched = Scheduler(FakeConfig(max_num_seqs=3, max_num_batched_tokens=32), bm)
    # 2 blocks each fill the cache; each alone fits (7 + 12 tokens = 5 blocks).
    seqs = [make_seq(i, [1] * 7, max_tokens=12) for i in range(3)]
    for s in seqs:
        sched.add(s)
    finished, victims = [], []
    for _ in range(200):
        if not sched.has_unfinished():
            break
        step = sched.schedule()
        victims += [v.request_id for v in step.preempted]
        finished += [s.request_id for s in sample_and_stop(sched, step, 2)]
    assert sched.num_preemptions > 0
    assert victims[0] == "2"  # the most recently admitted goes first
    assert sorted(finished) == ["0", "1", "2"] and bm.num_free_blocks == 6


def test_only_the_scheduler_advances_progress():
    """num_computed_tokens and num_tokens are read-only on a Sequence: the scheduler's plan is the one
    writer (engine/sequence.py), so no other module can move them."""
    seq = make_seq(0, [1, 2, 3])
    for name in ("num_computed_tokens", "num_tokens"):
        with pytest.raises(AttributeError):
            setattr(seq, name, 2)
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    sched = Scheduler(FakeConfig(), bm)
    sched.add(seq)
    step = sched.schedule()
    assert step.plan.new_requests[0].num_computed_tokens == 0  # the plan holds the state before the step
    assert (seq.num_computed_tokens, seq.num_tokens, seq.num_pending_tokens) == (3, 4, 1)


def test_config_refuses_prompt_budget_without_chunking():
    cfg = EngineConfig(model="x", enable_chunked_prefill=False, max_num_batched_tokens=64, max_model_len=128)

    class HF:
        max_position_embeddings = 2048
    with pytest.raises(ValueError, match="chunked prefill"):
        cfg.resolve(HF())
