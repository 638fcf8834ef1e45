"""A minimal OpenAI-style streaming endpoint that does no compute, to measure the load generator's
own ceiling: `python -m workbench.loadgen.null_server --port P [--delay-ms D] [--fail-every N]`."""
from __future__ import annotations

import argparse
import asyncio
import itertools
import json

import orjson

TOKEN = " x"


def build_app(delay_ms: float = 0.0, fail_every: int = 0, model: str = "null"):
    counter = itertools.count(1)

    async def send_json(send, status: int, body: dict):
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": orjson.dumps(body)})

    async def read_body(receive) -> bytes:
        body = b""
        while True:
            msg = await receive()
            body += msg.get("body", b"")
            if not msg.get("more_body"):
                return body

    async def app(scope, receive, send):
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        path = scope["path"]
        if path in ("/v1/models", "/health", "/version"):
            body = {"object": "list", "data": [{"id": model, "object": "model"}]} if path == "/v1/models" \
                else {"version": "null-server"}
            await send_json(send, 200, body)
            return
        if scope["method"] != "POST" or not path.endswith("completions"):
            await send_json(send, 404, {"error": {"message": f"no route {path}", "type": "not_found",
                                                  "param": None, "code": None}})
            return
        request = json.loads(await read_body(receive) or b"{}")
        if fail_every and next(counter) % fail_every == 0:
            await send_json(send, 500, {"error": {"message": "planted failure", "type": "server_error",
                                                  "param": None, "code": None}})
            return
        chat = path.endswith("/chat/completions")
        n = int(request.get("max_tokens") or 16)
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})
        events = []
        for i in range(n):
            choice = {"index": 0, "delta": {"content": TOKEN}} if chat else {"index": 0, "text": TOKEN}
            choice["finish_reason"] = "length" if i == n - 1 else None
            events.append(b"data: " + orjson.dumps({"choices": [choice]}) + b"\n\n")
            if delay_ms:  # paced: one event per write
                await send({"type": "http.response.body", "body": events.pop(), "more_body": True})
                await asyncio.sleep(delay_ms / 1e3)
        if events:  # unpaced: one write, so the server spends as little of the shared CPU as it can
            await send({"type": "http.response.body", "body": b"".join(events), "more_body": True})
        tail = b""
        if (request.get("stream_options") or {}).get("include_usage"):
            usage = {"prompt_tokens": 1, "completion_tokens": n, "total_tokens": n + 1}
            tail = b"data: " + orjson.dumps({"choices": [], "usage": usage}) + b"\n\n"
        await send({"type": "http.response.body", "body": tail + b"data: [DONE]\n\n"})

    return app


def main() -> None:
    import uvicorn

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8001)
    p.add_argument("--delay-ms", type=float, default=0.0, help="pause between tokens")
    p.add_argument("--fail-every", type=int, default=0, help="answer every Nth request with HTTP 500")
    p.add_argument("--model", default="null")
    args = p.parse_args()
    uvicorn.run(build_app(args.delay_ms, args.fail_every, args.model), host=args.host, port=args.port,
                log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
