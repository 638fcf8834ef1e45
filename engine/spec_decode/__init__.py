"""Speculative decoding (vLLM v1's shape): a proposer drafts k tokens per running request, the target
verifies the k + 1 positions in one forward, exact rejection sampling keeps a prefix of the drafts.

- config.py: SpeculativeConfig, built from vLLM's `speculative_config` dict or the older flags.
- ngram.py: prompt lookup over the request's own tokens (host, numpy).
- draft_model.py: a second, smaller model with its own paged KV cache.
- rejection_sampler.py: Leviathan et al. / Chen et al. acceptance, vectorised over the batch (torch).
- decoder.py: the worker's side: verify, write the accepted tokens, propose the next drafts.
- scheduling.py: the core's side: roll back what was rejected, keep the drafts, count acceptance.
"""
