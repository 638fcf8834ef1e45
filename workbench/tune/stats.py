"""Is a tuned configuration really better than the defaults? Median ratio, a one-sided Mann-Whitney
U test and a bootstrap 95% interval of the ratio of medians, over interleaved re-runs.

Kept small and free of tuning concepts so that it can merge with the gate's statistics later."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats

ALPHA = 0.05


@dataclass(frozen=True)
class Comparison:
    median_ratio: float  # candidate median / baseline median
    p_value: float  # one-sided: the candidate is better (higher when maximizing, lower when minimizing)
    ci_low: float  # bootstrap 95% interval of the ratio of medians
    ci_high: float
    n_candidate: int
    n_baseline: int
    maximize: bool

    @property
    def significant(self) -> bool:
        """Better by the rank test and by an interval that excludes 1."""
        better_ci = self.ci_low > 1.0 if self.maximize else self.ci_high < 1.0
        return self.p_value < ALPHA and better_ci

    def verdict(self) -> str:
        if not self.significant:
            return "no significant gain over defaults"
        if self.maximize:
            pct = lambda r: f"{100 * (r - 1):+.1f}%"  # noqa: E731
            return f"{pct(self.median_ratio)} over defaults [{pct(self.ci_low)}, {pct(self.ci_high)}]"
        pct = lambda r: f"{100 * (1 - r):.1f}%"  # noqa: E731
        return f"{pct(self.median_ratio)} lower than defaults [{pct(self.ci_high)}, {pct(self.ci_low)}]"

    def as_dict(self) -> dict:
        return asdict(self) | {"significant": self.significant, "verdict": self.verdict()}


def compare(candidate: list[float], baseline: list[float], maximize: bool = True, seed: int = 0) -> Comparison:
    """Needs at least two samples a side; a baseline median of zero leaves the ratio undefined."""
    a, b = np.asarray(candidate, dtype=float), np.asarray(baseline, dtype=float)
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"compare needs at least 2 samples a side, got {len(a)} and {len(b)}")
    if np.median(b) == 0:
        raise ValueError("the baseline's median is 0: a ratio over it is undefined")
    p = stats.mannwhitneyu(a, b, alternative="greater" if maximize else "less").pvalue
    ratio = lambda x, y, axis=-1: np.median(x, axis=axis) / np.median(y, axis=axis)  # noqa: E731
    if np.ptp(a) == 0 and np.ptp(b) == 0:  # no spread at all: the interval is the point
        lo = hi = float(ratio(a, b))
    else:
        ci = stats.bootstrap((a, b), ratio, n_resamples=2000, confidence_level=0.95, method="percentile",
                             rng=np.random.default_rng(seed)).confidence_interval
        lo, hi = float(ci.low), float(ci.high)
    return Comparison(float(ratio(a, b)), float(p), lo, hi, len(a), len(b), maximize)
