"""Request bodies of the OpenAI API (plus vLLM's sampling extras), and OpenAI-style errors."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from engine.sampling_params import SamplingParams


class OpenAIError(Exception):
    """Raised anywhere in a handler; becomes {"error": {...}} with this status."""

    def __init__(self, message: str, status: int = 400, param: str | None = None,
                 err_type: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.message, self.status, self.param, self.err_type = message, status, param, err_type
        self.code = code or {400: "bad_request", 401: "invalid_api_key", 404: "model_not_found"}.get(status)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.err_type, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(BaseModel):
    """Fields both endpoints share; unknown fields are ignored, as OpenAI's server does."""
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    n: int = Field(1, ge=1)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    user: str | None = None
    # vLLM's extras
    top_k: int = -1
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0)
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    logit_bias: dict[str, float] | None = None  # OpenAI's keys are token ids written as strings
    allowed_token_ids: list[int] | None = None
    prompt_logprobs: int | None = None  # checked in OpenAIServing.sampling (vLLM's rules and messages)

    def sampling_params(self, max_tokens: int, logprobs: int | None) -> SamplingParams:
        return SamplingParams(n=self.n, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                              min_p=self.min_p, presence_penalty=self.presence_penalty,
                              frequency_penalty=self.frequency_penalty, repetition_penalty=self.repetition_penalty,
                              seed=self.seed, max_tokens=max_tokens, min_tokens=self.min_tokens,
                              ignore_eos=self.ignore_eos, stop=self.stop, stop_token_ids=self.stop_token_ids,
                              include_stop_str_in_output=self.include_stop_str_in_output, logprobs=logprobs,
                              skip_special_tokens=self.skip_special_tokens, logit_bias=self.logit_bias_ids(),
                              allowed_token_ids=self.allowed_token_ids, prompt_logprobs=self.prompt_logprobs)

    def logit_bias_ids(self) -> dict[int, float] | None:
        if not self.logit_bias:
            return None
        try:
            return {int(k): float(v) for k, v in self.logit_bias.items()}
        except ValueError:
            raise ValueError("logit_bias keys must be token ids, e.g. {\"50256\": -100}") from None


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0)
    echo: bool = False
    suffix: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[dict] | None = None


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    tools: list[dict] | None = None


class TokenizeRequest(BaseModel):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(BaseModel):
    model: str | None = None
    tokens: list[int]


ROLES = Literal["system", "user", "assistant", "developer", "tool"]
KNOWN_ROLES = {"system", "user", "assistant", "developer", "tool"}


class LoadLoRAAdapterRequest(BaseModel):
    """POST /v1/load_lora_adapter, as vLLM takes it."""
    lora_name: str
    lora_path: str
    load_inplace: bool = False  # replace an adapter already loaded under this name


class UnloadLoRAAdapterRequest(BaseModel):
    """POST /v1/unload_lora_adapter, as vLLM takes it (lora_int_id is accepted and checked if given)."""
    lora_name: str
    lora_int_id: int | None = None
