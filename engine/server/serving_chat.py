"""/v1/chat/completions: a conversation through the chat template, streamed or not."""
from __future__ import annotations

import time
import uuid

from fastapi import Request
from fastapi.responses import StreamingResponse

from engine.outputs import CompletionOutput
from engine.server.core_client import EngineDeadError
from engine.server.protocol import ChatCompletionRequest, OpenAIError
from engine.server.serving_common import OpenAIServing, prompt_logprobs_json
from engine.server.sse import DONE, collect, engine_error, failed_output_error, merge_streams, sse, until_disconnected


async def create_chat_completion(serving: OpenAIServing, req: ChatCompletionRequest, raw: Request):
    lora = serving.check_model(req.model)
    top = req.top_logprobs or 0
    if top and not req.logprobs:
        raise OpenAIError("top_logprobs needs logprobs=true", param="top_logprobs")
    serving.admit()
    ids = await serving.render_chat(req)
    params = serving.sampling(req, len(ids), req.max_completion_tokens or req.max_tokens,
                              top if req.logprobs else None, logprobs_field="top_logprobs")
    rid = f"chatcmpl-{uuid.uuid4().hex}"
    stream = serving.client.generate(rid, None, ids, params, lora)
    model = serving.response_model(lora)
    if req.stream:
        return StreamingResponse(stream_chat(serving, req, rid, len(ids), stream, model),
                                 media_type="text/event-stream")
    final = (await until_disconnected(raw, collect([stream])))[0]
    choices = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                "logprobs": chat_logprobs(serving.tokenizer, c, 0, top), "finish_reason": c.finish_reason,
                "stop_reason": c.stop_reason} for c in final.outputs]
    completion_tokens = sum(len(c.token_ids) for c in final.outputs)
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": serving.usage(len(ids), completion_tokens, final.num_cached_tokens),
            "prompt_logprobs": prompt_logprobs_json(final.prompt_logprobs)}  # vLLM: on the response


async def stream_chat(serving: OpenAIServing, req: ChatCompletionRequest, rid: str, prompt_len: int, stream,
                      model: str):
    head = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model}
    for i in range(req.n):
        yield sse({**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                        "logprobs": None, "finish_reason": None}]})
    sent_text: dict[int, int] = {}
    sent_tokens: dict[int, int] = {}
    completion_tokens = cached = 0
    top = req.top_logprobs or 0
    try:
        async for _, out in merge_streams([stream]):
            cached = out.num_cached_tokens
            error = failed_output_error(out)
            if error is not None:
                yield sse(error.body())
                break
            for c in out.outputs:
                text_start, tok_start = sent_text.get(c.index, 0), sent_tokens.get(c.index, 0)
                delta = c.text[text_start:]
                if not delta and c.finish_reason is None:
                    continue
                sent_text[c.index], sent_tokens[c.index] = len(c.text), len(c.token_ids)
                if c.finish_reason is not None:
                    completion_tokens += len(c.token_ids)
                yield sse({**head, "choices": [{
                    "index": c.index, "delta": {"content": delta} if delta else {},
                    "logprobs": chat_logprobs(serving.tokenizer, c, tok_start, top),
                    "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}]})
    except (ValueError, EngineDeadError) as exc:
        yield sse(engine_error(exc).body())
    if req.stream_options and req.stream_options.include_usage:
        yield sse({**head, "choices": [], "usage": serving.usage(prompt_len, completion_tokens, cached)})
    yield DONE


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
