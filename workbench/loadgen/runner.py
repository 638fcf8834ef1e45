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

from workbench.datasets import SampleRequest
from workbench.loadgen.client import make_client, send_request
from workbench.loadgen.config import ServeBenchConfig
from workbench.loadgen.lag import lag_cause as default_lag_cause
from workbench.loadgen.metrics import aggregate, per_turn, windows
from workbench.loadgen.plan import Plan, build_plan, build_requests, server_token_counter, tokenizer_dir
from workbench.loadgen.server_side import counter_deltas, sample_metrics, scrape
from workbench.loadgen.sessions import Session, history_messages, history_prompt
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


async def wait_for_turn(at: float, start: float, config: ServeBenchConfig) -> tuple[bool, bool]:
    """Sleep until `at` seconds after `start`. Returns (send, late): send is False once --duration
    has passed; late when a rate-limited request is already more than LAG_WARN_S behind."""
    delay = at - (time.perf_counter() - start)
    late = False
    if delay > 0:
        await asyncio.sleep(delay)
    elif -delay > LAG_WARN_S and paced(config):
        late = True
    return config.duration is None or time.perf_counter() - start <= config.duration, late


def paced(config: ServeBenchConfig) -> bool:
    """Whether requests have send times to keep (a rate, a ramp, a trace or multi-turn think times)."""
    return not math.isinf(config.request_rate) or bool(config.ramp_up) or config.dataset in ("trace", "multi-turn")


async def lag_monitor(stop: asyncio.Event, warnings: list[str], cause: str) -> None:
    """Warn when the event loop falls behind (the client would then distort the measurement); `cause`
    says why, for this command and machine (loadgen/lag.py)."""
    last_warn = 0.0
    while not stop.is_set():
        t = time.perf_counter()
        await asyncio.sleep(0.1)
        lag = time.perf_counter() - t - 0.1
        if lag > LAG_WARN_S and time.perf_counter() - last_warn > 3:
            last_warn = time.perf_counter()
            msg = f"client event loop lagged {lag * 1e3:.0f} ms: {cause}"
            warnings.append(msg)
            console.print(f"[yellow]warning:[/] {msg}", soft_wrap=True)


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
    run = _Run(config, client, cap, progress, total)
    before = await asyncio.to_thread(scrape, config.base_url, config.api_key)
    samples: list[dict] = []
    run.start = time.perf_counter()
    sampler = asyncio.create_task(sample_metrics(config.base_url, config.api_key, run.start, run.stop, samples))
    monitor = asyncio.create_task(lag_monitor(run.stop, run.warnings, cause))
    with run.bar:
        if config.workers > 1:
            records, duration = await run.in_workers(plan)
        elif plan.sessions:
            records = [r for rs in await asyncio.gather(*(run.session(s, t) for s, t in zip(plan.sessions, plan.times)))
                       for r in rs]
            duration = time.perf_counter() - run.start
        else:
            records = [r for r in await asyncio.gather(*(run.one(i, r, plan.times[i])
                                                         for i, r in enumerate(plan.requests))) if r is not None]
            duration = time.perf_counter() - run.start
    run.stop.set()
    await asyncio.gather(monitor, sampler)
    await client.close()
    after = await asyncio.to_thread(scrape, config.base_url, config.api_key)
    if run.late:
        msg = f"{run.late} requests left more than {LAG_WARN_S * 1e3:.0f} ms behind their scheduled time: {cause}"
        run.warnings.append(msg)
        console.print(f"[yellow]warning:[/] {msg}", soft_wrap=True)
    metrics, errors = aggregate(records, duration, config.goodput, run.peak or peak_concurrency(records))
    metrics |= counter_deltas(before, after)
    settings = config.model_dump(mode="json")
    settings["request_rate"] = "inf" if math.isinf(config.request_rate) else config.request_rate
    return BenchResult(kind="serve", label=config.label, config=settings, environment=collect_environment(),
                       server=server, metrics=metrics, requests=records, telemetry=samples,
                       windows=windows(records, duration), turns=per_turn(records),
                       extra={"errors": errors, "lengths": plan.lengths, "warnings": run.warnings,
                              "run_id": uuid.uuid4().hex[:12]})


