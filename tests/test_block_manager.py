"""Scheduler and block-manager invariants under random load, aborts and preemption."""
import random

import pytest

from engine.block_manager import BlockManager
from engine.config import EngineConfig
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import Sequence, SequenceStatus


def make_seq(i, tokens, max_tokens=5):
    return Sequence(str(i), 0, tokens, SamplingParams(max_tokens=max_tokens), 0.0, None)


class FakeConfig:
    def __init__(self, **kw):
        self.max_num_seqs = kw.get("max_num_seqs", 4)
        self.max_num_batched_tokens = kw.get("max_num_batched_tokens", 32)
        self.enable_chunked_prefill = kw.get("enable_chunked_prefill", True)


def test_prefix_hits_counted_exactly():
    bm = BlockManager(num_blocks=16, block_size=4, enable_prefix_caching=True)
    a = make_seq(0, list(range(100, 111)))  # 11 tokens: 2 full blocks + 3
    assert bm.match_prefix(a) == 0
    bm.allocate(a, len(a))
    bm.register_full_blocks(a, len(a))
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
    bm.allocate(a, len(a))
    bm.register_full_blocks(a, len(a))
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
        batch = sched.schedule()
        assert batch.num_tokens <= 20 and len(batch.seqs) <= 5
        assert all(n == 1 for n in batch.num_new_tokens[:batch.num_decode_seqs])
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            assert len(seq.block_table) * 4 >= seq.num_computed_tokens + n
            seq.num_computed_tokens += n
            if seq.num_computed_tokens == len(seq):
                seq.append_token(rng.randrange(50))
                if seq.num_output_tokens >= seq.params.max_tokens:
                    sched.finish(seq, "length")
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
        batch = sched.schedule()
        victims += [v.request_id for v in batch.preempted]
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            seq.num_computed_tokens += n
            if seq.num_computed_tokens == len(seq):
                seq.append_token(2)
                if seq.num_output_tokens >= 12:
                    sched.finish(seq, "length")
                    finished.append(seq.request_id)
    assert sched.num_preemptions > 0
    assert victims[0] == "2"  # the most recently admitted goes first
    assert sorted(finished) == ["0", "1", "2"] and bm.num_free_blocks == 6


def test_config_refuses_prompt_budget_without_chunking():
    cfg = EngineConfig(model="x", enable_chunked_prefill=False, max_num_batched_tokens=64, max_model_len=128)

    class HF:
        max_position_embeddings = 2048
    with pytest.raises(ValueError, match="chunked prefill"):
        cfg.resolve(HF())
