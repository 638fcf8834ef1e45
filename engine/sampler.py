"""Turns the step's logits into tokens: penalties, min_tokens, logit_bias, allowed ids, temperature,
min-p, top-k, top-p, seeded draws, logprobs.

Semantics follow vLLM: penalties act on the raw logits; logprobs are those of the raw model
distribution; min-p is applied to the tempered distribution before the top-k and top-p cuts; a
request with a seed draws only from its own generator (exponential race: argmax(probs /
Exponential(1))), so its tokens do not depend on what else is in the batch. Every input comes from
the SamplingMetadata of engine/sampling_metadata.py; nothing here reads a device value back or
uploads anything, so the step stays asynchronous.

Cuts keep ties: top-k keeps every token whose logit equals the k-th largest; top-p keeps the
smallest set of most likely tokens whose mass reaches p, and every token as likely as the least
likely of them, so the result does not depend on how a sort orders equal values.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.sampling_metadata import Penalties, SamplingMetadata

NEG_INF = float("-inf")


@dataclass
class SamplerOutput:
    tokens: torch.Tensor  # [rows] int64, on the device (the next step's decode inputs are gathered from it)
    logprobs: dict[str, torch.Tensor] | None = None  # chosen, ranks, top_ids, top_vals (rows of `tokens`)


def make_generator(seed: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


class Sampler:
    def __init__(self, seed: int, device: torch.device):
        self.generator = make_generator(seed, device)  # for rows without a seed of their own

    def __call__(self, logits: torch.Tensor, meta: SamplingMetadata) -> SamplerOutput:
        """`logits`: [rows, vocab] float32, one row per batch row; modified in place."""
        raw_logprobs = torch.log_softmax(logits, dim=-1) if meta.max_num_logprobs is not None else None
        logits = process_logits(logits, meta)
        if meta.all_greedy:
            tokens = logits.argmax(dim=-1)  # the common fast path: one kernel, no softmax
        else:
            tokens = self._sample(logits, meta)
        if raw_logprobs is None:
            return SamplerOutput(tokens)
        return SamplerOutput(tokens, logprobs_of(raw_logprobs, tokens, meta.max_num_logprobs))

    def _sample(self, logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
        greedy_tokens = None if meta.all_random else logits.argmax(dim=-1)
        temperature = torch.where(meta.greedy, 1.0, meta.temperature)  # greedy rows take greedy_tokens
        logits.div_(temperature.unsqueeze(1))
        if meta.min_p is not None:
            on_rows(apply_min_p, logits, meta.min_p_rows, meta.min_p)
        if meta.top_k is not None:
            on_rows(apply_top_k, logits, meta.top_k_rows, meta.top_k, meta.max_top_k)
        if meta.top_p is not None:
            on_rows(apply_top_p, logits, meta.top_p_rows, meta.top_p)
        tokens = exponential_race(logits.softmax(dim=-1), self.generator, meta.generators)
        return tokens if greedy_tokens is None else torch.where(meta.greedy, greedy_tokens, tokens)


# ---------------------------------------------------------------- logits processing (argmax-changing)
def process_logits(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    if meta.penalties is not None:
        logits = apply_penalties(logits, meta.penalties)
    if meta.blocked is not None:
        rows, ids, active = meta.blocked
        logits[rows, ids] = torch.where(active, NEG_INF, logits[rows, ids])
    if meta.logit_bias is not None:
        rows, ids, values = meta.logit_bias
        logits.index_put_((rows, ids), values, accumulate=True)
    if meta.allowed is not None:
        rows, mask = meta.allowed
        logits[rows] = logits[rows].masked_fill(~mask, NEG_INF)
    return logits


def apply_penalties(logits: torch.Tensor, pen: Penalties) -> torch.Tensor:
    """Repetition (seen in prompt or output: positive logits divided, negative multiplied), then
    frequency (times each output count) and presence (once per output token) subtracted."""
    if pen.rows is not None:
        logits[pen.rows] = penalised(logits[pen.rows], pen)
        return logits
    return penalised(logits, pen)


def penalised(logits: torch.Tensor, pen: Penalties) -> torch.Tensor:
    counts = pen.output_counts
    out_seen = counts > 0
    seen = out_seen | pen.prompt_mask
    scaled = torch.where(logits > 0, logits / pen.repetition, logits * pen.repetition)
    logits = torch.where(seen, scaled, logits)
    return logits - counts * pen.frequency - out_seen * pen.presence


# ---------------------------------------------------------------- cuts (on tempered logits, in place)
def on_rows(cut, logits: torch.Tensor, rows: torch.Tensor | None, values: torch.Tensor, *args) -> torch.Tensor:
    """Apply a cut to the listed rows only (all rows when `rows` is None)."""
    if rows is None:
        return cut(logits, values, *args)
    logits[rows] = cut(logits[rows], values[rows], *args)
    return logits


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens whose probability is below min_p times the most likely one's: in logit space,
    below max + log(min_p) (min_p = 0 keeps everything), so no softmax is needed."""
    threshold = logits.amax(dim=-1, keepdim=True) + torch.log(min_p).unsqueeze(1)
    return logits.masked_fill_(logits < threshold, NEG_INF)


def apply_top_k(logits: torch.Tensor, k: torch.Tensor, max_k: int) -> torch.Tensor:
    """Keep each row's k largest logits and their ties; rows with k <= 0 keep everything. `max_k`
    (the largest k, known on the host) sizes the one topk, so nothing is read back."""
    max_k = min(max_k, logits.shape[-1])
    top = logits.topk(max_k, dim=-1).values
    kth = top.gather(1, (k.clamp(1, max_k) - 1).unsqueeze(1))
    kth = kth.masked_fill((k <= 0).unsqueeze(1), NEG_INF)
    return logits.masked_fill_(logits < kth, NEG_INF)


def apply_top_p(logits: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches p (at least one), and
    their ties. p = 1 keeps everything (rounding in the cumulative sum must not drop the tail)."""
    probs = logits.softmax(dim=-1)
    sorted_probs = probs.sort(dim=-1, descending=True).values
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    limit = p.masked_fill(p >= 1.0, 2.0).unsqueeze(1)
    num_kept = (mass_before < limit).sum(dim=-1, keepdim=True)  # >= 1: nothing comes before the first
    threshold = sorted_probs.gather(1, num_kept - 1)
    return logits.masked_fill_(probs < threshold, NEG_INF)


# ---------------------------------------------------------------- draws and logprobs
def exponential_race(probs: torch.Tensor, generator: torch.Generator,
                     generators: dict[int, torch.Generator]) -> torch.Tensor:
    """argmax(probs / E) with E ~ Exponential(1) draws a token with probability probs. A row with its
    own generator draws its noise from it alone, so its tokens do not depend on its batch."""
    noise = torch.empty_like(probs).exponential_(generator=generator)
    for row, g in generators.items():
        noise[row].exponential_(generator=g)
    return probs.div_(noise).argmax(dim=-1)


def logprobs_of(raw: torch.Tensor, tokens: torch.Tensor, max_num: int) -> dict[str, torch.Tensor]:
    chosen = raw.gather(1, tokens.unsqueeze(1)).squeeze(1)
    ranks = (raw > chosen.unsqueeze(1)).sum(dim=1) + 1
    top_vals, top_ids = raw.topk(max_num, dim=-1)
    return {"chosen": chosen, "ranks": ranks, "top_ids": top_ids, "top_vals": top_vals}
