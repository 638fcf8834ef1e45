"""The FastAPI app: thin routes over the serving modules, and every error in OpenAI's JSON."""
from __future__ import annotations

import logging

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException

from engine.server import serving_lora
from engine.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    LoadLoRAAdapterRequest,
    OpenAIError,
    TokenizeRequest,
    UnloadLoRAAdapterRequest,
)
from engine.server.serving_chat import create_chat_completion
from engine.server.serving_common import OpenAIServing
from engine.server.serving_completions import create_completion
from engine.version import __version__

log = logging.getLogger("engine.server")


def build_app(serving: OpenAIServing, allow_runtime_lora: bool = False) -> FastAPI:
    """`allow_runtime_lora`: serve /v1/load_lora_adapter and /v1/unload_lora_adapter
    (VLLM_ALLOW_RUNTIME_LORA_UPDATING)."""
    app = FastAPI(title="PagedBench OpenAI-compatible server", version=__version__)
    add_error_handlers(app)

    async def require_key(request: Request) -> None:
        serving.check_auth(request)

    open_routes = APIRouter()
    keyed = APIRouter(dependencies=[Depends(require_key)])

    @open_routes.get("/health")
    async def health():
        if not serving.client.alive:
            return JSONResponse({"status": "engine core stopped"}, status_code=503)
        return Response(status_code=200)

    @open_routes.get("/version")
    async def version():
        return {"version": __version__, "api_server": serving.server_index}

    @open_routes.get("/metrics")
    async def metrics():
        return Response(generate_latest(serving.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @open_routes.post("/tokenize")
    async def tokenize(req: TokenizeRequest):
        serving.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise OpenAIError("give exactly one of 'prompt' or 'messages'")
        if req.prompt is not None:
            tokens = await serving.encode(req.prompt, add_special_tokens=req.add_special_tokens)
        else:
            tokens = await serving.render_chat(ChatCompletionRequest(messages=req.messages,
                                                                     add_generation_prompt=req.add_generation_prompt))
        return {"tokens": tokens, "count": len(tokens), "max_model_len": serving.limits.max_model_len}

    @open_routes.post("/detokenize")
    async def detokenize(req: DetokenizeRequest):
        serving.check_model(req.model)
        vocab = serving.limits.vocab_size
        if any(t < 0 or t >= vocab for t in req.tokens):
            raise OpenAIError(f"token ids must be in [0, {vocab})", param="tokens")
        return {"prompt": serving.tokenizer.decode(req.tokens)}

    @keyed.get("/v1/models")
    async def models():
        return {"object": "list", "data": serving.model_cards()}

    if allow_runtime_lora:
        @keyed.post("/v1/load_lora_adapter")
        async def load_lora_adapter(req: LoadLoRAAdapterRequest):
            return await serving_lora.load_lora_adapter(serving, req)

        @keyed.post("/v1/unload_lora_adapter")
        async def unload_lora_adapter(req: UnloadLoRAAdapterRequest):
            return await serving_lora.unload_lora_adapter(serving, req)

    @keyed.post("/v1/completions")
    async def completions(req: CompletionRequest, raw: Request):
        return await create_completion(serving, req, raw)

    @keyed.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, raw: Request):
        return await create_chat_completion(serving, req, raw)

    @keyed.post("/reset_prefix_cache")
    async def reset_prefix_cache():
        """vLLM's endpoint: forget the cached prefix blocks, so a benchmark point starts cold."""
        serving.client.reset_prefix_cache()
        return Response(status_code=200)

    app.include_router(open_routes)
    app.include_router(keyed)
    return app


def add_error_handlers(app: FastAPI) -> None:
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

    @app.exception_handler(HTTPException)
    async def _http_error(_: Request, exc: HTTPException):
        # FastAPI's own errors (an unparseable body, an unknown route, a wrong method) in OpenAI's format.
        status = exc.status_code
        err = OpenAIError(str(exc.detail), status, err_type="invalid_request_error" if status < 500 else "server_error",
                          code={404: "not_found", 405: "method_not_allowed"}.get(status))
        return JSONResponse(err.body(), status_code=status, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        err = OpenAIError(f"Internal server error: {type(exc).__name__}", 500, err_type="server_error",
                          code="internal_error")
        return JSONResponse(err.body(), status_code=500)
