"""Latency-versus-throughput curves: a list of rates, or GuideLLM's sweep (a synchronous run, a
saturating run, then N rates evenly between their throughputs)."""
from __future__ import annotations

import math

from workbench.loadgen.config import ServeBenchConfig
from workbench.loadgen.runner import run_serve_benchmark
from workbench.results import BenchResult


def run_rates(config: ServeBenchConfig, rates: list[float], progress: bool = True) -> list[BenchResult]:
    results = []
    for rate in rates:
        label = f"{config.label + ' ' if config.label else ''}rate={'inf' if math.isinf(rate) else f'{rate:g}'}"
        results.append(run_serve_benchmark(config.model_copy(update={"request_rate": rate, "label": label}),
                                           progress))
    return results


def run_sweep(config: ServeBenchConfig, n: int, progress: bool = True) -> list[BenchResult]:
    if n < 1:
        raise ValueError(f"--sweep needs at least 1 intermediate rate, got {n}")
    prefix = config.label + " " if config.label else ""
    sync = run_serve_benchmark(config.model_copy(update={"request_rate": math.inf, "max_concurrency": 1,
                                                         "label": prefix + "sync"}), progress)
    peak = run_serve_benchmark(config.model_copy(update={"request_rate": math.inf, "label": prefix + "max"}),
                               progress)
    low, high = sync.metrics["request_throughput"], peak.metrics["request_throughput"]
    rates = [low + (high - low) * (i + 1) / (n + 1) for i in range(n)]
    return [sync, *run_rates(config, rates, progress), peak]
