"""Speculative decoding's pure pieces: the config, the n-gram proposer, the rejection sampler's
distribution (chi-square against the target, and a deliberately wrong sampler that must fail)."""
import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from engine.config import ConfigError, EngineConfig
from engine.spec_decode.ngram import ngram_propose
from engine.spec_decode.rejection_sampler import filtered_probs, rejection_sample

# ---------------------------------------------------------------- config


@pytest.mark.parametrize("kwargs,expected", [
    ({"speculative_config": {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 5,
                             "prompt_lookup_min": 1}}, ("ngram", 3, None, 5, 1)),
    ({"speculative_config": '{"model": "tiny", "num_speculative_tokens": 2}'}, ("draft_model", 2, "tiny", 4, 2)),
    ({"speculative_model": "[ngram]", "num_speculative_tokens": 4, "ngram_prompt_lookup_max": 3},
     ("ngram", 4, None, 3, 2)),
    ({"speculative_model": "tiny", "num_speculative_tokens": 1}, ("draft_model", 1, "tiny", 4, 2)),
])
def test_speculative_config_forms(kwargs, expected):
    s = EngineConfig("tiny", **kwargs).speculative
    assert (s.method, s.num_speculative_tokens, s.model, s.prompt_lookup_max, s.prompt_lookup_min) == expected


def test_zero_speculative_tokens_is_off():
    assert EngineConfig("tiny", speculative_model="[ngram]", num_speculative_tokens=0).speculative is None
    assert EngineConfig("tiny").num_spec_tokens == 0