class _Run:
    """The state of one single-process run: the cap, the counters the progress bar shows, lateness."""

    def __init__(self, config: ServeBenchConfig, client, cap: int, progress: bool, total: int):
        self.config, self.client = config, client
        self.cap = cap
        self.semaphore = asyncio.Semaphore(cap)
        self.in_flight = self.peak = self.late = self.out_tokens = self.failed = 0
        self.warnings: list[str] = []
        self.stop = asyncio.Event()
        self.start = 0.0
        self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[status]}"), TimeElapsedColumn(), console=console,
                            disable=not progress, refresh_per_second=4)
        self.task = self.bar.add_task(config.label or "bench serve", total=total, status="")
        # Sequential runs can attribute /metrics deltas to single requests (the per-turn hit rate where
        # the server does not report cached tokens in its usage).
        self.attribute = cap == 1 and config.dataset == "multi-turn"

    async def send(self, request: SampleRequest, index: int, at: float, reply: list[str] | None = None):
        async with self.semaphore:
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
            try:
                before = await asyncio.to_thread(scrape, self.config.base_url, self.config.api_key) \
                    if self.attribute else None
                record = await send_request(self.client, self.config, request, index, self.start, at, reply)
                if before and record.cached_tokens is None:
                    after = await asyncio.to_thread(scrape, self.config.base_url, self.config.api_key)
                    hits = counter_deltas(before, after).get("server_prefix_cache_hits")
                    record.cached_tokens = None if hits is None else int(hits)
            finally:
                self.in_flight -= 1
        self.out_tokens += record.output_tokens
        self.failed += not record.success
        elapsed = time.perf_counter() - self.start
        self.bar.update(self.task, advance=1, status=f"in flight {self.in_flight}, failed {self.failed}, "
                                                     f"{self.out_tokens / elapsed:,.0f} out tok/s")
        return record

    async def one(self, i: int, request: SampleRequest, at: float):
        send, was_late = await wait_for_turn(at, self.start, self.config)
        self.late += was_late
        return await self.send(request, i, at) if send else None

    async def session(self, session: Session, at: float) -> list:
        """A conversation: each turn sent when the previous reply is in and the think time has passed;
        its prompt is the whole history (the replies as the server gave them) plus the new message."""
        history: list[tuple[str, str]] = []
        records = []
        chat = self.config.endpoint == "chat"
        for k, turn in enumerate(session.turns):
            send, was_late = await wait_for_turn(at, self.start, self.config)
            self.late += was_late
            if not send:
                break
            prompt = history_prompt(history, turn.message)
            request = SampleRequest(prompt, turn.message_len, turn.output_len,
                                    messages=history_messages(history, turn.message) if chat else None)
            reply: list[str] = []
            record = await self.send(request, session.index * self.config.num_turns + k, at, reply)
            record.session, record.turn = session.index, k
            records.append(record)
            if not record.success:
                break  # a conversation cannot go on without its reply
            history.append((turn.message, "".join(reply)))
            at = time.perf_counter() - self.start + self.config.think_time
        return records

    async def in_workers(self, plan: Plan):
        def show(done: int, tokens: int, errors: int) -> None:  # totals from the worker processes
            elapsed = time.perf_counter() - self.start
            self.bar.update(self.task, completed=done, status=f"failed {errors}, {tokens / elapsed:,.0f} out tok/s")

        records, self.late, worker_warnings = await asyncio.to_thread(run_in_workers, self.config, plan.requests,
                                                                      plan.times, self.cap, show)
        self.warnings += worker_warnings  # each worker watched its own event loop
        # Workers start on a common clock a moment after `start`: time the run by its requests.
        duration = max((r.start_time + (r.e2el or 0.0) for r in records), default=0.0) - min(
            (r.start_time for r in records), default=0.0)
        return records, duration


def run_serve_benchmark(config: ServeBenchConfig, progress: bool = True, lag_cause: str | None = None) -> BenchResult:
    try:  # uvloop roughly halves the client's per-chunk cost
        import uvloop

        factory = uvloop.new_event_loop
    except ImportError:
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(arun_serve_benchmark(config, progress, lag_cause))
