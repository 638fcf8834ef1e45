"""One background thread owns the LLMEngine and steps it while there is work; asyncio handlers add
and abort requests through a command queue and receive outputs on per-request asyncio queues, so
neither side ever blocks the other."""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from engine.llm_engine import EngineStats, LLMEngine
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams

log = logging.getLogger("engine.server")


@dataclass
class _Add:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    outputs: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    arrival_time: float


@dataclass
class _Abort:
    request_id: str


class AsyncEngine:
    def __init__(self, engine: LLMEngine, on_output=None):
        self.engine = engine
        self.on_output = on_output  # called in the engine thread for each output (metrics)
        self.stats: EngineStats = engine.get_stats()  # a snapshot, replaced after every step
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._queues: dict[str, tuple[asyncio.Queue, asyncio.AbstractEventLoop]] = {}
        self._stop = threading.Event()
        self._dead: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------- asyncio side
    async def generate(self, request_id: str, prompt_token_ids: list[int],
                       params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """Yields cumulative outputs until the request finishes. Leaving early (a client that went
        away, a cancelled task) aborts the request and frees its KV blocks."""
        if self._dead is not None:
            raise RuntimeError(f"the engine loop has stopped: {self._dead!r}")
        outputs: asyncio.Queue = asyncio.Queue()
        self._commands.put(_Add(request_id, prompt_token_ids, params, outputs, asyncio.get_running_loop(),
                                time.monotonic()))
        finished = False
        try:
            while True:
                item = await outputs.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._commands.put(_Abort(request_id))

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._commands.put(None)  # wake the loop
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self._dead is None

    # ---------------------------------------------------------------- engine thread
    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                busy = self.engine.has_unfinished_requests()
                self._drain(block=not busy)
                if self._stop.is_set():
                    break
                if self.engine.has_unfinished_requests():
                    for out in self.engine.step():
                        self._deliver(out)
                    self.stats = self.engine.get_stats()
        except BaseException as exc:  # report to every waiting request instead of hanging them
            log.exception("engine loop failed")
            self._dead = exc
            for rid in list(self._queues):
                self._send(rid, RuntimeError(f"engine failure: {exc!r}"))
        finally:
            if self.engine.requests:
                self.engine.abort_request(list(self.engine.requests))
                for out in self.engine.step():
                    self._deliver(out)

    def _drain(self, block: bool) -> None:
        try:
            command = self._commands.get(timeout=0.5) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while command is not None or not self._commands.empty():
            if isinstance(command, _Add):
                self._queues[command.request_id] = (command.outputs, command.loop)
                try:
                    self.engine.add_request(command.request_id, command.prompt_token_ids, command.params,
                                            arrival_time=command.arrival_time)
                except ValueError as exc:
                    self._send(command.request_id, exc)
                    self._queues.pop(command.request_id, None)
            elif isinstance(command, _Abort):
                self.engine.abort_request(command.request_id)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                break
        self.stats = self.engine.get_stats()

    def _deliver(self, out: RequestOutput) -> None:
        if self.on_output is not None:
            self.on_output(out)
        self._send(out.request_id, out)
        if out.finished:
            self._queues.pop(out.request_id, None)

    def _send(self, request_id: str, item) -> None:
        target = self._queues.get(request_id)
        if target is not None:
            q, loop = target
            loop.call_soon_threadsafe(q.put_nowait, item)
