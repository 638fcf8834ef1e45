"""Latency-versus-throughput curves: a list of rates, or GuideLLM's sweep (a synchronous run, a
saturating run, then N rates evenly between their throughputs).

Each point is a clean measurement: it gets its own seed (fresh prompts, so no point is served from the
cache a previous one warmed) and, where the server has `POST /reset_prefix_cache`, a cold prefix cache."""
from __future__ import annotations

import math

from rich.console import Console

from workbench.loadgen.config import ServeBenchConfig
from workbench.loadgen.runner import run_serve_benchmark
from workbench.loadgen.server_side import reset_prefix_cache
from workbench.results import BenchResult

console = Console(stderr=True)


class _Points:
    """Runs the points of one sweep in order: seed + k for the k-th point, the cache reset before each.
    A server without the reset endpoint is said so once."""

    def __init__(self, config: ServeBenchConfig, progress: bool):
        self.config, self.progress = config, progress
        self.count = 0
        self.reset_supported: bool | None = None if config.reset_prefix_cache else False

    def run(self, **update) -> BenchResult:
        point = self.config.model_copy(update={**update, "seed": self.config.seed + self.count})
        self.count += 1
        if self.reset_supported is not False:  # not tried yet, or it worked last time
            self.reset_supported = reset_prefix_cache(point.base_url, point.api_key)
            if not self.reset_supported:
                console.print("[yellow]note:[/] the server has no /reset_prefix_cache (404): sweep points are "
                              "not reset between runs (each still gets fresh prompts)")
        result = run_serve_benchmark(point, self.progress)
        result.extra["prefix_cache_reset"] = ("reset before this point" if self.reset_supported else
                                              "not supported by the server" if self.config.reset_prefix_cache
                                              else "off (--no-reset-prefix-cache)")
        return result


def _label(config: ServeBenchConfig, text: str) -> str:
    return f"{config.label + ' ' if config.label else ''}{text}"


def _rate_text(rate: float) -> str:
    return "inf" if math.isinf(rate) else f"{rate:g}"


def run_rates(config: ServeBenchConfig, rates: list[float], progress: bool = True,
              points: _Points | None = None) -> list[BenchResult]:
    points = points or _Points(config, progress)
    return [points.run(request_rate=rate, label=_label(config, f"rate={_rate_text(rate)}")) for rate in rates]


def run_sweep(config: ServeBenchConfig, n: int, progress: bool = True) -> list[BenchResult]:
    if n < 1:
        raise ValueError(f"--sweep needs at least 1 intermediate rate, got {n}")
    points = _Points(config, progress)
    sync = points.run(request_rate=math.inf, max_concurrency=1, label=_label(config, "sync"))
    peak = points.run(request_rate=math.inf, label=_label(config, "max"))
    low, high = sync.metrics["request_throughput"], peak.metrics["request_throughput"]
    rates = [low + (high - low) * (i + 1) / (n + 1) for i in range(n)]
    return [sync, *run_rates(config, rates, progress, points), peak]
