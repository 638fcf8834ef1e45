"""The worker's side of speculative decoding: verify the drafts, write every row's new tokens into
the persistent batch, propose the next drafts.

A step with drafts is synchronous: the accepted tokens are read back before the step returns, since
the next step's inputs (and drafts) depend on how many were accepted. Tokens therefore live on the
host between steps (no row waits on a device token), and the engine core finishes each step before
scheduling the next (engine/core.py).

Which requests get drafts: those whose sampling is temperature, top-k, top-p, min-p and a seed.
Penalties, logit bias, allowed ids, min_tokens masks and logprobs depend on (or report) each position
separately; such requests decode one token per step beside the speculating ones.
"""
from __future__ import annotations

import numpy as np
import torch

from engine.sampling_metadata import (
    F_ALLOWED,
    F_BIAS,
    F_LOGPROBS,
    F_MIN_TOKENS,
    F_PENALTY,
    F_PROMPT_LOGPROBS,
    GREEDY,
    MIN_P,
    TEMPERATURE,
    TOP_K,
    TOP_P,
    upload,
)
from engine.scheduler_output import ModelRunnerOutput, SchedulerOutput
from engine.spec_decode.rejection_sampler import filtered_probs, rejection_sample


def eligible_rows(features: np.ndarray) -> np.ndarray:
    """[rows] bool: the rows whose sampling speculation supports (module docstring)."""
    f = features
    return ((f[:, F_PENALTY] == 0) & (f[:, F_BIAS] == 0) & (f[:, F_ALLOWED] == 0) & (f[:, F_MIN_TOKENS] == 0)
            & (f[:, F_LOGPROBS] < 0) & (f[:, F_PROMPT_LOGPROBS] < 0))


class ResolvedOutput:
    """A step's output, already on the host (a spec step is synchronous)."""

    def __init__(self, output: ModelRunnerOutput):
        self.output = output

    def result(self) -> ModelRunnerOutput:
        return self.output


