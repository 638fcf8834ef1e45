"""The peer in `bench throughput --baseline transformers`: transformers' own continuous batching
(`generate_batch` over a paged cache), run on the same prompt token ids and output length."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

# transformers 5.17 needs the "paged|" prefix; later releases select paged attention themselves.
ATTN_IMPLEMENTATIONS = ("paged|sdpa", "sdpa")


@dataclass
class BaselineResult:
    elapsed_s: float
    output_tokens: int
    requests: int
    failed: int
    attn_implementation: str
    notes: list[str] = field(default_factory=list)

    @property
    def output_throughput(self) -> float:
        return self.output_tokens / self.elapsed_s if self.elapsed_s else 0.0


def load_model(model_dir: str, dtype: torch.dtype, device: str):
    from transformers import AutoModelForCausalLM

    errors = []
    for impl in ATTN_IMPLEMENTATIONS:
        try:
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation=impl)
            return model.to(device).eval(), impl
        except (ValueError, ImportError, KeyError) as exc:
            errors.append(f"{impl}: {exc}")
    raise RuntimeError("transformers could not load the model for continuous batching: " + "; ".join(errors))


def run_baseline(model_dir: str, prompts: list[list[int]], output_len: int, dtype: torch.dtype,
                 device: str) -> BaselineResult:
    """Greedy, no EOS stop (the same work as our ignore_eos run); one short warm-up first."""
    from transformers import GenerationConfig

    model, impl = load_model(model_dir, dtype, device)
    config = GenerationConfig(max_new_tokens=output_len, do_sample=False, eos_token_id=None, pad_token_id=0,
                              use_cuda_graph=False)
    model.generate_batch(inputs=prompts[:4], generation_config=GenerationConfig(
        max_new_tokens=4, do_sample=False, eos_token_id=None, pad_token_id=0))
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    results = model.generate_batch(inputs=prompts, generation_config=config)
    if device == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    produced = [len(r.generated_tokens) for r in results.values() if r.error is None]
    notes = []
    failed = len(prompts) - len(produced)
    if failed:
        notes.append(f"{failed} of {len(prompts)} requests failed in transformers")
    short = sum(1 for n in produced if n < output_len)
    if short:
        notes.append(f"{short} requests produced fewer than {output_len} tokens; throughput counts what was produced")
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return BaselineResult(elapsed, sum(produced), len(prompts), failed, impl, notes)
