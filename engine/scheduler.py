"""Continuous batching with a per-step token budget, chunked prefill and preemption by recompute,
and the plain-data step plan (engine/scheduler_output.py) that the workers apply.

Each step: running sequences first (decodes and unfinished prefill chunks, oldest first), then
newly admitted ones while the token budget (`max_num_batched_tokens`), the sequence cap
(`max_num_seqs`) and free KV blocks allow. When blocks run out, the newest running sequence is
preempted: its blocks are freed and it goes back to the head of the queue to be recomputed.

The scheduler owns the progress of every request: it advances `num_computed_tokens` (and counts
the token a step will sample) as it schedules, from the same numbers it sends to the workers, so
nothing else needs to write them (engine/sequence.py). A running sequence whose one remaining token
is its last (max_tokens or max_model_len reached once that token arrives) is not scheduled again:
its length stop is certain, and computing it would waste a row.

Pipeline parallelism (vLLM v1's way): the core keeps several steps in flight, one per stage, and a
request whose sampled token is still in flight is not scheduled again until the token is back (the
first stage needs it as input, and only the last stage has it). A step then takes at most
max_num_seqs / pipeline_parallel_size sequences, so that the running requests split into batches
that follow each other through the stages. (A prompt's chunks need no token between them, so they
may follow each other down the pipeline: each stage runs the steps in order.)
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from engine.block_manager import BlockManager
from engine.config import EngineConfig
from engine.scheduler_output import (
    NewRequestData,
    ResumedRequestData,
    SchedulerOutput,
)
from engine.sequence import (
    Sequence,
    SequenceStatus,
    advance,
    advance_spec,
    reject_drafts,
    reset_progress,
    set_prefix_hit,
)


@dataclass
class ScheduledStep:
    """One step's work: the plan for the workers and, for the core, the sequences it covers."""
    plan: SchedulerOutput
    seqs: list[Sequence]  # in plan order: new, resumed, cached
    num_new_tokens: list[int]
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return self.plan.total_num_scheduled_tokens

    @property
    def has_removals(self) -> bool:
        p = self.plan
        return bool(p.finished_req_ids or p.preempted_req_ids or p.unscheduled_req_ids)

    def __bool__(self) -> bool:
        return bool(self.seqs)


def prefix_key(seq: Sequence) -> int | None:
    """The prefix cache's extra key: KV computed under one adapter is never reused under another."""
    return seq.lora_id or None


