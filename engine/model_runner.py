"""Applies a step plan to the persistent batch, builds the step's inputs from its arrays, runs the
model (eager, or a captured CUDA graph for pure decode steps) and launches the sampler.

Inputs: every token's row and position come from the batch's per-row counts with numpy (np.repeat,
fancy indexing), never a loop over tokens; they are written into fixed host buffers (pinned on
CUDA) and copied to fixed device buffers, which are also the CUDA graphs' inputs, so a decode step
replays its graph with no extra device copies. Rows of a graph's padding (past the batch) get slot
-1 (their K/V is not stored) and context length 1. A token that the previous step sampled is still
on the device: it is gathered from that step's output tensor into the input ids, on the device.

The step is asynchronous: `execute_model` returns once the work is queued, with a PendingOutput
whose `result()` waits for this step's sampled tokens only. One logits row per batch row (its last
scheduled token): a row whose chunk stops short of its newest token samples nothing (its token is
dropped), so the sampler always works on whole-batch slices of the per-row state.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from engine.config import EngineConfig
from engine.distributed.stage import PipelineStage
from engine.input_batch import InputBatch, RequestState, apply_plan, host_array
from engine.layers.attention import AttentionMetadata
from engine.lora.layers import LoRAMapping
from engine.lora.manager import LoRAManager
from engine.messages import TokenLogprobs
from engine.prompt_logprobs import (
    PromptRows,
    TokenScores,
    prompt_logprobs_by_request,
    score_prompt_rows,
    select_prompt_rows,
)
from engine.sampler import Sampler, SamplerOutput
from engine.sampling_metadata import F_PROMPT_LOGPROBS
from engine.scheduler_output import (
    ModelRunnerOutput,
    NewRequestData,
    RequestSampling,
    SchedulerOutput,
)
from engine.step_timer import StepTimer
from kernels.lora import LoRAIndices, lora_indices

log = logging.getLogger("engine")


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    sizes = [1, 2, 4] + list(range(8, max_num_seqs + 1, 8))
    return sorted({s for s in sizes if s <= max_num_seqs} | {max_num_seqs})


class Staging:
    """Named fields at fixed offsets of one host buffer (pinned on CUDA) and one device buffer:
    each step writes the fields on the host and copies the used part of each to the device. On
    CPU the two are one buffer."""

    def __init__(self, sizes: dict[str, int], dtype: torch.dtype, device: torch.device):
        self.offsets, total = {}, 0
        for name, size in sizes.items():
            self.offsets[name] = (total, size)
            total += size
        cuda = device.type == "cuda"
        self._host, self.host_array = host_array((total,), dtype, pin_memory=cuda)
        self._dev = torch.zeros(total, dtype=dtype, device=device) if cuda else self._host

    def host(self, name: str, n: int) -> np.ndarray:
        start, size = self.offsets[name]
        assert n <= size, f"{name}: {n} entries, room for {size}"
        return self.host_array[start:start + n]

    def dev(self, name: str, n: int) -> torch.Tensor:
        start, _ = self.offsets[name]
        return self._dev[start:start + n]

    def put(self, name: str, values: np.ndarray, pad_to: int = 0, pad_value: int = 0) -> None:
        n = len(values)
        view = self.host(name, max(n, pad_to))
        view[:n] = values
        view[n:] = pad_value
        if self._dev is not self._host:
            start, _ = self.offsets[name]
            self._dev[start:start + len(view)].copy_(self._host[start:start + len(view)], non_blocking=True)


@dataclass
class StepInputs:
    num_rows: int
    num_tokens: int
    num_decodes: int
    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    logits_indices: torch.Tensor | None  # hidden rows to project; None: one per row already (decodes)
    samples: np.ndarray  # [rows] bool: the rows whose chunk reaches their newest token
    samples_dev: torch.Tensor | None  # the same on the device (None: every row samples)
    blocked_rows: np.ndarray | None  # rows still short of min_tokens
    blocked_flags: torch.Tensor | None
    graph_size: int | None  # the CUDA graph that runs this step
    prompt_rows: list[PromptRows]  # rows that score prompt tokens (requests with prompt_logprobs)
    prompt_scores: TokenScores | None = None  # their scores, once the model ran
    lora: LoRAMapping | None = None  # each token's adapter slot (None: no adapter in this eager step)
    # [rows] draft tokens each row verifies (None: none this step). Such a step has a token per draft
    # beyond one a row, so it never replays a decode CUDA graph: verification runs eager.
    num_drafts: np.ndarray | None = None


def verify_indices(cu: np.ndarray, num_drafts: np.ndarray) -> np.ndarray:
    """The hidden rows to project: each row's last 1 + num_drafts tokens (its drafts' positions, whose
    logits verify the next draft, and its last, which samples the bonus), rows in order."""
    counts = 1 + num_drafts.astype(np.int64)
    starts = np.repeat(cu[1:] - counts, counts)
    offsets = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
    return starts + offsets


class PendingOutput:
    """A step's sampled tokens (and logprobs) on their way to the host. The copy is queued behind the
    step's device work, so the engine can launch the next step before it waits for them."""

    def __init__(self, req_ids: list[str], samples: np.ndarray, out: SamplerOutput | None,
                 num_logprobs: list[int | None] | None, timer: StepTimer, prompt_rows: list[PromptRows] = (),
                 prompt_scores: TokenScores | None = None):
        self.req_ids = req_ids
        self.samples = samples
        self.num_logprobs = num_logprobs
        self.timer = timer
        self.prompt_rows = prompt_rows
        self._ready = None
        host = {} if out is None else {"tokens": out.tokens, **(out.logprobs or {})}
        if prompt_scores is not None:
            host.update(prompt_logprobs=prompt_scores.logprobs, prompt_ranks=prompt_scores.ranks,
                        prompt_top_ids=prompt_scores.top_ids, prompt_top_logprobs=prompt_scores.top_logprobs)
        if out is not None and out.tokens.device.type == "cuda":
            host = {k: torch.empty(v.shape, dtype=v.dtype, pin_memory=True).copy_(v, non_blocking=True)
                    for k, v in host.items()}
            self._ready = torch.cuda.Event()
            self._ready.record()
        self._host = host

    def result(self) -> ModelRunnerOutput:
        if self._ready is not None:
            self._ready.synchronize()  # this step's copy only, not the work queued after it
        self.timer.lap("wait")
        if not self._host:
            return ModelRunnerOutput([], [])
        tokens = self._host["tokens"].tolist()
        if self.samples.all():
            sampled = [[t] for t in tokens]
        else:
            sampled = [[t] if s else [] for t, s in zip(tokens, self.samples.tolist())]
        return ModelRunnerOutput(self.req_ids, sampled, self._logprobs(sampled), self._prompt_logprobs())

    def _prompt_logprobs(self) -> dict[str, list[TokenLogprobs]] | None:
        if "prompt_logprobs" not in self._host:
            return None
        h = self._host
        return prompt_logprobs_by_request(self.prompt_rows, h["prompt_logprobs"].tolist(), h["prompt_ranks"].tolist(),
                                          h["prompt_top_ids"].tolist(), h["prompt_top_logprobs"].tolist())

    def _logprobs(self, sampled: list[list[int]]) -> list[list[TokenLogprobs]] | None:
        if "chosen" not in self._host:
            return None
        h = self._host
        chosen, ranks = h["chosen"].tolist(), h["ranks"].tolist()
        top_ids, top_vals = h["top_ids"].tolist(), h["top_vals"].tolist()
        return [[TokenLogprobs(chosen[i], ranks[i], top_ids[i][:k], top_vals[i][:k])] if k is not None and tokens
                else [] for i, (k, tokens) in enumerate(zip(self.num_logprobs, sampled))]


