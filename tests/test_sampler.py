"""Known answers for the sampler on hand-written logits, through the real per-row device state
(engine/sampling_metadata.py): greedy, top-k, top-p, min-p, penalties, logit_bias, allowed ids,
min_tokens, seeds."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from engine.sampler import (
    Sampler,
    apply_min_p,
    apply_penalties,
    apply_top_k,
    apply_top_p,
    make_generator,
    on_rows,
    process_logits,
)
from engine.sampling_metadata import SamplingRows
from engine.scheduler_output import RequestSampling

CPU = torch.device("cpu")
INF = float("inf")


def state(samplings: list[RequestSampling], vocab: int, prompts=None, outputs=None) -> SamplingRows:
    rows = SamplingRows(len(samplings), vocab, CPU, pin_memory=False)
    for i, s in enumerate(samplings):
        generator = None if s.seed is None else make_generator(s.seed, CPU)
        rows.set_row(i, s, generator, np.array(prompts[i] if prompts else [0]), outputs[i] if outputs else [])
    rows.commit(len(samplings))
    return rows


def metadata(rows: SamplingRows, n: int, num_output=None, samples=None):
    samples = np.ones(n, dtype=bool) if samples is None else samples
    blocked = rows.blocked_rows(np.array(num_output if num_output is not None else [0] * n))
    flags = None
    if blocked is not None:
        flags = torch.zeros(n, dtype=torch.int32)
        flags[torch.as_tensor(blocked)] = 1
    return rows.metadata(n, samples, flags, blocked)


def sample(samplings, logits, **kw) -> list[int]:
    rows = state(samplings, logits.shape[1], kw.pop("prompts", None), kw.pop("outputs", None))
    return Sampler(0, CPU)(logits.clone(), metadata(rows, len(samplings), **kw)).tokens.tolist()


def log_probs(*p) -> torch.Tensor:
    return torch.tensor([[math.log(x) for x in p]])


def kept(logits: torch.Tensor) -> list[list[int]]:
    return [torch.nonzero(row > -INF).flatten().tolist() for row in logits]


# ---------------------------------------------------------------- greedy and the cuts
def test_greedy_is_argmax_and_top_k_1_is_greedy():
    logits = torch.tensor([[1.0, 3.0, 2.0], [5.0, 0.0, 1.0]])
    assert sample([RequestSampling(temperature=0.0)] * 2, logits) == [1, 0]
    assert sample([RequestSampling(temperature=1.5, top_k=1)] * 2, logits) == [1, 0]
    rows = state([RequestSampling(temperature=0.0), RequestSampling(temperature=0.0)], 3)
    assert rows._derived.all_greedy  # the one-kernel path, chosen on the host


def test_top_k_known_answers():
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0], [1.0, 3.0, 3.0, 2.0], [1.0, 4.0, 3.0, 2.0], [0.0, 1.0, 2.0, 3.0]])
    k = torch.tensor([2, 1, 10, -1])  # ties at the threshold kept; k past the vocabulary; no cut
    out = apply_top_k(logits.clone(), k, max_k=10)
    assert kept(out) == [[1, 2], [1, 2], [0, 1, 2, 3], [0, 1, 2, 3]]
    assert out[0, 1] == 4.0 and out[0, 2] == 3.0  # kept logits are untouched
    assert kept(apply_top_k(logits[:1].clone(), torch.tensor([1]), max_k=1)) == [[1]]


def test_top_p_known_answers():
    probs = (0.5, 0.3, 0.15, 0.05)
    for p, expected in [(0.4, [0]), (0.7, [0, 1]), (0.81, [0, 1, 2]), (0.99, [0, 1, 2, 3])]:
        assert kept(apply_top_p(log_probs(*probs), torch.tensor([p]))) == [expected], p
    # Ties: the least likely kept token's equals are kept too, whichever one the sort put first.
    ties = torch.tensor([[2.0, 1.0, 1.0, 0.0]])  # probs 0.534, 0.197, 0.197, 0.072
    assert kept(apply_top_p(ties.clone(), torch.tensor([0.6]))) == [[0, 1, 2]]
    # p = 1 keeps a token whose probability underflows the cumulative sum's rounding.
    tail = torch.tensor([[0.0, -100.0]])
    assert kept(apply_top_p(tail.clone(), torch.tensor([1.0]))) == [[0, 1]]


def test_min_p_known_answers():
    out = apply_min_p(log_probs(0.5, 0.3, 0.15, 0.05), torch.tensor([0.2]))  # threshold 0.1
    assert kept(out) == [[0, 1, 2]]
    assert kept(apply_min_p(log_probs(0.5, 0.3, 0.15, 0.05), torch.tensor([0.0]))) == [[0, 1, 2, 3]]


def test_sampled_tokens_stay_inside_every_cut():
    torch.manual_seed(0)
    logits = torch.randn(6, 50) * 3
    samplings = [RequestSampling(temperature=0.9, top_k=5, seed=i) for i in range(2)] + \
        [RequestSampling(temperature=1.2, top_p=0.5, seed=i) for i in range(2)] + \
        [RequestSampling(temperature=1.0, min_p=0.3, seed=i) for i in range(2)]
    rows = state(samplings, 50)
    allowed = [set(kept(apply_top_k(logits[i:i + 1] / 0.9, torch.tensor([5]), 5))[0]) for i in range(2)] + \
        [set(kept(apply_top_p(logits[i:i + 1] / 1.2, torch.tensor([0.5])))[0]) for i in range(2, 4)] + \
        [set(kept(apply_min_p(logits[i:i + 1].clone(), torch.tensor([0.3])))[0]) for i in range(4, 6)]
    sampler = Sampler(0, CPU)
    for _ in range(50):
        tokens = sampler(logits.clone(), metadata(rows, 6)).tokens.tolist()
        assert all(t in allowed[i] for i, t in enumerate(tokens)), tokens


def test_draws_follow_the_distribution():
    rows = state([RequestSampling(temperature=1.0, seed=5)], 3)
    sampler, logits = Sampler(0, CPU), log_probs(0.7, 0.2, 0.1)
    counts = np.bincount([sampler(logits.clone(), metadata(rows, 1)).tokens.item() for _ in range(3000)], minlength=3)
    assert np.allclose(counts / 3000, [0.7, 0.2, 0.1], atol=0.03), counts


# ---------------------------------------------------------------- logits processing
def test_penalties_exact_logits():
    """Repetition 2 on seen tokens (prompt or output), frequency 0.1 per output count, presence 0.3."""
    s = RequestSampling(temperature=0.0, repetition_penalty=2.0, frequency_penalty=0.1, presence_penalty=0.3)
    rows = state([s], 5, prompts=[[0, 1]], outputs=[[2, 2, 3]])
    logits = torch.tensor([[2.0, -1.0, 0.5, 1.0, 0.7]])
    out = apply_penalties(logits, metadata(rows, 1).penalties)
    # prompt 0: 2/2; prompt 1 (negative): -1*2; output 2 (count 2): 0.5/2 - 0.2 - 0.3; output 3: 1/2 - 0.1 - 0.3
    assert out.tolist()[0] == pytest.approx([1.0, -2.0, -0.25, 0.1, 0.7])
    # The step's own token is counted on the device, in the same work as the sampler's.
    rows.record_sampled(torch.tensor([4]), 1, None)
    out = apply_penalties(torch.tensor([[2.0, -1.0, 0.5, 1.0, 0.7]]), metadata(rows, 1).penalties)
    assert out[0, 4].item() == pytest.approx(0.7 / 2 - 0.1 - 0.3)


def test_penalties_change_the_greedy_choice_only_where_asked():
    logits = torch.tensor([[3.0, 2.9, 0.0], [3.0, 2.9, 0.0]])
    samplings = [RequestSampling(temperature=0.0, repetition_penalty=1.5), RequestSampling(temperature=0.0)]
    assert sample(samplings, logits, outputs=[[0], [0]], prompts=[[2], [2]]) == [1, 0]


def test_logit_bias_and_allowed_token_ids():
    logits = torch.zeros(2, 5)
    bias = RequestSampling(temperature=0.0, logit_bias={2: 5.0, 0: -1.0})
    allowed = RequestSampling(temperature=0.0, allowed_token_ids=[1, 3])
    rows = state([bias, allowed], 5)
    out = process_logits(logits.clone(), metadata(rows, 2))
    assert out[0].tolist() == [-1.0, 0.0, 5.0, 0.0, 0.0]
    assert kept(out[1:]) == [[1, 3]]
    assert sample([bias, allowed], torch.tensor([[0.0, 0, 0, 0, 0], [9.0, 0, 0, 1, 0]])) == [2, 3]


def test_min_tokens_blocks_the_stop_ids_until_reached():
    s = RequestSampling(temperature=0.0, min_tokens=3, min_tokens_stop_ids=[2, 4])
    logits = torch.tensor([[0.0, 1.0, 9.0, 0.0, 8.0]] * 2)
    # Row 0 has 1 output token (short of 3): its stop ids are masked; row 1 has 3: they are not.
    assert sample([s, s], logits, num_output=[1, 3]) == [1, 2]
    plain = RequestSampling(temperature=0.0)
    assert sample([plain, s], logits, num_output=[0, 5]) == [2, 2]  # no row short: nothing masked


# ---------------------------------------------------------------- seeds
def test_seeded_draws_do_not_depend_on_the_batch():
    torch.manual_seed(1)
    logits = torch.randn(5, 40)
    seeded = RequestSampling(temperature=1.0, top_p=0.95, seed=7)
    others = [RequestSampling(temperature=1.0), RequestSampling(temperature=0.7, seed=8),
              RequestSampling(temperature=0.0),
              RequestSampling(temperature=1.3, top_k=4)]
    alone_rows, crowd_rows = state([seeded], 40), state(others[:2] + [seeded] + others[2:], 40)
    alone_sampler, crowd_sampler = Sampler(123, CPU), Sampler(456, CPU)
    alone = [alone_sampler(logits[2:3].clone(), metadata(alone_rows, 1)).tokens.item() for _ in range(8)]
    crowd = [crowd_sampler(logits.clone(), metadata(crowd_rows, 5)).tokens[2].item() for _ in range(8)]
    assert alone == crowd and len(set(alone)) > 1  # the same draws, and real draws


def test_a_row_that_samples_nothing_leaves_its_generator_alone():
    """A prompt chunk short of its end gets a logits row but samples nothing: its seeded generator must
    not move, or its tokens would depend on how its prompt was chunked."""
    s = RequestSampling(temperature=1.0, seed=3)
    logits = torch.randn(1, 30)
    rows = state([s], 30)
    skipped = metadata(rows, 1, samples=np.array([False]))
    assert skipped.generators == {}
    fresh = state([s], 30)
    first = Sampler(0, CPU)(logits.clone(), metadata(fresh, 1)).tokens.item()
    Sampler(0, CPU)(logits.clone(), skipped)
    assert Sampler(0, CPU)(logits.clone(), metadata(rows, 1)).tokens.item() == first


def test_logprobs_are_those_of_the_raw_distribution():
    s = RequestSampling(temperature=0.0, logprobs=2, repetition_penalty=1.5)
    rows = state([s], 4, outputs=[[1]])
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    out = Sampler(0, CPU)(logits.clone(), metadata(rows, 1))
    raw = torch.log_softmax(logits, dim=-1)[0]
    # Penalised, token 1 (3 / 1.5 = 2) ties token 2; the logprobs stay those of the raw logits.
    token = out.tokens.item()
    assert out.logprobs["chosen"].item() == pytest.approx(raw[token].item())
    assert out.logprobs["top_ids"][0].tolist() == [1, 2]
    assert out.logprobs["ranks"].item() == int((raw > raw[token]).sum()) + 1


def test_cuts_on_some_rows_cut_only_those():
    logits = torch.cat([log_probs(0.5, 0.3, 0.15, 0.05)] * 3)
    samplings = [RequestSampling(temperature=1.0, top_p=0.7, min_p=0.2), RequestSampling(temperature=1.0, top_k=1),
                 RequestSampling(temperature=1.0, top_p=0.4)]
    meta = metadata(state(samplings, 4), 3)
    assert meta.top_p_rows.tolist() == [0, 2]  # the sort covers the rows with a cut only
    assert meta.min_p_rows.tolist() == [0] and meta.top_k_rows.tolist() == [1]
    assert kept(on_rows(apply_top_p, logits.clone(), meta.top_p_rows, meta.top_p)) == [[0, 1], [0, 1, 2, 3], [0]]
    assert kept(on_rows(apply_min_p, logits.clone(), meta.min_p_rows, meta.min_p)) == [[0, 1, 2], [0, 1, 2, 3]] + \
        [[0, 1, 2, 3]]
    assert kept(on_rows(apply_top_k, logits.clone(), meta.top_k_rows, meta.top_k, meta.max_top_k)) == \
        [[0, 1, 2, 3], [0], [0, 1, 2, 3]]


def test_penalties_on_some_rows_leave_the_others_exact():
    logits = torch.tensor([[2.0, -1.0, 0.5], [2.0, -1.0, 0.5], [2.0, -1.0, 0.5]])
    samplings = [RequestSampling(temperature=1.0), RequestSampling(temperature=1.0, repetition_penalty=2.0),
                 RequestSampling(temperature=1.0)]
    rows = state(samplings, 3, prompts=[[0], [0], [0]], outputs=[[1], [1], [1]])
    pen = metadata(rows, 3).penalties
    assert pen.rows.tolist() == [1]
    out = apply_penalties(logits.clone(), pen)
    assert out.tolist() == [[2.0, -1.0, 0.5], [1.0, -2.0, 0.5], [2.0, -1.0, 0.5]]
