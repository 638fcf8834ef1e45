"""The draft-model proposer: a second (smaller) model with its own paged KV cache, run k times per
engine step for the whole batch.

Its cache is its own pool of blocks, of the target's block size, handed out by the same BlockManager
class (no prefix caching: a draft's K/V is cheap to recompute). Each request that may speculate
(engine/spec_decode/decoder.py) has a DraftState: the positions whose draft K/V is valid, and the
draft tokens it fed past the tokens known at the time. Per engine step, after the target's:
1. catch-up: every such request in the batch feeds the tokens the draft has not seen yet (a prompt
   chunk in the same step as the target computes it, or the accepted tokens and the new one);
   requests that sampled take draft token 1 from their last position;
2. k - 1 decode steps: each feeds its previous draft token and takes the next.
Draft K/V at a position stays valid while the token fed there is the one that stayed (a draft
accepted by the target); the comparison is redone at the next catch-up, so truncated or rejected
drafts need no message. The pool holds as many blocks as the target's plus room for k drafts a row;
with prefix caching on, the target's shared blocks may still outnumber it: a request whose draft
blocks cannot be had drops its draft state (proposes nothing this step, catches up later).

Draft tokens are sampled with the request's own settings (temperature, top-k, top-p, min-p, the
request's generator), and their distributions q kept for the rejection sampler. Draft steps run eager.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field

import numpy as np
import torch

from engine.block_manager import BlockManager
from engine.config import ConfigError, EngineConfig
from engine.kv_cache import allocate_kv_cache, bytes_per_block, num_blocks_for
from engine.layers.attention import AttentionMetadata
from engine.model_loader import build_model, load_hf_config
from engine.presets import resolve_model
from engine.sampler import exponential_race
from engine.sampling_metadata import GREEDY, upload
from engine.scheduler_output import SchedulerOutput
from engine.spec_decode.rejection_sampler import filtered_probs

log = logging.getLogger("engine")


@dataclass
class DraftState:
    """What the draft's cache holds of one request (the BlockManager reads block_table,
    block_hashes and num_computed_tokens)."""
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # positions with valid draft K/V (after the last check)
    base: int = 0  # the known tokens when the tail was fed
    tail: list[int] = field(default_factory=list)  # draft tokens fed at positions base, base + 1, ...


def draft_engine_config(config: EngineConfig, draft_hf) -> EngineConfig:
    """The target's settings with the draft's shapes (for its cache's sizes and allocation)."""
    return dataclasses.replace(config, model=config.speculative.model, hf_config=draft_hf, speculative_config=None,
                               speculative_model=None, num_speculative_tokens=None, ngram_prompt_lookup_max=None,
                               ngram_prompt_lookup_min=None, enable_lora=False)


class DraftModelProposer:
    def __init__(self, config: EngineConfig, device: torch.device):
        spec = config.speculative
        self.k = spec.num_speculative_tokens
        self.device = device
        self.block_size = config.block_size
        model_dir = resolve_model(spec.model, with_weights=config.load_format != "dummy")
        hf = load_hf_config(model_dir)
        if hf.vocab_size != config.hf_config.vocab_size:
            raise ConfigError(f"speculative_config: the draft model {spec.model!r} has vocab_size {hf.vocab_size}, "
                              f"the target {config.hf_config.vocab_size}: their token ids must mean the same")
        limit = int(getattr(hf, "max_position_embeddings", 2048) or 2048)
        if limit < config.max_model_len:
            raise ConfigError(f"speculative_config: the draft model {spec.model!r} takes {limit} positions, fewer "
                              f"than max_model_len ({config.max_model_len})")
        self.config = draft_engine_config(config, hf)
        self.model = build_model(hf, config.torch_dtype, device, model_dir, config.load_format, config.seed)
        self.max_blocks = (config.max_model_len + self.k + self.block_size - 1) // self.block_size
        # Room for every row's drafts beyond the target's blocks (+1: a row's drafts may straddle two).
        self.reserve = config.max_num_seqs * ((self.k + self.block_size - 1) // self.block_size + 1)
        self.blocks = BlockManager(0, self.block_size, False)
        self.states: dict[str, DraftState] = {}
        self.kv_caches: list = []

    # ---------------------------------------------------------------- the cache
    def split_kv_budget(self, target: EngineConfig, kv_budget: int | None) -> int:
        """The target's number of blocks when both caches share the KV budget (or kv_cache_memory);
        the draft gets that many plus its reserve."""
        per_target, per_draft = bytes_per_block(target), bytes_per_block(self.config)
        if target.num_gpu_blocks_override is not None:
            return num_blocks_for(target, None)
        total = target.kv_cache_memory if target.kv_cache_memory is not None else kv_budget
        num_blocks = max(0, total - self.reserve * per_draft) // (per_target + per_draft)
        log.info("KV budget shared with the draft model: %.3f + %.3f MiB per block, %d draft blocks in reserve",
                 per_target / (1 << 20), per_draft / (1 << 20), self.reserve)
        return num_blocks_for(dataclasses.replace(target, num_gpu_blocks_override=num_blocks), None)

    def initialize_cache(self, num_target_blocks: int) -> None:
        num_blocks = num_target_blocks + self.reserve
        self.kv_caches = allocate_kv_cache(self.config, num_blocks, self.device)
        for i, attn in enumerate(self.model.attention_layers()):
            attn.k_cache, attn.v_cache = self.kv_caches[i]
        self.blocks = BlockManager(num_blocks, self.block_size, False)
        self.states = {}

    def release(self) -> None:
        empty = torch.empty(0, device=self.device)
        for attn in self.model.attention_layers():
            attn.k_cache = attn.v_cache = empty
        self.kv_caches, self.model = [], None

    def apply_plan(self, plan: SchedulerOutput) -> None:
        """Finished and preempted requests give their draft blocks back."""
        for rid in (*plan.finished_req_ids, *plan.preempted_req_ids):
            self._drop(rid)

    def _drop(self, rid: str) -> None:
        state = self.states.pop(rid, None)
        if state is not None:
            self.blocks.free(state)

    # ---------------------------------------------------------------- proposing
    @torch.inference_mode()
    def propose_batch(self, runner, inputs, sampled: np.ndarray, eligible: np.ndarray,
                      decoder) -> dict[str, tuple[list[int], torch.Tensor | None]]:
        """Drafts (and their q, None for greedy rows) for the rows in `sampled` that may speculate."""
        if not self.kv_caches:
            return {}  # the memory profile's step: no draft cache yet
        batch, rows = runner.batch, inputs.num_rows
        did_sample = np.zeros(rows, dtype=bool)
        did_sample[sampled] = True
        known = np.where(did_sample, batch.num_tokens[:rows],
                         batch.num_computed_tokens[:rows] + batch.num_scheduled_tokens[:rows]).astype(np.int64)
        feeds = self._catch_up_plan(batch, np.flatnonzero(eligible), known, did_sample)
        if not feeds:
            return {}
        proposing = [(row, start) for row, start in feeds if did_sample[row]]
        logits = self._catch_up(batch, feeds, known, [r for r, _ in proposing])
        for row, _ in feeds:
            self.states[batch.req_ids[row]].num_computed_tokens = int(known[row])
        if not proposing:
            return {}
        prow = np.array([r for r, _ in proposing], dtype=np.int64)
        params = batch.sampling.params[prow]
        greedy = params[:, GREEDY] > 0
        cuts = decoder.cuts(params, greedy, 1)
        gens = {i: batch.sampling.generators[r] for i, r in enumerate(prow.tolist())
                if batch.sampling.generators[r] is not None}
        greedy_t = upload(greedy, torch.bool, self.device)
        tokens, probs = [], []
        for j in range(self.k):
            if j:
                logits = self._decode(batch, prow, known + j - 1, tokens[-1])
            token, q = self._sample(logits, greedy, greedy_t, cuts, runner.sampler.generator, gens)
            tokens.append(token)
            probs.append(q)
        drafts = torch.stack(tokens, dim=1).tolist()
        q_all = None if probs[0] is None else torch.stack(probs, dim=1)
        out = {}
        for i, row in enumerate(prow.tolist()):
            state = self.states[batch.req_ids[row]]
            state.num_computed_tokens = int(known[row]) + self.k - 1
            state.base, state.tail = int(known[row]), drafts[i][:self.k - 1]
            out[batch.req_ids[row]] = (drafts[i], None if greedy[i] else q_all[i])
        return out

    def _catch_up_plan(self, batch, rows: np.ndarray, known: np.ndarray,
                       did_sample: np.ndarray) -> list[tuple[int, int]]:
        """(row, first position to feed) for each row that takes part; allocates their blocks."""
        feeds = []
        for row in rows.tolist():
            rid = batch.req_ids[row]
            state = self.states.setdefault(rid, DraftState())
            valid = self._valid_positions(state, batch.token_ids[row], int(known[row]))
            start = min(valid, int(known[row]) - 1) if did_sample[row] else valid
            state.num_computed_tokens = start
            state.tail = []
            need = int(known[row]) - start + (self.k - 1 if did_sample[row] else 0)
            if not self.blocks.can_allocate(state, need):
                self._drop(rid)  # catches up from scratch once there is room
                continue
            self.blocks.allocate(state, need)
            if start < known[row]:
                feeds.append((row, start))
        return feeds

    @staticmethod
    def _valid_positions(state: DraftState, tokens: np.ndarray, known: int) -> int:
        """The positions whose draft K/V holds the tokens that stayed: the checked ones, then the fed
        drafts for as long as they match what the target kept."""
        if not state.tail:
            return min(state.num_computed_tokens, known)
        n = min(len(state.tail), known - state.base)
        fed = np.asarray(state.tail[:n])
        mismatch = np.flatnonzero(fed != tokens[state.base:state.base + n])
        return state.base + (int(mismatch[0]) if len(mismatch) else n)

    def _catch_up(self, batch, feeds: list[tuple[int, int]], known: np.ndarray, proposing: list[int]) -> torch.Tensor:
        """One forward over every row's unseen tokens; logits at the last position of the `proposing`
        rows (in that order). One-token rows go first (the decode kernel's group)."""
        feeds = sorted(feeds, key=lambda f: known[f[0]] - f[1] != 1)
        rows = [r for r, _ in feeds]
        n = np.array([known[r] - s for r, s in feeds], dtype=np.int64)
        starts = np.array([s for _, s in feeds], dtype=np.int64)
        cu = np.zeros(len(feeds) + 1, dtype=np.int64)
        np.cumsum(n, out=cu[1:])
        tok_row = np.repeat(np.arange(len(feeds)), n)
        pos = np.arange(int(cu[-1])) - np.repeat(cu[:-1] - starts, n)
        batch_rows = np.asarray(rows, dtype=np.int64)[tok_row]
        ids = batch.token_ids[batch_rows, pos]
        logits_rows = [rows.index(r) for r in proposing]
        hidden = self._forward(rows, batch, ids, pos, tok_row, starts + n, cu, int((n == 1).sum()), int(n.max()))
        return self.model.compute_logits(hidden[upload(cu[1:][logits_rows] - 1, torch.int64, self.device)])

    def _decode(self, batch, prow: np.ndarray, positions: np.ndarray, tokens: torch.Tensor) -> torch.Tensor:
        """One token per proposing row: the previous draft at `positions[row]`."""
        pos = positions[prow]
        rows = prow.tolist()
        cu = np.arange(len(rows) + 1, dtype=np.int64)
        hidden = self._forward(rows, batch, tokens, pos, np.arange(len(rows)), pos + 1, cu, len(rows), 1)
        return self.model.compute_logits(hidden)

    def _forward(self, rows: list[int], batch, ids, pos: np.ndarray, tok_row: np.ndarray, ctx: np.ndarray,
                 cu: np.ndarray, num_decodes: int, max_query_len: int) -> torch.Tensor:
        dev, bs = self.device, self.block_size
        table_host = np.zeros((len(rows), self.max_blocks), dtype=np.int64)
        for i, row in enumerate(rows):
            blocks = self.states[batch.req_ids[row]].block_table
            table_host[i, :len(blocks)] = blocks
        slots = table_host[tok_row, pos // bs] * bs + pos % bs
        meta = AttentionMetadata(
            slot_mapping=upload(slots, torch.int64, dev), block_tables=upload(table_host, torch.int32, dev),
            context_lens=upload(ctx, torch.int32, dev), cu_seqlens_q=upload(cu, torch.int32, dev),
            num_decode_seqs=num_decodes, max_query_len=max_query_len, max_context_len=int(ctx.max()))
        input_ids = ids if isinstance(ids, torch.Tensor) else upload(ids, torch.int64, dev)
        return self.model(input_ids, upload(pos, torch.int64, dev), meta)

    def _sample(self, logits: torch.Tensor, greedy: np.ndarray, greedy_t: torch.Tensor, cuts: tuple,
                generator, gens: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A draft token per row (argmax for greedy rows), and q for all rows (None if all greedy)."""
        logits = logits.float()
        top = logits.argmax(dim=-1)
        if greedy.all():
            return top, None
        q = filtered_probs(logits, *cuts)
        drawn = exponential_race(q.clone(), generator, gens)
        return torch.where(greedy_t, top, drawn), q
