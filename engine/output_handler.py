"""The core's output handling: one step's ModelRunnerOutput applied to the scheduler's requests in a
single pass. The one place that appends generated tokens, checks token stops (EOS, stop token ids,
max_tokens, max_model_len) and builds the step's CoreOutputs. Text, stop strings and RequestOutputs
are the front end's (engine/output_processor.py).

Stops are found one step late (the core has already launched the next step when it reads these
tokens), so a row may come back for a request that finished or was aborted since: it is dropped.
A request may get several tokens in a step (speculative decoding): they are taken up to the first
stop.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from engine.messages import CoreOutput
from engine.scheduler_output import ModelRunnerOutput
from engine.sequence import Sequence, SequenceStatus

log = logging.getLogger("engine")


@dataclass
class StepOutcome:
    outputs: list[CoreOutput] = field(default_factory=list)
    finished: list[Sequence] = field(default_factory=list)  # finish_reason and stop_reason set
    failed: list[tuple[Sequence, Exception]] = field(default_factory=list)
    num_generated: int = 0
    num_prompt_tokens: int = 0  # of the requests that got their first token


class OutputHandler:
    def __init__(self, eos_token_ids: set[int], before_each: Callable[[Sequence], None] | None = None):
        self.eos_token_ids = frozenset(eos_token_ids)
        self.before_each = before_each  # fault injection for tests (engine/core.py)

    def stop_ids_for(self, ignore_eos: bool, stop_token_ids: list[int]) -> frozenset[int]:
        return frozenset(stop_token_ids) | (frozenset() if ignore_eos else self.eos_token_ids)

    def process(self, result: ModelRunnerOutput, requests: dict[str, Sequence]) -> StepOutcome:
        """`requests`: the step's sequences by id (those that are finished by now are skipped)."""
        outcome = StepOutcome()
        logprobs = result.logprobs
        get = requests.get
        for rid, scored in (result.prompt_logprobs or {}).items():  # before the first token they precede
            seq = get(rid)
            if seq is not None and seq.prompt_logprobs is not None:
                seq.prompt_logprobs += scored
        finished = SequenceStatus.FINISHED
        for i, (rid, tokens) in enumerate(zip(result.req_ids, result.sampled_token_ids)):
            if not tokens:
                continue  # a prompt chunk short of its end
            seq = get(rid)
            if seq is None or seq.status is finished:
                continue  # finished or aborted since this step was launched: its row was computed for nothing
            try:
                if self.before_each is not None:
                    self.before_each(seq)
                self._append(seq, tokens, logprobs[i] if logprobs is not None else None, outcome)
            except Exception as exc:  # one request's failure stays its own
                log.exception("handling the token of request %s failed", rid)
                outcome.failed.append((seq, exc))
        return outcome

    def _append(self, seq: Sequence, tokens: list[int], logprobs: list | None, outcome: StepOutcome) -> None:
        token_ids = seq.token_ids
        num_prompt = seq.num_prompt_tokens
        first = len(token_ids) == num_prompt
        reason = stop = None
        taken = len(tokens)
        for i, token in enumerate(tokens):  # usually one
            token_ids.append(token)
            if token in seq.stop_ids and len(token_ids) - num_prompt >= seq.params.min_tokens:
                reason, stop = "stop", (None if token in self.eos_token_ids and not seq.params.ignore_eos else token)
            elif len(token_ids) >= seq.max_num_tokens:
                reason = "length"
            else:
                continue
            taken = i + 1
            break
        assert len(token_ids) <= seq.num_tokens, f"request {seq.request_id} got a token it was not scheduled for"
        out = CoreOutput(seq.request_id, tokens if taken == len(tokens) else tokens[:taken],
                         num_cached_tokens=seq.num_cached_tokens if first else 0)
        if first and seq.prompt_logprobs is not None:  # complete: the prompt's last chunk came with this token
            out.prompt_logprobs = seq.prompt_logprobs
        if logprobs and seq.params.logprobs is not None:
            out.logprobs = logprobs[:taken]
        outcome.num_generated += taken
        if first:
            outcome.num_prompt_tokens += num_prompt
        if reason is not None:
            out.finish_reason, out.stop_reason = reason, stop
            seq.finish_reason, seq.stop_reason = reason, stop
            outcome.finished.append(seq)
        outcome.outputs.append(out)
