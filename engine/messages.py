"""What crosses the boundary between a front end (the API server processes, or LLMEngine offline)
and the engine core: plain data, encoded with msgspec when it crosses a process boundary.

The core sees one sequence per request (a request with n samples is fanned out into n core
requests by the front end, as vLLM v1 does), works in token ids only, and answers each step with
one batch holding every sequence's new token ids: no text, no per-request messages.
"""
from __future__ import annotations

import msgspec

from engine.lora.request import LoRARequest
from engine.sampling_params import SamplingParams


class CoreRequest(msgspec.Struct, array_like=True, omit_defaults=True):
    request_id: str
    prompt_token_ids: list[int]
    params: dict  # SamplingParams fields with n == 1 (the core rebuilds and re-checks them)
    arrival_time: float
    client_index: int = 0  # which API process gets the outputs
    lora: LoRARequest | None = None  # the adapter it runs under (None: the base model)

    @staticmethod
    def from_params(request_id: str, prompt_token_ids: list[int], params: SamplingParams, arrival_time: float,
                    client_index: int = 0) -> CoreRequest:
        fields = {k: v for k, v in params.__dict__.items() if k not in _FRONT_END_FIELDS and v != _DEFAULTS[k]}
        return CoreRequest(request_id, prompt_token_ids, fields, arrival_time, client_index)

    def sampling_params(self) -> SamplingParams:
        return SamplingParams(**self.params)


_DEFAULTS = SamplingParams().__dict__
# Text and output shape are the front end's business (engine/output_processor.py); the core works in ids.
_FRONT_END_FIELDS = {"stop", "stop_list", "include_stop_str_in_output", "skip_special_tokens", "output_kind"}


class TokenLogprobs(msgspec.Struct, array_like=True):
    """The sampled token's logprob and rank, and the top-N (ids, logprobs) of the raw distribution."""
    logprob: float
    rank: int
    top_ids: list[int]
    top_logprobs: list[float]


class CoreOutput(msgspec.Struct, array_like=True, omit_defaults=True):
    request_id: str
    new_token_ids: list[int]
    finish_reason: str | None = None  # "stop" (EOS or a stop token id), "length", "abort" or an error
    stop_reason: int | None = None  # the stop token id
    logprobs: list[TokenLogprobs] | None = None  # one per new token, when the request asked
    num_cached_tokens: int = 0
    # With the first token, when the request asked: prompt positions 1..P-1, each scoring its prompt token.
    prompt_logprobs: list[TokenLogprobs] | None = None
    error: str | None = None  # the request failed inside the core (finish_reason is then "error")


class EngineStats(msgspec.Struct, array_like=True):
    num_running: int
    num_waiting: int
    kv_cache_usage: float
    num_gpu_blocks: int
    num_preemptions_total: int
    prefix_cache_queries_total: int
    prefix_cache_hits_total: int
    prompt_tokens_total: int
    generation_tokens_total: int
    num_steps_total: int
    scheduled_tokens_total: int
    # Speculative decoding (vLLM's counters; per_pos is empty when it is off)
    spec_decode_num_drafts_total: int = 0
    spec_decode_num_draft_tokens_total: int = 0
    spec_decode_num_accepted_tokens_total: int = 0
    spec_decode_num_accepted_tokens_per_pos: list[int] = []


class LoadLoRA(msgspec.Struct, array_like=True, omit_defaults=True):
    """An API process asks the core to read and register an adapter under a name (POST
    /v1/load_lora_adapter, or --lora-modules); the core picks its lora_int_id."""
    call_id: int
    client_index: int
    lora_name: str
    lora_path: str
    base_model_name: str | None = None
    load_inplace: bool = False  # replace an adapter of the same name (vLLM's field)


class UnloadLoRA(msgspec.Struct, array_like=True):
    call_id: int
    client_index: int
    lora_name: str


class CallResult(msgspec.Struct, array_like=True, omit_defaults=True):
    """The core's answer to a LoadLoRA / UnloadLoRA: error is None on success; status is the HTTP status
    the API process answers with."""
    call_id: int
    error: str | None = None
    status: int = 200


class CoreOutputs(msgspec.Struct, array_like=True):
    """One step's outputs for one client, with the engine's stats after the step. After an adapter was
    loaded or unloaded, every client also gets the whole adapter registry (`adapters`), and the caller
    its result, in the same message: the name is known to the API process by the time its call returns."""
    outputs: list[CoreOutput]
    stats: EngineStats
    results: list[CallResult] = []
    adapters: list[LoRARequest] | None = None


class CoreInfo(msgspec.Struct):
    """What the core tells its clients once it is ready."""
    model_dir: str
    tokenizer_dir: str
    max_model_len: int
    vocab_size: int
    max_logprobs: int
    max_num_seqs: int
    eos_token_ids: list[int]
    stats: EngineStats
    enable_lora: bool = False
    adapters: list[LoRARequest] = []  # registered by name (--lora-modules)


# Input messages to the core: (kind byte, payload). Aborts carry a list of request ids.
ADD, ABORT, RESET_PREFIX_CACHE, SHUTDOWN = b"A", b"X", b"R", b"S"
LOAD_LORA, UNLOAD_LORA = b"L", b"U"
