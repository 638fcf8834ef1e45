"""The OpenAI-compatible HTTP API (FastAPI) over an AsyncEngine."""
from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from importlib import metadata

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from engine.outputs import CompletionOutput, RequestOutput
from engine.server.async_engine import AsyncEngine
from engine.server.metrics import ServerMetrics
from engine.server.protocol import (KNOWN_ROLES, ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                                    OpenAIError, TokenizeRequest)


def package_version() -> str:
    try:
        return metadata.version("pagedbench")
    except metadata.PackageNotFoundError:
        return "0.1.0+local"


class OpenAIServer:
    """Holds what the routes need: the engine, its tokenizer and limits, the metrics."""

    def __init__(self, engine: AsyncEngine, metrics: ServerMetrics, model_name: str, api_key: str | None,
                 max_n: int):
        self.engine = engine
        self.metrics = metrics
        self.model_name = model_name
        self.api_key = api_key
        self.max_n = max_n
        self.tokenizer = engine.engine.tokenizer
        self.max_model_len = engine.engine.config.max_model_len
        self.max_logprobs = engine.engine.config.max_logprobs
        self.created = int(time.time())

    # ---------------------------------------------------------------- validation
    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise OpenAIError(f"The model `{model}` does not exist.", 404, "model", "NotFoundError")

    def budget(self, prompt_len: int, requested: int | None, n: int) -> int:
        if prompt_len >= self.max_model_len:
            raise OpenAIError(f"This model's maximum context length is {self.max_model_len} tokens. However, your "
                              f"prompt has {prompt_len} tokens. Please shorten the prompt.", param="prompt")
        room = self.max_model_len - prompt_len
        if requested is not None and requested > room:
            raise OpenAIError(f"This model's maximum context length is {self.max_model_len} tokens. However, you "
                              f"requested {prompt_len + requested} tokens ({prompt_len} in the prompt, {requested} "
                              "for the completion). Please reduce the prompt or max_tokens.", param="max_tokens")
        if n > self.max_n:
            raise OpenAIError(f"n={n} is too large; this server allows at most {self.max_n}.", param="n")
        return requested if requested is not None else room

    def sampling(self, req, prompt_len: int, max_tokens: int | None, logprobs: int | None):
        if logprobs is not None and logprobs > self.max_logprobs:
            raise OpenAIError(f"logprobs={logprobs} exceeds the server's max_logprobs ({self.max_logprobs}).",
                              param="logprobs")
        try:
            return req.sampling_params(self.budget(prompt_len, max_tokens, req.n), logprobs)
        except ValueError as exc:
            raise OpenAIError(str(exc)) from None

    def encode_prompts(self, prompt) -> list[tuple[str | None, list[int]]]:
        if isinstance(prompt, str):
            prompts = [prompt]
        elif prompt and all(isinstance(p, int) for p in prompt):
            prompts = [list(prompt)]
        else:
            prompts = list(prompt)
        if not prompts:
            raise OpenAIError("prompt must not be empty", param="prompt")
        encoded = []
        for p in prompts:
            ids = self.tokenizer.encode(p) if isinstance(p, str) else list(p)
            if not ids:
                raise OpenAIError("prompt must not be empty", param="prompt")
            vocab = self.engine.engine.config.hf_config.vocab_size
            if min(ids) < 0 or max(ids) >= vocab:
                raise OpenAIError(f"prompt token ids must be in [0, {vocab})", param="prompt")
            encoded.append((p if isinstance(p, str) else None, ids))
        return encoded

    def render_chat(self, req: ChatCompletionRequest) -> list[int]:
        if not req.messages:
            raise OpenAIError("messages must not be empty", param="messages")
        messages = []
        for i, m in enumerate(req.messages):
            if m.role not in KNOWN_ROLES:
                raise OpenAIError(f"messages[{i}].role {m.role!r} is not one of {sorted(KNOWN_ROLES)}",
                                  param=f"messages[{i}].role")
            content = m.content
            if isinstance(content, list):  # OpenAI content parts: keep the text ones
                if any(part.get("type") != "text" for part in content):
                    raise OpenAIError(f"messages[{i}].content: only text parts are supported",
                                      param=f"messages[{i}].content")
                content = "".join(part.get("text", "") for part in content)
            messages.append({"role": m.role, "content": content or ""})
        if req.tools:
            raise OpenAIError("tools are not supported by this server", param="tools")
        text = self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=req.add_generation_prompt,
                                                  continue_final_message=req.continue_final_message)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def check_auth(self, request: Request) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        token = header[7:] if header.lower().startswith("bearer ") else ""
        if not secrets.compare_digest(token.encode(), self.api_key.encode()):
            raise OpenAIError("Incorrect or missing API key; send 'Authorization: Bearer <key>'.", 401,
                              err_type="authentication_error")

    def usage(self, prompt_tokens: int, completion_tokens: int) -> dict:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}


