"""The performance gate: compare a current run against a baseline, metric by metric, with a
threshold and a noise-aware test, so that run-to-run noise passes and real regressions fail.

Threshold syntax, `--metric NAME:SPEC`:
  output_throughput:-5%     higher is better; fail if it drops by more than 5%
  p99_ttft_ms:+10%          lower is better; fail if it rises by more than 10%
  num_preemptions:+0        absolute: fail if it rises at all
  prefix_cache_hit_rate:-0.02   absolute: fail if it drops by more than 0.02
A regression is declared only when the median change is past the threshold AND, with at least
three samples on each side, a one-sided Mann-Whitney U test says the shift is real (p < 0.05);
with fewer samples, a bootstrap 95% interval of the median difference must lie past the threshold.
"""
from __future__ import annotations

import math
import re
import statistics
from dataclasses import dataclass

import numpy as np

from workbench.results import BenchResult

SPEC = re.compile(r"^(?P<name>[A-Za-z0-9_.]+):(?P<sign>[+-])(?P<amount>\d+(\.\d+)?)(?P<pct>%?)$")


class GateError(ValueError):
    """Bad usage or input (exit code 2)."""


@dataclass
class Threshold:
    metric: str
    higher_is_better: bool
    amount: float
    relative: bool

    @classmethod
    def parse(cls, spec: str) -> "Threshold":
        m = SPEC.match(spec.strip())
        if not m:
            raise GateError(f"--metric {spec!r}: expected NAME:-5% (higher is better), NAME:+10% (lower is better), "
                            "or absolute forms like NAME:+0 / NAME:-0.02")
        return cls(m["name"], m["sign"] == "-", float(m["amount"]), bool(m["pct"]))

    def describe(self) -> str:
        unit = "%" if self.relative else ""
        return f"{'-' if self.higher_is_better else '+'}{self.amount:g}{unit}"


@dataclass
class Row:
    metric: str
    baseline: float
    current: float
    change: float  # current - baseline, in the threshold's units (% or absolute)
    threshold: str
    p_value: float | None
    verdict: str  # pass | fail

    def as_dict(self) -> dict:
        return {"metric": self.metric, "baseline": self.baseline, "current": self.current,
                "change": self.change, "change_pct": self._pct(), "threshold": self.threshold,
                "p_value": self.p_value, "verdict": self.verdict}

    def _pct(self) -> float | None:
        return (self.current - self.baseline) / abs(self.baseline) * 100 if self.baseline else None


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


def compare(baseline: dict[str, list[float]], current: dict[str, list[float]], thresholds: list[Threshold],
            seed: int = 0) -> list[Row]:
    rows = []
    for t in thresholds:
        for side, name in ((baseline, "baseline"), (current, "current")):
            if not side.get(t.metric):
                raise GateError(f"metric {t.metric!r} is missing from the {name} results "
                                f"(it has: {', '.join(sorted(side)) or 'nothing'})")
        b, c = baseline[t.metric], current[t.metric]
        mb, mc = statistics.median(b), statistics.median(c)
        change = _change(mb, mc, t)
        bad = (-change if t.higher_is_better else change) > t.amount
        p_value = None
        if bad and len(b) >= 3 and len(c) >= 3:
            p_value = _mann_whitney(b, c, t.higher_is_better)
            bad = p_value < 0.05
        elif bad and (len(b) > 1 or len(c) > 1):
            lo, hi = _bootstrap_interval(b, c, t, seed)
            bad = (-hi if t.higher_is_better else lo) > t.amount  # even the kindest end is past the threshold
        rows.append(Row(t.metric, mb, mc, change, t.describe(), p_value, "fail" if bad else "pass"))
    return rows


def _change(base: float, cur: float, t: Threshold) -> float:
    if not t.relative:
        return cur - base
    if base == 0:
        return 0.0 if cur == 0 else math.copysign(math.inf, cur)
    return (cur - base) / abs(base) * 100


def _mann_whitney(b: list[float], c: list[float], higher_is_better: bool) -> float:
    from scipy.stats import mannwhitneyu

    alternative = "less" if higher_is_better else "greater"  # is current worse than baseline?
    if len(set(b) | set(c)) == 1:
        return 1.0
    return float(mannwhitneyu(c, b, alternative=alternative).pvalue)


def _bootstrap_interval(b: list[float], c: list[float], t: Threshold, seed: int) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    bs = rng.choice(b, size=(2000, len(b))).tolist()
    cs = rng.choice(c, size=(2000, len(c))).tolist()
    diffs = sorted(_change(float(np.median(x)), float(np.median(y)), t) for x, y in zip(bs, cs))
    return diffs[50], diffs[1949]


def markdown(rows: list[Row]) -> str:
    lines = ["| metric | baseline | current | change | threshold | p-value | verdict |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        unit = "%" if r.threshold.endswith("%") else ""
        lines.append(f"| {r.metric} | {r.baseline:,.4g} | {r.current:,.4g} | {r.change:+.3g}{unit} | {r.threshold} "
                     f"| {'' if r.p_value is None else f'{r.p_value:.3f}'} | "
                     f"{'✅ pass' if r.verdict == 'pass' else '❌ FAIL'} |")
    return "\n".join(lines)
