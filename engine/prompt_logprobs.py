"""Prompt log-probabilities (vLLM's `SamplingParams.prompt_logprobs`): for every prompt position after
the first, the logprob and rank of the actual prompt token under the model's distribution at the
position before it, plus the top-N (ids, logprobs). Position 0 has none (vLLM reports None).

How the rows are found (in the worker, from its persistent batch). A prompt may be computed over
several steps (chunked prefill); each step's chunk [start, end) has hidden rows for those positions,
and the row at position q predicts the token at q + 1. So a chunk scores the prompt tokens at
positions start + 1 .. min(end, P - 1), where P is the prompt length (the row at P - 1 predicts the
first generated token: that one is sampled, not scored). The worker's record of the request counts
the positions scored so far, so a request that is preempted and recomputed does not score its
prompt twice.

Prefix caching: positions served from the cache have no hidden rows. As vLLM v1 does, a request that
asks for prompt logprobs does not read the prefix cache (the scheduler skips the lookup for it) and
computes its whole prompt; its blocks are still registered for others to share.

The work: one vocabulary projection per scored row, in slices of rows so that the float32 logits of
a long prompt never sit whole in memory. The scores travel to the host with the step's sampled
tokens (the same asynchronous copy), and the core hands them out with the request's first token.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from engine.messages import TokenLogprobs
from engine.sampling_metadata import upload

LOGITS_ELEMENTS_PER_SLICE = 1 << 25  # 128 MiB of float32 logits at a time


@dataclass
class PromptRows:
    """One request's scored rows in a step's flat hidden states."""
    req_id: str
    first_row: int  # row in the step's flat batch
    target_ids: list[int]  # the prompt tokens those rows predict, in order
    num_top: int  # the request's prompt_logprobs


def select_prompt_rows(req_id: str, prompt_token_ids: np.ndarray, num_scored: int, start: int, end: int,
                       first_row: int, num_top: int) -> PromptRows | None:
    """The rows of a chunk computing positions [start, end), flat from `first_row`, that score prompt
    tokens not scored yet (`num_scored` of them are); None when the chunk has none."""
    stop = min(end, len(prompt_token_ids) - 1)
    begin = max(start, num_scored)
    if begin >= stop:
        return None
    if start > num_scored:
        raise RuntimeError(f"request {req_id}: prompt positions {num_scored}..{start - 1} were never computed "
                           "(prompt logprobs need every prompt row; was the prefix cache read?)")
    return PromptRows(req_id, first_row + begin - start, prompt_token_ids[begin + 1:stop + 1].tolist(), num_top)


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
    """Score every selected row of a step at once (the largest top-N asked for). The row indices and
    targets go up as one-time pinned copies: nothing here waits for the device."""
    index = np.concatenate([np.arange(r.first_row, r.first_row + len(r.target_ids)) for r in rows])
    index = upload(index, torch.int64, hidden.device)
    targets = upload([t for r in rows for t in r.target_ids], torch.int64, hidden.device)
    return score_tokens(compute_logits, hidden[index], targets, max(r.num_top for r in rows), vocab_size)


def prompt_logprobs_by_request(rows: list[PromptRows], logprobs: list[float], ranks: list[int],
                               top_ids: list[list[int]], top_logprobs: list[list[float]]) -> dict[str, list]:
    """The scores read back (as lists), per request, each cut to its own top-N."""
    out, i = {}, 0
    for r in rows:
        k = r.num_top
        scored = out.setdefault(r.req_id, [])
        for _ in r.target_ids:
            scored.append(TokenLogprobs(logprobs[i], ranks[i], top_ids[i][:k], top_logprobs[i][:k]))
            i += 1
    return out