# ---------------------------------------------------------------- output formatting
def completion_logprobs(tokenizer, c: CompletionOutput, start: int, text_offset: int) -> dict | None:
    if c.logprobs is None:
        return None
    tokens, token_lps, tops, offsets = [], [], [], []
    for tid, entry in zip(c.token_ids[start:], c.logprobs[start:]):
        piece = tokenizer.decode([tid])
        tokens.append(piece)
        token_lps.append(entry[tid].logprob)
        tops.append({tokenizer.decode([t]): lp.logprob for t, lp in entry.items()})
        offsets.append(text_offset)
        text_offset += len(piece)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(tokenizer, c: CompletionOutput, start: int, top_n: int) -> dict | None:
    if c.logprobs is None:
        return None
    content = []
    for tid, entry in zip(c.token_ids[start:], c.logprobs[start:]):
        piece = tokenizer.decode([tid])
        top = sorted(entry.items(), key=lambda kv: -kv[1].logprob)[:top_n]
        content.append({"token": piece, "logprob": entry[tid].logprob, "bytes": list(piece.encode()),
                        "top_logprobs": [{"token": tokenizer.decode([t]), "logprob": lp.logprob,
                                          "bytes": list(tokenizer.decode([t]).encode())} for t, lp in top]})
    return {"content": content}


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


async def merge_streams(streams: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave several requests' outputs (a batch of prompts) as they arrive."""
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
        # Cancelling a pump cancels its engine stream, whose cleanup aborts the request (client gone).
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


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


# ---------------------------------------------------------------- the app
def build_app(server: OpenAIServer) -> FastAPI:
    app = FastAPI(title="PagedBench OpenAI-compatible server", version=package_version())

    @app.exception_handler(OpenAIError)
    async def _openai_error(_: Request, exc: OpenAIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        loc = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        if first.get("type") == "json_invalid":
            message, loc = f"Invalid JSON body: {first.get('ctx', {}).get('error', first.get('msg', ''))}", ""
        else:
            message = f"{loc or 'body'}: {first.get('msg', 'invalid value')}"
        return JSONResponse(OpenAIError(message, 400, loc or None).body(), status_code=400)

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if request.url.path.startswith("/v1"):
            try:
                server.check_auth(request)
            except OpenAIError as exc:
                return JSONResponse(exc.body(), status_code=exc.status)
        return await call_next(request)

    @app.get("/health")
    async def health():
        if not server.engine.alive:
            return JSONResponse({"status": "engine loop stopped"}, status_code=503)
        return Response(status_code=200)

    @app.get("/version")
    async def version():
        return {"version": package_version()}

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{
            "id": server.model_name, "object": "model", "created": server.created, "owned_by": "pagedbench",
            "root": str(server.engine.engine.model_dir), "max_model_len": server.max_model_len}]}

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest):
        server.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise OpenAIError("give exactly one of 'prompt' or 'messages'")
        if req.prompt is not None:
            tokens = server.tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens)
        else:
            tokens = server.render_chat(ChatCompletionRequest(messages=req.messages,
                                                              add_generation_prompt=req.add_generation_prompt))
        return {"tokens": tokens, "count": len(tokens), "max_model_len": server.max_model_len}

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest):
        server.check_model(req.model)
        vocab = server.engine.engine.config.hf_config.vocab_size
        if any(t < 0 or t >= vocab for t in req.tokens):
            raise OpenAIError(f"token ids must be in [0, {vocab})", param="tokens")
        return {"prompt": server.tokenizer.decode(req.tokens)}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, raw: Request):
        server.check_model(req.model)
        if req.echo or req.suffix:
            raise OpenAIError("echo and suffix are not supported", param="echo" if req.echo else "suffix")
        prompts = server.encode_prompts(req.prompt)
        params = [server.sampling(req, len(ids), req.max_tokens, req.logprobs) for _, ids in prompts]
        rid = f"cmpl-{uuid.uuid4().hex}"
        streams = [server.engine.generate(f"{rid}-{i}", ids, p) for i, ((_, ids), p) in enumerate(zip(prompts, params))]
        if req.stream:
            return StreamingResponse(stream_completions(server, req, rid, prompts, streams),
                                     media_type="text/event-stream")
        finals = await until_disconnected(raw, collect(streams))
        choices, completion_tokens = [], 0
        for i, out in enumerate(finals):
            for c in out.outputs:
                completion_tokens += len(c.token_ids)
                choices.append({"index": i * req.n + c.index, "text": c.text, "finish_reason": c.finish_reason,
                                "stop_reason": c.stop_reason, "logprobs": completion_logprobs(server.tokenizer, c, 0, 0)})
        prompt_tokens = sum(len(ids) for _, ids in prompts)
        return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": server.model_name,
                "choices": choices, "usage": server.usage(prompt_tokens, completion_tokens)}

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, raw: Request):
        server.check_model(req.model)
        ids = server.render_chat(req)
        top = req.top_logprobs or 0
        if top and not req.logprobs:
            raise OpenAIError("top_logprobs needs logprobs=true", param="top_logprobs")
        params = server.sampling(req, len(ids), req.max_completion_tokens or req.max_tokens,
                                 top if req.logprobs else None)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        stream = server.engine.generate(rid, ids, params)
        if req.stream:
            return StreamingResponse(stream_chat(server, req, rid, len(ids), stream), media_type="text/event-stream")
        final = (await until_disconnected(raw, collect([stream])))[0]
        choices = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                    "logprobs": chat_logprobs(server.tokenizer, c, 0, top), "finish_reason": c.finish_reason,
                    "stop_reason": c.stop_reason} for c in final.outputs]
        completion_tokens = sum(len(c.token_ids) for c in final.outputs)
        return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": server.model_name,
                "choices": choices, "usage": server.usage(len(ids), completion_tokens)}

    return app