@pytest.mark.parametrize("kwargs,names", [
    ({"speculative_config": {"method": "ngram", "num_speculative_tokens": 2, "draft_tp": 1}}, "draft_tp"),
    ({"speculative_config": {"method": "medusa", "num_speculative_tokens": 2}}, "method"),
    ({"speculative_config": {"method": "ngram", "num_speculative_tokens": 99}}, "num_speculative_tokens"),
    ({"speculative_config": {"method": "draft_model", "num_speculative_tokens": 2}}, "model"),
    ({"speculative_config": {"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 5}},
     "prompt_lookup_min"),
    ({"speculative_config": {"model": "tiny", "num_speculative_tokens": 2, "prompt_lookup_max": 3}},
     "prompt_lookup_max"),
    ({"speculative_config": "{oops"}, "JSON"),
    ({"speculative_model": "[ngram]"}, "num_speculative_tokens"),
    ({"speculative_config": {"method": "ngram", "num_speculative_tokens": 2}, "num_speculative_tokens": 2},
     "not both"),
])
def test_bad_speculative_config_names_the_key(kwargs, names):
    with pytest.raises(ConfigError, match=names) as info:
        EngineConfig("tiny", **kwargs)
    assert "\n" not in str(info.value)


def test_cli_flags_build_the_config():
    from engine.server.args import build_parser, engine_config

    args = build_parser().parse_args(["tiny", "--speculative-config",
                                      '{"method": "ngram", "num_speculative_tokens": 3}'])
    assert engine_config(args).speculative.num_speculative_tokens == 3
    args = build_parser().parse_args(["tiny", "--speculative-model", "[ngram]", "--num-speculative-tokens", "2",
                                      "--ngram-prompt-lookup-min", "1"])
    spec = engine_config(args).speculative
    assert (spec.method, spec.num_speculative_tokens, spec.prompt_lookup_min) == ("ngram", 2, 1)


# ---------------------------------------------------------------- n-gram proposer


@pytest.mark.parametrize("tokens,expected", [
    ([1, 2, 3, 4, 9, 1, 2, 3], [4, 9, 1]),  # the 3-gram 1 2 3 recurs
    ([1, 2, 3, 4, 5], []),  # nothing recurs
    ([7, 8, 1, 2, 7, 8, 3, 5, 7, 8], [3, 5, 7]),  # the latest occurrence wins
    ([4, 1, 2, 9, 9, 1, 2, 6, 0, 4, 1, 2], [9, 9, 1]),  # the longest n wins: 4 1 2 beats the later 1 2
    ([5, 5, 5, 5], [5]),  # the continuation may run into the suffix itself
    ([1, 2, 1, 2, 1, 2, 1, 2], [1, 2, 1]),  # a repeating pattern: the earliest hit has k tokens after it
    ([3], []),
])
def test_ngram_propose(tokens, expected):
    assert ngram_propose(np.array(tokens), 3, 4, 2).tolist() == expected


def test_ngram_respects_min_length():
    assert ngram_propose(np.array([1, 2, 3, 1]), 2, 4, 2).tolist() == []
    assert ngram_propose(np.array([1, 2, 3, 1]), 2, 4, 1).tolist() == [2, 3]


# ---------------------------------------------------------------- rejection sampler
VOCAB = 8
SAMPLES = 40_000


def _dists(seed: int):
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(2, VOCAB, generator=g) * 1.5  # logits at positions 1, 2 (p_1, p_2); p_3 for the bonus
    draft = torch.randn(2, VOCAB, generator=g) * 1.5
    bonus = torch.randn(VOCAB, generator=g)
    return target, draft, bonus


def _speculate(top_p: float, wrong: bool = False, ngram: bool = False, seed: int = 0):
    """SAMPLES independent rows, each with 2 drafts from q: the emitted tokens, the target's p."""
    target, draft, bonus = _dists(seed)
    n = SAMPLES
    temp = torch.ones(2)
    p = filtered_probs(target, temp, None, 0, torch.full((2,), top_p), None)
    q = filtered_probs(draft, temp, None, 0, torch.full((2,), top_p), None)
    p3 = filtered_probs(bonus.unsqueeze(0), torch.ones(1), None, 0, torch.full((1,), top_p), None)[0]
    g = torch.Generator().manual_seed(seed + 1)
    if ngram:  # a fixed draft (point mass): each position's most likely token
        drafts = p.argmax(-1).expand(n, 2).clone()
        draft_probs = None
    else:
        drafts = torch.stack([torch.multinomial(q[j], n, replacement=True, generator=g) for j in range(2)], dim=1)
        draft_probs = q.unsqueeze(0).expand(n, 2, VOCAB)
    bonus_tokens = torch.multinomial(p3, n, replacement=True, generator=g)
    target_probs = p.unsqueeze(0).expand(n, 2, VOCAB)
    if wrong:  # "always accept": the drafts' distribution comes out instead of the target's
        draft_probs = target_probs
    out, accepted = rejection_sample(target_probs, p.argmax(-1).expand(n, 2), drafts, torch.full((n,), 2),
                                     draft_probs, bonus_tokens, torch.zeros(n, dtype=torch.bool), generator=g)
    return out, accepted, p, p3


def _chi2_pvalue(tokens: torch.Tensor, probs: torch.Tensor) -> float:
    support = probs > 0
    assert (probs[tokens] > 0).all(), "a token outside the target's support was emitted"
    counts = torch.bincount(tokens, minlength=VOCAB).double()
    expected = probs.double() / probs.double().sum() * len(tokens)
    return chisquare(counts[support].numpy(), expected[support].numpy()).pvalue


@pytest.mark.parametrize("top_p", [1.0, 0.9])
@pytest.mark.parametrize("ngram", [False, True])
def test_rejection_sampler_matches_target_distribution(top_p, ngram):
    out, accepted, p, p3 = _speculate(top_p, ngram=ngram)
    assert _chi2_pvalue(out[:, 0], p[0]) > 1e-3  # the first emitted token ~ p_1
    took_first = accepted >= 1
    assert took_first.sum() > 1000
    assert _chi2_pvalue(out[took_first, 1], p[1]) > 1e-3  # the second, given the first was a draft, ~ p_2
    both = accepted == 2
    assert _chi2_pvalue(out[both, 2], p3) > 1e-3  # the bonus ~ p_3
    assert (out[accepted < 2, 2] == -1).all() and ((out[:, :2] >= 0).sum(1) >= 1).all()


def test_chi_square_catches_a_wrong_sampler():
    out, _, p, _ = _speculate(1.0, wrong=True)
    assert _chi2_pvalue(out[:, 0], p[0]) < 1e-6


def test_greedy_accepts_the_argmax_prefix():
    probs = torch.zeros(2, 3, 5)
    argmax = torch.tensor([[1, 2, 3], [4, 4, 4]])
    drafts = torch.tensor([[1, 2, 0], [4, 1, 4]])
    out, accepted = rejection_sample(probs, argmax, drafts, torch.tensor([3, 3]), None, torch.tensor([9, 9]),
                                     torch.ones(2, dtype=torch.bool))
    assert accepted.tolist() == [2, 1]
    assert out.tolist() == [[1, 2, 3, -1], [4, 4, -1, -1]]
    out, accepted = rejection_sample(probs, argmax, drafts, torch.tensor([2, 0]), None, torch.tensor([9, 7]),
                                     torch.ones(2, dtype=torch.bool))
    assert accepted.tolist() == [2, 0] and out.tolist() == [[1, 2, 9, -1], [7, -1, -1, -1]]


def test_seeded_rows_are_reproducible_whatever_the_batch():
    target, draft, _ = _dists(3)
    p = filtered_probs(target, torch.ones(2), None, 0, None, None)
    q = filtered_probs(draft, torch.ones(2), None, 0, None, None)

    def run(rows: int, seeded_row: int):
        gens = {seeded_row: torch.Generator().manual_seed(42)}
        drafts = torch.tensor([[3, 5]]).expand(rows, 2)
        return rejection_sample(p.expand(rows, 2, VOCAB), p.argmax(-1).expand(rows, 2), drafts,
                                torch.full((rows,), 2), q.expand(rows, 2, VOCAB), torch.zeros(rows, dtype=torch.long),
                                torch.zeros(rows, dtype=torch.bool), torch.Generator().manual_seed(rows),
                                gens)[0][seeded_row]

    assert run(1, 0).tolist() == run(5, 3).tolist()


# ---------------------------------------------------------------- tuner, metrics


def test_tuner_searches_num_speculative_tokens():
    import shlex

    from engine.server.args import build_parser, engine_config
    from workbench.tune.study_file import find_study, load_study
    from workbench.tune.trial import render_flags

    study, _ = load_study(find_study("speculative"))
    assert study.default_flags()["num_speculative_tokens"] == 0  # the defaults trial: no speculation
    for k in (0, 3):
        flags = study.server | {"num_speculative_tokens": k}
        config = engine_config(build_parser().parse_args(["tiny", *shlex.split(render_flags(flags))]))
        assert config.num_spec_tokens == k


def test_tuner_refuses_num_speculative_tokens_without_a_proposer():
    from workbench.tune.study_file import StudyFile

    with pytest.raises(ValueError, match="speculative_model"):
        StudyFile.model_validate({"study": {"name": "s", "model": "tiny", "n_trials": 1},
                                  "search_space": {"num_speculative_tokens": {"type": "int", "low": 0, "high": 3}},
                                  "objectives": [{"metric": "x", "direction": "maximize"}]})


def test_prometheus_spec_decode_counters():
    from prometheus_client import CollectorRegistry, generate_latest

    from engine.messages import EngineStats
    from engine.server.metrics import StatsCollector
    from workbench.loadgen.server_side import counter_deltas, parse_metrics

    def stats(drafts, tokens, accepted, per_pos):
        return EngineStats(0, 0, 0.0, 10, 0, 0, 0, 0, 0, 0, 0, drafts, tokens, accepted, per_pos)

    def scrape(s):
        registry = CollectorRegistry()
        registry.register(StatsCollector("m", lambda: s))
        return generate_latest(registry).decode()

    text = scrape(stats(10, 30, 18, [9, 6, 3]))
    assert 'vllm:spec_decode_num_drafts_total{model_name="m"} 10.0' in text
    assert 'vllm:spec_decode_num_draft_tokens_total{model_name="m"} 30.0' in text
    assert 'vllm:spec_decode_num_accepted_tokens_total{model_name="m"} 18.0' in text
    for pos, v in enumerate([9, 6, 3]):
        assert f'vllm:spec_decode_num_accepted_tokens_per_pos_total{{model_name="m",position="{pos}"}} {v}.0' in text
    assert "spec_decode" not in scrape(stats(0, 0, 0, []))  # off: not exported, as vLLM
    deltas = counter_deltas(parse_metrics(scrape(stats(10, 30, 18, [9, 6, 3]))),
                            parse_metrics(scrape(stats(20, 60, 48, [19, 16, 13]))))
    assert deltas["spec_decode_acceptance_rate"] == pytest.approx(1.0)
    assert deltas["spec_decode_mean_accepted_length"] == pytest.approx(4.0)
