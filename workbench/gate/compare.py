"""The performance gate: compare a current run against a baseline, metric by metric, with a
threshold and a noise-aware test, so that run-to-run noise passes and real regressions fail.

Threshold syntax, `--metric NAME:SPEC`:
  output_throughput:-5%     higher is better; fail if it drops by more than 5%
  p99_ttft_ms:+10%          lower is better; fail if it rises by more than 10%
  num_preemptions:+0        absolute: fail if it rises at all
  prefix_cache_hit_rate:-0.02   absolute: fail if it drops by more than 0.02

How a metric is decided (the row's `rule` says which rule did):
  exact         every sample on both sides is the same (a deterministic metric such as tokens per
                step of a seeded workload): the change decides alone; there is no noise to test.
  mann-whitney  the null hypothesis is "the regression is no larger than the threshold": each
                baseline sample is moved to the threshold's edge and a one-sided exact Mann-Whitney
                U test asks whether the current samples are worse still. With n and m samples its
                smallest possible p is 1 / C(n+m, n) (3 a side: 0.05; 2 a side: 0.167), so the
                test is used only where that can reach the strictest level Holm may ask of it,
                alpha / k for k tested metrics. A failure needs p <= its Holm level.
  bootstrap     fewer samples than that: a bootstrap p-value (the share of 4,000 resampled median
                changes that are not past the threshold) goes into the same Holm procedure. At
                these sizes its false-positive rate is not controlled (2 a side: about 1/6 for a
                change sitting exactly on the threshold); the row's note says how many repeats
                the exact test needs. `require_exact` refuses such a comparison instead.
Holm's step-down procedure keeps the family-wise false-positive rate at alpha over all tested
metrics; exact metrics are not in the family (a measured change of a deterministic metric is no
chance event). Every failure also needs the median change itself past the threshold.
"""
from __future__ import annotations

import math
import re
import statistics
from dataclasses import dataclass

import numpy as np

from workbench.results import BenchResult

SPEC = re.compile(r"^(?P<name>[A-Za-z0-9_.]+):(?P<sign>[+-])(?P<amount>\d+(\.\d+)?)(?P<pct>%?)$")
ALPHA = 0.05
BOOTSTRAP_RESAMPLES = 4000


class GateError(ValueError):
    """Bad usage or input (exit code 2)."""


@dataclass
class Threshold:
    metric: str
    higher_is_better: bool
    amount: float
    relative: bool

    @classmethod
    def parse(cls, spec: str) -> Threshold:
        m = SPEC.match(spec.strip())
        if not m:
            raise GateError(f"--metric {spec!r}: expected NAME:-5% (higher is better), NAME:+10% (lower is better), "
                            "or absolute forms like NAME:+0 / NAME:-0.02")
        return cls(m["name"], m["sign"] == "-", float(m["amount"]), bool(m["pct"]))

    def describe(self) -> str:
        unit = "%" if self.relative else ""
        return f"{'-' if self.higher_is_better else '+'}{self.amount:g}{unit}"

    def change(self, base: float, cur: float) -> float:
        """current - baseline in this threshold's units (% of the baseline, or absolute)."""
        if not self.relative:
            return cur - base
        if base == 0:
            return 0.0 if cur == 0 else math.copysign(math.inf, cur)
        return (cur - base) / abs(base) * 100

    def past(self, change: float) -> bool:
        """Is this change a regression larger than the threshold?"""
        return (-change if self.higher_is_better else change) > self.amount

    def edge(self, value: float) -> float:
        """The value a baseline sample would have after a regression of exactly the threshold."""
        step = abs(value) * self.amount / 100 if self.relative else self.amount
        return value - step if self.higher_is_better else value + step


@dataclass
class Row:
    metric: str
    baseline: float
    current: float
    change: float  # current - baseline medians, in the threshold's units (% or absolute)
    threshold: str
    rule: str  # exact | mann-whitney | bootstrap
    p_value: float | None
    verdict: str  # pass | fail
    n_baseline: int = 0
    n_current: int = 0
    holm_level: float | None = None  # the level this metric's p was held to
    note: str = ""

    def as_dict(self) -> dict:
        return {"metric": self.metric, "baseline": self.baseline, "current": self.current,
                "change": self.change, "change_pct": self._pct(), "threshold": self.threshold, "rule": self.rule,
                "p_value": self.p_value, "holm_level": self.holm_level, "n_baseline": self.n_baseline,
                "n_current": self.n_current, "verdict": self.verdict, "note": self.note}

    def _pct(self) -> float | None:
        return (self.current - self.baseline) / abs(self.baseline) * 100 if self.baseline else None


@dataclass
class Rules:
    alpha: float = ALPHA
    require_exact: bool = False  # refuse (GateError) where the exact test cannot reach its level
    seed: int = 0
    resamples: int = BOOTSTRAP_RESAMPLES


def samples_of(result: BenchResult, path: str) -> dict[str, list[float]]:
    """A gate baseline keeps every repeat in extra['samples']; any other result is one sample."""
    samples = result.extra.get("samples")
    if isinstance(samples, dict) and samples:
        return {k: [float(v) for v in vs] for k, vs in samples.items()}
    return {k: [float(v)] for k, v in result.metrics.items() if v is not None}