class SpecDecoder:
    """`proposer`: NgramProposer-like (propose(token rows) -> drafts) or a DraftModelProposer (with
    propose_batch, which also needs the step's progress and keeps draft probabilities)."""

    def __init__(self, proposer, num_speculative_tokens: int, device: torch.device):
        self.proposer = proposer
        self.k = num_speculative_tokens
        self.device = device
        self.draft_probs: dict[str, torch.Tensor] = {}  # req_id -> [drafts, vocab] q of its pending drafts

    # ---------------------------------------------------------------- plan
    def apply_plan(self, plan: SchedulerOutput) -> None:
        for rid in (*plan.finished_req_ids, *plan.preempted_req_ids):
            self.draft_probs.pop(rid, None)
        if hasattr(self.proposer, "apply_plan"):
            self.proposer.apply_plan(plan)

    # ---------------------------------------------------------------- verification
    def split_logits(self, logits: torch.Tensor, num_drafts: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """`logits`: 1 + num_drafts[r] rows per batch row (engine/model_runner.verify_indices). Returns
        (each row's last logits [rows, V], the rows with drafts' verification logits [R, K, V])."""
        counts = 1 + num_drafts.astype(np.int64)
        ends = np.cumsum(counts)
        spec = np.flatnonzero(num_drafts)
        k = int(num_drafts.max())
        first = (ends - counts)[spec]
        # Padding past a row's drafts repeats its last draft's row (ignored by the rejection sampler).
        grid = first[:, None] + np.minimum(np.arange(k)[None, :], num_drafts[spec, None] - 1)
        last = logits[upload(ends - 1, torch.int64, self.device)]
        verify = logits[upload(grid.reshape(-1), torch.int64, self.device)].view(len(spec), k, -1)
        return last, verify

    def _verify(self, runner, num_drafts: np.ndarray, verify: torch.Tensor,
                bonus: torch.Tensor) -> tuple[np.ndarray, torch.Tensor]:
        """Rejection-sample the rows with drafts: (those rows, their tokens [R, K + 1], -1 padded)."""
        batch, dev = runner.batch, self.device
        spec = np.flatnonzero(num_drafts)
        d = num_drafts[spec].astype(np.int64)
        k = verify.shape[1]
        drafts = np.zeros((len(spec), k), dtype=np.int64)
        for i, row in enumerate(spec.tolist()):
            start = batch.num_tokens[row]
            drafts[i, :d[i]] = batch.token_ids[row, start:start + d[i]]
        params = batch.sampling.params[spec]
        greedy = params[:, GREEDY] > 0
        probs = None if greedy.all() else self._target_probs(verify, params, greedy, k)
        draft_probs = None
        if probs is not None and hasattr(self.proposer, "propose_batch"):
            draft_probs = torch.zeros_like(probs)
            for i, row in enumerate(spec.tolist()):
                if not greedy[i]:
                    draft_probs[i, :d[i]] = self.draft_probs[batch.req_ids[row]][:d[i]]
        gens = {i: batch.sampling.generators[row] for i, row in enumerate(spec.tolist())
                if batch.sampling.generators[row] is not None}
        spec_t = upload(spec, torch.int64, dev)
        tokens, _ = rejection_sample(probs, verify.argmax(dim=-1), upload(drafts, torch.int64, dev),
                                     upload(d, torch.int64, dev), draft_probs, bonus[spec_t],
                                     upload(greedy, torch.bool, dev), runner.sampler.generator, gens)
        return spec, tokens

    def _target_probs(self, verify: torch.Tensor, params: np.ndarray, greedy: np.ndarray, k: int) -> torch.Tensor:
        rows, vocab = verify.shape[0], verify.shape[2]
        probs = filtered_probs(verify.reshape(rows * k, vocab), *self.cuts(params, greedy, k))
        return probs.view(rows, k, vocab)

    def cuts(self, params: np.ndarray, greedy: np.ndarray, repeat: int) -> tuple:
        """The filtered_probs arguments for rows with these sampler params, each repeated `repeat` times
        (one per position); the draft model uses the same for its q."""
        dev = self.device
        rep = lambda col: np.repeat(col, repeat)  # noqa: E731
        temperature = upload(rep(np.where(greedy, 1.0, params[:, TEMPERATURE])), torch.float32, dev)
        top_k = params[:, TOP_K]
        max_top_k = int(top_k.max()) if (top_k > 0).any() else 0
        top_k_t = upload(rep(top_k), torch.int64, dev) if max_top_k else None
        top_p = upload(rep(params[:, TOP_P]), torch.float32, dev) if (params[:, TOP_P] < 1.0).any() else None
        min_p = upload(rep(params[:, MIN_P]), torch.float32, dev) if (params[:, MIN_P] > 0.0).any() else None
        return temperature, top_k_t, max_top_k, top_p, min_p

    # ---------------------------------------------------------------- the step's end
    def complete_step(self, runner, inputs, out, meta, verify: torch.Tensor | None) -> ResolvedOutput:
        """Instead of the runner's asynchronous ending: verify, read back, write the tokens, propose."""
        from engine.model_runner import PendingOutput

        batch, rows = runner.batch, inputs.num_rows
        spec_tokens = None
        if verify is not None:
            spec, spec_tokens = self._verify(runner, inputs.num_drafts, verify, out.tokens)
        num_logprobs = [r.logprobs for r in batch.sampling.requests[:rows]] if out.logprobs is not None else None
        result = PendingOutput(batch.req_ids[:rows], inputs.samples, out, num_logprobs, runner.timer,
                               inputs.prompt_rows, inputs.prompt_scores).result()
        if spec_tokens is not None:
            for row, tokens in zip(spec.tolist(), spec_tokens.tolist()):
                result.sampled_token_ids[row] = [t for t in tokens if t >= 0]
        sampled = self._write_tokens(batch, result.sampled_token_ids)
        result.spec_token_ids = self._propose(runner, sampled, inputs)
        runner.timer.lap("sample")
        return ResolvedOutput(result)

    @staticmethod
    def _write_tokens(batch, sampled: list[list[int]]) -> np.ndarray:
        """Append each row's new tokens on the host; returns the rows that got any."""
        rows = []
        for row, tokens in enumerate(sampled):
            if tokens:
                start = batch.num_tokens[row]
                batch.token_ids[row, start:start + len(tokens)] = tokens
                batch.num_tokens[row] = batch.num_host_tokens[row] = start + len(tokens)
                batch.pending_step[row] = -1
                rows.append(row)
        return np.array(rows, dtype=np.int64)

    def _propose(self, runner, sampled: np.ndarray, inputs) -> dict[str, list[int]]:
        batch, rows = runner.batch, inputs.num_rows
        eligible = eligible_rows(batch.sampling.features[:rows])
        for row in sampled.tolist():
            self.draft_probs.pop(batch.req_ids[row], None)
        if hasattr(self.proposer, "propose_batch"):
            proposals = self.proposer.propose_batch(runner, inputs, sampled, eligible, self)
        else:
            proposing = [r for r in sampled.tolist() if eligible[r]]
            drafts = self.proposer.propose([batch.token_ids[r, :batch.num_tokens[r]] for r in proposing])
            proposals = {batch.req_ids[r]: (d, None) for r, d in zip(proposing, drafts) if d}
        out = {}
        for rid, (drafts, q) in proposals.items():
            out[rid] = drafts
            if q is not None:
                self.draft_probs[rid] = q
        return out
