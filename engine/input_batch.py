"""The worker's persistent batch: one row per scheduled request, kept across steps, as vLLM v1's
InputBatch does it. A step's plan (engine/scheduler_output.py) adds rows for new and resumed
requests, drops the rows of finished, preempted and unscheduled ones, and updates the rest in place
(progress, appended block ids); holes are filled from the end (condense), and rows are swapped so
that one-token rows come first (the attention kernels' decode group). Input preparation then works
on these arrays with vector operations (engine/model_runner.py).

Rows hold: token ids [max_num_seqs, max_model_len + 1] (the extra column takes the token sampled
after a request's last, which is discarded), token counts and progress, the row's block table
(host, pinned on CUDA, and a device copy refreshed from it when it changes), per-row sampling state
(engine/sampling_metadata.py), the LoRA id, and where a row's newest token waits on the device: a
token sampled in the previous step is read from that step's output tensor on the device (the
host has not seen it yet), so the host never waits for it.

Host arrays that feed asynchronous copies are never written while a copy from them may still be
queued: the runner waits for the previous step's input copies (which precede that step's compute on
the stream, long done in practice) before it updates the batch.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np
import torch

from engine.sampler import make_generator
from engine.sampling_metadata import SamplingRows
from engine.scheduler_output import NewRequestData, RequestSampling, SchedulerOutput


@dataclass
class RequestState:
    """What a worker keeps of a request for its whole life, in the batch or out of it."""
    req_id: str
    prompt_token_ids: np.ndarray
    sampling: RequestSampling
    generator: torch.Generator | None
    lora_id: int = 0
    num_prompt_scored: int = 0  # prompt positions scored so far (prompt_logprobs; engine/prompt_logprobs.py)


def host_array(shape, dtype: torch.dtype, pin_memory: bool) -> tuple[torch.Tensor, np.ndarray]:
    tensor = torch.zeros(shape, dtype=dtype, pin_memory=pin_memory)
    return tensor, tensor.numpy()


class BlockTable:
    """Rows of block ids: appended on the host, copied to the device (one copy of the used rows)
    in a step where any row changed."""

    def __init__(self, max_rows: int, max_blocks: int, device: torch.device, pin_memory: bool):
        self._host, self.host = host_array((max_rows, max_blocks), torch.int32, pin_memory)
        self.num_blocks = np.zeros(max_rows, dtype=np.int32)
        self.device_table = torch.zeros(max_rows, max_blocks, dtype=torch.int32, device=device)
        self._dirty = True

    def set_row(self, row: int, block_ids: list[int]) -> None:
        self.host[row, :len(block_ids)] = block_ids
        self.num_blocks[row] = len(block_ids)
        self._dirty = True

    def append(self, row: int, block_ids: list[int]) -> None:
        start = self.num_blocks[row]
        self.host[row, start:start + len(block_ids)] = block_ids
        self.num_blocks[row] = start + len(block_ids)
        self._dirty = True

    def truncate(self, row: int, num_blocks: int) -> None:
        """Keep the row's first `num_blocks` (the scheduler freed the rest: rejected draft tokens')."""
        self.num_blocks[row] = min(self.num_blocks[row], num_blocks)

    def swap(self, i: int, j: int) -> None:
        self.host[[i, j]] = self.host[[j, i]]
        self.num_blocks[[i, j]] = self.num_blocks[[j, i]]
        self._dirty = True

    def clear(self) -> None:
        """Every row back to block 0: rows past the batch are read by CUDA graphs' padding rows, so a
        block id left over from a larger scratch cache (the memory profile's) must not survive."""
        self.host.fill(0)
        self.num_blocks[:] = 0
        self.device_table.zero_()
        self._dirty = False

    def commit(self, num_rows: int) -> None:
        if self._dirty and num_rows:
            self.device_table[:num_rows].copy_(self._host[:num_rows], non_blocking=True)
        self._dirty = False


class InputBatch:
    def __init__(self, max_num_seqs: int, max_model_len: int, max_blocks_per_seq: int, vocab_size: int,
                 device: torch.device, num_spec_tokens: int = 0):
        pin = device.type == "cuda"
        n = max_num_seqs
        self.max_num_seqs = n
        self.req_ids: list[str | None] = [None] * n
        self.row_of: dict[str, int] = {}
        self.num_rows = 0  # rows below this are in use, except the holes in _free (until condense)
        self._free: list[int] = []  # a heap: adds fill the lowest hole first
        # + 1: the token sampled after a request's last (dropped); + the draft tokens a step may verify
        self.token_ids = np.zeros((n, max_model_len + 1 + num_spec_tokens), dtype=np.int32)
        self.num_tokens = np.zeros(n, dtype=np.int32)  # prompt + sampled, counting one still on the device
        self.num_host_tokens = np.zeros(n, dtype=np.int32)  # of those, written in token_ids
        self.num_prompt_tokens = np.zeros(n, dtype=np.int32)
        self.num_computed_tokens = np.zeros(n, dtype=np.int32)  # at the start of the current step
        self.num_scheduled_tokens = np.zeros(n, dtype=np.int32)
        # Draft tokens the row verifies this step: written in token_ids after its num_tokens, and
        # scheduled after its newest token (speculative decoding; engine/spec_decode/).
        self.num_draft_tokens = np.zeros(n, dtype=np.int32)
        # The token a row sampled in step `pending_step` (position `pending_pos`) is row
        # `pending_index` of that step's output tensor, on the device.
        self.pending_step = np.full(n, -1, dtype=np.int64)
        self.pending_pos = np.zeros(n, dtype=np.int32)
        self.pending_index = np.zeros(n, dtype=np.int64)
        self.lora_ids = np.zeros(n, dtype=np.int32)  # 0: no adapter (LoRA keys on it)
        self.block_table = BlockTable(n, max_blocks_per_seq, device, pin)
        self.sampling = SamplingRows(n, vocab_size, device, pin)
        self._row_arrays = [self.token_ids, self.num_tokens, self.num_host_tokens, self.num_prompt_tokens,
                            self.num_computed_tokens, self.num_scheduled_tokens, self.pending_step,
                            self.pending_pos, self.pending_index, self.lora_ids, self.num_draft_tokens]

    def __len__(self) -> int:
        return len(self.row_of)

    # ---------------------------------------------------------------- membership
    def add(self, req: RequestState, output_token_ids: list[int], block_ids: list[int], num_computed: int,
            num_scheduled: int) -> int:
        if req.req_id in self.row_of:
            raise RuntimeError(f"request {req.req_id!r} already has row {self.row_of[req.req_id]}")
        if self._free:
            row = heapq.heappop(self._free)
        else:
            row = self.num_rows
            if row >= self.max_num_seqs:
                raise RuntimeError(f"the batch is full ({self.max_num_seqs} rows)")
            self.num_rows += 1
        prompt = req.prompt_token_ids
        num_prompt, total = len(prompt), len(prompt) + len(output_token_ids)
        if total >= self.token_ids.shape[1]:
            raise RuntimeError(f"request {req.req_id!r} has {total} tokens, past max_model_len")
        self.token_ids[row, :num_prompt] = prompt
        self.token_ids[row, num_prompt:total] = output_token_ids
        self.num_tokens[row] = self.num_host_tokens[row] = total
        self.num_prompt_tokens[row] = num_prompt
        self.num_computed_tokens[row] = num_computed
        self.num_scheduled_tokens[row] = num_scheduled
        self.pending_step[row] = -1
        self.lora_ids[row] = req.lora_id
        self.block_table.set_row(row, block_ids)
        self.sampling.set_row(row, req.sampling, req.generator, prompt, output_token_ids)
        self.req_ids[row] = req.req_id
        self.row_of[req.req_id] = row
        return row

    def remove(self, req_id: str) -> int | None:
        """Drop a request's row (a hole until `condense`); None if it has none."""
        row = self.row_of.pop(req_id, None)
        if row is None:
            return None
        self.req_ids[row] = None
        self.sampling.clear_row(row)
        heapq.heappush(self._free, row)
        return row

    def condense(self) -> None:
        """Move the last rows into the holes, so that rows 0..len-1 are the batch."""
        live = len(self.row_of)
        holes = sorted(h for h in self._free if h < live)
        movers = [r for r in range(live, self.num_rows) if self.req_ids[r] is not None]
        assert len(holes) == len(movers), (holes, movers)
        for hole, row in zip(holes, reversed(movers)):  # the last row fills the first hole
            self.swap(row, hole)
        self._free = []
        self.num_rows = live

    def swap(self, i: int, j: int) -> None:
        for array in self._row_arrays:
            array[[i, j]] = array[[j, i]]
        self.block_table.swap(i, j)
        self.sampling.swap(i, j)
        a, b = self.req_ids[i], self.req_ids[j]
        self.req_ids[i], self.req_ids[j] = b, a
        if a is not None:
            self.row_of[a] = j
        if b is not None:
            self.row_of[b] = i

    def order_decodes_first(self) -> int:
        """Swap rows so that the one-token rows come first; returns how many there are."""
        n = self.num_scheduled_tokens[:self.num_rows]
        one = n == 1
        num_decodes = int(one.sum())
        misplaced_prefills = np.flatnonzero(~one[:num_decodes])
        misplaced_decodes = np.flatnonzero(one[num_decodes:]) + num_decodes
        for i, j in zip(misplaced_prefills.tolist(), misplaced_decodes.tolist()):
            self.swap(i, j)
        return num_decodes

    # ---------------------------------------------------------------- after sampling
    def mark_sampled(self, step: int, samples: np.ndarray) -> None:
        """Rows `samples` (a bool mask over the rows) sampled a token in `step`: it is their newest,
        still on the device, at row i of the step's output tensor."""
        rows = np.flatnonzero(samples)
        self.pending_step[rows] = step
        self.pending_pos[rows] = self.num_tokens[rows]
        self.pending_index[rows] = rows
        self.num_tokens[rows] += 1

    def check(self) -> None:
        """For tests: the invariants between the arrays and the maps."""
        assert self.num_rows == len(self.row_of) and not self._free
        for row in range(self.num_rows):
            rid = self.req_ids[row]
            assert rid is not None and self.row_of[rid] == row, (row, rid)
            assert self.num_host_tokens[row] <= self.num_tokens[row]
            assert (self.num_computed_tokens[row] + self.num_scheduled_tokens[row]
                    <= self.num_tokens[row] + self.num_draft_tokens[row])
            assert self.sampling.requests[row] is not None
        assert all(r is None for r in self.req_ids[self.num_rows:])


def apply_plan(batch: InputBatch, requests: dict[str, RequestState], plan: SchedulerOutput,
               device: torch.device) -> int:
    """Apply a step plan to the batch (and to `requests`, the worker's record of every live request):
    rows leave, rows come in, the rest take their diffs; then the rows are condensed and the decode
    rows put first. Returns the number of decode rows."""
    for rid in plan.finished_req_ids:
        batch.remove(rid)
        requests.pop(rid, None)
    for rid in plan.preempted_req_ids:
        batch.remove(rid)
    for rid in plan.unscheduled_req_ids:
        batch.remove(rid)
    for new in plan.new_requests:
        req = new_request_state(new, device)
        requests[new.req_id] = req
        batch.add(req, [], new.block_ids, new.num_computed_tokens, new.num_scheduled_tokens)
    for res in plan.resumed_requests:
        batch.add(requests[res.req_id], res.output_token_ids, res.block_ids, res.num_computed_tokens,
                  res.num_scheduled_tokens)
    cached = plan.cached_requests
    if cached.req_ids:
        row_of = batch.row_of
        rows = np.fromiter((row_of[r] for r in cached.req_ids), dtype=np.int64, count=len(cached.req_ids))
        batch.num_computed_tokens[rows] = cached.num_computed_tokens
        batch.num_scheduled_tokens[rows] = cached.num_scheduled_tokens
        for rid, kept in cached.num_blocks_kept.items():
            batch.block_table.truncate(row_of[rid], kept)
        for rid, block_ids in cached.new_block_ids.items():
            batch.block_table.append(row_of[rid], block_ids)
    batch.num_draft_tokens[:] = 0
    for rid, drafts in plan.scheduled_spec_decode_tokens.items():
        row = batch.row_of[rid]
        start = batch.num_tokens[row]
        batch.token_ids[row, start:start + len(drafts)] = drafts
        batch.num_draft_tokens[row] = len(drafts)
    batch.condense()
    return batch.order_decodes_first()


def new_request_state(new: NewRequestData, device: torch.device) -> RequestState:
    s = new.sampling
    generator = None if s.seed is None else make_generator(s.seed, device)
    return RequestState(new.req_id, np.asarray(new.prompt_token_ids, dtype=np.int32), s, generator, new.lora_id)
