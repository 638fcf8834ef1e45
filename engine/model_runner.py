"""Turns a scheduled batch into flat tensors, runs the model (eager, or a captured CUDA graph for
decode batches) and returns the logits of the sequences that sample a token this step."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from engine.config import EngineConfig
from engine.kv_cache import allocate_kv_cache, gpu_kv_budget, num_blocks_for
from engine.layers.attention import AttentionMetadata
from engine.prompt_logprobs import PromptRows, TokenScores, score_prompt_rows, select_prompt_rows
from engine.scheduler import ScheduledBatch
from engine.sequence import Sequence

log = logging.getLogger("engine")


@dataclass
class StepInputs:
    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    logits_indices: torch.Tensor  # rows of the hidden states whose next token is sampled
    sampled: list[Sequence]  # the sequences those rows belong to, in order
    prompt_rows: list[PromptRows]  # rows that score prompt tokens (requests with prompt_logprobs)


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    sizes = [1, 2, 4] + list(range(8, max_num_seqs + 1, 8))
    return sorted({s for s in sizes if s <= max_num_seqs} | {max_num_seqs})


class ModelRunner:
    def __init__(self, config: EngineConfig, model: torch.nn.Module, device: torch.device):
        self.config = config
        self.model = model
        self.device = device
        self.block_size = config.block_size
        self.max_blocks_per_seq = (config.max_model_len + self.block_size - 1) // self.block_size
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.memory_profile = None
        kv_budget = self._profile_kv_budget() if device.type == "cuda" else None
        self.num_blocks = num_blocks_for(config, kv_budget)
        self._bind_cache(allocate_kv_cache(config, self.num_blocks, device))
        if device.type == "cuda" and not config.enforce_eager:
            self._capture_graphs()

    def _bind_cache(self, caches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Point every attention layer at its cache tensors ([] unbinds them, so they can be freed)."""
        self.kv_caches = caches
        empty = torch.empty(0, device=self.device)
        for i, attn in enumerate(self.model.attention_layers()):
            attn.k_cache, attn.v_cache = caches[i] if caches else (empty, empty)

    def release(self) -> None:
        """Drop the KV cache, the CUDA graphs and the weights, so the device memory can be reused in
        this process (by a baseline, say) even while something still refers to the engine."""
        self._bind_cache([])
        self.graphs, self.graph_bufs, self.graph_hidden = {}, None, None
        self.model = None
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()

    # ---------------------------------------------------------------- inputs
    def prepare(self, batch: ScheduledBatch, prev_tokens: torch.Tensor | None = None) -> StepInputs:
        """Flatten the batch. `prev_tokens` holds the previous step's sampled tokens on the device:
        decode rows whose newest token is still there (Sequence.pending_row) are fed from it."""
        bs = self.block_size
        decodes = batch.seqs[:batch.num_decode_seqs]
        # The decode group (most rows of most steps) in flat comprehensions. A one-token row is
        # usually a decode, but can be a one-token prompt chunk, which samples nothing.
        positions = [seq.num_computed_tokens for seq in decodes]
        input_ids = [seq.token_ids[p] for seq, p in zip(decodes, positions)]
        slots = [seq.block_table[p // bs] * bs + p % bs for seq, p in zip(decodes, positions)]
        context_lens = [p + 1 for p in positions]
        logits_indices = [i for i, (seq, p) in enumerate(zip(decodes, positions)) if p + 1 == len(seq.token_ids)]
        sampled = [decodes[i] for i in logits_indices]
        pending_rows = [i for i, seq in enumerate(decodes) if seq.pending_row is not None]
        pending_src = [decodes[i].pending_row for i in pending_rows]
        cu_seqlens = list(range(len(decodes) + 1))
        prompt_rows = [select_prompt_rows(seq, p, p + 1, i) for i, (seq, p) in enumerate(zip(decodes, positions))
                       if seq.prompt_logprobs is not None]  # one-token prompt chunks
        for seq, n in zip(batch.seqs[batch.num_decode_seqs:], batch.num_new_tokens[batch.num_decode_seqs:]):
            start = seq.num_computed_tokens
            end = start + n
            if seq.prompt_logprobs is not None:
                prompt_rows.append(select_prompt_rows(seq, start, end, cu_seqlens[-1]))
            table = seq.block_table
            input_ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
            context_lens.append(end)
            cu_seqlens.append(cu_seqlens[-1] + n)
            if end == len(seq):  # this chunk reaches the newest token: sample the next one
                logits_indices.append(cu_seqlens[-1] - 1)
                sampled.append(seq)
        fields = [input_ids, positions, slots, context_lens, cu_seqlens, logits_indices, pending_rows, pending_src]
        ids, pos, slot_t, ctx, cu, logit_idx, rows, src, tables = self._upload(fields, batch.seqs)
        if rows.numel():
            if prev_tokens is None:
                raise RuntimeError("a sequence waits for a device token, but no previous step was given")
            ids[rows] = prev_tokens[src]
        meta = AttentionMetadata(
            slot_mapping=slot_t, block_tables=tables, context_lens=ctx.to(torch.int32),
            cu_seqlens_q=cu.to(torch.int32), num_decode_seqs=batch.num_decode_seqs,
            max_query_len=max(batch.num_new_tokens), max_context_len=max(context_lens))
        return StepInputs(ids, pos, meta, logit_idx, sampled, [r for r in prompt_rows if r is not None])

    def _upload(self, fields: list[list[int]], seqs: list[Sequence]) -> list[torch.Tensor]:
        """One host buffer (pinned on CUDA) and one asynchronous copy for all of the step's
        integer inputs, so that preparing a step never waits for the device to drain."""
        sizes = [len(f) for f in fields]
        n_flat = sum(sizes)
        width = max(len(seq.block_table) for seq in seqs)
        flat = np.zeros(n_flat + len(seqs) * width, dtype=np.int64)
        flat[:n_flat] = [x for f in fields for x in f]
        tables = flat[n_flat:].reshape(len(seqs), width)
        for row, seq in zip(tables, seqs):
            row[:len(seq.block_table)] = seq.block_table
        buf = torch.from_numpy(flat)
        if self.device.type == "cuda":
            buf = buf.pin_memory().to(self.device, non_blocking=True)
        return list(buf[:n_flat].split(sizes)) + [buf[n_flat:].view(len(seqs), width).to(torch.int32)]

    # ---------------------------------------------------------------- run
    @torch.inference_mode()
    def run(self, batch: ScheduledBatch, prev_tokens: torch.Tensor | None = None
            ) -> tuple[StepInputs, torch.Tensor, TokenScores | None]:
        """The step's inputs, the logits of its sampled rows, and the scores of its prompt rows (None
        when no request asked for prompt logprobs)."""
        inputs = self.prepare(batch, prev_tokens)
        num_seqs = len(batch.seqs)
        if self.graphs and batch.num_decode_seqs == num_seqs and num_seqs <= max(self.graphs):
            hidden = self._replay(inputs, num_seqs)
        else:
            hidden = self.model(inputs.input_ids, inputs.positions, inputs.meta)
        logits = self.model.compute_logits(hidden[inputs.logits_indices])
        prompt_scores = None
        if inputs.prompt_rows:
            prompt_scores = score_prompt_rows(self.model.compute_logits, hidden, inputs.prompt_rows,
                                              self.config.hf_config.vocab_size)
        return inputs, logits, prompt_scores

    # ---------------------------------------------------------------- CUDA graphs
    def _graph_buffers(self, max_bs: int) -> dict[str, torch.Tensor]:
        d = self.device
        return {"input_ids": torch.zeros(max_bs, dtype=torch.int64, device=d),
                "positions": torch.zeros(max_bs, dtype=torch.int64, device=d),
                "slot_mapping": torch.full((max_bs,), -1, dtype=torch.int64, device=d),
                "block_tables": torch.zeros(max_bs, self.max_blocks_per_seq, dtype=torch.int32, device=d),
                "context_lens": torch.ones(max_bs, dtype=torch.int32, device=d),
                "cu_seqlens_q": torch.arange(max_bs + 1, dtype=torch.int32, device=d)}

    def _graph_meta(self, bufs: dict, bs: int) -> AttentionMetadata:
        return AttentionMetadata(slot_mapping=bufs["slot_mapping"][:bs], block_tables=bufs["block_tables"][:bs],
                                 context_lens=bufs["context_lens"][:bs], cu_seqlens_q=bufs["cu_seqlens_q"][:bs + 1],
                                 num_decode_seqs=bs, max_query_len=1, max_context_len=self.config.max_model_len)

    @torch.inference_mode()
    def _capture(self, sizes: list[int], bufs: dict) -> tuple[dict, torch.Tensor]:
        graphs, pool = {}, None
        hidden_out = torch.zeros(max(sizes), self.config.hf_config.hidden_size, dtype=self.config.torch_dtype,
                                 device=self.device)
        for bs in sorted(sizes, reverse=True):  # largest first, so smaller graphs reuse its memory pool
            meta = self._graph_meta(bufs, bs)
            args = (bufs["input_ids"][:bs], bufs["positions"][:bs], meta)
            hidden_out[:bs] = self.model(*args)  # warm-up: compiles and autotunes outside the capture
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                hidden_out[:bs] = self.model(*args)
            pool = graph.pool()
            graphs[bs] = graph
        torch.cuda.synchronize()
        return graphs, hidden_out

    def _capture_graphs(self) -> None:
        start = time.perf_counter()
        sizes = graph_batch_sizes(self.config.max_num_seqs)
        self.graph_bufs = self._graph_buffers(max(sizes))
        self.graphs, self.graph_hidden = self._capture(sizes, self.graph_bufs)
        log.info("captured %d CUDA graphs for decode batch sizes %s..%s in %.1f s", len(sizes), sizes[0], sizes[-1],
                 time.perf_counter() - start)

    def _replay(self, inputs: StepInputs, num_seqs: int) -> torch.Tensor:
        bs = min(s for s in self.graphs if s >= num_seqs)
        bufs, meta = self.graph_bufs, inputs.meta
        bufs["input_ids"][:num_seqs] = inputs.input_ids
        bufs["positions"][:num_seqs] = inputs.positions
        bufs["slot_mapping"][:num_seqs] = meta.slot_mapping
        bufs["slot_mapping"][num_seqs:bs] = -1
        bufs["context_lens"][:num_seqs] = meta.context_lens
        bufs["context_lens"][num_seqs:bs] = 1
        bufs["block_tables"][:num_seqs, :meta.block_tables.shape[1]] = meta.block_tables
        self.graphs[bs].replay()
        return self.graph_hidden[:num_seqs]

    # ---------------------------------------------------------------- memory profiling (GPU)
    @torch.inference_mode()
    def _profile_kv_budget(self) -> int:
        """Run the largest step the scheduler can produce against a small scratch cache, measure the
        peak, trial-capture the largest decode graph, and return the bytes left for the KV cache."""
        cfg = self.config
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        weights = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        tokens = cfg.max_num_batched_tokens
        num_seqs = max(1, min(cfg.max_num_seqs, tokens))
        per_seq = [tokens // num_seqs + (1 if i < tokens % num_seqs else 0) for i in range(num_seqs)]
        per_seq = [min(n, cfg.max_model_len) for n in per_seq]
        blocks = [(n + self.block_size - 1) // self.block_size for n in per_seq]
        self._bind_cache(allocate_kv_cache(cfg, sum(blocks), self.device))
        tables, slots, first = [], [], 0
        for n, b in zip(per_seq, blocks):
            table = list(range(first, first + b))
            tables.append(table + [0] * (max(blocks) - b))
            slots.extend(table[p // self.block_size] * self.block_size + p % self.block_size for p in range(n))
            first += b
        cu = [0]
        for n in per_seq:
            cu.append(cu[-1] + n)
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, device=self.device), block_tables=torch.tensor(tables, dtype=torch.int32,
                                                                                           device=self.device),
            context_lens=torch.tensor(per_seq, dtype=torch.int32, device=self.device),
            cu_seqlens_q=torch.tensor(cu, dtype=torch.int32, device=self.device), num_decode_seqs=0,
            max_query_len=max(per_seq), max_context_len=max(per_seq))
        n_tok = sum(per_seq)
        positions = torch.cat([torch.arange(n, device=self.device) for n in per_seq])
        input_ids = torch.zeros(n_tok, dtype=torch.int64, device=self.device)
        hidden = self.model(input_ids, positions, meta)
        logits = self.model.compute_logits(hidden[torch.tensor(cu[1:], device=self.device) - 1])
        torch.softmax(logits, dim=-1)  # the sampler's largest temporary
        del hidden, logits
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        graph_bytes = 0
        if not cfg.enforce_eager:
            before = torch.cuda.memory_reserved()
            bufs = self._graph_buffers(cfg.max_num_seqs)
            graphs, out = self._capture([cfg.max_num_seqs], bufs)
            graph_bytes = torch.cuda.memory_reserved() - before
            del graphs, out, bufs
        self._bind_cache([])
        torch.cuda.empty_cache()
        self.memory_profile = gpu_kv_budget(cfg, weights, peak, graph_bytes)
        log.info("memory profile: %s", self.memory_profile.describe())
        return self.memory_profile.kv_budget
