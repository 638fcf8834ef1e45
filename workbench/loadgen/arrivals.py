"""When each request is sent: gamma-distributed gaps (shape = burstiness), as vLLM's benchmark does."""
from __future__ import annotations

import math

import numpy as np


def arrival_times(num: int, rate: float, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """Seconds from the start for each of `num` requests. Mean gap 1/rate; burstiness 1 is a Poisson
    process, below 1 burstier, above 1 more regular. rate=inf sends all at time 0."""
    if math.isinf(rate):
        return [0.0] * num
    rng = np.random.default_rng(seed)
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=num)
    gaps[0] = 0.0  # the first request goes out at once
    return np.cumsum(gaps).tolist()
