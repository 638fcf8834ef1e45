"""Prompt log-probabilities (vLLM's `SamplingParams.prompt_logprobs`): for every prompt position after
the first, the logprob and rank of the actual prompt token under the model's distribution at the
position before it, plus the top-N (ids, logprobs). Position 0 has none (vLLM reports None).

How the rows are found. A prompt may be computed over several steps (chunked prefill); each step's
chunk [start, end) has hidden rows for those positions, and the row at position q predicts the token
at q + 1. So a chunk scores the prompt tokens at positions start + 1 .. min(end, P - 1), where P is
the prompt length (the row at P - 1 predicts the first generated token: that one is sampled, not
scored). `Sequence.prompt_logprobs` holds what is scored so far, so a sequence that is preempted and
recomputed does not score its prompt twice.

Prefix caching: positions served from the cache have no hidden rows. As vLLM v1 does, a request that
asks for prompt logprobs does not read the prefix cache (the scheduler skips the lookup for it) and
computes its whole prompt; its blocks are still registered for others to share.

The work: one vocabulary projection per scored row, in slices of rows so that the float32 logits of
a long prompt never sit whole in memory. The results are read to the host in the step that computed
them (a device sync on steps that carry scored rows only; the hot decode path never has any).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from engine.messages import TokenLogprobs
from engine.sequence import Sequence

LOGITS_ELEMENTS_PER_SLICE = 1 << 25  # 128 MiB of float32 logits at a time


@dataclass
class PromptRows:
    """One sequence's scored rows in a step's flat hidden states."""
    seq: Sequence
    first_row: int  # row in the step's flat batch
    target_ids: list[int]  # the prompt tokens those rows predict, in order


def select_prompt_rows(seq: Sequence, start: int, end: int, first_row: int) -> PromptRows | None:
    """The rows of a chunk computing positions [start, end), flat from `first_row`, that score prompt
    tokens not scored yet; None when the request did not ask or the chunk has none."""
    if seq.prompt_logprobs is None:  # not asked for
        return None
    stop = min(end, seq.num_prompt_tokens - 1)
    scored = len(seq.prompt_logprobs)  # rows at positions before this were scored in an earlier step
    begin = max(start, scored)
    if begin >= stop:
        return None
    if start > scored:
        raise RuntimeError(f"request {seq.request_id}: prompt positions {scored}..{start - 1} were never computed "
                           "(prompt logprobs need every prompt row; was the prefix cache read?)")
    return PromptRows(seq, first_row + begin - start, seq.token_ids[begin + 1:stop + 1])


@dataclass
class TokenScores:
    """Per scored row: the target's logprob and rank (1 = most likely), and the top-k."""
    logprobs: torch.Tensor  # [rows]
    ranks: torch.Tensor  # [rows]
    top_ids: torch.Tensor  # [rows, k]
    top_logprobs: torch.Tensor  # [rows, k]


def score_tokens(compute_logits: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor,
                 target_ids: torch.Tensor, num_top: int, vocab_size: int) -> TokenScores:
    """Log-softmax of the logits of `hidden` rows, read at `target_ids`, with the `num_top` best."""
    rows_per_slice = max(1, LOGITS_ELEMENTS_PER_SLICE // vocab_size)
    parts = []
    for lo in range(0, hidden.shape[0], rows_per_slice):
        logprobs = torch.log_softmax(compute_logits(hidden[lo:lo + rows_per_slice]).float(), dim=-1)
        target = target_ids[lo:lo + rows_per_slice].unsqueeze(1)
        chosen = logprobs.gather(1, target)
        ranks = (logprobs > chosen).sum(dim=1) + 1
        if num_top:
            top_values, top_ids = logprobs.topk(num_top, dim=-1)
        else:
            top_values = logprobs.new_empty(len(chosen), 0)
            top_ids = top_values.long()
        parts.append((chosen.squeeze(1), ranks, top_ids, top_values))
    return TokenScores(*(torch.cat(column) for column in zip(*parts)))


def score_prompt_rows(compute_logits, hidden: torch.Tensor, rows: list[PromptRows], vocab_size: int) -> TokenScores:
    """Score every selected row of a step at once (the largest top-N asked for)."""
    index = torch.cat([torch.arange(r.first_row, r.first_row + len(r.target_ids)) for r in rows]).to(hidden.device)
    targets = torch.tensor([t for r in rows for t in r.target_ids], device=hidden.device)
    num_top = max(r.seq.params.prompt_logprobs for r in rows)
    return score_tokens(compute_logits, hidden[index], targets, num_top, vocab_size)


def record_prompt_logprobs(rows: list[PromptRows], scores: TokenScores) -> None:
    """Read the scores to the host and append each sequence's share, cut to its own top-N."""
    logprobs, ranks = scores.logprobs.tolist(), scores.ranks.tolist()
    top_ids, top_logprobs = scores.top_ids.tolist(), scores.top_logprobs.tolist()
    i = 0
    for r in rows:
        k = r.seq.params.prompt_logprobs
        for _ in r.target_ids:
            r.seq.prompt_logprobs.append(TokenLogprobs(logprobs[i], ranks[i], top_ids[i][:k], top_logprobs[i][:k]))
            i += 1
