"""SLO capacity: the highest request rate (or concurrency) at which the p99 latencies still meet
their targets, found in a few probes: bracket by doubling (or halving) from a start value, then
bisect between the last pass and the first failure (as vLLM's `sweep serve_sla` does).

A probe is any function value -> metrics; this module decides nothing about servers."""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from workbench.loadgen.config import SLO_KEYS


class CapacitySpec(BaseModel):
    """The study's [capacity] table."""
    model_config = ConfigDict(extra="forbid")
    knob: Literal["request_rate", "max_concurrency"] = "request_rate"
    slo: dict[str, float]  # p99 targets in ms: ttft, tpot, e2el
    percentile: Literal[90, 95, 99] = 99
    start: float = Field(4.0, gt=0)
    low: float = Field(0.25, gt=0)  # below this the configuration's capacity is 0
    high: float = Field(1024.0, gt=0)  # never probe above this
    max_probes: int = Field(7, ge=2)
    tolerance: float = Field(0.1, gt=0)  # stop when (fail - pass) / pass is within this
    probe_seconds: float | None = Field(None, gt=0)  # rate knob: prompts per probe = rate x this (at least num_prompts)

    @field_validator("slo")
    @classmethod
    def _known(cls, v: dict[str, float]) -> dict[str, float]:
        if not v:
            raise ValueError("give at least one SLO, e.g. { ttft = 500, tpot = 50 }")
        unknown = set(v) - set(SLO_KEYS)
        if unknown:
            raise ValueError(f"unknown SLO(s) {sorted(unknown)}; use {', '.join(SLO_KEYS)}")
        if any(ms <= 0 for ms in v.values()):
            raise ValueError("SLO thresholds must be positive milliseconds")
        return v

    @model_validator(mode="after")
    def _range(self) -> CapacitySpec:
        if not self.low <= self.start <= self.high:
            raise ValueError(f"need low <= start <= high, got {self.low}, {self.start}, {self.high}")
        return self

    def misses(self, metrics: dict) -> list[str]:
        """The targets a probe missed (a failed request or a missing figure is a miss)."""
        out = [] if not metrics.get("error_rate") else [f"error_rate {metrics['error_rate']:.3f}"]
        for key, limit in self.slo.items():
            v = metrics.get(f"p{self.percentile}_{key}_ms")
            if v is None or not v <= limit:
                out.append(f"p{self.percentile} {key} {v if v is None else round(v, 1)} > {limit:g} ms")
        return out


@dataclass
class CapacityResult:
    capacity: float  # 0 when even `low` misses the SLO
    metrics: dict  # of the highest passing probe (of the last probe when none passed)
    probes: list[dict] = field(default_factory=list)  # [{value, passed, misses}] in probe order


def search(spec: CapacitySpec, probe: Callable[[float], dict]) -> CapacityResult:
    integer = spec.knob == "max_concurrency"
    fix = (lambda v: max(1, int(round(v)))) if integer else (lambda v: v)  # noqa: E731
    probes: list[dict] = []
    best: tuple[float, dict] | None = None
    last: dict = {}
    lo, hi = None, None  # highest pass, lowest failure

    def run(value: float) -> bool:
        nonlocal best, last
        metrics = probe(value)
        misses = spec.misses(metrics)
        probes.append({"value": value, "passed": not misses, "misses": misses})
        last = metrics
        if not misses and (best is None or value > best[0]):
            best = (value, metrics)
        return not misses

    value = fix(spec.start)
    while len(probes) < spec.max_probes:  # bracket
        if run(value):
            lo = value
            if hi is not None or value >= spec.high:
                break
            value = fix(min(spec.high, value * 2))
        else:
            hi = value
            if lo is not None or value <= spec.low:
                break
            value = fix(max(spec.low, value / 2))
        if value in (lo, hi):
            break
    while lo is not None and hi is not None and len(probes) < spec.max_probes:  # bisect
        if (hi - lo) / lo <= spec.tolerance:
            break
        mid = fix(math.sqrt(lo * hi)) if not integer else (lo + hi) // 2
        if mid in (lo, hi):
            break
        if run(mid):
            lo = mid
        else:
            hi = mid
    if best is None:
        return CapacityResult(0.0, last, probes)
    return CapacityResult(float(best[0]), best[1], probes)
