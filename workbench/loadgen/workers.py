"""How a run's requests are sent: one path for every run.

A `Sender` sends one share of a run on a shared clock: each request at its scheduled time, under
its share of the concurrency cap, counting lateness and watching its own event loop for lag. A
single-process run is one Sender in the parent's event loop. One Python event loop tops out at a
few hundred streamed requests a second (the openai client's per-request work), so `--workers N`
runs N Senders in child processes, each with every N-th request, its share of the cap and the same
arrival schedule on the shared monotonic clock; the parent gathers the records and drives the
progress display."""
from __future__ import annotations

import asyncio
import math
import multiprocessing as mp
import queue as queue_mod
import time
from collections.abc import Callable

from rich.console import Console

from workbench.datasets import SampleRequest
from workbench.loadgen.client import make_client, send_request
from workbench.loadgen.config import ServeBenchConfig
from workbench.loadgen.lag import lag_cause as judge_lag_cause
from workbench.loadgen.server_side import counter_deltas, scrape
from workbench.loadgen.sessions import Session, history_messages, history_prompt
from workbench.results import RequestRecord

LAG_WARN_S = 0.05
FLUSH_S = 0.25  # how often a worker process reports progress
console = Console(stderr=True)


def shares(total: int, parts: int) -> list[int]:
    """`total` split into `parts` near-equal positive shares (a concurrency cap per worker)."""
    return [total // parts + (1 if k < total % parts else 0) for k in range(parts)]


def peak_concurrency(records: list[RequestRecord]) -> int:
    """The most requests in flight at once, from their start times and latencies."""
    events = sorted([(r.start_time, 1) for r in records] + [(r.start_time + (r.e2el or 0.0), -1) for r in records],
                    key=lambda e: (e[0], e[1]))  # an end before a start at the same instant
    peak = now = 0
    for _, step in events:
        now += step
        peak = max(peak, now)
    return peak


def paced(config: ServeBenchConfig) -> bool:
    """Whether requests have send times to keep (a rate, a ramp, a trace or multi-turn think times)."""
    return not math.isinf(config.request_rate) or bool(config.ramp_up) or config.dataset in ("trace", "multi-turn")


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


async def lag_monitor(stop: asyncio.Event, warnings: list[str], cause: str) -> None:
    """Warn when the event loop falls behind (the client would then distort the measurement)."""
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


class Sender:
    """One share of a run, sent from one event loop. `on_progress(done, output_tokens, failed)` is
    called after every request."""

    def __init__(self, config: ServeBenchConfig, client, cap: int,
                 on_progress: Callable[[int, int, int], None] | None = None, lag_cause: str | None = None):
        """lag_cause: why a lagging client lags, as its warning says (default: loadgen/lag.py's judgement)."""
        self.config, self.client = config, client
        self.lag_cause = lag_cause or judge_lag_cause(config)
        self.semaphore = asyncio.Semaphore(cap)
        self.on_progress = on_progress
        self.in_flight = self.peak = self.late = 0
        self.counts = [0, 0, 0]  # done, output tokens, failed
        self.warnings: list[str] = []
        self.start = 0.0
        # Sequential runs can attribute /metrics deltas to single requests (the per-turn hit rate where
        # the server does not report cached tokens in its usage).
        self.attribute = cap == 1 and config.dataset == "multi-turn"

    async def run(self, start: float, requests: list[SampleRequest], times: list[float],
                  indices: list[int] | None = None, sessions: list[Session] | None = None) -> list[RequestRecord]:
        """Send `requests` at `times` seconds after `start` (indices: their places in the whole run), or
        the `sessions` starting at `times`; the records of what was sent."""
        self.start = start
        stop = asyncio.Event()
        monitor = asyncio.create_task(lag_monitor(stop, self.warnings, self.lag_cause))
        try:
            if sessions:
                done = await asyncio.gather(*(self.session(s, t) for s, t in zip(sessions, times)))
                return [r for rs in done for r in rs]
            indices = list(range(len(requests))) if indices is None else indices
            done = await asyncio.gather(*(self.one(i, r, t) for i, r, t in zip(indices, requests, times)))
            return [r for r in done if r is not None]
        finally:
            stop.set()
            await monitor

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
        self.counts[0] += 1
        self.counts[1] += record.output_tokens
        self.counts[2] += not record.success
        if self.on_progress:
            self.on_progress(*self.counts)
        return record

    async def one(self, i: int, request: SampleRequest, at: float):
        send, was_late = await wait_for_turn(at, self.start, self.config)
        self.late += was_late
        return await self.send(request, i, at) if send else None

    async def session(self, session: Session, at: float) -> list[RequestRecord]:
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


# ---------------------------------------------------------------- several processes
def run_in_workers(config: ServeBenchConfig, requests: list[SampleRequest], times: list[float], cap: int,
                   on_progress) -> tuple[list[RequestRecord], int, list[str]]:
    """Blocking: start the workers, release them together, collect (records, late, warnings).
    `on_progress(done, output_tokens, failed)` is called with running totals."""
    ctx = mp.get_context("spawn")  # the parent runs an event loop and threads: never fork it
    n = min(config.workers, len(requests))
    caps = shares(max(cap, n), n)
    inbox, go, start_at = ctx.Queue(), ctx.Event(), ctx.Value("d", 0.0)
    procs = [ctx.Process(target=_worker, daemon=True,
                         args=(k, config.model_dump(), requests[k::n], list(range(k, len(requests), n)),
                               times[k::n], caps[k], start_at, go, inbox)) for k in range(n)]
    for p in procs:
        p.start()
    try:
        _expect(inbox, procs, "ready", n)
        start_at.value = time.perf_counter() + 0.05
        go.set()
        return _collect(inbox, procs, n, on_progress)
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()


def _expect(inbox, procs, kind: str, count: int) -> None:
    seen = 0
    while seen < count:
        msg = _get(inbox, procs)
        if msg[0] != kind:
            raise RuntimeError(f"load generator worker: expected {kind!r}, got {msg[0]!r}")
        seen += 1


def _get(inbox, procs):
    while True:
        try:
            msg = inbox.get(timeout=1.0)
        except queue_mod.Empty:
            if any(p.exitcode not in (None, 0) for p in procs):
                raise RuntimeError("a load generator worker died; see its output above") from None
            continue
        if msg[0] == "error":
            raise RuntimeError(f"load generator worker failed: {msg[1]}")
        return msg


def _collect(inbox, procs, n: int, on_progress):
    records, late, warnings, finished = [], 0, [], 0
    totals = [[0, 0, 0] for _ in range(n)]
    while finished < n:
        msg = _get(inbox, procs)
        if msg[0] == "progress":
            totals[msg[1]] = msg[2]
            on_progress(*(sum(t[j] for t in totals) for j in range(3)))
        elif msg[0] == "done":
            records += msg[1]
            late += msg[2]
            warnings += msg[3]
            finished += 1
    records.sort(key=lambda r: r.index)
    return records, late, warnings


def event_loop_factory():
    """uvloop where installed: it roughly halves the client's per-chunk cost."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def _worker(worker_id, config_dict, requests, indices, times, cap, start_at, go, inbox) -> None:
    try:
        config = ServeBenchConfig(**config_dict)
        with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
            runner.run(_send_share(worker_id, config, requests, indices, times, cap, start_at, go, inbox))
    except BaseException as exc:  # noqa: BLE001 -- reported to the parent, which fails the run clearly
        inbox.put(("error", f"{type(exc).__name__}: {exc}"))


async def _send_share(worker_id, config, requests, indices, times, cap, start_at, go, inbox) -> None:
    """A worker process: one Sender over its share; progress to the parent every FLUSH_S."""
    client = make_client(config, connections=min(cap, 1024))
    sender = Sender(config, client, cap)
    inbox.put(("ready",))
    await asyncio.to_thread(go.wait)
    stop = asyncio.Event()

    async def report():
        while not stop.is_set():
            inbox.put(("progress", worker_id, list(sender.counts)))
            await asyncio.sleep(FLUSH_S)

    reporter = asyncio.create_task(report())
    records = await sender.run(start_at.value, requests, times, indices)
    stop.set()
    await reporter
    await client.close()
    inbox.put(("progress", worker_id, list(sender.counts)))
    inbox.put(("done", records, sender.late, sender.warnings))