class Scheduler:
    def __init__(self, config: EngineConfig, block_manager: BlockManager):
        self.max_num_seqs = config.max_num_seqs
        self.max_loras = config.max_loras if config.enable_lora else 0
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.chunked_prefill = config.enable_chunked_prefill
        self.pipelined = config.pipeline_parallel_size > 1
        self.max_seqs_per_step = -(-config.max_num_seqs // config.pipeline_parallel_size)
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        # Rows the workers must drop, told with the next plan (again, if a plan failed to arrive).
        self._finished_ids: list[str] = []
        self._carried = SchedulerOutput()

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledStep:
        budget = self.max_num_batched_tokens
        scheduled: dict[Sequence, int] = {}  # keyed by identity: cheaper than building an id each step
        spec: dict[Sequence, list[int]] = {}  # the drafts each verifies (speculative decoding)
        preempted: list[Sequence] = []
        block_size = self.block_manager.block_size
        fast_decode = not self.block_manager.enable_prefix_caching
        running = SequenceStatus.RUNNING
        pipelined, cap = self.pipelined, self.max_seqs_per_step
        for seq in list(self.running):  # the per-sequence loop of every step: the scheduler reads its own
            if seq.status is not running:  # counters directly (engine/sequence.py)
                continue  # preempted earlier in this loop
            num_tokens, num_computed = seq._num_tokens, seq._num_computed_tokens
            if num_tokens >= seq.max_num_tokens:
                continue  # its one uncomputed token is its last: nothing left to compute
            if pipelined and (num_tokens > len(seq.token_ids) or len(scheduled) >= cap):
                continue  # its token is still in the pipeline, or this step is full
            num_new = min(num_tokens - num_computed, budget)
            if num_new == 0:
                continue
            if seq.spec_token_ids and num_tokens - num_computed == 1:
                # Its newest token and the drafts after it, as far as the budget and max_tokens allow (the
                # step emits up to k + 1 tokens).
                k = min(len(seq.spec_token_ids), budget - 1, seq.max_num_tokens - num_tokens - 1)
                if k > 0:
                    spec[seq] = seq.spec_token_ids[:k]
                    num_new = 1 + k
            if num_new == 1 and fast_decode and num_computed % block_size:
                # Decode fast path: the new token's slot is in the sequence's last, partly filled block.
                scheduled[seq] = 1
                budget -= 1
                continue
            if not self._make_room(seq, num_new, scheduled, preempted):
                continue  # seq itself was preempted
            # Never hashes a draft's block: register_full_blocks stops at the known tokens.
            self.block_manager.allocate(seq, num_new)
            self.block_manager.register_full_blocks(seq, seq.num_computed_tokens + num_new, prefix_key(seq))
            scheduled[seq] = num_new
            budget -= num_new
        if not preempted:  # as vLLM: admit nothing new in a step that had to preempt
            self._admit_waiting(budget, scheduled)
        for seq in preempted:
            spec.pop(seq, None)
        return self._plan(scheduled, preempted, spec)

    def _make_room(self, seq: Sequence, num_new: int, scheduled: dict, preempted: list) -> bool:
        """Preempt the newest running sequences until `seq` can get its blocks. False if `seq` itself
        had to go."""
        while not self.block_manager.can_allocate(seq, num_new):
            victim = self.running[-1]
            self._preempt(victim)
            scheduled.pop(victim, None)
            preempted.append(victim)
            if victim is seq:
                return False
        return True

    def _admit_waiting(self, budget: int, scheduled: dict) -> None:
        # The adapters running now: a request under another one waits while they fill the GPU slots (it
        # keeps its place; requests behind it with a running adapter, or none, go ahead).
        adapters = {s.lora_id for s in self.running if s.lora_id}
        held: list[Sequence] = []
        while (self.waiting and budget > 0 and len(self.running) < self.max_num_seqs
               and len(scheduled) < self.max_seqs_per_step):
            seq = self.waiting[0]
            if seq.num_pending_tokens:
                break  # preempted with a token in flight: it comes back once that token is known
            if seq.lora_id and seq.lora_id not in adapters and len(adapters) >= self.max_loras:
                held.append(self.waiting.popleft())
                continue
            # A request scoring its prompt needs every prompt row computed: it does not read the prefix
            # cache (as vLLM v1; engine/prompt_logprobs.py).
            if not seq.block_table and seq.num_computed_tokens == 0 and seq.prompt_logprobs is None:
                cached = self.block_manager.match_prefix(seq, prefix_key(seq))
                set_prefix_hit(seq, cached)
                if seq.first_scheduled_time is None:
                    seq.num_cached_tokens = cached
            num_new = seq.num_uncomputed_tokens
            if not self.chunked_prefill and num_new > budget:
                self._release_prefix(seq)
                break
            num_new = min(num_new, budget)
            if not self.block_manager.can_allocate(seq, num_new):
                self._release_prefix(seq)
                break
            self.waiting.popleft()
            self.block_manager.allocate(seq, num_new)
            self.block_manager.register_full_blocks(seq, seq.num_computed_tokens + num_new, prefix_key(seq))
            seq.status = SequenceStatus.RUNNING
            if seq.lora_id:
                adapters.add(seq.lora_id)
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = time.monotonic()
            self.running.append(seq)
            scheduled[seq] = num_new
            budget -= num_new
        self.waiting.extendleft(reversed(held))

    def _release_prefix(self, seq: Sequence) -> None:
        """Undo a prefix match for a sequence that stays waiting, so its blocks stay evictable."""
        if seq.block_table:
            self.block_manager.free(seq)
            reset_progress(seq)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        reset_progress(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        seq.was_preempted = True
        seq.spec_token_ids = []  # proposed for a state it no longer has
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    # ---------------------------------------------------------------- the plan
    def _plan(self, scheduled: dict[Sequence, int], preempted: list[Sequence],
              spec: dict[Sequence, list[int]] | None = None) -> ScheduledStep:
        """The plain-data plan for the workers, then the progress it implies (the one place that
        advances num_computed_tokens)."""
        plan, self._carried = self._carried, SchedulerOutput()
        cached = plan.cached_requests
        for seq in preempted:
            if seq.in_batch:
                plan.preempted_req_ids.append(seq.request_id)
                seq.in_batch = False
        for seq in self.running:
            if seq.in_batch and seq not in scheduled:
                plan.unscheduled_req_ids.append(seq.request_id)
                seq.in_batch = False
        cached_ids, cached_computed = cached.req_ids.append, cached.num_computed_tokens.append
        cached_scheduled, new_blocks = cached.num_scheduled_tokens.append, cached.new_block_ids
        for seq, n in scheduled.items():
            if seq.in_batch:  # the usual case: a diff
                cached_ids(seq.request_id)
                cached_computed(seq._num_computed_tokens)
                cached_scheduled(n)
                if seq.num_blocks_kept is not None:  # cut back after rejected drafts
                    cached.num_blocks_kept[seq.request_id] = seq.num_blocks_kept
                    seq.num_blocks_kept = None
                if len(seq.block_table) > seq.num_blocks_sent:
                    new_blocks[seq.request_id] = seq.block_table[seq.num_blocks_sent:]
                    seq.num_blocks_sent = len(seq.block_table)
            else:  # a row to add: new to the workers in full, or back after a step outside the batch
                if not seq.known_to_workers:
                    plan.new_requests.append(NewRequestData(
                        seq.request_id, seq.token_ids[:seq.num_prompt_tokens], seq.sampling, list(seq.block_table),
                        seq.num_computed_tokens, n, seq.lora_id))
                    seq.known_to_workers = True
                else:
                    plan.resumed_requests.append(ResumedRequestData(
                        seq.request_id, list(seq.block_table), seq.num_computed_tokens, n, seq.output_token_ids,
                        seq.was_preempted))
                    seq.was_preempted = False
                seq.in_batch = True
                seq.num_blocks_sent = len(seq.block_table)
                seq.num_blocks_kept = None  # its whole table went with it
            if spec and seq in spec:
                advance_spec(seq, n)
            else:
                advance(seq, n)
        if spec:
            plan.scheduled_spec_decode_tokens = {seq.request_id: drafts for seq, drafts in spec.items()}
        seqs = list(scheduled)
        plan.finished_req_ids += self._finished_ids
        self._finished_ids = []
        plan.total_num_scheduled_tokens = sum(scheduled.values())
        return ScheduledStep(plan, seqs, list(scheduled.values()), preempted)

    def reject_drafts(self, seq: Sequence, num_rejected: int) -> None:
        """After a verification step: the rejected drafts' positions are not computed, and the blocks
        that only they used are freed (the workers' row is cut back with the next plan)."""
        if not num_rejected:
            return
        reject_drafts(seq, num_rejected)
        bs = self.block_manager.block_size
        keep = (seq.num_computed_tokens + bs - 1) // bs
        if keep < len(seq.block_table):
            self.block_manager.trim(seq, keep)
            if seq.in_batch and seq.num_blocks_sent > keep:
                seq.num_blocks_sent = seq.num_blocks_kept = keep

    def plan_failed(self, plan: SchedulerOutput) -> None:
        """A plan that may not have reached the workers: its removals go with the next one (dropping
        a row twice is harmless; missing a drop is not)."""
        self._carried.finished_req_ids += plan.finished_req_ids
        self._carried.preempted_req_ids += plan.preempted_req_ids
        self._carried.unscheduled_req_ids += plan.unscheduled_req_ids

    def finish(self, seq: Sequence, reason: str) -> None:
        """Mark `seq` finished (or aborted) and free its blocks, wherever it is."""
        if seq.status == SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status == SequenceStatus.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = seq.finish_reason or reason
        if seq.known_to_workers:
            self._finished_ids.append(seq.request_id)
            seq.known_to_workers = seq.in_batch = False
