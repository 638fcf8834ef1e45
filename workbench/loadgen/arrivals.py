"""When each request is sent: gamma-distributed gaps (shape = burstiness), as vLLM's benchmark does,
at a constant rate or along a ramp (linear or exponential) from one rate to another."""
from __future__ import annotations

import math

import numpy as np


def arrival_times(num: int, rate: float, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """Seconds from the start for each of `num` requests. Mean gap 1/rate; burstiness 1 is a Poisson
    process, below 1 burstier, above 1 more regular. rate=inf sends all at time 0."""
    if math.isinf(rate):
        return [0.0] * num
    return (_unit_process(num, burstiness, seed) / rate).tolist()


def _unit_process(num: int, burstiness: float, seed: int) -> np.ndarray:
    """Arrival instants of a renewal process of rate 1 (gamma gaps), the first at 0."""
    rng = np.random.default_rng(seed)
    gaps = rng.gamma(shape=burstiness, scale=1.0 / burstiness, size=num)
    gaps[0] = 0.0  # the first request goes out at once
    return np.cumsum(gaps)


def ramp_period(num: int, kind: str, start: float, end: float) -> float:
    """The ramp's length in seconds when it is to carry `num` requests on average: the integral of the
    rate over the period equals num."""
    if kind == "linear":
        return 2.0 * num / (start + end)
    if start == end:
        return num / start
    return num * math.log(end / start) / (end - start)


def expected_count(t: float, kind: str, start: float, end: float, period: float) -> float:
    """Λ(t): how many requests a ramp of `period` seconds has sent by time t on average."""
    t = min(t, period)
    if kind == "linear":
        return start * t + (end - start) * t * t / (2.0 * period)
    if start == end:
        return start * t
    k = math.log(end / start)
    return start * period / k * (math.exp(k * t / period) - 1.0)


def ramp_arrival_times(num: int, kind: str, start: float, end: float, burstiness: float = 1.0, seed: int = 0,
                       period: float | None = None) -> list[float]:
    """Send times whose rate goes from `start` to `end` requests/s over `period` seconds (by default the
    period that carries `num` requests), linearly or exponentially. A renewal process of rate 1 is mapped
    through the inverse of Λ (time rescaling), so burstiness keeps its meaning; beyond the period the
    rate stays at `end`."""
    if kind not in ("linear", "exponential"):
        raise ValueError(f"ramp-up must be linear or exponential, got {kind!r}")
    if not (start > 0 and end > 0 and math.isfinite(start) and math.isfinite(end)):
        raise ValueError("ramp-up rates must be positive and finite")
    period = period or ramp_period(num, kind, start, end)
    total = expected_count(period, kind, start, end, period)
    return [_invert(float(s), kind, start, end, period, total) for s in _unit_process(num, burstiness, seed)]


def _invert(s: float, kind: str, start: float, end: float, period: float, total: float) -> float:
    """The t with Λ(t) = s (closed forms); past the period, constant rate `end`."""
    if s >= total:
        return period + (s - total) / end
    if kind == "linear":
        if start == end:
            return s / start
        a = (end - start) / (2.0 * period)  # a t^2 + start t - s = 0
        return (-start + math.sqrt(start * start + 4.0 * a * s)) / (2.0 * a)
    if start == end:
        return s / start
    k = math.log(end / start)
    return period / k * math.log1p(s * k / (start * period))
