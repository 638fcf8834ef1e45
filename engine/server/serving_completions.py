"""/v1/completions: one or several prompts, streamed or not."""
from __future__ import annotations

import time
import uuid

from fastapi import Request
from fastapi.responses import StreamingResponse

from engine.outputs import CompletionOutput
from engine.server.core_client import EngineDeadError
from engine.server.protocol import CompletionRequest, OpenAIError
from engine.server.serving_common import OpenAIServing, prompt_logprobs_json
from engine.server.sse import DONE, collect, engine_error, failed_output_error, merge_streams, sse, until_disconnected


async def create_completion(serving: OpenAIServing, req: CompletionRequest, raw: Request):
    lora = serving.check_model(req.model)
    if req.echo or req.suffix:
        raise OpenAIError("echo and suffix are not supported", param="echo" if req.echo else "suffix")
    serving.admit()
    prompts = await serving.encode_prompts(req.prompt)
    params = [serving.sampling(req, len(ids), req.max_tokens, req.logprobs) for _, ids in prompts]
    rid = f"cmpl-{uuid.uuid4().hex}"
    streams = [serving.client.generate(f"{rid}-{i}", text, ids, p, lora)
               for i, ((text, ids), p) in enumerate(zip(prompts, params))]
    if req.stream:
        return StreamingResponse(stream_completion(serving, req, rid, prompts, streams, serving.response_model(lora)),
                                 media_type="text/event-stream")
    finals = await until_disconnected(raw, collect(streams))
    choices, completion_tokens = [], 0
    for i, out in enumerate(finals):
        prompt_logprobs = prompt_logprobs_json(out.prompt_logprobs)  # vLLM: on each choice of the prompt
        for c in out.outputs:
            completion_tokens += len(c.token_ids)
            choices.append({"index": i * req.n + c.index, "text": c.text, "finish_reason": c.finish_reason,
                            "stop_reason": c.stop_reason, "logprobs": completion_logprobs(serving.tokenizer, c, 0, 0),
                            "prompt_logprobs": prompt_logprobs})
    prompt_tokens = sum(len(ids) for _, ids in prompts)
    cached = sum(out.num_cached_tokens for out in finals)
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": serving.response_model(lora),
            "choices": choices, "usage": serving.usage(prompt_tokens, completion_tokens, cached)}


async def stream_completion(serving: OpenAIServing, req: CompletionRequest, rid: str, prompts, streams, model: str):
    head = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model}
    sent_text: dict[tuple[int, int], int] = {}
    sent_tokens: dict[tuple[int, int], int] = {}
    completion_tokens = 0
    cached: dict[int, int] = {}
    try:
        async for i, out in merge_streams(streams):
            cached[i] = out.num_cached_tokens
            error = failed_output_error(out)
            if error is not None:
                yield sse(error.body())
                break
            for c in out.outputs:
                key = (i, c.index)
                text_start, tok_start = sent_text.get(key, 0), sent_tokens.get(key, 0)
                delta = c.text[text_start:]
                if not delta and c.finish_reason is None and len(c.token_ids) == tok_start:
                    continue
                choice = {"index": i * req.n + c.index, "text": delta, "finish_reason": c.finish_reason,
                          "stop_reason": c.stop_reason,
                          "logprobs": completion_logprobs(serving.tokenizer, c, tok_start, text_start)}
                sent_text[key], sent_tokens[key] = len(c.text), len(c.token_ids)
                if c.finish_reason is not None:
                    completion_tokens += len(c.token_ids)
                yield sse({**head, "choices": [choice]})
    except (ValueError, EngineDeadError) as exc:
        yield sse(engine_error(exc).body())
    if req.stream_options and req.stream_options.include_usage:
        yield sse({**head, "choices": [], "usage": serving.usage(sum(len(ids) for _, ids in prompts),
                                                                 completion_tokens, sum(cached.values()))})
    yield DONE


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
