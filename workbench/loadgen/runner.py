"""Run a serving benchmark: probe the server, build the prompts, send them on schedule under the
concurrency cap with a live display, and return a BenchResult."""
from __future__ import annotations

import asyncio
import math
import time
import uuid

import httpx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from workbench.datasets import SampleRequest, sample_requests
from workbench.loadgen.arrivals import arrival_times
from workbench.loadgen.client import make_client, send_request
from workbench.loadgen.config import ServeBenchConfig
from workbench.loadgen.metrics import aggregate
from workbench.loadgen.workers import peak_concurrency, run_in_workers
from workbench.results import BenchResult, collect_environment

LAG_WARN_S = 0.05
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
    try:
        version = httpx.get(f"{base}/version", timeout=5)
        if version.status_code == 200:
            info["version"] = version.json()
    except (httpx.HTTPError, ValueError):
        pass
    return info


def server_token_counter(config: ServeBenchConfig):
    """The server's /tokenize (vLLM and ours have it), or None."""
    base = config.base_url.rstrip("/")
    client = httpx.Client(timeout=30, headers={"Authorization": f"Bearer {config.api_key}"} if config.api_key else {})
    try:
        r = client.post(f"{base}/tokenize", json={"model": config.model, "prompt": "probe"})
        if r.status_code != 200 or "count" not in r.json():
            return None
    except (httpx.HTTPError, ValueError):
        return None
    return lambda text: client.post(f"{base}/tokenize", json={"model": config.model, "prompt": text,
                                                              "add_special_tokens": False}).json()["count"]


def build_requests(config: ServeBenchConfig) -> tuple[list[SampleRequest], str]:
    tokenizer, count, how = None, None, ""
    if config.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(_tokenizer_dir(config.tokenizer))
        how = f"exact, with the tokenizer in {config.tokenizer}"
    else:
        count = server_token_counter(config)
        how = "exact, with the server's /tokenize" if count else (
            "APPROXIMATE: no tokenizer given and the server has no /tokenize; ~4 characters per token")
    total = config.num_prompts + config.warmup
    reqs = sample_requests(config.dataset, num_prompts=total, input_len=config.input_len,
                           output_len=config.output_len, range_ratio=config.range_ratio, seed=config.seed,
                           path=config.dataset_path, tokenizer=tokenizer, count_tokens=count,
                           prefix_len=config.prefix_len, num_prefixes=config.num_prefixes)
    return reqs, how


def _tokenizer_dir(name: str) -> str:
    """A directory, or a preset name (resolved through the engine's preset cache only if it is there)."""
    from pathlib import Path

    if Path(name).is_dir():
        return name
    try:  # optional: presets live with the engine; a plain HTTP user passes a directory
        from engine.presets import resolve_model

        return str(resolve_model(name, with_weights=False))
    except ImportError:
        raise ValueError(f"--tokenizer {name!r} is not a directory") from None


async def wait_for_turn(at: float, start: float, config: ServeBenchConfig) -> tuple[bool, bool]:
    """Sleep until `at` seconds after `start`. Returns (send, late): send is False once --duration
    has passed; late when a rate-limited request is already more than LAG_WARN_S behind."""
    delay = at - (time.perf_counter() - start)
    late = False
    if delay > 0:
        await asyncio.sleep(delay)
    elif -delay > LAG_WARN_S and not math.isinf(config.request_rate):
        late = True
    return config.duration is None or time.perf_counter() - start <= config.duration, late


async def lag_monitor(stop: asyncio.Event, warnings: list[str]) -> None:
    """Warn when the event loop falls behind (the client would then distort the measurement)."""
    last_warn = 0.0
    while not stop.is_set():
        t = time.perf_counter()
        await asyncio.sleep(0.1)
        lag = time.perf_counter() - t - 0.1
        if lag > LAG_WARN_S and time.perf_counter() - last_warn > 3:
            last_warn = time.perf_counter()
            msg = (f"client event loop lagged {lag * 1e3:.0f} ms: the load generator is near its limit "
                   "(more --workers help)")
            warnings.append(msg)
            console.print(f"[yellow]warning:[/] {msg}")


