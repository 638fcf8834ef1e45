"""From per-request records to the aggregates `vllm bench serve` reports (times in ms), plus what an
open-loop schedule needs: client-side queueing and latencies from the scheduled send time (`sched_`),
per-window figures (latency against offered load) and multi-turn figures per turn and session."""
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


def meets_slos(r: RequestRecord, slos_ms: dict[str, float], from_schedule: bool = False) -> bool:
    """vLLM's goodput: a request counts only if it meets every SLO given. `from_schedule` times TTFT and
    E2EL from the scheduled send time, so waiting in the client counts against the SLO too."""
    if not r.success:
        return False
    values = {"ttft": r.sched_ttft if from_schedule else r.ttft, "e2el": r.sched_e2el if from_schedule else r.e2el,
              "tpot": r.tpot if r.tpot is not None else 0.0}
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
        "request_goodput": sum(meets_slos(r, slos_ms) for r in records) / duration_s if slos_ms else None,
        "request_goodput_sched": sum(meets_slos(r, slos_ms, True) for r in records) / duration_s if slos_ms
        else None}
    metrics |= summarize("ttft", [r.ttft for r in ok if r.ttft is not None])
    metrics |= summarize("tpot", [r.tpot for r in ok if r.tpot is not None])
    metrics |= summarize("itl", [gap for r in ok for gap in r.itl])
    metrics |= summarize("e2el", [r.e2el for r in ok if r.e2el is not None])
    metrics |= summarize("queue_delay", [r.queue_delay for r in records if r.queue_delay is not None])
    metrics |= summarize("sched_ttft", [r.sched_ttft for r in ok if r.sched_ttft is not None])
    metrics |= summarize("sched_e2el", [r.sched_e2el for r in ok if r.sched_e2el is not None])
    metrics |= session_metrics(records)
    errors = Counter(r.error or "unknown" for r in records if not r.success)
    return metrics, dict(errors)


def _median_ms(values: list[float]) -> float | None:
    return float(np.median(values)) * 1e3 if values else None


def _p99_ms(values: list[float]) -> float | None:
    return float(np.percentile(values, 99)) * 1e3 if values else None


def windows(records: list[RequestRecord], duration_s: float, count: int = 10) -> list[dict[str, float | None]]:
    """The run cut into `count` equal windows by scheduled send time: the load offered in each and the
    latency it got (so a ramp shows latency against offered load, and a trace latency against time)."""
    if not records or duration_s <= 0:
        return []
    width = duration_s / count
    out = []
    for w in range(count):
        lo, hi = w * width, (w + 1) * width
        sent = [r for r in records if lo <= _sent_at(r) < hi or (w == count - 1 and _sent_at(r) >= hi)]
        ok = [r for r in sent if r.success]
        done = [r for r in records if r.success and lo <= r.start_time + (r.e2el or 0.0) < hi]
        out.append({"start_s": lo, "end_s": hi, "offered_rate": len(sent) / width, "sent": len(sent),
                    "failed": len(sent) - len(ok), "request_throughput": len(done) / width,
                    "output_throughput": sum(r.output_tokens for r in done) / width,
                    "median_ttft_ms": _median_ms([r.ttft for r in ok if r.ttft is not None]),
                    "p99_ttft_ms": _p99_ms([r.ttft for r in ok if r.ttft is not None]),
                    "median_tpot_ms": _median_ms([r.tpot for r in ok if r.tpot is not None]),
                    "median_e2el_ms": _median_ms([r.e2el for r in ok if r.e2el is not None]),
                    "mean_queue_delay_ms": float(np.mean([r.queue_delay for r in sent if r.queue_delay is not None]))
                    * 1e3 if any(r.queue_delay is not None for r in sent) else None})
    return out


def _sent_at(r: RequestRecord) -> float:
    return r.scheduled_time if r.scheduled_time is not None else r.start_time


def per_turn(records: list[RequestRecord]) -> list[dict[str, float | None]]:
    """Multi-turn: figures for each turn number; the prefix-cache hit rate where cached tokens are known."""
    turns = sorted({r.turn for r in records if r.turn is not None})
    out = []
    for t in turns:
        rs = [r for r in records if r.turn == t]
        ok = [r for r in rs if r.success]
        known = [r for r in ok if r.cached_tokens is not None and r.prompt_tokens]
        out.append({"turn": t, "requests": len(rs), "failed": len(rs) - len(ok),
                    "mean_prompt_tokens": float(np.mean([r.prompt_tokens for r in ok])) if ok else None,
                    "median_ttft_ms": _median_ms([r.ttft for r in ok if r.ttft is not None]),
                    "p99_ttft_ms": _p99_ms([r.ttft for r in ok if r.ttft is not None]),
                    "median_e2el_ms": _median_ms([r.e2el for r in ok if r.e2el is not None]),
                    "prefix_cache_hit_rate": sum(r.cached_tokens for r in known) / sum(r.prompt_tokens for r in known)
                    if known else None})
    return out


def session_metrics(records: list[RequestRecord]) -> dict[str, float | None]:
    """Multi-turn: how long sessions lasted (first send to last reply) and how many turns they got."""
    sessions: dict[int, list[RequestRecord]] = {}
    for r in records:
        if r.session is not None:
            sessions.setdefault(r.session, []).append(r)
    if not sessions:
        return {}
    spans = [max(r.start_time + (r.e2el or 0.0) for r in rs) - min(r.start_time for r in rs)
             for rs in sessions.values()]
    return {"sessions": len(sessions), "mean_session_duration_s": float(np.mean(spans)),
            "p99_session_duration_s": float(np.percentile(spans, 99)),
            "mean_turns_per_session": float(np.mean([len(rs) for rs in sessions.values()])),
            "sessions_completed": sum(all(r.success for r in rs) for rs in sessions.values())}
