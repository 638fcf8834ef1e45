"""Exact speculative sampling (Leviathan et al. 2023; Chen et al. 2023), vectorised over the batch.

For a request with drafts x_1..x_k drawn from the draft distributions q_1..q_k, and the target's
distributions p_1..p_{k+1} at the k + 1 verified positions:
- draft j is accepted with probability min(1, p_j(x_j) / q_j(x_j)), in order, until one is rejected;
- at the first rejection j, the token is drawn from normalize(max(0, p_j - q_j)) instead;
- when all k are accepted, a bonus token is drawn from p_{k+1}.
Every emitted token is then distributed exactly as the target would sample it. p and q are the
*processed* distributions: the request's temperature, min-p, top-k and top-p applied to each
(filtered_probs, the sampler's own cuts in the sampler's order). An n-gram draft has no
distribution: q is a point mass, so acceptance is p(x) and the residual is p without x.
Greedy requests accept while the draft equals the target's argmax; the first mismatch emits the
argmax. Seeded requests draw their uniforms and residual samples from their own generator only.
"""
from __future__ import annotations

import torch

from engine.sampler import apply_min_p, apply_top_k, apply_top_p


def filtered_probs(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor | None, max_top_k: int,
                   top_p: torch.Tensor | None, min_p: torch.Tensor | None) -> torch.Tensor:
    """softmax of the logits after temperature, min-p, top-k, top-p (per row; the sampler's order).
    `temperature` must be positive (greedy rows pass 1). Does not modify `logits`."""
    logits = logits / temperature.unsqueeze(1)
    if min_p is not None:
        apply_min_p(logits, min_p)
    if top_k is not None and max_top_k > 0:
        apply_top_k(logits, top_k, max_top_k)
    if top_p is not None:
        apply_top_p(logits, top_p)
    return logits.softmax(dim=-1)


def _uniform(shape: tuple, generator: torch.Generator | None, generators: dict[int, torch.Generator],
             device: torch.device) -> torch.Tensor:
    u = torch.rand(shape, generator=generator, device=device)
    for row, g in generators.items():
        u[row] = torch.rand(shape[1:], generator=g, device=device)
    return u


def _race(probs: torch.Tensor, generator: torch.Generator | None,
          generators: dict[int, torch.Generator]) -> torch.Tensor:
    """One draw per [row, position] from `probs` [rows, k, vocab] (exponential race; seeded rows
    from their own generator)."""
    noise = torch.empty_like(probs).exponential_(generator=generator)
    for row, g in generators.items():
        noise[row].exponential_(generator=g)
    return (probs / noise).argmax(dim=-1)


def rejection_sample(target_probs: torch.Tensor | None, target_argmax: torch.Tensor, draft_tokens: torch.Tensor,
                     num_drafts: torch.Tensor, draft_probs: torch.Tensor | None, bonus_tokens: torch.Tensor,
                     greedy: torch.Tensor, generator: torch.Generator | None = None,
                     generators: dict[int, torch.Generator] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Shapes: R rows (requests), K = the most drafts any row has, V the vocabulary.
    target_probs [R, K, V]: p_1..p_K (processed; None when every row is greedy); target_argmax [R, K]:
    the argmax of each (greedy rows); draft_tokens [R, K] int64 (padding past num_drafts is ignored);
    num_drafts [R] int64; draft_probs [R, K, V] or None (point-mass drafts: n-gram; rows that are
    greedy may hold anything); bonus_tokens [R]: drawn from p after row r's last draft (the ordinary
    sampler's token at the row's last position); greedy [R] bool.
    Returns (tokens [R, K + 1] int64, -1 past each row's end; num_accepted [R])."""
    generators = generators or {}
    rows, k = draft_tokens.shape
    device = draft_tokens.device
    draft_tokens = draft_tokens.clamp_min(0)  # padding may be -1
    if target_probs is None:
        accepted, recovered = draft_tokens == target_argmax, target_argmax
    else:
        accepted, recovered = _accept_random(target_probs, draft_tokens, draft_probs, generator, generators)
        accepted = torch.where(greedy.unsqueeze(1), draft_tokens == target_argmax, accepted)
        recovered = torch.where(greedy.unsqueeze(1), target_argmax, recovered)
    positions = torch.arange(k, device=device)
    accepted &= positions.unsqueeze(0) < num_drafts.unsqueeze(1)
    num_accepted = accepted.long().cumprod(dim=1).sum(dim=1)
    at = num_accepted.clamp(max=max(k - 1, 0)).unsqueeze(1)
    next_token = torch.where(num_accepted == num_drafts, bonus_tokens,
                             recovered.gather(1, at).squeeze(1) if k else bonus_tokens)
    out = torch.full((rows, k + 1), -1, dtype=torch.int64, device=device)
    keep = positions.unsqueeze(0) < num_accepted.unsqueeze(1)
    out[:, :k] = torch.where(keep, draft_tokens, -1)
    out.scatter_(1, num_accepted.unsqueeze(1), next_token.long().unsqueeze(1))
    return out, num_accepted


def _accept_random(target_probs: torch.Tensor, draft_tokens: torch.Tensor, draft_probs: torch.Tensor | None,
                   generator: torch.Generator | None,
                   generators: dict[int, torch.Generator]) -> tuple[torch.Tensor, torch.Tensor]:
    """(accepted [R, K]: u < p(x) / q(x); a draw from each position's residual [R, K])."""
    idx = draft_tokens.unsqueeze(2)
    p_x = target_probs.gather(2, idx).squeeze(2)
    if draft_probs is None:
        q_x = torch.ones_like(p_x)
        residual = target_probs.scatter(2, idx, 0.0)
    else:
        q_x = draft_probs.gather(2, idx).squeeze(2)
        residual = (target_probs - draft_probs).clamp_min_(0.0)
    u = _uniform(tuple(draft_tokens.shape), generator, generators, draft_tokens.device)
    # The residual of a position that is never rejected may be all zeros (p == q): p stands in.
    empty = residual.sum(dim=2, keepdim=True) <= 0
    residual = torch.where(empty, target_probs, residual)
    return u * q_x < p_x, _race(residual, generator, generators)
