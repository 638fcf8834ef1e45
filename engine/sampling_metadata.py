"""Per-row sampling state of the persistent batch, kept on the device, and the per-step view of it
that the sampler reads.

Why on the device: with the parameters uploaded as small tensors every step, each upload waited
for the device and undid the one-step overlap. Here the per-row parameters live in one device
tensor, re-uploaded from a host mirror only when the batch's membership (or row order) changes;
what the sampler needs to choose its path (any top-k? the largest k? all greedy?) is decided on
the host at the same moment, so a step never reads a device value back. Penalties read per-row
output-token counts kept on the device (the sampled tokens are scatter-added each step, in the
same device work) and a prompt-token mask built once when a row is added: no token history is
ever uploaded per step.

Rows of requests without penalties leave their counts row stale: it is never read (the penalties
run on the rows that have them), so it is neither reset nor moved.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from engine.scheduler_output import RequestSampling

# Columns of the per-row parameter tensor.
TEMPERATURE, TOP_P, TOP_K, MIN_P, REPETITION, PRESENCE, FREQUENCY, GREEDY = range(8)
NUM_COLUMNS = 8
_DEFAULT_ROW = (1.0, 1.0, -1.0, 0.0, 1.0, 0.0, 0.0, 0.0)
GREEDY_EPS = 1e-5
# Columns of the host-only per-row feature table: what the sampler's paths depend on, as numbers, so
# that a membership change decides them with numpy rather than a loop over the rows.
F_PENALTY, F_BIAS, F_ALLOWED, F_MIN_TOKENS, F_LOGPROBS, F_SEEDED, F_PROMPT_LOGPROBS = range(7)
_NO_FEATURES = (0, 0, 0, 0, -1, 0, -1)


def upload(values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A one-time upload (at a membership change): pinned and asynchronous on CUDA, so that it never
    waits for the device; the caching host allocator keeps the pinned copy alive until it is done."""
    tensor = torch.as_tensor(values, dtype=dtype)
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor


@dataclass
class Penalties:
    """For the rows with penalties (all of the batch's, or those listed in `rows`)."""
    repetition: torch.Tensor  # [rows, 1]
    presence: torch.Tensor
    frequency: torch.Tensor
    output_counts: torch.Tensor  # [rows, vocab] int32: each output token's count
    prompt_mask: torch.Tensor  # [rows, vocab] bool: the token is in the prompt
    rows: torch.Tensor | None = None  # the batch rows these are, when not all of them


@dataclass
class SamplingMetadata:
    """What the sampler needs for one step, for the batch's first `num_rows` rows (one logits row each)."""
    num_rows: int
    temperature: torch.Tensor  # [rows] float32
    greedy: torch.Tensor  # [rows] bool
    all_greedy: bool
    all_random: bool
    # The cuts: per-row values, and the rows that have the cut when not all of them do (the cut then
    # runs on those rows only: each costs passes over the vocabulary, top-p a sort)
    top_k: torch.Tensor | None = None  # [rows] int64, <= 0 for rows without a cut
    top_k_rows: torch.Tensor | None = None
    max_top_k: int = 0
    top_p: torch.Tensor | None = None
    top_p_rows: torch.Tensor | None = None
    min_p: torch.Tensor | None = None
    min_p_rows: torch.Tensor | None = None
    penalties: Penalties | None = None
    logit_bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # rows, token ids, values
    allowed: tuple[torch.Tensor, torch.Tensor] | None = None  # rows, [len(rows), vocab] bool mask
    # min_tokens: (rows, token ids, whether each entry is masked this step); a mask, not a filter, so
    # that choosing the entries never reads the device
    blocked: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    generators: dict[int, torch.Generator] = field(default_factory=dict)  # rows with their own seed
    max_num_logprobs: int | None = None

    @property
    def shapes_logits(self) -> bool:
        """Anything that can change the argmax of a greedy row."""
        return bool(self.penalties or self.logit_bias or self.allowed or self.blocked)


@dataclass
class _Derived:
    """What is decided on the host when the membership changes."""
    all_greedy: bool
    all_random: bool
    max_top_k: int
    # For each cut and the penalties: whether any row has it, and which rows do (None: all of them)
    any_top_k: bool
    top_k_rows: torch.Tensor | None
    any_top_p: bool
    top_p_rows: torch.Tensor | None
    any_min_p: bool
    min_p_rows: torch.Tensor | None
    any_penalty: bool
    penalty_rows: torch.Tensor | None
    max_num_logprobs: int | None
    seeded_rows: list[int]
    min_tokens_rows: np.ndarray  # rows with min_tokens > 0
    min_tokens: np.ndarray  # their min_tokens
    blocked_coo: tuple[torch.Tensor, torch.Tensor] | None  # (row, stop id) entries of the min_tokens rows
    logit_bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None
    allowed: tuple[torch.Tensor, torch.Tensor] | None


