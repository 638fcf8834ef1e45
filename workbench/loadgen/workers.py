"""One run spread over several client processes. One Python event loop tops out at a few hundred
streamed requests a second (the openai client's per-request work), so `--workers N` gives each
process every N-th request, its share of the concurrency cap and the same arrival schedule on
the shared monotonic clock; the parent gathers the records and drives the progress display."""
from __future__ import annotations

import asyncio
import multiprocessing as mp
import queue as queue_mod
import time

from workbench.datasets import SampleRequest
from workbench.loadgen.config import ServeBenchConfig
from workbench.results import RequestRecord

FLUSH_S = 0.25  # how often a worker reports progress


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


def _worker(worker_id, config_dict, requests, indices, times, cap, start_at, go, inbox) -> None:
    try:
        config = ServeBenchConfig(**config_dict)
        try:
            import uvloop

            factory = uvloop.new_event_loop
        except ImportError:
            factory = None
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(_send_share(worker_id, config, requests, indices, times, cap, start_at, go, inbox))
    except BaseException as exc:  # noqa: BLE001 -- reported to the parent, which fails the run clearly
        inbox.put(("error", f"{type(exc).__name__}: {exc}"))


async def _send_share(worker_id, config, requests, indices, times, cap, start_at, go, inbox) -> None:
    from workbench.loadgen.client import make_client, send_request
    from workbench.loadgen.lag import lag_cause
    from workbench.loadgen.runner import lag_monitor, wait_for_turn

    client = make_client(config, connections=min(cap, 1024))
    inbox.put(("ready",))
    await asyncio.to_thread(go.wait)
    start = start_at.value
    semaphore = asyncio.Semaphore(cap)
    counts = [0, 0, 0]  # done, output tokens, failed
    late = 0
    warnings: list[str] = []
    stop = asyncio.Event()

    async def one(i: int, request: SampleRequest, at: float):
        nonlocal late
        send, was_late = await wait_for_turn(at, start, config)
        late += was_late
        if not send:
            return None
        async with semaphore:
            record = await send_request(client, config, request, i, start, at)
        counts[0] += 1
        counts[1] += record.output_tokens
        counts[2] += not record.success
        return record

    async def report():
        while not stop.is_set():
            inbox.put(("progress", worker_id, list(counts)))
            await asyncio.sleep(FLUSH_S)

    tasks = [asyncio.create_task(report()), asyncio.create_task(lag_monitor(stop, warnings, lag_cause(config)))]
    records = await asyncio.gather(*(one(i, r, t) for i, r, t in zip(indices, requests, times)))
    stop.set()
    await asyncio.gather(*tasks)
    await client.close()
    inbox.put(("progress", worker_id, list(counts)))
    inbox.put(("done", [r for r in records if r is not None], late, warnings))
