"""Turns the step's logits into tokens: penalties, temperature, top-k/top-p/min-p, seeded draws, logprobs.

Semantics follow vLLM: penalties act on the raw logits; logprobs are those of the raw model
distribution; a request with a seed draws only from its own generator (exponential race:
argmax(probs / Exponential(1))), so its tokens do not depend on what else is in the batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.sampling_params import SamplingParams

_GREEDY_EPS = 1e-5


@dataclass
class SamplingBatch:
    """What the sampler needs for the rows of `logits` (one row per sequence sampled this step)."""
    params: list[SamplingParams]
    prompt_token_ids: list[list[int]]  # filled only when some row has a penalty
    output_token_ids: list[list[int]]
    generators: list[torch.Generator | None]  # per-request seeded generator, None = the sampler's own
    stop_ids_to_block: list[list[int]]  # ids masked out for this row (min_tokens not reached yet)


@dataclass
class SampleResult:
    token_ids: list[int]
    logprobs: list[float] | None = None  # logprob of each sampled token (None when no row asked)
    ranks: list[int] | None = None  # its rank in the raw distribution (1 = most likely)
    top_logprobs: list[list[tuple[int, float]] | None] | None = None


class PendingSample:
    """A step's sampled tokens (and logprobs) on their way to the host. The copy is queued behind
    the step's device work, so the engine can launch the next step before it waits for them."""

    def __init__(self, tokens: torch.Tensor, extras: dict[str, torch.Tensor], num_top: list[int | None]):
        self.tokens = tokens  # stays on the device: the next step's decode inputs are gathered from it
        self._num_top = num_top
        self._ready = None
        host = {"tokens": tokens, **extras}
        if tokens.device.type == "cuda":
            host = {k: torch.empty(v.shape, dtype=v.dtype, pin_memory=True).copy_(v, non_blocking=True)
                    for k, v in host.items()}
            self._ready = torch.cuda.Event()
            self._ready.record()
        self._host = host

    def result(self) -> SampleResult:
        if self._ready is not None:
            self._ready.synchronize()  # waits for this step's copy only, not for work queued after it
        h = self._host
        token_list = h["tokens"].tolist()
        if "chosen" not in h:
            return SampleResult(token_list)
        top_ids, top_vals = h["top_ids"].tolist(), h["top_vals"].tolist()
        top = [None if not k else list(zip(top_ids[i][:k], top_vals[i][:k])) for i, k in enumerate(self._num_top)]
        return SampleResult(token_list, h["chosen"].tolist(), h["ranks"].tolist(), top)