async def collect(streams: list[AsyncIterator[RequestOutput]]) -> list[RequestOutput]:
    finals: list[RequestOutput | None] = [None] * len(streams)
    try:
        async for i, out in merge_streams(streams):
            finals[i] = out
    except ValueError as exc:  # the engine refused the request
        raise OpenAIError(str(exc)) from None
    return finals


async def stream_completions(server: OpenAIServer, req: CompletionRequest, rid: str, prompts, streams):
    created = int(time.time())
    sent_text: dict[tuple[int, int], int] = {}
    sent_tokens: dict[tuple[int, int], int] = {}
    completion_tokens = 0
    try:
        async for i, out in merge_streams(streams):
            for c in out.outputs:
                key = (i, c.index)
                text_start, tok_start = sent_text.get(key, 0), sent_tokens.get(key, 0)
                delta = c.text[text_start:]
                if not delta and c.finish_reason is None and len(c.token_ids) == tok_start:
                    continue
                choice = {"index": i * req.n + c.index, "text": delta, "finish_reason": c.finish_reason,
                          "stop_reason": c.stop_reason,
                          "logprobs": completion_logprobs(server.tokenizer, c, tok_start, text_start)}
                sent_text[key], sent_tokens[key] = len(c.text), len(c.token_ids)
                if c.finish_reason is not None:
                    completion_tokens += len(c.token_ids)
                yield sse({"id": rid, "object": "text_completion", "created": created, "model": server.model_name,
                           "choices": [choice]})
    except ValueError as exc:
        yield sse(OpenAIError(str(exc)).body())
    if req.stream_options and req.stream_options.include_usage:
        yield sse({"id": rid, "object": "text_completion", "created": created, "model": server.model_name,
                   "choices": [], "usage": server.usage(sum(len(ids) for _, ids in prompts), completion_tokens)})
    yield sse("[DONE]")


async def stream_chat(server: OpenAIServer, req: ChatCompletionRequest, rid: str, prompt_len: int, stream):
    created = int(time.time())
    base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": server.model_name}
    for i in range(req.n):
        yield sse({**base, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                        "logprobs": None, "finish_reason": None}]})
    sent_text: dict[int, int] = {}
    sent_tokens: dict[int, int] = {}
    completion_tokens = 0
    top = req.top_logprobs or 0
    try:
        async for _, out in merge_streams([stream]):
            for c in out.outputs:
                text_start, tok_start = sent_text.get(c.index, 0), sent_tokens.get(c.index, 0)
                delta = c.text[text_start:]
                if not delta and c.finish_reason is None:
                    continue
                sent_text[c.index], sent_tokens[c.index] = len(c.text), len(c.token_ids)
                if c.finish_reason is not None:
                    completion_tokens += len(c.token_ids)
                yield sse({**base, "choices": [{
                    "index": c.index, "delta": {"content": delta} if delta else {},
                    "logprobs": chat_logprobs(server.tokenizer, c, tok_start, top),
                    "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}]})
    except ValueError as exc:
        yield sse(OpenAIError(str(exc)).body())
    if req.stream_options and req.stream_options.include_usage:
        yield sse({**base, "choices": [], "usage": server.usage(prompt_len, completion_tokens)})
    yield sse("[DONE]")
