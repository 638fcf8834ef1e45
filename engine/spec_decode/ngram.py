"""Prompt lookup (n-gram) drafts: the request's last n tokens are looked up earlier in its own
prompt + output, longest n first (prompt_lookup_max down to prompt_lookup_min); the tokens that
followed the latest earlier occurrence are the drafts. Host work, numpy only, no model.

The latest occurrence rather than the first: in copy-heavy answers (quoting, editing a text) the
most recent match is the one being copied. Unless it is too close to the end to be followed by k
tokens (a repeating pattern): then the earliest, which has the longest continuation.
"""
from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


def ngram_propose(tokens: np.ndarray, k: int, lookup_max: int, lookup_min: int) -> np.ndarray:
    """Up to k draft tokens for the sequence `tokens` (1-D int array); empty when no n-gram of length
    lookup_min..lookup_max recurs."""
    num = len(tokens)
    for n in range(min(lookup_max, num - 1), lookup_min - 1, -1):
        pattern = tokens[num - n:]
        # Windows starting at 0..num-n-1: every occurrence before the suffix itself, each followed by
        # at least one token.
        windows = sliding_window_view(tokens[:num - 1], n)
        hits = np.flatnonzero((windows == pattern).all(axis=1))
        if len(hits):
            full = hits[hits + n + k <= num]
            start = int(full[-1] if len(full) else hits[0]) + n
            return tokens[start:start + k]
    return tokens[:0]


class NgramProposer:
    def __init__(self, num_speculative_tokens: int, lookup_max: int, lookup_min: int):
        self.k = num_speculative_tokens
        self.lookup_max = lookup_max
        self.lookup_min = lookup_min

    def propose(self, token_rows: list[np.ndarray]) -> list[list[int]]:
        """Drafts for each sequence (a view of its known tokens)."""
        return [ngram_propose(t, self.k, self.lookup_max, self.lookup_min).tolist() for t in token_rows]
