"""The peer in `bench throughput --baseline transformers`: transformers' own continuous batching
(`generate_batch` over its paged cache), on the same prompt token ids and output length.

Checked against the sources of transformers 5.17 (the GPU machine) and 5.23 (here):
- attn_implementation "sdpa" loads in both; 5.17 switches it to "paged|sdpa" for continuous batching,
  5.23 runs "sdpa" itself and only strips a "paged|" prefix with a FutureWarning (5.17's message
  announced its removal). So "sdpa" goes first and "paged|sdpa" is the fallback (noted in the
  result); the implementation the forward passes actually ran with is recorded by a hook. Both may
  switch to flash attention when it is installed (their own best path, kept).
- GenerationConfig(eos_token_id=None) is filled from the model's config, which would stop at EOS:
  eos_token_id=-1 disables it in both versions.
- `generate_batch` takes one max_new_tokens for all requests, so the workload must have one output
  length (the caller checks).
- The manager is sized by ContinuousBatchingConfig: we pass our engine's limits (our KV tokens as
  its blocks of 256 tokens, capped at what the workload can occupy; max_num_batched_tokens;
  max_num_seqs; prefix sharing on iff ours is on), so both run under the same budget (its coarser
  blocks hold fewer short sequences in the same tokens: its design, kept). Left alone, transformers
  sizes its cache from free memory, which on CPU means most of the host's RAM (a minute of page
  faults here). Its sdpa path keeps a mask of batch tokens x cache tokens, so our limits may not
  fit its memory model (MemoryError): then it sizes its own cache, and the result says so.
- A warm-up call keeps its manager (persistent_manager=True) so that the timed call does not pay
  for start-up or CUDA graph capture.
"""
from __future__ import annotations

import gc
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

ATTN_IMPLEMENTATIONS = ("sdpa", "paged|sdpa")
TF_PAGE_SIZE = 256  # transformers' default tokens per cache block (page_size in 5.23, block_size in 5.17)


@dataclass
class BaselineLimits:
    """Our engine's limits, handed to transformers' manager."""
    kv_tokens: int  # our KV cache capacity in tokens
    max_num_batched_tokens: int
    max_num_seqs: int
    prefix_sharing: bool


@dataclass
class BaselineResult:
    elapsed_s: float
    output_tokens: int  # tokens actually produced (counted, not assumed)
    expected_tokens: int
    requests: int
    failed: int
    attn_implementation: str  # what its forward passes ran with (read by a hook during the run)
    transformers_version: str
    weights: str  # "checkpoint" or "random init (no weights in the directory)"
    notes: list[str] = field(default_factory=list)

    @property
    def output_throughput(self) -> float:
        return self.output_tokens / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def as_dict(self) -> dict:
        return asdict(self) | {"output_throughput": self.output_throughput,
                               "name": "transformers generate_batch (continuous batching)"}


def load_model(model_dir: Path, dtype: torch.dtype, device: str, notes: list[str]):
    """The model under the first attention spelling this transformers accepts; random weights of the
    checkpoint's shapes when the directory has none (as our --load-format dummy)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    has_weights = any(model_dir.glob("*.safetensors"))
    errors = []
    for impl in ATTN_IMPLEMENTATIONS:
        try:
            if has_weights:
                model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype, attn_implementation=impl)
            else:
                config = AutoConfig.from_pretrained(str(model_dir))
                model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=impl)
        except (ValueError, ImportError, KeyError) as exc:
            errors.append(f"{impl!r}: {exc}")
            continue
        if errors:
            notes.append(f"attn_implementation fell back to {impl!r} ({'; '.join(errors)})")
        return model.to(device).eval(), ("checkpoint" if has_weights else "random init (no weights in the directory)")
    raise RuntimeError("transformers could not load the model for continuous batching: " + "; ".join(errors))


def _cb_config(limits: BaselineLimits | None, seq_lens: list[int]):
    """Our limits; the cache no larger than the whole workload occupies at once (a request holds
    whole blocks), which keeps transformers' size-dependent buffers from growing for nothing."""
    from transformers.generation import ContinuousBatchingConfig

    if limits is None:  # transformers' own sizing, from free memory
        return ContinuousBatchingConfig()
    demand = sum(math.ceil(n / TF_PAGE_SIZE) for n in seq_lens)
    return ContinuousBatchingConfig(num_blocks=max(1, min(math.ceil(limits.kv_tokens / TF_PAGE_SIZE), demand)),
                                    max_batch_tokens=limits.max_num_batched_tokens,
                                    max_requests_per_batch=limits.max_num_seqs,
                                    allow_block_sharing=limits.prefix_sharing)


def _greedy(max_new_tokens: int):
    from transformers import GenerationConfig

    return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=-1, pad_token_id=0)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run_baseline(model_dir: Path, prompts: list[list[int]], warmup_prompts: list[list[int]], output_len: int,
                 dtype: torch.dtype, device: str, limits: BaselineLimits) -> BaselineResult:
    """Greedy, EOS ignored: the same work as our ignore_eos run. Only the second generate_batch is timed.

    The warm-up call keeps its manager for the timed call. That manager sizes what our limits leave
    open (the block-table width of the flash decode path) from the warm-up's requests, so the
    warm-up prompts must include one as long as the longest timed prompt, and run the full output
    length; they must not be workload prompts, or prefix sharing would find them cached."""
    import transformers

    notes: list[str] = []
    model, weights = load_model(Path(model_dir), dtype, device, notes)
    # The manager switches the attention implementation for its run and restores it when it stops:
    # record what the forward passes actually saw.
    seen: set[str] = set()
    hook = model.register_forward_pre_hook(lambda module, args: seen.add(str(module.config._attn_implementation)))
    try:
        cb = _cb_config(limits, [len(p) + output_len for p in prompts])
        try:
            model.generate_batch(inputs=warmup_prompts, generation_config=_greedy(output_len),
                                 continuous_batching_config=cb, persistent_manager=True)
        except MemoryError as exc:  # its footprint model (the sdpa mask grows with batch x cache) said no
            notes.append(f"our limits did not fit transformers' memory model ({exc}); it sized its own cache")
            cb = _cb_config(None, [])
            model.generate_batch(inputs=warmup_prompts, generation_config=_greedy(output_len),
                                 continuous_batching_config=cb, persistent_manager=True)
        _sync(device)
        start = time.perf_counter()
        results = model.generate_batch(inputs=prompts, generation_config=_greedy(output_len),
                                       continuous_batching_config=cb)
        _sync(device)
        elapsed = time.perf_counter() - start
    finally:
        hook.remove()
        if hasattr(model, "destroy_cached_continuous_batching_manager"):
            model.destroy_cached_continuous_batching_manager()
        del model
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    produced = [len(r.generated_tokens) for r in results.values() if r.error is None]
    failed = len(prompts) - len(produced)
    if failed:
        notes.append(f"{failed} of {len(prompts)} requests failed or went missing in transformers")
    off = [n for n in produced if n != output_len]
    if off:
        notes.append(f"{len(off)} requests produced other than {output_len} tokens ({min(off)}..{max(off)}); "
                     "throughput counts what was produced")
    return BaselineResult(elapsed_s=elapsed, output_tokens=sum(produced), expected_tokens=len(prompts) * output_len,
                          requests=len(prompts), failed=failed,
                          attn_implementation=", ".join(sorted(seen)) or "not observed",
                          transformers_version=transformers.__version__, weights=weights, notes=notes)
