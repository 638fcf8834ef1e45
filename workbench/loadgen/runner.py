"""Run a serving benchmark: probe the server, build the prompts, send them on schedule under the
concurrency cap (one Sender here, or several worker processes: workers.py) with a live display,
and return a BenchResult."""
from __future__ import annotations

import asyncio
import math
import time
import uuid

import httpx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from workbench.loadgen.client import make_client, send_request
from workbench.loadgen.config import ServeBenchConfig
from workbench.loadgen.lag import lag_cause as default_lag_cause
from workbench.loadgen.metrics import aggregate, per_turn, windows
from workbench.loadgen.plan import build_plan, build_requests, server_token_counter, tokenizer_dir
from workbench.loadgen.server_side import counter_deltas, sample_metrics, scrape
from workbench.loadgen.workers import LAG_WARN_S, Sender, event_loop_factory, peak_concurrency, run_in_workers
from workbench.results import BenchResult, collect_environment

console = Console(stderr=True)


class ServerUnavailable(Exception):
    """The server cannot be reached or refuses our key: nothing can be measured."""


def probe_server(config: ServeBenchConfig) -> dict:
    """/v1/models (auth checked), /version and /tokenize support, before any load is sent."""
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    base = config.base_url.rstrip("/")
    try:
        models = httpx.get(f"{base}/v1/models", headers=headers, timeout=10)
    except httpx.HTTPError as exc:
        raise ServerUnavailable(f"cannot reach {base}: {type(exc).__name__}: {exc}") from None
    if models.status_code == 401:
        raise ServerUnavailable(f"{base} refused the API key (401); pass the right --api-key")
    if models.status_code != 200:
        raise ServerUnavailable(f"{base}/v1/models answered {models.status_code}: {models.text[:200]}")
    info = {"models": models.json()}
    served = [m.get("id") for m in info["models"].get("data", [])]
    if served and config.model not in served:
        raise ServerUnavailable(f"the server does not serve model {config.model!r}; it serves {served}")
    missing = [name for name in config.lora_names if served and name not in served]
    if missing:
        raise ServerUnavailable(f"the server does not serve {', '.join(map(repr, missing))} (--lora-names); it "
                                f"serves {served}")
    try:
        version = httpx.get(f"{base}/version", timeout=5)
        if version.status_code == 200:
            info["version"] = version.json()
    except (httpx.HTTPError, ValueError):
        pass
    return info


# build_requests and server_token_counter lived here before plan.py: still importable from here.
__all__ = ["ServerUnavailable", "build_requests", "probe_server", "run_serve_benchmark", "server_token_counter"]
_tokenizer_dir = tokenizer_dir


async def arun_serve_benchmark(config: ServeBenchConfig, progress: bool = True,
                               lag_cause: str | None = None) -> BenchResult:
    """lag_cause: why a lagging client lags, as the warning should say (default: judged from the
    server's address and this machine, loadgen/lag.py)."""
    cause = lag_cause or default_lag_cause(config)
    server = probe_server(config)
    plan = build_plan(config)
    total = len(plan.requests) or sum(len(s.turns) for s in plan.sessions)
    cap = config.max_concurrency or total
    client = make_client(config, connections=min(cap, 1024))
    if plan.warmup:
        if progress:
            console.print(f"{config.label or 'bench serve'}: warming up with {len(plan.warmup)} requests "
                          "(not measured)")
        await asyncio.gather(*(send_request(client, config, r, -1, time.perf_counter(), None) for r in plan.warmup))
    bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[status]}"), TimeElapsedColumn(), console=console, disable=not progress,
                   refresh_per_second=4)
    task = bar.add_task(config.label or "bench serve", total=total, status="")
    before = await asyncio.to_thread(scrape, config.base_url, config.api_key)
    samples: list[dict] = []
    stop = asyncio.Event()
    start = time.perf_counter()

    def show(done: int, tokens: int, failed: int) -> None:
        bar.update(task, completed=done, status=f"failed {failed}, "
                                                f"{tokens / (time.perf_counter() - start):,.0f} out tok/s")

    sampler = asyncio.create_task(sample_metrics(config.base_url, config.api_key, start, stop, samples))
    with bar:
        if config.workers > 1:
            records, late, warnings = await asyncio.to_thread(run_in_workers, config, plan.requests, plan.times,
                                                              cap, show)
            # Workers start on a common clock a moment after `start`: time the run by its requests.
            duration = max((r.start_time + (r.e2el or 0.0) for r in records), default=0.0) - min(
                (r.start_time for r in records), default=0.0)
            peak = peak_concurrency(records)
        else:  # one sender, in this event loop
            sender = Sender(config, client, cap, show, lag_cause=cause)
            records = await sender.run(start, plan.requests, plan.times, sessions=plan.sessions)
            duration = time.perf_counter() - start
            late, warnings, peak = sender.late, sender.warnings, sender.peak
    stop.set()
    await sampler
    await client.close()
    after = await asyncio.to_thread(scrape, config.base_url, config.api_key)
    if late:
        msg = f"{late} requests left more than {LAG_WARN_S * 1e3:.0f} ms behind their scheduled time: {cause}"
        warnings.append(msg)
        console.print(f"[yellow]warning:[/] {msg}", soft_wrap=True)
    metrics, errors = aggregate(records, duration, config.goodput, peak)
    metrics |= counter_deltas(before, after)
    settings = config.model_dump(mode="json")
    settings["request_rate"] = "inf" if math.isinf(config.request_rate) else config.request_rate
    return BenchResult(kind="serve", label=config.label, config=settings, environment=collect_environment(),
                       server=server, metrics=metrics, requests=records, telemetry=samples,
                       windows=windows(records, duration), turns=per_turn(records),
                       extra={"errors": errors, "lengths": plan.lengths, "warnings": warnings,
                              "run_id": uuid.uuid4().hex[:12]})


def run_serve_benchmark(config: ServeBenchConfig, progress: bool = True, lag_cause: str | None = None) -> BenchResult:
    with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
        return runner.run(arun_serve_benchmark(config, progress, lag_cause))
