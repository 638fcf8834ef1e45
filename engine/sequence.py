"""A Sequence is the core's record of one request being generated: its tokens, its KV blocks and
its progress.

One owner per piece of state. The scheduler (engine/scheduler.py) alone advances the progress
counters, `num_computed_tokens` and `num_tokens`, when it schedules a step: they are read-only
properties here, and only `advance`, `reset_progress` and `set_prefix_hit` (called by the
scheduler) write them. Output handling (engine/output_handler.py) alone appends to `token_ids`.
The two meet through the one-step overlap: a token the scheduler has scheduled to be sampled, but
whose value is still on the device, is counted in `num_tokens` and not yet in `token_ids`.
"""
from __future__ import annotations

from enum import Enum, auto

from engine.sampling_params import SamplingParams
from engine.scheduler_output import RequestSampling


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


class Sequence:
    """Tokens are prompt + output. `num_computed_tokens` of them have their K/V in the cache (or
    will, once the step in flight ends); the scheduler feeds the rest (a prefill chunk, or the newest
    token when decoding)."""

    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 sampling: RequestSampling, arrival_time: float, max_num_tokens: int,
                 stop_ids: frozenset[int] = frozenset(), lora_id: int = 0):
        self.request_id = request_id
        self.token_ids = list(prompt_token_ids)  # known to the host; appended by output handling only
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params
        self.sampling = sampling  # what the workers apply (engine/scheduler_output.py)
        self.arrival_time = arrival_time
        self.max_num_tokens = max_num_tokens  # prompt + max_tokens, capped at max_model_len
        self.stop_ids = stop_ids  # EOS (unless ignore_eos) and stop_token_ids
        self.lora_id = lora_id
        self.client_index = 0  # the API process that receives its outputs
        self.status = SequenceStatus.WAITING
        self.block_table: list[int] = []
        self.block_hashes: list[int] = []  # prefix-cache hash chain of its full, computed blocks
        self.num_cached_tokens = 0  # prompt tokens served by the prefix cache at first admission
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.first_scheduled_time: float | None = None
        self.num_preemptions = 0
        # Progress: written by the scheduler only (see the module docstring).
        self._num_computed_tokens = 0
        self._num_tokens = len(prompt_token_ids)
        # What the workers know of it (the scheduler's, for building step plans).
        self.known_to_workers = False
        self.in_batch = False  # a row in the workers' persistent batch since the last step
        self.num_blocks_sent = 0
        self.was_preempted = False  # since it last had a row
        # Speculative decoding: the drafts proposed for its next step (the workers' proposal), and the
        # number of blocks its table was cut back to since the last plan (None: not cut).
        self.spec_token_ids: list[int] = []
        self.num_blocks_kept: int | None = None
        # Scored prompt tokens (positions 1, 2, ...), gathered step by step from the workers' outputs
        # by output handling and sent with the first token (engine/prompt_logprobs.py).
        self.prompt_logprobs: list | None = [] if params.prompt_logprobs is not None else None

    # ---------------------------------------------------------------- progress (read-only)
    @property
    def num_computed_tokens(self) -> int:
        return self._num_computed_tokens

    @property
    def num_tokens(self) -> int:
        """Prompt + output tokens, counting a sampled token still on its way from the device."""
        return self._num_tokens

    @property
    def num_pending_tokens(self) -> int:
        return self._num_tokens - len(self.token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        return self._num_tokens - self._num_computed_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED


# The progress writers. They are functions of this module, not methods, so that nothing reaches
# them by accident through a Sequence; engine/scheduler.py is their one caller.
def advance(seq: Sequence, num_new_tokens: int) -> bool:
    """A step computes `num_new_tokens` more of `seq`; True when that reaches its newest token, so the
    step samples one more (counted in num_tokens from now on, while its value is on the device)."""
    seq._num_computed_tokens += num_new_tokens
    if seq._num_computed_tokens == seq._num_tokens:
        seq._num_tokens += 1
        return True
    return False


def advance_spec(seq: Sequence, num_new_tokens: int) -> None:
    """A step verifies drafts: its newest token and num_new_tokens - 1 drafts are computed. Until the
    step's outcome is known every draft counts as computed and as a token, plus the one token the
    step samples after them (engine/spec_decode/scheduling.py takes back the rejected ones)."""
    seq._num_computed_tokens += num_new_tokens
    seq._num_tokens = seq._num_computed_tokens + 1


def reject_drafts(seq: Sequence, num_rejected: int) -> None:
    """The step's outcome: `num_rejected` drafts were not accepted; their positions are not computed."""
    seq._num_computed_tokens -= num_rejected
    seq._num_tokens -= num_rejected


def set_prefix_hit(seq: Sequence, num_cached: int) -> None:
    seq._num_computed_tokens = num_cached


def reset_progress(seq: Sequence) -> None:
    """Preemption by recompute: nothing is in the cache any more; the known tokens stay."""
    seq._num_computed_tokens = 0
