"""One streamed request through the official openai client, timed token by token.

The client makes and authenticates the request; its raw server-sent-event lines are read with
`with_streaming_response`, so that a chunk costs one JSON parse instead of a pydantic model (the
generator must never be the bottleneck)."""
from __future__ import annotations

import json
import time

import openai

from workbench.datasets import SampleRequest
from workbench.loadgen.config import ServeBenchConfig
from workbench.results import RequestRecord

try:  # newer openai releases speak httpx2
    import httpx2 as httpx_impl
except ImportError:  # pragma: no cover - older openai
    import httpx as httpx_impl

try:
    import orjson

    loads = orjson.loads
except ImportError:  # pragma: no cover
    loads = json.loads


class StreamError(Exception):
    """The server sent an error object inside the stream."""


def make_client(config: ServeBenchConfig, connections: int) -> openai.AsyncOpenAI:
    limits = httpx_impl.Limits(max_connections=connections, max_keepalive_connections=connections)
    return openai.AsyncOpenAI(base_url=config.base_url.rstrip("/") + "/v1", api_key=config.api_key or "EMPTY",
                              max_retries=0, timeout=config.timeout,
                              http_client=openai.DefaultAsyncHttpxClient(limits=limits, timeout=config.timeout))


def error_type(exc: BaseException) -> str:
    if isinstance(exc, openai.APIStatusError):
        return f"{type(exc).__name__}:{exc.status_code}"
    return type(exc).__name__


async def _events(http_response):
    """The stream's JSON events, parsed from raw bytes: cheaper than decoding text and splitting it
    into lines first, which matters at tens of thousands of events a second. Ends at [DONE]."""
    pending = b""
    async for data in http_response.aiter_bytes():
        pending += data
        *lines, pending = pending.split(b"\n")
        for line in lines:
            if not line.startswith(b"data:"):
                continue  # blank separators, comments, event names
            payload = line[5:].strip()
            if payload == b"[DONE]":
                return
            yield loads(payload)
    if pending.startswith(b"data:") and pending[5:].strip() not in (b"", b"[DONE]"):
        yield loads(pending[5:].strip())


async def send_request(client: openai.AsyncOpenAI, config: ServeBenchConfig, request: SampleRequest,
                       index: int, run_start: float, scheduled: float | None,
                       reply: list[str] | None = None) -> RequestRecord:
    """Send one streamed request; `reply`, when given, collects the generated text (a multi-turn
    session needs it for its next turn)."""
    extra = dict(config.extra_body)
    if config.ignore_eos:
        extra |= {"ignore_eos": True, "min_tokens": request.output_len}
    common = {"model": config.model_for(index), "max_tokens": request.output_len, "stream": True,
              "stream_options": {"include_usage": True}, "extra_body": extra or None, "temperature": 0.0}
    chat = config.endpoint == "chat"
    start = time.perf_counter()
    record = RequestRecord(index=index, start_time=start - run_start, scheduled_time=scheduled, success=False,
                           prompt_tokens=request.prompt_len)
    last = None
    chunks = 0
    usage = None
    try:
        if chat:
            ctx = client.chat.completions.with_streaming_response.create(
                messages=request.messages or [{"role": "user", "content": request.prompt}], **common)
        else:
            ctx = client.completions.with_streaming_response.create(prompt=request.prompt, **common)
        async with ctx as response:
            async for obj in _events(response.http_response):
                if "error" in obj:
                    raise StreamError(str(obj["error"].get("message", obj["error"])))
                if obj.get("usage"):
                    usage = obj["usage"]
                for choice in obj.get("choices") or ():
                    text = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
                    if text or not chat or (choice.get("finish_reason") and record.ttft is None):
                        # As vLLM's bench serve: a completions chunk is a token arrival even when its text
                        # is empty (a skipped special token, or bytes of a character not complete yet);
                        # chat servers send no chunk for those, so there its final chunk is the first.
                        now = time.perf_counter()
                        if last is None:
                            record.ttft = now - start
                        else:
                            record.itl.append(now - last)
                        last = now
                        chunks += bool(text)
                        if reply is not None and text:
                            reply.append(text)
        record.e2el = time.perf_counter() - start
        if usage:
            record.output_tokens = usage.get("completion_tokens", chunks)
            record.prompt_tokens = usage.get("prompt_tokens", request.prompt_len)
            cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
            record.cached_tokens = cached if isinstance(cached, int) else None
        else:
            record.output_tokens = chunks  # no usage chunk: one token per content chunk (approximate)
        if record.ttft is None:
            raise StreamError("the stream ended without a completion")
        record.success = True
    except Exception as exc:  # counted by type; the run goes on
        record.error = error_type(exc)
        record.e2el = time.perf_counter() - start
    return record
