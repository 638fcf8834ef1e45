"""The core's side of speculative decoding, after each step's tokens were appended (output
handling): the drafts each request verified are compared with what it got, the rejected ones rolled
back (Scheduler.reject_drafts: computed counts and block tables), the proposals for the next step
kept on the sequences, and acceptance counted under vLLM's metric names.

A request that got n tokens for k drafts accepted n - 1 of them (the last token is the correction
or the bonus). A request stopped inside an accepted run (EOS, a stop id, max_tokens) is finished by
output handling: its blocks are freed whole, so nothing is rolled back."""
from __future__ import annotations

from dataclasses import dataclass, field

from engine.scheduler_output import ModelRunnerOutput, SchedulerOutput
from engine.sequence import Sequence


@dataclass
class SpecDecodeStats:
    """Cumulative, as vLLM's counters: verifications with drafts, draft tokens, accepted drafts, and
    accepted drafts by position (the first draft is position 0)."""
    num_speculative_tokens: int
    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_pos: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.accepted_per_pos = [0] * self.num_speculative_tokens

    def observe(self, num_drafts: int, num_accepted: int) -> None:
        self.num_drafts += 1
        self.num_draft_tokens += num_drafts
        self.num_accepted_tokens += num_accepted
        for pos in range(num_accepted):
            self.accepted_per_pos[pos] += 1


def after_step(scheduler, plan: SchedulerOutput, result: ModelRunnerOutput, seqs: dict[str, Sequence],
               stats: SpecDecodeStats) -> None:
    """`seqs`: the step's sequences by id."""
    got = dict(zip(result.req_ids, result.sampled_token_ids))
    for rid, drafts in plan.scheduled_spec_decode_tokens.items():
        seq = seqs.get(rid)
        tokens = got.get(rid)
        if seq is None or not tokens:
            continue  # failed with its step
        num_accepted = min(len(tokens) - 1, len(drafts))
        stats.observe(len(drafts), num_accepted)
        if not seq.is_finished:
            scheduler.reject_drafts(seq, len(drafts) - num_accepted)
    proposals = result.spec_token_ids or {}
    for rid, seq in seqs.items():
        if not seq.is_finished:
            seq.spec_token_ids = proposals.get(rid, [])
