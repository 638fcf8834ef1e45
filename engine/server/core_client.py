"""An API server process's link to the engine core process (engine/core_process.py).

Requests go out as they arrive; one task reads the core's per-step output batches, runs the output
processing (detokenizing, stop strings) and wakes the handlers of the requests that moved. A
handler that wakes after several steps sees all of their tokens at once, so a busy API process
writes fewer, larger SSE events instead of falling behind.

If the core process dies, ZeroMQ reports the disconnect: every waiting handler gets
EngineDeadError at once, /health turns 503 and `on_dead` is called (the server then exits
non-zero so that a supervisor can restart it).
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import msgspec
import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from engine.core_process import CoreAddresses
from engine.lora.request import LoRARequest
from engine.messages import (
    ABORT,
    ADD,
    LOAD_LORA,
    RESET_PREFIX_CACHE,
    UNLOAD_LORA,
    CallResult,
    CoreInfo,
    CoreOutputs,
    EngineStats,
    LoadLoRA,
    UnloadLoRA,
)
from engine.output_processor import OutputProcessor, RequestState
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams

log = logging.getLogger("engine.server")


class EngineDeadError(RuntimeError):
    """The engine core process is gone; no request can finish."""


@dataclass
class _Stream:
    state: RequestState
    wake: asyncio.Event = field(default_factory=asyncio.Event)


class CoreClient:
    def __init__(self, info: CoreInfo, addresses: CoreAddresses, client_index: int, tokenizer,
                 on_step: Callable[[list[RequestState]], None] | None = None,
                 on_dead: Callable[[], None] | None = None, log_requests: bool = False,
                 max_log_len: int | None = None):
        """`log_requests`: a log line when each request arrives and when it ends (vLLM's request log;
        `max_log_len` cuts the prompt shown in it)."""
        self.info = info
        self.log_requests = log_requests
        self.max_log_len = max_log_len
        self.client_index = client_index
        self.processor = OutputProcessor(tokenizer)
        self.stats: EngineStats = info.stats
        self.on_step = on_step  # metrics, called with the requests that moved in a step
        self.on_dead = on_dead
        self.dead: str | None = None
        self._streams: dict[str, _Stream] = {}
        self._unstarted: set[str] = set()  # requests sent that have no token yet (admission control)
        # The core's adapter registry, by name, as of its last report (every API process gets every change).
        self.adapters: dict[str, LoRARequest] = {a.lora_name: a for a in info.adapters}
        self._calls: dict[int, asyncio.Future] = {}  # adapter calls waiting for the core's CallResult
        self._next_call = 0
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(CoreOutputs)
        self._ctx = zmq.asyncio.Context()
        # Sending never waits: a PUSH socket without a high-water mark only queues.
        self._out = self._ctx.socket(zmq.PUSH)
        self._out.setsockopt(zmq.SNDHWM, 0)
        self._out.connect(addresses.input)
        self._in = self._ctx.socket(zmq.PULL)
        self._in.setsockopt(zmq.RCVHWM, 0)
        self._monitor = self._in.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self._in.connect(addresses.outputs[client_index])
        self._tasks: list[asyncio.Task] = []

    def start(self) -> None:
        """Start reading outputs (call from the server's event loop)."""
        self._tasks = [asyncio.create_task(self._read_outputs(), name="core-outputs"),
                       asyncio.create_task(self._watch_core(), name="core-monitor")]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._in.disable_monitor()
        for sock in (self._monitor, self._in, self._out):
            sock.close(linger=0)
        self._ctx.term()

    @property
    def alive(self) -> bool:
        return self.dead is None

    # ---------------------------------------------------------------- requests
    async def generate(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                       params: SamplingParams, lora: LoRARequest | None = None) -> AsyncIterator[RequestOutput]:
        """Cumulative outputs until the request finishes, under adapter `lora` (None: the base model).
        Leaving early (a client that went away, a cancelled task) aborts it in the core and frees its KV
        blocks."""
        if self.dead is not None:
            raise EngineDeadError(self.dead)
        core_requests = self.processor.add_request(request_id, prompt, prompt_token_ids, params,
                                                   time.monotonic(), self.client_index)
        for request in core_requests:
            request.lora = lora
        stream = self._streams[request_id] = _Stream(self.processor.requests[request_id])
        self._unstarted.add(request_id)
        if self.log_requests:
            self._log_received(request_id, prompt, prompt_token_ids, params, lora)
        for request in core_requests:
            self._out.send_multipart([ADD, self._encoder.encode(request)], copy=False)
        out, finished = None, False
        try:
            while not finished:
                await stream.wake.wait()
                stream.wake.clear()
                if self.dead is not None and not stream.state.finished:
                    raise EngineDeadError(self.dead)
                out = self.processor.make_output(stream.state)
                finished = out.finished
                yield out
        finally:
            self._streams.pop(request_id, None)
            self._unstarted.discard(request_id)
            if not finished:
                self.abort(request_id)
            if self.log_requests:
                self._log_ended(request_id, out if finished else None, stream.state.metrics.arrival_time)

    def _log_received(self, request_id: str, prompt: str | None, prompt_token_ids: list[int], params: SamplingParams,
                      lora: LoRARequest | None) -> None:
        # Chat prompts and token-id prompts arrive as ids only; they are not decoded just to be logged.
        shown = "(token ids)" if prompt is None else repr(prompt[:self.max_log_len] if self.max_log_len is not None
                                                          else prompt)
        log.info("Received request %s: prompt: %s, prompt tokens: %d, params: %s, lora_request: %s", request_id, shown,
                 len(prompt_token_ids), params, lora.lora_name if lora is not None else None)

    @staticmethod
    def _log_ended(request_id: str, out: RequestOutput | None, arrival_time: float) -> None:
        if out is None:
            log.info("Aborted request %s.", request_id)
            return
        reasons = ", ".join(sorted({str(c.finish_reason) for c in out.outputs}))
        log.info("Finished request %s: %d prompt + %d generated tokens in %.2f s (finish reason: %s).", request_id,
                 len(out.prompt_token_ids or ()), sum(len(c.token_ids) for c in out.outputs),
                 time.monotonic() - arrival_time, reasons)

    def abort(self, request_id: str) -> None:
        children = self.processor.child_ids(request_id)
        state = self.processor.abort(request_id)
        if state is None:
            return
        if children and self.dead is None:
            self._out.send_multipart([ABORT, self._encoder.encode(children)])
        if self.on_step is not None:
            self.on_step([state])

    def reset_prefix_cache(self) -> None:
        self._out.send_multipart([RESET_PREFIX_CACHE, b""])

    async def load_lora(self, name: str, path: str, load_inplace: bool = False) -> CallResult:
        return await self._call(LOAD_LORA, LoadLoRA(self._call_id(), self.client_index, name, path,
                                                    load_inplace=load_inplace))

    async def unload_lora(self, name: str) -> CallResult:
        return await self._call(UNLOAD_LORA, UnloadLoRA(self._call_id(), self.client_index, name))

    def _call_id(self) -> int:
        self._next_call += 1
        return self._next_call

    async def _call(self, kind: bytes, message) -> CallResult:
        """Send an adapter call and wait for its result (the registry is updated before it resolves)."""
        if self.dead is not None:
            raise EngineDeadError(self.dead)
        future = self._calls[message.call_id] = asyncio.get_running_loop().create_future()
        self._out.send_multipart([kind, self._encoder.encode(message)])
        try:
            return await future
        finally:
            self._calls.pop(message.call_id, None)

    @property
    def num_waiting(self) -> int:
        """Requests waiting for their first token: the core's count, or this process's own when the
        core's last report predates a burst of arrivals."""
        return max(self.stats.num_waiting, len(self._unstarted))

    # ---------------------------------------------------------------- background tasks
    async def _read_outputs(self) -> None:
        while True:
            frame = await self._in.recv(copy=False)
            batch = self._decoder.decode(frame.buffer)
            self.stats = batch.stats
            if batch.adapters is not None:
                self.adapters = {a.lora_name: a for a in batch.adapters}
            for result in batch.results:
                future = self._calls.get(result.call_id)
                if future is not None and not future.done():
                    future.set_result(result)
            if not batch.outputs:
                continue
            processed = self.processor.process(batch.outputs)
            if processed.to_abort:  # stop strings found here: the core stops computing them
                self._out.send_multipart([ABORT, self._encoder.encode(processed.to_abort)])
            for state in processed.touched:
                self._unstarted.discard(state.request_id)
                stream = self._streams.get(state.request_id)
                if stream is not None:
                    stream.wake.set()
            if self.on_step is not None:
                self.on_step(processed.touched)

    async def _watch_core(self) -> None:
        while True:
            event = parse_monitor_message(await self._monitor.recv_multipart())
            if event["event"] == zmq.EVENT_DISCONNECTED:
                break
        self.dead = "the engine core process has exited"
        log.error("%s: failing %d in-flight requests", self.dead, len(self._streams))
        for stream in self._streams.values():
            stream.wake.set()
        for future in self._calls.values():
            if not future.done():
                future.set_exception(EngineDeadError(self.dead))
        if self.on_dead is not None:
            self.on_dead()