class ModelRunner:
    def __init__(self, config: EngineConfig, model: torch.nn.Module, device: torch.device,
                 timer: StepTimer | None = None, lora: LoRAManager | None = None, stage: PipelineStage | None = None):
        """`stage`: this worker's link to its pipeline neighbours (None: the whole model is here)."""
        self.config = config
        self.model = model
        self.stage = stage
        self.device = device
        self.timer = timer or StepTimer()
        self.block_size = config.block_size
        self.max_blocks_per_seq = (config.max_model_len + self.block_size - 1) // self.block_size
        self.vocab_size = config.hf_config.vocab_size
        self.batch = InputBatch(config.max_num_seqs, config.max_model_len, self.max_blocks_per_seq, self.vocab_size,
                                device, config.num_spec_tokens)
        self.requests: dict[str, RequestState] = {}  # every request the core has sent and not finished
        self.sampler = Sampler(config.seed, device)
        seqs, tokens = config.max_num_seqs, max(config.max_num_batched_tokens, config.max_num_seqs)
        self.staging64 = Staging({"logits_indices": seqs * (1 + config.num_spec_tokens), "gather_dst": seqs,
                                  "gather_src": seqs, "input_ids": tokens, "positions": tokens, "slot_mapping": tokens},
                                 torch.int64, device)
        self.staging32 = Staging({"context_lens": seqs, "cu_seqlens": seqs + 1, "samples": seqs, "blocked": seqs,
                                  "lora_slots": tokens}, torch.int32, device)
        self.lora = lora
        self._profile_lora = False  # the memory profile runs the LoRA kernels on every token (slot 0)
        if lora is not None:  # the decode graphs' fixed LoRA indices, refilled before each replay
            self._graph_sorted = torch.zeros(seqs, dtype=torch.int32, device=device)
            self._graph_starts = torch.zeros(lora.num_slots + 1, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.graph_hidden: torch.Tensor | None = None
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._step = 0
        self._prev_tokens: torch.Tensor | None = None  # the last step's sampled tokens, on the device
        self._inputs_copied: torch.cuda.Event | None = None
        # Speculative decoding's verification and proposals (engine/spec_decode/decoder.py), set by the
        # worker; None: every row samples one token per step.
        self.spec = None

    def bind_cache(self, caches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Point every attention layer at its cache tensors ([] unbinds them, so they can be freed)."""
        self.kv_caches = caches
        empty = torch.empty(0, device=self.device)
        for i, attn in enumerate(self.model.attention_layers()):
            attn.k_cache, attn.v_cache = caches[i] if caches else (empty, empty)

    def release(self) -> None:
        """Drop the KV cache, the CUDA graphs and the weights, so the device memory can be reused in
        this process (by a baseline, say) even while something still refers to the engine."""
        self.bind_cache([])
        self.graphs, self.graph_hidden, self._prev_tokens = {}, None, None
        self.model = None
        self.batch = None
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()

    # ---------------------------------------------------------------- the step
    @torch.inference_mode()
    def execute_model(self, plan: SchedulerOutput) -> PendingOutput:
        inputs, logits = self.forward_step(plan)
        if logits is None:  # nothing scheduled, or a pipeline stage before the last (it samples nothing)
            return PendingOutput([], np.zeros(0, dtype=bool), None, None, self.timer)
        batch, rows = self.batch, inputs.num_rows
        verify = None
        if inputs.num_drafts is not None:  # rows with drafts have a logits row per draft before their last
            logits, verify = self.spec.split_logits(logits, inputs.num_drafts)
        meta = batch.sampling.metadata(rows, inputs.samples, inputs.blocked_flags, inputs.blocked_rows)
        out = self.sampler(logits, meta)
        batch.sampling.record_sampled(out.tokens, rows, inputs.samples_dev)
        if self.spec is not None:
            return self.spec.complete_step(self, inputs, out, meta, verify)
        batch.mark_sampled(self._step, inputs.samples)
        self._prev_tokens = out.tokens
        num_logprobs = [r.logprobs for r in batch.sampling.requests[:rows]] if out.logprobs is not None else None
        pending = PendingOutput(batch.req_ids[:rows], inputs.samples, out, num_logprobs, self.timer,
                                inputs.prompt_rows, inputs.prompt_scores)
        self.timer.lap("sample")
        return pending

    @torch.inference_mode()
    def forward_step(self, plan: SchedulerOutput) -> tuple[StepInputs | None, torch.Tensor | None]:
        """Apply the plan, build the inputs, run the model: (inputs, one logits row per batch row).
        (None, None) when no request is scheduled."""
        self._wait_for_input_copies()
        self._step += 1
        self.update_states(plan)
        if self.batch.num_rows == 0:
            self._prev_tokens = None
            self.timer.lap("prepare")
            return None, None
        inputs = self.prepare()
        self.timer.lap("prepare")
        if inputs.graph_size is not None:
            self.graphs[inputs.graph_size].replay()
            hidden = self.graph_hidden[:inputs.num_rows]
        else:
            hidden = self._run_model(inputs)
            if hidden is None:
                self.timer.lap("forward")
                return inputs, None
        if inputs.prompt_rows:
            inputs.prompt_scores = score_prompt_rows(self.model.compute_logits, hidden, inputs.prompt_rows,
                                                     self.vocab_size)
        if inputs.logits_indices is not None:
            hidden = hidden[inputs.logits_indices]
        logits = self.model.compute_logits(hidden)
        self.timer.lap("forward")
        return inputs, logits

    def _run_model(self, inputs: StepInputs) -> torch.Tensor | None:
        """The eager forward: the final hidden states, or None on a pipeline stage before the last (which
        sends its activations on to the next stage instead)."""
        stage = self.stage
        if stage is None:
            return self.model(inputs.input_ids, inputs.positions, inputs.meta, inputs.lora)
        intermediate = None if stage.is_first else stage.receive(inputs.num_tokens)
        out = self.model(inputs.input_ids, inputs.positions, inputs.meta, inputs.lora, intermediate)
        if stage.is_last:
            return out
        stage.send(out)
        return None

    def _wait_for_input_copies(self) -> None:
        """The host buffers of the previous step's input copies are rewritten now: wait until those
        copies ran (they precede that step's compute on the stream, so this rarely waits at all)."""
        if self._inputs_copied is not None:
            self._inputs_copied.synchronize()
            self._inputs_copied = None

    # ---------------------------------------------------------------- the plan -> the batch
    def update_states(self, plan: SchedulerOutput) -> None:
        self._num_decodes = apply_plan(self.batch, self.requests, plan, self.device)
        if self.spec is not None:
            self.spec.apply_plan(plan)

    # ---------------------------------------------------------------- inputs
    def prepare(self) -> StepInputs:
        batch, bs = self.batch, self.block_size
        rows = batch.num_rows
        n = batch.num_scheduled_tokens[:rows].astype(np.int64)
        start = batch.num_computed_tokens[:rows].astype(np.int64)
        num_tokens = int(n.sum())
        cu = np.zeros(rows + 1, dtype=np.int64)
        np.cumsum(n, out=cu[1:])
        if num_tokens == rows:  # every row feeds one token: the decode step, most steps
            tok_row, tok_pos = np.arange(rows), start
        else:
            tok_row = np.repeat(np.arange(rows), n)
            tok_pos = np.arange(num_tokens) - np.repeat(cu[:-1] - start, n)
        pending = (batch.pending_step[tok_row] == self._step - 1) & (tok_pos == batch.pending_pos[tok_row])
        drafts = batch.num_draft_tokens[:rows]
        any_drafts = bool(drafts.any())
        on_host = batch.num_host_tokens[tok_row] + (drafts[tok_row] if any_drafts else 0)
        if ((tok_pos >= on_host) & ~pending).any():
            raise RuntimeError("a scheduled token is neither on the host nor in the previous step's output")
        gather_dst = np.flatnonzero(pending)
        ctx = start + n
        samples = ctx >= batch.num_tokens[:rows]
        graph = self._graph_size(rows, num_tokens)
        padded_tokens, padded_rows = (graph, graph) if graph else (num_tokens, rows)

        s64, s32 = self.staging64, self.staging32
        s64.put("input_ids", batch.token_ids[tok_row, tok_pos], pad_to=padded_tokens)
        s64.put("positions", tok_pos, pad_to=padded_tokens)
        s64.put("slot_mapping", batch.block_table.host[tok_row, tok_pos // bs].astype(np.int64) * bs + tok_pos % bs,
                pad_to=padded_tokens, pad_value=-1)
        s32.put("context_lens", ctx, pad_to=padded_rows, pad_value=1)
        s32.put("cu_seqlens", cu if not graph else np.arange(padded_rows + 1))
        if any_drafts:  # a logits row for each draft and the newest token (speculative verification)
            s64.put("logits_indices", verify_indices(cu, drafts))
        elif num_tokens != rows:
            s64.put("logits_indices", cu[1:] - 1)
        if len(gather_dst):
            s64.put("gather_dst", gather_dst)
            s64.put("gather_src", batch.pending_index[tok_row[gather_dst]])
        any_lora = self._put_lora_slots(tok_row, rows, padded_tokens)
        all_sample = bool(samples.all())
        if not all_sample:
            s32.put("samples", samples)
        blocked = batch.sampling.blocked_rows(batch.num_tokens[:rows] - batch.num_prompt_tokens[:rows])
        if blocked is not None:
            flags = np.zeros(rows, dtype=np.int32)
            flags[blocked] = 1
            s32.put("blocked", flags)
        batch.block_table.commit(rows)
        batch.sampling.commit(rows)
        if self.device.type == "cuda":
            self._inputs_copied = torch.cuda.Event()
            self._inputs_copied.record()

        input_ids = s64.dev("input_ids", padded_tokens)
        if len(gather_dst):
            if self._prev_tokens is None:
                raise RuntimeError("a row waits for a token of the previous step, but it sampled nothing")
            src = s64.dev("gather_src", len(gather_dst))
            input_ids[s64.dev("gather_dst", len(gather_dst))] = self._prev_tokens[src]
        meta = AttentionMetadata(
            slot_mapping=s64.dev("slot_mapping", num_tokens), block_tables=batch.block_table.device_table[:rows],
            context_lens=s32.dev("context_lens", rows), cu_seqlens_q=s32.dev("cu_seqlens", rows + 1),
            num_decode_seqs=self._num_decodes, max_query_len=int(n.max()), max_context_len=int(ctx.max()))
        num_logits = rows + int(drafts.sum()) if any_drafts else rows
        return StepInputs(
            rows, num_tokens, self._num_decodes, input_ids[:num_tokens], s64.dev("positions", num_tokens), meta,
            None if num_tokens == rows else s64.dev("logits_indices", num_logits), samples,
            None if all_sample else s32.dev("samples", rows), blocked,
            None if blocked is None else s32.dev("blocked", rows), graph, self._prompt_rows(start, n, cu),
            lora=self._lora_mapping(any_lora, padded_tokens, graph), num_drafts=drafts.copy() if any_drafts else None)

    def _prompt_rows(self, start: np.ndarray, n: np.ndarray, cu: np.ndarray) -> list[PromptRows]:
        """The step's rows that score prompt tokens (rows of requests with prompt_logprobs only)."""
        batch = self.batch
        asked = np.flatnonzero(batch.sampling.features[:batch.num_rows, F_PROMPT_LOGPROBS] >= 0)
        rows = []
        for row in asked.tolist():
            req = self.requests[batch.req_ids[row]]
            first, end = int(start[row]), int(start[row] + n[row])
            selected = select_prompt_rows(req.req_id, req.prompt_token_ids, req.num_prompt_scored, first, end,
                                          int(cu[row]), req.sampling.prompt_logprobs)
            if selected is not None:
                rows.append(selected)
                req.num_prompt_scored = min(end, len(req.prompt_token_ids) - 1)
        return rows

    # ---------------------------------------------------------------- LoRA
    def _put_lora_slots(self, tok_row: np.ndarray, rows: int, padded_tokens: int) -> bool:
        """Pin the GPU slots of the adapters in the batch (loading the missing ones) and stage each
        token's slot (-1: none, the graph's padding too). False when no row has an adapter."""
        if self.lora is None:
            return False
        ids = self.batch.lora_ids[:rows]
        if self._profile_lora:
            row_slots = np.zeros(rows, dtype=np.int32)
        else:
            slot_of = self.lora.activate(np.unique(ids[ids > 0]).tolist())
            if not slot_of:
                return False
            row_slots = np.full(rows, -1, dtype=np.int32)
            for lora_id, slot in slot_of.items():
                row_slots[ids == lora_id] = slot
        self.staging32.put("lora_slots", row_slots[tok_row], pad_to=padded_tokens, pad_value=-1)
        return True

    def _lora_mapping(self, any_lora: bool, padded_tokens: int, graph: int | None) -> LoRAMapping | None:
        """The eager step's mapping; for a graph, its fixed indices refilled (emptied without adapters)."""
        if self.lora is None:
            return None
        if graph is not None:
            if any_lora:
                fresh = lora_indices(self.staging32.dev("lora_slots", graph), self.lora.num_slots)
                self._graph_sorted[:graph].copy_(fresh.sorted_tokens)
                self._graph_starts.copy_(fresh.slot_starts)
            else:
                self._graph_starts.zero_()  # every slot empty: the captured kernels add nothing
            return None
        if not any_lora:
            return None
        return LoRAMapping.build(self.staging32.dev("lora_slots", padded_tokens), self.lora.num_slots)

    def _graph_lora(self, bs: int) -> LoRAMapping:
        indices = LoRAIndices(self.staging32.dev("lora_slots", bs), self._graph_sorted[:bs], self._graph_starts)
        return LoRAMapping(indices, use_triton=True)

    def _graph_size(self, rows: int, num_tokens: int) -> int | None:
        if not self.graphs or num_tokens != rows or self._num_decodes != rows or rows > max(self.graphs):
            return None
        return min(s for s in self.graphs if s >= rows)

    # ---------------------------------------------------------------- CUDA graphs
    def _graph_meta(self, bs: int) -> AttentionMetadata:
        s64, s32 = self.staging64, self.staging32
        return AttentionMetadata(
            slot_mapping=s64.dev("slot_mapping", bs), block_tables=self.batch.block_table.device_table[:bs],
            context_lens=s32.dev("context_lens", bs), cu_seqlens_q=s32.dev("cu_seqlens", bs + 1),
            num_decode_seqs=bs, max_query_len=1, max_context_len=self.config.max_model_len)

    def _graph_inputs(self, bs: int) -> tuple:
        """The captured step reads its inputs from the fixed device buffers; fill them with a valid
        padding batch (slot -1: nothing stored; context 1: block 0 of an all-zero table row; no adapter).
        With LoRA, the step's LoRA mapping reads fixed indices too (refilled before each replay)."""
        s64, s32 = self.staging64, self.staging32
        assert len(self.batch) == 0, "graphs are captured with the batch empty"
        self.batch.block_table.clear()
        for name, value in (("input_ids", 0), ("positions", 0), ("slot_mapping", -1)):
            s64.dev(name, bs).fill_(value)
        s32.dev("context_lens", bs).fill_(1)
        s32.dev("cu_seqlens", bs + 1).copy_(torch.arange(bs + 1, dtype=torch.int32, device=self.device))
        args = (s64.dev("input_ids", bs), s64.dev("positions", bs), self._graph_meta(bs))
        if self.lora is None:
            return args
        s32.dev("lora_slots", bs).fill_(-1)
        self._graph_starts.zero_()
        return (*args, self._graph_lora(bs))

    @torch.inference_mode()
    def warm_up_graph(self, bs: int) -> None:
        """One eager run of a decode batch of `bs`, outside any capture (compiles and autotunes)."""
        self.model(*self._graph_inputs(bs))
        torch.cuda.synchronize()

    @torch.inference_mode()
    def capture_graph(self, bs: int, pool=None) -> torch.cuda.CUDAGraph:
        if self.graph_hidden is None or self.graph_hidden.shape[0] < bs:
            self.graph_hidden = torch.zeros(bs, self.config.hf_config.hidden_size, dtype=self.config.torch_dtype,
                                            device=self.device)
        args = self._graph_inputs(bs)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            self.graph_hidden[:bs] = self.model(*args)
        return graph

    def capture_graphs(self) -> int:
        """Capture a decode graph per batch size; returns the device memory the captures took (the
        warm-ups run first, outside that window)."""
        start = time.perf_counter()
        sizes = sorted(graph_batch_sizes(self.config.max_num_seqs), reverse=True)
        for bs in sizes:
            self.warm_up_graph(bs)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        free_before = torch.cuda.mem_get_info()[0]
        self.graph_hidden = None
        graphs, pool = {}, None
        for bs in sizes:  # largest first, so smaller graphs reuse its memory pool
            graphs[bs] = self.capture_graph(bs, pool)
            pool = graphs[bs].pool()
        torch.cuda.synchronize()
        self.graphs = graphs
        log.info("captured %d CUDA graphs for decode batch sizes %s..%s in %.1f s", len(sizes), sizes[-1], sizes[0],
                 time.perf_counter() - start)
        return max(0, free_before - torch.cuda.mem_get_info()[0])

    # ---------------------------------------------------------------- memory profiling
    def profile_plan(self, first_block: int = 0) -> tuple[SchedulerOutput, int]:
        """The largest step the scheduler can produce, as a plan: max_num_batched_tokens prompt tokens
        over as many requests as may run, each sampling with every option that costs memory (top-k,
        top-p, min-p, penalties, logprobs, prompt logprobs). Returns it with the number of KV blocks it
        needs."""
        cfg = self.config
        tokens = cfg.max_num_batched_tokens
        num_seqs = max(1, min(cfg.max_num_seqs, tokens))
        per_seq = [min(tokens // num_seqs + (1 if i < tokens % num_seqs else 0), cfg.max_model_len - 1)
                   for i in range(num_seqs)]
        sampling = RequestSampling(temperature=1.0, top_p=0.9, top_k=50, min_p=0.05, presence_penalty=0.1,
                                   frequency_penalty=0.1, repetition_penalty=1.1, logprobs=cfg.max_logprobs,
                                   prompt_logprobs=cfg.max_logprobs)
        new, block = [], first_block
        for i, n in enumerate(per_seq):
            num_blocks = (n + self.block_size - 1) // self.block_size
            new.append(NewRequestData(f"profile-{i}", [0] * n, sampling, list(range(block, block + num_blocks)), 0, n))
            block += num_blocks
        return SchedulerOutput(new_requests=new, total_num_scheduled_tokens=sum(per_seq)), block - first_block

    def run_profile_plan(self, plan: SchedulerOutput) -> None:
        """Run the plan through the real path (plan -> batch -> inputs -> forward -> sampler), then
        forget its requests. With LoRA, every token goes through the LoRA kernels (slot 0, all zeros
        then), so that their temporaries are in the peak."""
        self._profile_lora = self.lora is not None
        try:
            self.execute_model(plan).result()
        finally:
            self._profile_lora = False
        self.execute_model(SchedulerOutput(finished_req_ids=[r.req_id for r in plan.new_requests])).result()
        self.batch.block_table.clear()  # its block ids were the scratch cache's
        self.timer.reset()
