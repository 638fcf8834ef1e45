"""Server-sent events and the plumbing shared by the streaming and non-streaming endpoints."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import orjson
from fastapi import Request

from engine.outputs import RequestOutput
from engine.server.core_client import EngineDeadError
from engine.server.protocol import OpenAIError

DONE = b"data: [DONE]\n\n"


def sse(data: dict) -> bytes:
    """One event; orjson, not a pydantic model per token (most of a stream's cost is here)."""
    return b"data: " + orjson.dumps(data) + b"\n\n"


def engine_error(exc: Exception) -> OpenAIError:
    """The OpenAI error for a failure that reached a handler from the engine."""
    if isinstance(exc, EngineDeadError):
        return OpenAIError(f"The engine is not running: {exc}", 503, err_type="server_error",
                           code="engine_dead")
    return OpenAIError(str(exc), 400)


def failed_output_error(out: RequestOutput) -> OpenAIError | None:
    if out.error is None:
        return None
    return OpenAIError(f"The engine failed this request: {out.error}", 500, err_type="server_error",
                       code="engine_error")


async def merge_streams(streams: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave several requests' outputs (a batch of prompts) as they arrive."""
    if len(streams) == 1:  # the common case, without a task and a queue per request
        async for out in streams[0]:
            yield 0, out
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i, stream):
        try:
            async for out in stream:
                queue.put_nowait((i, out))
        except Exception as exc:
            queue.put_nowait((i, exc))
        finally:
            queue.put_nowait((i, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    open_streams = len(tasks)
    try:
        while open_streams:
            i, item = await queue.get()
            if item is None:
                open_streams -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        # Cancelling a pump closes its engine stream, whose cleanup aborts the request (client gone).
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def collect(streams: list[AsyncIterator[RequestOutput]]) -> list[RequestOutput]:
    finals: list[RequestOutput | None] = [None] * len(streams)
    try:
        async for i, out in merge_streams(streams):
            finals[i] = out
    except (ValueError, EngineDeadError) as exc:
        raise engine_error(exc) from None
    for out in finals:
        error = failed_output_error(out)
        if error is not None:
            raise error
    return finals


async def until_disconnected(request: Request, work):
    """Run `work` (a coroutine) but cancel it if the client goes away, so its requests are aborted."""
    task = asyncio.ensure_future(work)
    try:
        while not task.done():
            done, _ = await asyncio.wait({task}, timeout=0.25)
            if not done and await request.is_disconnected():
                task.cancel()
                raise OpenAIError("client disconnected", 499)
        return task.result()
    finally:
        if not task.done():
            task.cancel()