async def arun_serve_benchmark(config: ServeBenchConfig, progress: bool = True) -> BenchResult:
    server = probe_server(config)
    requests, length_note = build_requests(config)
    warm, measured = requests[:config.warmup], requests[config.warmup:]
    cap = config.max_concurrency or len(measured)
    client = make_client(config, connections=min(cap, 1024))
    if warm:
        await asyncio.gather(*(send_request(client, config, r, -1, time.perf_counter(), None) for r in warm))
    times = arrival_times(len(measured), config.request_rate, config.burstiness, config.seed)
    semaphore = asyncio.Semaphore(cap)
    in_flight = peak = 0
    late = 0
    warnings: list[str] = []
    stop = asyncio.Event()
    monitor = asyncio.create_task(lag_monitor(stop, warnings))
    bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[status]}"), TimeElapsedColumn(), console=console,
                   disable=not progress, refresh_per_second=4)
    task = bar.add_task(config.label or "bench serve", total=len(measured), status="")
    out_tokens = 0
    failed = 0
    start = time.perf_counter()

    async def one(i: int, request: SampleRequest):
        nonlocal in_flight, peak, late, out_tokens, failed
        send, was_late = await wait_for_turn(times[i], start, config)
        late += was_late
        if not send:
            return None
        async with semaphore:
            in_flight += 1
            peak = max(peak, in_flight)
            try:
                record = await send_request(client, config, request, i, start, times[i])
            finally:
                in_flight -= 1
        out_tokens += record.output_tokens
        failed += not record.success
        elapsed = time.perf_counter() - start
        bar.update(task, advance=1, status=f"in flight {in_flight}, failed {failed}, "
                                           f"{out_tokens / elapsed:,.0f} out tok/s")
        return record

    def show(done: int, tokens: int, errors: int) -> None:  # totals from the worker processes
        elapsed = time.perf_counter() - start
        bar.update(task, completed=done, status=f"failed {errors}, {tokens / elapsed:,.0f} out tok/s")

    with bar:
        if config.workers > 1:
            stop.set()  # each worker watches its own event loop
            records, late, worker_warnings = await asyncio.to_thread(run_in_workers, config, measured, times, cap,
                                                                     show)
            warnings += worker_warnings
            peak = peak_concurrency(records)
            # Workers start on a common clock a moment after `start`: time the run by its requests.
            duration = max((r.start_time + (r.e2el or 0.0) for r in records), default=0.0) - min(
                (r.start_time for r in records), default=0.0)
        else:
            records = [r for r in await asyncio.gather(*(one(i, r) for i, r in enumerate(measured)))
                       if r is not None]
            duration = time.perf_counter() - start
    stop.set()
    await monitor
    await client.close()
    if late:
        msg = f"{late} requests left more than {LAG_WARN_S * 1e3:.0f} ms behind their scheduled time"
        warnings.append(msg)
        console.print(f"[yellow]warning:[/] {msg}")
    metrics, errors = aggregate(records, duration, config.goodput, peak)
    settings = config.model_dump(mode="json")
    settings["request_rate"] = "inf" if math.isinf(config.request_rate) else config.request_rate
    return BenchResult(kind="serve", label=config.label, config=settings,
                       environment=collect_environment(), server=server, metrics=metrics, requests=records,
                       extra={"errors": errors, "lengths": length_note, "warnings": warnings,
                              "run_id": uuid.uuid4().hex[:12]})


def run_serve_benchmark(config: ServeBenchConfig, progress: bool = True) -> BenchResult:
    try:  # uvloop roughly halves the client's per-chunk cost
        import uvloop

        factory = uvloop.new_event_loop
    except ImportError:
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(arun_serve_benchmark(config, progress))
