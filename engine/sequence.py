"""A Sequence is one sample being generated: its tokens, its KV blocks and its progress."""
from __future__ import annotations

from enum import Enum, auto

import torch

from engine.sampling_params import SamplingParams


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


class Sequence:
    """Tokens are prompt + output. `num_computed_tokens` of them have their K/V in the cache;
    the scheduler feeds the rest (a prefill chunk, or the one newest token when decoding)."""

    def __init__(self, request_id: str, index: int, prompt_token_ids: list[int], params: SamplingParams,
                 arrival_time: float, generator: torch.Generator | None):
        self.request_id = request_id
        self.index = index  # which of the request's n samples
        self.seq_id = (request_id, index)
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params
        self.arrival_time = arrival_time
        self.generator = generator
        self.client_index = 0  # the API process that receives its outputs
        self.status = SequenceStatus.WAITING
        self.block_table: list[int] = []
        self.block_hashes: list[int] = []  # prefix-cache hash chain of its full, computed blocks
        self.num_computed_tokens = 0
        self.pending_row: int | None = None  # newest token still on the device: its row there
        self.num_cached_tokens = 0  # prompt tokens served by the prefix cache at first admission
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.first_scheduled_time: float | None = None
        self.first_token_time: float | None = None
        self.num_preemptions = 0
        # Scored prompt tokens (positions 1, 2, ...), filled step by step (engine/prompt_logprobs.py).
        self.prompt_logprobs: list | None = [] if params.prompt_logprobs is not None else None

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)

    def reset_for_recompute(self) -> None:
        """Preemption by recompute: drop the KV (the caller frees the blocks) and start over from
        the tokens already known, prompt and output alike."""
        self.block_table = []
        self.block_hashes = []
        self.num_computed_tokens = 0
        self.status = SequenceStatus.WAITING
        self.num_preemptions += 1
