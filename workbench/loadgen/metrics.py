"""From per-request records to the aggregates `vllm bench serve` reports (times in ms)."""
from __future__ import annotations

from collections import Counter

import numpy as np

from workbench.results import RequestRecord

PERCENTILES = (90, 95, 99)


def summarize(name: str, values_s: list[float]) -> dict[str, float | None]:
    if not values_s:
        return {f"{stat}_{name}_ms": None for stat in ("mean", "median", "std", *(f"p{p}" for p in PERCENTILES))}
    ms = np.asarray(values_s, dtype=float) * 1e3
    out = {f"mean_{name}_ms": float(ms.mean()), f"median_{name}_ms": float(np.median(ms)),
           f"std_{name}_ms": float(ms.std())}
    out |= {f"p{p}_{name}_ms": float(np.percentile(ms, p)) for p in PERCENTILES}
    return out


def meets_slos(r: RequestRecord, slos_ms: dict[str, float]) -> bool:
    """vLLM's goodput: a request counts only if it meets every SLO given."""
    if not r.success:
        return False
    values = {"ttft": r.ttft, "e2el": r.e2el, "tpot": r.tpot if r.tpot is not None else 0.0}
    return all(values[k] is not None and values[k] * 1e3 <= limit for k, limit in slos_ms.items())


def aggregate(records: list[RequestRecord], duration_s: float, slos_ms: dict[str, float],
              peak_concurrency: int) -> tuple[dict[str, float | None], dict[str, int]]:
    ok = [r for r in records if r.success]
    failed = len(records) - len(ok)
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)
    metrics: dict[str, float | None] = {
        "completed": len(ok), "failed": failed, "error_rate": failed / len(records) if records else 0.0,
        "duration_s": duration_s, "request_throughput": len(ok) / duration_s,
        "output_throughput": out_tokens / duration_s, "total_token_throughput": (in_tokens + out_tokens) / duration_s,
        "total_input_tokens": in_tokens, "total_output_tokens": out_tokens, "peak_concurrency": peak_concurrency,
        "request_goodput": sum(meets_slos(r, slos_ms) for r in records) / duration_s if slos_ms else None}
    metrics |= summarize("ttft", [r.ttft for r in ok if r.ttft is not None])
    metrics |= summarize("tpot", [r.tpot for r in ok if r.tpot is not None])
    metrics |= summarize("itl", [gap for r in ok for gap in r.itl])
    metrics |= summarize("e2el", [r.e2el for r in ok if r.e2el is not None])
    errors = Counter(r.error or "unknown" for r in records if not r.success)
    return metrics, dict(errors)
