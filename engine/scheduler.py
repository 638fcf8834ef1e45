"""Continuous batching with a per-step token budget, chunked prefill and preemption by recompute.

Each step: running sequences first (decodes and unfinished prefill chunks, oldest first), then
newly admitted ones while the token budget (`max_num_batched_tokens`), the sequence cap
(`max_num_seqs`) and free KV blocks allow. When blocks run out, the newest running sequence is
preempted: its blocks are freed and it goes back to the head of the queue to be recomputed.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from engine.block_manager import BlockManager
from engine.config import EngineConfig
from engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    """One step's work. Sequences that feed exactly one token come first (the decode group)."""
    seqs: list[Sequence]
    num_new_tokens: list[int]
    num_decode_seqs: int
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def __bool__(self) -> bool:
        return bool(self.seqs)


class Scheduler:
    def __init__(self, config: EngineConfig, block_manager: BlockManager):
        self.max_num_seqs = config.max_num_seqs
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.chunked_prefill = config.enable_chunked_prefill
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        budget = self.max_num_batched_tokens
        scheduled: dict[Sequence, int] = {}  # keyed by identity: cheaper than building an id each step
        preempted: list[Sequence] = []
        block_size = self.block_manager.block_size
        for seq in list(self.running):
            if seq.status != SequenceStatus.RUNNING:
                continue  # preempted earlier in this loop
            num_new = min(seq.num_uncomputed_tokens, budget)
            if num_new == 0:
                continue
            if num_new == 1 and seq.num_computed_tokens % block_size and not self.block_manager.enable_prefix_caching:
                # Decode fast path: the new token's slot is in the sequence's last, partly filled block.
                scheduled[seq] = 1
                budget -= 1
                continue
            if not self._make_room(seq, num_new, scheduled, preempted):
                continue  # seq itself was preempted
            self.block_manager.allocate(seq, num_new)
            self.block_manager.register_full_blocks(seq, seq.num_computed_tokens + num_new)
            scheduled[seq] = num_new
            budget -= num_new
        if not preempted:  # as vLLM: admit nothing new in a step that had to preempt
            budget = self._admit_waiting(budget, scheduled)
        return self._batch(scheduled, preempted)

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

    def _admit_waiting(self, budget: int, scheduled: dict) -> int:
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            # A request scoring its prompt needs every prompt row computed: it does not read the prefix
            # cache (as vLLM v1; engine/prompt_logprobs.py).
            if not seq.block_table and seq.num_computed_tokens == 0 and seq.prompt_logprobs is None:
                cached = self.block_manager.match_prefix(seq)
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
            self.block_manager.register_full_blocks(seq, seq.num_computed_tokens + num_new)
            seq.status = SequenceStatus.RUNNING
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = time.monotonic()
            self.running.append(seq)
            scheduled[seq] = num_new
            budget -= num_new
        return budget

    def _release_prefix(self, seq: Sequence) -> None:
        """Undo a prefix match for a sequence that stays waiting, so its blocks stay evictable."""
        if seq.block_table:
            self.block_manager.free(seq)
            seq.num_computed_tokens = 0

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.reset_for_recompute()
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def _batch(self, scheduled: dict, preempted: list) -> ScheduledBatch:
        decodes, prefills = [], []
        for seq in self.running:  # running order: oldest first within each group
            n = scheduled.get(seq)
            if n == 1:
                decodes.append(seq)
            elif n:
                prefills.append(seq)
        return ScheduledBatch(seqs=decodes + prefills,
                              num_new_tokens=[1] * len(decodes) + [scheduled[s] for s in prefills],
                              num_decode_seqs=len(decodes), preempted=preempted)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Mark `seq` finished (or aborted) and free its blocks, wherever it is."""
        if seq.status == SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status == SequenceStatus.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = seq.finish_reason or reason