def merge(results: list[dict[str, list[float]]]) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for r in results:
        for k, vs in r.items():
            out.setdefault(k, []).extend(vs)
    return out


def smallest_p(n: int, m: int) -> float:
    """The smallest one-sided p an exact Mann-Whitney test of n against m samples can give."""
    return 1 / math.comb(n + m, n)


def repeats_needed(level: float) -> int:
    """Samples a side for the exact test to be able to reach `level`."""
    n = 1
    while smallest_p(n, n) > level * (1 + 1e-9):
        n += 1
    return n


def compare(baseline: dict[str, list[float]], current: dict[str, list[float]], thresholds: list[Threshold],
            rules: Rules | None = None) -> list[Row]:
    rules = rules or Rules()
    for t in thresholds:
        for side, name in ((baseline, "baseline"), (current, "current")):
            if not side.get(t.metric):
                raise GateError(f"metric {t.metric!r} is missing from the {name} results "
                                f"(it has: {', '.join(sorted(side)) or 'nothing'})")
    rows = [_row(t, baseline[t.metric], current[t.metric]) for t in thresholds]
    tested = [(row, t) for row, t in zip(rows, thresholds) if row.rule != "exact"]
    strictest = rules.alpha / max(len(tested), 1)
    for row, t in tested:
        b, c = baseline[t.metric], current[t.metric]
        if smallest_p(len(b), len(c)) <= strictest * (1 + 1e-9):
            row.rule, row.p_value = "mann-whitney", _mann_whitney(b, c, t)
            continue
        need = repeats_needed(strictest)
        if rules.require_exact:
            raise GateError(f"metric {t.metric!r}: {len(b)} baseline and {len(c)} current samples cannot reach the "
                            f"level {strictest:.3g} with the exact test; give {need} or more a side (--repeats {need})")
        row.rule, row.p_value = "bootstrap", _bootstrap_p(b, c, t, rules)
        row.note = f"too few samples for the exact test at level {strictest:.3g}: {need} a side needed"
    _holm(rows=[row for row, _ in tested], alpha=rules.alpha)
    return rows


def _row(t: Threshold, b: list[float], c: list[float]) -> Row:
    mb, mc = statistics.median(b), statistics.median(c)
    change = t.change(mb, mc)
    rule = "exact" if len(set(b)) == 1 and len(set(c)) == 1 else "pending"
    verdict = "fail" if t.past(change) else "pass"
    return Row(t.metric, mb, mc, change, t.describe(), rule, None, verdict, len(b), len(c))


def _holm(rows: list[Row], alpha: float) -> None:
    """Holm's step-down: the i-th smallest p (from 0) is held to alpha / (k - i); once one is not
    rejected, no later one is. A row fails only if its median change is past the threshold too."""
    k = len(rows)
    rejecting = True
    for i, row in enumerate(sorted(rows, key=lambda r: r.p_value)):
        row.holm_level = alpha / (k - i)
        rejecting = rejecting and row.p_value <= row.holm_level * (1 + 1e-9)
        row.verdict = "fail" if rejecting and row.verdict == "fail" else "pass"


def _mann_whitney(b: list[float], c: list[float], t: Threshold) -> float:
    from scipy.stats import mannwhitneyu

    edge = [t.edge(v) for v in b]  # the baseline as it would be after a regression of exactly the threshold
    alternative = "less" if t.higher_is_better else "greater"  # is current worse than that?
    method = "exact" if len(b) * len(c) <= 400 else "asymptotic"
    return float(mannwhitneyu(c, edge, alternative=alternative, method=method).pvalue)


def _bootstrap_p(b: list[float], c: list[float], t: Threshold, rules: Rules) -> float:
    rng = np.random.default_rng(rules.seed)
    mb = np.median(rng.choice(b, size=(rules.resamples, len(b))), axis=1)
    mc = np.median(rng.choice(c, size=(rules.resamples, len(c))), axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        change = (mc - mb) / np.abs(mb) * 100 if t.relative else mc - mb
    change = np.nan_to_num(change, nan=0.0, posinf=np.inf, neginf=-np.inf)  # 0/0: no change
    kind = int(np.sum((-change if t.higher_is_better else change) <= t.amount))  # resamples not past it
    return (kind + 1) / (rules.resamples + 1)


def markdown(rows: list[Row]) -> str:
    lines = ["| metric | baseline | current | change | threshold | rule | p-value | level | verdict |",
             "|---|---:|---:|---:|---:|---|---:|---:|---|"]
    for r in rows:
        unit = "%" if r.threshold.endswith("%") else ""
        p = "" if r.p_value is None else f"{r.p_value:.3g}"
        level = "" if r.holm_level is None else f"{r.holm_level:.3g}"
        lines.append(f"| {r.metric} | {r.baseline:,.4g} | {r.current:,.4g} | {r.change:+.3g}{unit} | {r.threshold} "
                     f"| {r.rule} ({r.n_baseline} vs {r.n_current}) | {p} | {level} | "
                     f"{'✅ pass' if r.verdict == 'pass' else '❌ FAIL'} |")
    notes = [f"- {r.metric}: {r.note}" for r in rows if r.note]
    return "\n".join(lines + ([""] + notes if notes else []))
