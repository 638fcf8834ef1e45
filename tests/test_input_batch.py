"""The persistent batch (engine/input_batch.py) and the plan it applies (engine/scheduler_output.py):
add/remove/condense invariants, per-row state moving with its row, the msgspec round trip, and the
scheduler's plans applied under random load, aborts, preemption and the one-step overlap."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from engine.block_manager import BlockManager
from engine.input_batch import InputBatch, RequestState, apply_plan
from engine.messages import TokenLogprobs
from engine.sampling_metadata import TEMPERATURE
from engine.scheduler import Scheduler
from engine.scheduler_output import (
    CachedRequestData,
    ModelRunnerOutput,
    NewRequestData,
    RequestSampling,
    ResumedRequestData,
    SchedulerOutput,
    decode_model_runner_output,
    decode_scheduler_output,
    encode,
)
from engine.sequence import SequenceStatus
from tests.test_block_manager import FakeConfig, make_seq

CPU = torch.device("cpu")


def request(i: int, prompt_len: int, **sampling) -> RequestState:
    return RequestState(f"r{i}", np.arange(prompt_len, dtype=np.int32) + 10 * i, RequestSampling(**sampling), None)


def test_add_remove_condense_keeps_every_row_with_its_request():
    batch = InputBatch(max_num_seqs=6, max_model_len=32, max_blocks_per_seq=8, vocab_size=100, device=CPU)
    reqs = [request(i, 3 + i, temperature=0.1 * (i + 1), repetition_penalty=1.0 + i / 10) for i in range(6)]
    for i, r in enumerate(reqs):
        batch.add(r, [40 + i], [i, 10 + i], num_computed=2, num_scheduled=1 + i % 2)
    batch.check()
    for rid in ("r1", "r3"):
        batch.remove(rid)
    batch.add(reqs[1], [7, 8], [20], num_computed=0, num_scheduled=5)  # back, into the lowest hole
    assert batch.row_of["r1"] == 1
    batch.condense()
    batch.check()
    assert len(batch) == 5 and batch.num_rows == 5 and batch.req_ids[3] == "r5"  # the last row filled the hole
    for rid, row in batch.row_of.items():
        i = int(rid[1:])
        prompt = list(reqs[i].prompt_token_ids)
        outputs = [7, 8] if rid == "r1" else [40 + i]
        assert batch.token_ids[row, :batch.num_host_tokens[row]].tolist() == prompt + outputs
        assert batch.num_prompt_tokens[row] == len(prompt)
        blocks = [20] if rid == "r1" else [i, 10 + i]
        assert batch.block_table.host[row, :batch.block_table.num_blocks[row]].tolist() == blocks
        assert batch.sampling.params[row, TEMPERATURE] == pytest.approx(0.1 * (i + 1))
        assert batch.sampling.requests[row] is reqs[i].sampling
        # Penalty state moved with the row: its output counts hold its own output tokens.
        counts = batch.sampling.output_counts[row]
        assert sorted(torch.nonzero(counts).flatten().tolist()) == sorted(set(outputs)) or i == 0
    num_decodes = batch.order_decodes_first()
    batch.check()
    n = batch.num_scheduled_tokens[:batch.num_rows]
    assert (n[:num_decodes] == 1).all() and (n[num_decodes:] > 1).all()


def test_remove_everything_and_refill():
    batch = InputBatch(max_num_seqs=3, max_model_len=16, max_blocks_per_seq=4, vocab_size=20, device=CPU)
    for i in range(3):
        batch.add(request(i, 2), [], [i], 0, 2)
    with pytest.raises(RuntimeError, match="full"):
        batch.add(request(9, 2), [], [9], 0, 2)
    for i in range(3):
        batch.remove(f"r{i}")
    batch.condense()
    assert batch.num_rows == 0 and len(batch) == 0
    batch.add(request(5, 4), [], [1], 0, 4)
    batch.condense()
    batch.check()
    assert batch.row_of == {"r5": 0}


def test_plans_round_trip_through_msgspec():
    plan = SchedulerOutput(
        new_requests=[NewRequestData("a", [1, 2, 3], RequestSampling(temperature=0.7, top_k=5, seed=-3, logprobs=2,
                                                                     logit_bias={4: -1.5}, allowed_token_ids=[1, 4],
                                                                     min_tokens=2, min_tokens_stop_ids=[9]),
                                     [0, 1], 0, 3, lora_id=2)],
        resumed_requests=[ResumedRequestData("b", [5], 0, 4, [7, 8], from_preemption=True)],
        cached_requests=CachedRequestData(["c", "d"], [10, 11], [1, 1], {"d": [6]}, {"c": 2}),
        total_num_scheduled_tokens=9, scheduled_spec_decode_tokens={"c": [3, 4]}, finished_req_ids=["e"],
        preempted_req_ids=["f"], unscheduled_req_ids=["g"])
    assert decode_scheduler_output(encode(plan)) == plan
    out = ModelRunnerOutput(["a", "c"], [[5], []], [[TokenLogprobs(-0.5, 1, [5, 6], [-0.5, -1.0])], []])
    assert decode_model_runner_output(encode(out)) == out


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("prefix", [False, True])
def test_scheduler_plans_keep_the_worker_batch_in_step(seed, prefix):
    """Plans from the real scheduler under random load, aborts and preemption, encoded and decoded,
    applied to a batch: after every step the batch is exactly the scheduled requests, with the
    scheduler's progress, blocks and known tokens; every token a step feeds is on the host or was
    sampled in the step before (the device gather); tokens arrive one step late, as in the engine."""
    rng = random.Random(seed)
    bm = BlockManager(num_blocks=24, block_size=4, enable_prefix_caching=prefix)
    sched = Scheduler(FakeConfig(max_num_seqs=5, max_num_batched_tokens=20), bm)
    batch = InputBatch(max_num_seqs=5, max_model_len=64, max_blocks_per_seq=16, vocab_size=60, device=CPU)
    requests: dict[str, RequestState] = {}
    shared = [rng.randrange(50) for _ in range(9)]
    live = []
    for i in range(30):
        tokens = (shared if rng.random() < 0.5 else []) + [rng.randrange(50) for _ in range(rng.randint(1, 30))]
        live.append(make_seq(i, tokens, max_tokens=rng.randint(1, 12)))
        sched.add(live[-1])
    in_flight: list = []  # the sequences that sampled in the previous step (tokens not read yet)
    preemptions = 0
    for step_id in range(1, 3000):
        if not sched.has_unfinished():
            break
        step = sched.schedule()
        plan = decode_scheduler_output(encode(step.plan))
        assert plan == step.plan
        preemptions += len(plan.preempted_req_ids)
        before = {s.request_id: (s.num_computed_tokens - n) for s, n in zip(step.seqs, step.num_new_tokens)}
        apply_plan(batch, requests, plan, CPU)
        if step.seqs:
            batch.check()
        assert set(batch.req_ids[:batch.num_rows]) == set(before)
        n = batch.num_scheduled_tokens[:batch.num_rows]
        assert not (n[:-1] > 1)[np.flatnonzero(n[1:] == 1)].any(), "a decode row after a prefill row"
        for seq in step.seqs:
            row = batch.row_of[seq.request_id]
            start, count = batch.num_computed_tokens[row], batch.num_scheduled_tokens[row]
            assert start == before[seq.request_id] and start + count == seq.num_computed_tokens
            assert batch.block_table.host[row, :batch.block_table.num_blocks[row]].tolist() == seq.block_table
            host = batch.num_host_tokens[row]
            assert batch.token_ids[row, :host].tolist() == seq.token_ids[:host]
            for pos in range(start, start + count):
                gathered = batch.pending_step[row] == step_id - 1 and pos == batch.pending_pos[row]
                assert pos < host or gathered, f"token {pos} of {seq.request_id} is nowhere"
        samples = batch.num_computed_tokens[:batch.num_rows] + n >= batch.num_tokens[:batch.num_rows]
        batch.mark_sampled(step_id, samples)
        for seq in step.seqs:
            assert batch.num_tokens[batch.row_of[seq.request_id]] == seq.num_tokens
        # Output handling for the previous step, one step late.
        for seq in in_flight:
            if seq.is_finished:
                continue
            seq.token_ids.append(rng.randrange(50))
            if len(seq.token_ids) >= seq.max_num_tokens:
                sched.finish(seq, "length")
        in_flight = [batch_seq for batch_seq in step.seqs
                     if samples[batch.row_of[batch_seq.request_id]] and not batch_seq.is_finished]
        if rng.random() < 0.05:
            victims = [s for s in live if s.status != SequenceStatus.FINISHED]
            if victims:
                sched.finish(rng.choice(victims), "abort")
        bm.check_invariants([s for s in live if s.status != SequenceStatus.FINISHED])
    assert not sched.has_unfinished(), "the scheduler stalled"
    assert bm.num_free_blocks == bm.num_blocks
    if not prefix:
        assert preemptions > 0, "the small cache was meant to preempt"
