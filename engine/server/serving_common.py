"""What every endpoint shares: the core client, the tokenizer and limits, request validation,
prompt encoding and chat templating (long texts off the event loop), auth and usage."""
from __future__ import annotations

import asyncio
import functools
import secrets
import time
from dataclasses import dataclass

from fastapi import Request

from engine.lora.request import LoRARequest
from engine.sampling_params import SamplingParams
from engine.server.core_client import CoreClient
from engine.server.metrics import ServerMetrics
from engine.server.protocol import KNOWN_ROLES, ChatCompletionRequest, OpenAIError

# Texts longer than this are tokenized in a worker thread (the Rust tokenizer releases the GIL), so
# a huge prompt cannot stall /health or other requests; shorter ones are cheaper inline.
INLINE_TOKENIZE_CHARS = 20_000
SAMPLING_FIELDS = set(SamplingParams.__dataclass_fields__)


@dataclass
class ServerLimits:
    max_model_len: int
    vocab_size: int
    max_logprobs: int
    max_n: int
    max_waiting_requests: int  # 0 = unlimited


class OpenAIServing:
    def __init__(self, client: CoreClient, metrics: ServerMetrics, tokenizer, model_name: str, model_root: str,
                 api_key: str | None, limits: ServerLimits, server_index: int = 0):
        self.client = client
        self.metrics = metrics
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.model_root = model_root
        self.api_key = api_key
        self.limits = limits
        self.server_index = server_index
        self.created = int(time.time())
        # No token is longer than the longest vocabulary entry, so a text longer than max_model_len of
        # them (times 4, for normalizers that drop characters) cannot fit: refused without tokenizing.
        longest = max((len(t) for t in tokenizer.get_vocab()), default=1)
        self.max_prompt_chars = limits.max_model_len * max(longest, 1) * 4

    # ---------------------------------------------------------------- validation
    def check_model(self, model: str | None) -> LoRARequest | None:
        """The adapter a request's `model` names (None: the base model); 404 for an unknown name."""
        if model is None or model == self.model_name:
            return None
        lora = self.client.adapters.get(model)
        if lora is None:
            raise OpenAIError(f"The model `{model}` does not exist.", 404, "model", "NotFoundError")
        return lora

    def response_model(self, lora: LoRARequest | None) -> str:
        """The `model` a response names: the adapter's name, as vLLM answers."""
        return lora.lora_name if lora is not None else self.model_name

    def model_cards(self) -> list[dict]:
        """/v1/models: the base model, then each adapter with the base as its parent."""
        cards = [{"id": self.model_name, "object": "model", "created": self.created, "owned_by": "pagedbench",
                  "root": self.model_root, "parent": None, "max_model_len": self.limits.max_model_len}]
        for lora in self.client.adapters.values():
            cards.append({"id": lora.lora_name, "object": "model", "created": self.created, "owned_by": "pagedbench",
                          "root": lora.lora_path, "parent": lora.base_model_name or self.model_name,
                          "max_model_len": self.limits.max_model_len})
        return cards

    def check_auth(self, request: Request) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        token = header[7:] if header.lower().startswith("bearer ") else ""
        if not secrets.compare_digest(token.encode(), self.api_key.encode()):
            raise OpenAIError("Incorrect or missing API key; send 'Authorization: Bearer <key>'.", 401,
                              err_type="authentication_error")

    def admit(self) -> None:
        """Admission control: past --max-waiting-requests waiting in the engine, answer 429 at once."""
        limit = self.limits.max_waiting_requests
        if limit and self.client.num_waiting >= limit:
            raise OpenAIError(f"The server is overloaded: {self.client.num_waiting} requests are waiting "
                              f"(--max-waiting-requests {limit}). Retry later.", 429, err_type="rate_limit_error",
                              code="too_many_requests")

    def budget(self, prompt_len: int, requested: int | None, n: int) -> int:
        max_len = self.limits.max_model_len
        if prompt_len >= max_len:
            raise OpenAIError(f"This model's maximum context length is {max_len} tokens. However, your "
                              f"prompt has {prompt_len} tokens. Please shorten the prompt.", param="prompt")
        room = max_len - prompt_len
        if requested is not None and requested > room:
            raise OpenAIError(f"This model's maximum context length is {max_len} tokens. However, you "
                              f"requested {prompt_len + requested} tokens ({prompt_len} in the prompt, {requested} "
                              "for the completion). Please reduce the prompt or max_tokens.", param="max_tokens")
        if n > self.limits.max_n:
            raise OpenAIError(f"n={n} is too large; this server allows at most {self.limits.max_n}.", param="n")
        return requested if requested is not None else room

    def sampling(self, req, prompt_len: int, max_tokens: int | None, logprobs: int | None,
                 logprobs_field: str = "logprobs"):
        """`logprobs_field` names the request field the count came from (chat: top_logprobs)."""
        if logprobs is not None and logprobs > self.limits.max_logprobs:
            raise OpenAIError(f"{logprobs_field}={logprobs} exceeds the server's max_logprobs "
                              f"({self.limits.max_logprobs}).", param=logprobs_field)
        self.check_prompt_logprobs(req)
        try:
            params = req.sampling_params(self.budget(prompt_len, max_tokens, req.n), logprobs)
        except ValueError as exc:  # SamplingParams' messages start with the field's name
            field = str(exc).split(" ", 1)[0]
            raise OpenAIError(str(exc), param=field if field in SAMPLING_FIELDS else None) from None
        vocab = self.limits.vocab_size
        for name in ("stop_token_ids", "logit_bias", "allowed_token_ids"):
            bad = [t for t in getattr(params, name) or () if not 0 <= t < vocab]
            if bad:
                raise OpenAIError(f"{name} must hold token ids in [0, {vocab}); got {bad[0]}", param=name)
        if params.top_k > vocab:  # as vLLM: a top-k past the vocabulary keeps every token
            params.top_k = -1
        return params

    def check_prompt_logprobs(self, req) -> None:
        """vLLM's rules: not with streaming, non-negative, at most max_logprobs. vLLM's -1 (the whole
        vocabulary) is refused: it would send vocab-size dicts per prompt token."""
        n = req.prompt_logprobs
        if n is None:
            return
        if req.stream and n != 0:
            raise OpenAIError("`prompt_logprobs` are not available when `stream=True`.", param="prompt_logprobs")
        if n < 0:
            raise OpenAIError(f"prompt_logprobs must be between 0 and max_logprobs ({self.limits.max_logprobs}); "
                              f"got {n} (-1, the whole vocabulary, is not supported)", param="prompt_logprobs")
        if n > self.limits.max_logprobs:
            raise OpenAIError(f"prompt_logprobs={n} exceeds the server's max_logprobs ({self.limits.max_logprobs}).",
                              param="prompt_logprobs")

    # ---------------------------------------------------------------- prompts
    async def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if len(text) > self.max_prompt_chars:
            raise OpenAIError(f"This model's maximum context length is {self.limits.max_model_len} tokens; "
                              f"a text of {len(text):,} characters is far longer. Please shorten the prompt.",
                              param="prompt")
        if len(text) <= INLINE_TOKENIZE_CHARS:
            return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)
        return await asyncio.to_thread(self.tokenizer.encode, text, add_special_tokens=add_special_tokens)

    async def encode_prompts(self, prompt) -> list[tuple[str | None, list[int]]]:
        if isinstance(prompt, str):
            prompts = [prompt]
        elif prompt and all(isinstance(p, int) for p in prompt):
            prompts = [list(prompt)]
        else:
            prompts = list(prompt)
        if not prompts:
            raise OpenAIError("prompt must not be empty", param="prompt")
        encoded = []
        vocab = self.limits.vocab_size
        for p in prompts:
            ids = await self.encode(p) if isinstance(p, str) else list(p)
            if not ids:
                raise OpenAIError("prompt must not be empty", param="prompt")
            if min(ids) < 0 or max(ids) >= vocab:
                raise OpenAIError(f"prompt token ids must be in [0, {vocab})", param="prompt")
            encoded.append((p if isinstance(p, str) else None, ids))
        return encoded

    async def render_chat(self, req: ChatCompletionRequest) -> list[int]:
        if not req.messages:
            raise OpenAIError("messages must not be empty", param="messages")
        if req.continue_final_message and req.add_generation_prompt:
            raise OpenAIError("continue_final_message and add_generation_prompt cannot both be true; set "
                              "add_generation_prompt to false to continue the last message",
                              param="continue_final_message")
        if req.tools:
            raise OpenAIError("tools are not supported by this server", param="tools")
        messages = []
        for i, m in enumerate(req.messages):
            if m.role not in KNOWN_ROLES:
                raise OpenAIError(f"messages[{i}].role {m.role!r} is not one of {sorted(KNOWN_ROLES)}",
                                  param=f"messages[{i}].role")
            messages.append({"role": m.role, "content": _text_content(m.content, i)})
        if req.continue_final_message and messages[-1]["role"] != "assistant":
            raise OpenAIError("continue_final_message needs the last message to be the assistant's",
                              param="continue_final_message")
        render = functools.partial(self.tokenizer.apply_chat_template, messages, tokenize=False,
                                   add_generation_prompt=req.add_generation_prompt,
                                   continue_final_message=req.continue_final_message)
        size = sum(len(m["content"]) for m in messages)
        text = render() if size <= INLINE_TOKENIZE_CHARS else await asyncio.to_thread(render)
        return await self.encode(text, add_special_tokens=False)

    def usage(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
        """OpenAI's usage; cached_tokens are prompt tokens served by the prefix cache (as vLLM reports)."""
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
                "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def prompt_logprobs_json(prompt_logprobs) -> list | None:
    """RequestOutput.prompt_logprobs in vLLM's JSON: None, then {token id: {logprob, rank, decoded_token}}."""
    if prompt_logprobs is None:
        return None
    return [None if entry is None else {str(tid): {"logprob": lp.logprob, "rank": lp.rank,
                                                   "decoded_token": lp.decoded_token} for tid, lp in entry.items()}
            for entry in prompt_logprobs]


def _text_content(content, i: int) -> str:
    """OpenAI content: a string, or parts of which only text ones are supported."""
    if content is None or isinstance(content, str):
        return content or ""
    texts = []
    for j, part in enumerate(content):
        if part.get("type") != "text":
            raise OpenAIError(f"messages[{i}].content[{j}]: only text parts are supported",
                              param=f"messages[{i}].content")
        text = part.get("text", "")
        if not isinstance(text, str):
            raise OpenAIError(f"messages[{i}].content[{j}].text must be a string", param=f"messages[{i}].content")
        texts.append(text)
    return "".join(texts)
