"""The plain data that crosses the seam between the engine core and its workers, as vLLM v1 shapes it.

`SchedulerOutput` is the whole step plan: requests new to the workers in full, requests already in
the persistent batch as diffs, and which requests leave. A worker applies it to its own persistent
batch (engine/input_batch.py) and needs nothing else from the core: a tensor- or pipeline-parallel
worker in another process receives exactly this, msgspec-encoded, and every rank reaches the same
state. `ModelRunnerOutput` is what a worker hands back: the step's sampled tokens per request.

Why a resumed request carries its tokens: a request that leaves the batch without finishing
(preempted, or given no tokens in a step) loses its row; its generator and parameters stay with
the worker, but its row is rebuilt from the tokens the core knows when it comes back. The core
knows them all by then: a request is only re-admitted once its in-flight token has arrived.
"""
from __future__ import annotations

import msgspec

from engine.messages import TokenLogprobs


class RequestSampling(msgspec.Struct, array_like=True, omit_defaults=True, frozen=True):
    """A request's sampling parameters as the worker applies them (built once by the core from
    SamplingParams: the ids and limits are already checked and resolved)."""
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1: off (a top_k past the vocabulary arrives as -1)
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    min_tokens: int = 0
    min_tokens_stop_ids: list[int] = []  # masked until min_tokens tokens exist: EOS (unless ignored), stop ids
    logprobs: int | None = None
    prompt_logprobs: int | None = None  # score every prompt token, with this many alternatives
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None

    @property
    def has_penalty(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


class NewRequestData(msgspec.Struct, array_like=True, omit_defaults=True):
    """A request the workers have not seen: everything they will ever need about it."""
    req_id: str
    prompt_token_ids: list[int]
    sampling: RequestSampling
    block_ids: list[int]
    num_computed_tokens: int  # tokens whose K/V is already cached (a prefix-cache hit)
    num_scheduled_tokens: int
    lora_id: int = 0  # 0: no adapter


class ResumedRequestData(msgspec.Struct, array_like=True, omit_defaults=True):
    """A known request back in the batch after a step outside it: its row is rebuilt. The block ids
    replace the old ones; the output tokens are every token generated so far."""
    req_id: str
    block_ids: list[int]
    num_computed_tokens: int
    num_scheduled_tokens: int
    output_token_ids: list[int]
    from_preemption: bool = False  # False: it was only given no tokens in the last step


class CachedRequestData(msgspec.Struct, array_like=True, omit_defaults=True):
    """Requests that were in the batch last step and are scheduled again: diffs, in parallel lists
    so that a worker applies them with vector operations."""
    req_ids: list[str] = []
    num_computed_tokens: list[int] = []  # at the start of this step
    num_scheduled_tokens: list[int] = []
    new_block_ids: dict[str, list[int]] = {}  # only the requests that got blocks this step; appended
    # Requests whose block table was cut back since the last plan (KV of rejected draft tokens):
    # the row keeps this many blocks, then new_block_ids are appended.
    num_blocks_kept: dict[str, int] = {}


class SchedulerOutput(msgspec.Struct, array_like=True, omit_defaults=True):
    new_requests: list[NewRequestData] = []
    resumed_requests: list[ResumedRequestData] = []
    cached_requests: CachedRequestData = msgspec.field(default_factory=CachedRequestData)
    total_num_scheduled_tokens: int = 0
    # req_id -> the draft tokens a request verifies this step (speculative decoding, vLLM's name): its
    # num_scheduled_tokens are 1 + len(drafts), its newest token and then the drafts
    scheduled_spec_decode_tokens: dict[str, list[int]] = {}
    finished_req_ids: list[str] = []  # the workers forget these
    preempted_req_ids: list[str] = []  # rows dropped, blocks freed; they come back as resumed
    unscheduled_req_ids: list[str] = []  # rows dropped for a step without tokens; back as resumed

    @property
    def num_requests(self) -> int:
        return len(self.new_requests) + len(self.resumed_requests) + len(self.cached_requests.req_ids)


class ModelRunnerOutput(msgspec.Struct, array_like=True, omit_defaults=True):
    """One step's result from a worker. Rows are the batch's rows in order; a row that sampled
    nothing (a prompt chunk short of its end) has an empty list."""
    req_ids: list[str]
    sampled_token_ids: list[list[int]]  # a list per request: speculative decoding accepts several
    logprobs: list[list[TokenLogprobs]] | None = None  # per request, per sampled token, when a row asked
    # req_id -> the prompt tokens this step scored, in order (requests with prompt_logprobs)
    prompt_logprobs: dict[str, list[TokenLogprobs]] | None = None
    # req_id -> the drafts proposed for the next step (speculative decoding; requests with none absent)
    spec_token_ids: dict[str, list[int]] | None = None


def encode(message: SchedulerOutput | ModelRunnerOutput) -> bytes:
    return msgspec.msgpack.encode(message)


def decode_scheduler_output(data: bytes) -> SchedulerOutput:
    return msgspec.msgpack.decode(data, type=SchedulerOutput)


def decode_model_runner_output(data: bytes) -> ModelRunnerOutput:
    return msgspec.msgpack.decode(data, type=ModelRunnerOutput)