def make_generator(seed: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


class Sampler:
    def __init__(self, seed: int, device: torch.device):
        self.device = device
        self.generator = make_generator(seed, device)

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> PendingSample:
        params = batch.params
        want_logprobs = any(p.logprobs is not None for p in params)
        raw_logprobs = torch.log_softmax(logits.float(), dim=-1) if want_logprobs else None
        if all(p.greedy and not _has_penalty(p) and not _shapes_logits(p) for p in params) \
                and not any(batch.stop_ids_to_block):
            tokens = logits.argmax(dim=-1)  # the common fast path: one kernel, no softmax
        else:
            tokens = self._sample(self._process(logits.float().clone(), batch), batch)
        if raw_logprobs is None:
            return PendingSample(tokens, {}, [])
        return PendingSample(tokens, self._logprobs(raw_logprobs, tokens, params), [p.logprobs for p in params])

    # ---------------------------------------------------------------- logits processing
    def _process(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        rows = range(len(batch.params))
        if any(_has_penalty(p) for p in batch.params):
            logits = apply_penalties(logits, batch)
        for i in rows:
            if batch.stop_ids_to_block[i]:
                logits[i, batch.stop_ids_to_block[i]] = float("-inf")
            p = batch.params[i]
            if p.logit_bias:
                ids = torch.tensor(list(p.logit_bias), device=logits.device)
                logits[i, ids] += torch.tensor(list(p.logit_bias.values()), device=logits.device)
            if p.allowed_token_ids:
                keep = torch.full_like(logits[i], float("-inf"))
                keep[p.allowed_token_ids] = 0.0
                logits[i] += keep
        temps = torch.tensor([max(p.temperature, _GREEDY_EPS) for p in batch.params], device=logits.device)
        logits = logits / temps.unsqueeze(1)
        top_k = [p.top_k if p.top_k > 0 else logits.shape[1] for p in batch.params]
        if any(p.top_k > 0 for p in batch.params):
            logits = apply_top_k(logits, torch.tensor(top_k, device=logits.device), max(top_k))
        if any(p.top_p < 1.0 for p in batch.params):
            logits = apply_top_p(logits, torch.tensor([p.top_p for p in batch.params], device=logits.device))
        if any(p.min_p > 0.0 for p in batch.params):
            logits = apply_min_p(logits, torch.tensor([p.min_p for p in batch.params], device=logits.device))
        return logits

    def _sample(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        greedy = torch.tensor([p.greedy for p in batch.params], device=logits.device)
        probs = torch.softmax(logits, dim=-1)
        noise = torch.empty_like(probs)
        seeded = [i for i, g in enumerate(batch.generators) if g is not None]
        noise.exponential_(generator=self.generator)
        for i in seeded:  # a seeded request draws only from its own generator
            noise[i].exponential_(generator=batch.generators[i])
        sampled = (probs / noise).argmax(dim=-1)
        return torch.where(greedy, logits.argmax(dim=-1), sampled)

    # ---------------------------------------------------------------- logprobs
    @staticmethod
    def _logprobs(raw: torch.Tensor, tokens: torch.Tensor, params: list[SamplingParams]) -> dict[str, torch.Tensor]:
        chosen = raw.gather(1, tokens.unsqueeze(1)).squeeze(1)
        ranks = (raw > chosen.unsqueeze(1)).sum(dim=1) + 1
        top_vals, top_ids = raw.topk(max((p.logprobs or 0) for p in params), dim=-1)
        return {"chosen": chosen, "ranks": ranks, "top_ids": top_ids, "top_vals": top_vals}


def _shapes_logits(p: SamplingParams) -> bool:
    return bool(p.logit_bias) or bool(p.allowed_token_ids)


def _has_penalty(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0


def _token_counts(token_lists: list[list[int]], vocab: int, device: torch.device) -> torch.Tensor:
    counts = torch.zeros(len(token_lists), vocab, device=device)
    width = max((len(t) for t in token_lists), default=0)
    if width == 0:
        return counts
    ids = torch.full((len(token_lists), width), vocab, dtype=torch.int64)
    for i, t in enumerate(token_lists):
        ids[i, :len(t)] = torch.tensor(t, dtype=torch.int64)
    padded = torch.zeros(len(token_lists), vocab + 1, device=device)  # column `vocab` collects the padding
    padded.scatter_add_(1, ids.to(device), torch.ones(ids.shape, device=device))
    return padded[:, :vocab]


def apply_penalties(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    vocab = logits.shape[1]
    out_counts = _token_counts(batch.output_token_ids, vocab, logits.device)
    prompt_seen = _token_counts(batch.prompt_token_ids, vocab, logits.device) > 0
    rep = torch.tensor([p.repetition_penalty for p in batch.params], device=logits.device).unsqueeze(1)
    seen = prompt_seen | (out_counts > 0)
    penalised = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(seen, penalised, logits)
    freq = torch.tensor([p.frequency_penalty for p in batch.params], device=logits.device).unsqueeze(1)
    pres = torch.tensor([p.presence_penalty for p in batch.params], device=logits.device).unsqueeze(1)
    return logits - freq * out_counts - pres * (out_counts > 0).float()


def apply_top_k(logits: torch.Tensor, k: torch.Tensor, max_k: int | None = None) -> torch.Tensor:
    """Keep each row's k largest logits (ties at the threshold are kept). Give max_k (the largest
    k) to spare a device sync."""
    max_k = int(k.max().item()) if max_k is None else max_k
    top = logits.topk(max_k, dim=-1).values
    threshold = top.gather(1, (k - 1).clamp(min=0).unsqueeze(1))
    return logits.masked_fill(logits < threshold, float("-inf"))


def apply_top_p(logits: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches p (at least one)."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = (cumulative - sorted_logits.softmax(dim=-1)) >= p.unsqueeze(1)  # mass before this token
    drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    probs = logits.softmax(dim=-1)
    threshold = probs.max(dim=-1, keepdim=True).values * min_p.unsqueeze(1)
    return logits.masked_fill(probs < threshold, float("-inf"))