class SamplingRows:
    def __init__(self, max_rows: int, vocab_size: int, device: torch.device, pin_memory: bool):
        self.vocab_size = vocab_size
        self.device = device
        self._params_host = torch.tensor([_DEFAULT_ROW] * max_rows, dtype=torch.float32)
        if pin_memory:
            self._params_host = self._params_host.pin_memory()
        self.params = self._params_host.numpy()
        self.params_dev = torch.zeros(max_rows, NUM_COLUMNS, dtype=torch.float32, device=device)
        self.features = np.array([_NO_FEATURES] * max_rows, dtype=np.int64)
        self.requests: list[RequestSampling | None] = [None] * max_rows
        self.generators: list[torch.Generator | None] = [None] * max_rows
        self.output_counts = torch.zeros(max_rows, vocab_size, dtype=torch.int32, device=device)
        self.prompt_mask = torch.zeros(max_rows, vocab_size, dtype=torch.bool, device=device)
        self._derived: _Derived | None = None  # None: the membership changed since the last commit

    # ---------------------------------------------------------------- membership
    def set_row(self, row: int, sampling: RequestSampling, generator: torch.Generator | None,
                prompt_token_ids: np.ndarray, output_token_ids: list[int]) -> None:
        greedy = sampling.temperature < GREEDY_EPS or sampling.top_k == 1
        self.params[row] = (sampling.temperature, sampling.top_p, sampling.top_k, sampling.min_p,
                            sampling.repetition_penalty, sampling.presence_penalty, sampling.frequency_penalty,
                            float(greedy))
        self.features[row] = (sampling.has_penalty, bool(sampling.logit_bias), bool(sampling.allowed_token_ids),
                              sampling.min_tokens if sampling.min_tokens_stop_ids else 0,
                              -1 if sampling.logprobs is None else sampling.logprobs, generator is not None,
                              -1 if sampling.prompt_logprobs is None else sampling.prompt_logprobs)
        self.requests[row] = sampling
        self.generators[row] = generator
        if sampling.has_penalty:
            counts = self.output_counts[row]
            counts.zero_()
            if output_token_ids:
                ids = upload(output_token_ids, torch.int64, self.device)
                counts.index_add_(0, ids, torch.ones_like(ids, dtype=torch.int32))
            if sampling.repetition_penalty != 1.0:
                mask = self.prompt_mask[row]
                mask.zero_()
                mask[upload(prompt_token_ids, torch.int64, self.device)] = True
        self._derived = None

    def clear_row(self, row: int) -> None:
        self.params[row] = _DEFAULT_ROW
        self.features[row] = _NO_FEATURES
        self.requests[row] = None
        self.generators[row] = None
        self._derived = None

    def swap(self, i: int, j: int) -> None:
        self.params[[i, j]] = self.params[[j, i]]
        self.features[[i, j]] = self.features[[j, i]]
        self.requests[i], self.requests[j] = self.requests[j], self.requests[i]
        self.generators[i], self.generators[j] = self.generators[j], self.generators[i]
        if self.features[i, F_PENALTY] or self.features[j, F_PENALTY]:
            for table in (self.output_counts, self.prompt_mask):  # row copies: no index tensor to upload
                row_i = table[i].clone()
                table[i].copy_(table[j])
                table[j].copy_(row_i)
        self._derived = None

    # ---------------------------------------------------------------- per step
    def commit(self, num_rows: int) -> None:
        """After a membership change: upload the parameters and decide the sampler's paths. Call
        after the rows are final for the step and before `metadata`."""
        if self._derived is not None:
            return
        self.params_dev[:num_rows].copy_(self._params_host[:num_rows], non_blocking=True)
        self._derived = self._derive(num_rows)

    def _derive(self, num_rows: int) -> _Derived:
        p, f = self.params[:num_rows], self.features[:num_rows]
        greedy, top_k, logprobs = p[:, GREEDY] > 0, p[:, TOP_K], f[:, F_LOGPROBS]

        def subset(mask: np.ndarray) -> tuple[bool, torch.Tensor | None]:
            rows = np.flatnonzero(mask)
            return bool(len(rows)), upload(rows, torch.int64, self.device) if 0 < len(rows) < num_rows else None

        any_top_k, top_k_rows = subset(top_k > 0)
        any_top_p, top_p_rows = subset(p[:, TOP_P] < 1.0)
        any_min_p, min_p_rows = subset(p[:, MIN_P] > 0.0)
        any_penalty, penalty_rows = subset(f[:, F_PENALTY] > 0)
        mt_rows = np.flatnonzero(f[:, F_MIN_TOKENS])
        return _Derived(
            all_greedy=bool(greedy.all()), all_random=not bool(greedy.any()),
            max_top_k=int(top_k.max()) if any_top_k else 0, any_top_k=any_top_k, top_k_rows=top_k_rows,
            any_top_p=any_top_p, top_p_rows=top_p_rows, any_min_p=any_min_p, min_p_rows=min_p_rows,
            any_penalty=any_penalty, penalty_rows=penalty_rows,
            max_num_logprobs=int(logprobs.max()) if (logprobs >= 0).any() else None,
            seeded_rows=np.flatnonzero(f[:, F_SEEDED]).tolist(),
            min_tokens_rows=mt_rows, min_tokens=f[mt_rows, F_MIN_TOKENS],
            blocked_coo=self._entries(mt_rows, lambda r: dict.fromkeys(r.min_tokens_stop_ids, 0.0), values=False),
            logit_bias=self._entries(np.flatnonzero(f[:, F_BIAS]), lambda r: r.logit_bias),
            allowed=self._allowed_mask(np.flatnonzero(f[:, F_ALLOWED])))

    def _entries(self, rows: np.ndarray, entries_of, values: bool = True) -> tuple | None:
        """(row, token id[, value]) entries of the listed rows as device tensors; None if none."""
        flat = [(row, t, v) for row in rows.tolist() for t, v in entries_of(self.requests[row]).items()]
        if not flat:
            return None
        dev = self.device
        rows_t, ids_t = upload([e[0] for e in flat], torch.int64, dev), upload([e[1] for e in flat], torch.int64, dev)
        return (rows_t, ids_t, upload([e[2] for e in flat], torch.float32, dev)) if values else (rows_t, ids_t)

    def _allowed_mask(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The listed rows and a [len(rows), vocab] mask of the ids each may sample."""
        if not len(rows):
            return None
        flat = [(i, t) for i, row in enumerate(rows.tolist()) for t in self.requests[row].allowed_token_ids]
        dev = self.device
        mask = torch.zeros(len(rows), self.vocab_size, dtype=torch.bool, device=dev)
        mask[upload([i for i, _ in flat], torch.int64, dev), upload([t for _, t in flat], torch.int64, dev)] = True
        return upload(rows, torch.int64, dev), mask

    def blocked_rows(self, num_output_tokens: np.ndarray) -> np.ndarray | None:
        """Rows (of those with min_tokens) still short of it this step, given each row's output count."""
        d = self._derived
        if d is None or not len(d.min_tokens_rows):
            return None
        short = d.min_tokens_rows[num_output_tokens[d.min_tokens_rows] < d.min_tokens]
        return short if len(short) else None

    def metadata(self, num_rows: int, samples: np.ndarray, blocked_flags: torch.Tensor | None,
                 blocked_rows: np.ndarray | None) -> SamplingMetadata:
        """The step's view. `samples`: the rows that really sample (host); `blocked_flags`: a device
        [rows] flag, 1 where min_tokens masks the stop ids this step (None: no row is masked)."""
        d = self._derived
        assert d is not None, "commit() before metadata()"
        p = self.params_dev[:num_rows]
        meta = SamplingMetadata(num_rows=num_rows, temperature=p[:, TEMPERATURE], greedy=p[:, GREEDY] > 0,
                                all_greedy=d.all_greedy, all_random=d.all_random, logit_bias=d.logit_bias,
                                allowed=d.allowed, max_num_logprobs=d.max_num_logprobs)
        if d.any_top_k:
            meta.top_k, meta.top_k_rows, meta.max_top_k = p[:, TOP_K].long(), d.top_k_rows, d.max_top_k
        if d.any_top_p:
            meta.top_p, meta.top_p_rows = p[:, TOP_P], d.top_p_rows
        if d.any_min_p:
            meta.min_p, meta.min_p_rows = p[:, MIN_P], d.min_p_rows
        if d.any_penalty:
            rows = d.penalty_rows  # only they pay for the penalties' passes over the vocabulary
            q = p if rows is None else p[rows]
            counts, mask = ((self.output_counts[:num_rows], self.prompt_mask[:num_rows]) if rows is None
                            else (self.output_counts[rows], self.prompt_mask[rows]))
            meta.penalties = Penalties(q[:, REPETITION:REPETITION + 1], q[:, PRESENCE:PRESENCE + 1],
                                       q[:, FREQUENCY:FREQUENCY + 1], counts, mask, rows)
        if blocked_rows is not None and d.blocked_coo is not None:
            rows, ids = d.blocked_coo
            meta.blocked = (rows, ids, blocked_flags[rows] > 0)  # entries of rows short of min_tokens now
        meta.generators = {row: self.generators[row] for row in d.seeded_rows if samples[row]}
        return meta

    def record_sampled(self, tokens: torch.Tensor, num_rows: int, samples: torch.Tensor | None) -> None:
        """Count the step's sampled tokens (device work, queued behind the sampler). `samples`: a
        device [rows] int32 flag of the rows that really sampled (None: all of them)."""
        d = self._derived
        if d is None or not d.any_penalty:
            return
        ones = samples.unsqueeze(1) if samples is not None else torch.ones(
            num_rows, 1, dtype=torch.int32, device=tokens.device)
        self.output_counts[:num_rows].scatter_add_(1, tokens.unsqueeze(1), ones)
