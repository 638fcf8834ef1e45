"""What the server itself reports, read over HTTP as any vLLM-compatible server offers it: `/metrics`
(scraped before and after a run for counter deltas, and sampled every second during it) and
`POST /reset_prefix_cache` (so that sweep points start with a cold cache)."""
from __future__ import annotations

import asyncio
import time

import httpx
from prometheus_client.parser import text_string_to_metric_families

# vLLM's names (ours match), without the "vllm:" prefix; counters carry _total in the exposition.
GAUGES = {"kv_cache_usage": ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"),
          "running": ("vllm:num_requests_running",), "waiting": ("vllm:num_requests_waiting",)}
COUNTERS = {"preemptions": "vllm:num_preemptions_total", "prefix_cache_queries": "vllm:prefix_cache_queries_total",
            "prefix_cache_hits": "vllm:prefix_cache_hits_total", "prompt_tokens": "vllm:prompt_tokens_total",
            "generation_tokens": "vllm:generation_tokens_total",
            "spec_decode_num_drafts": "vllm:spec_decode_num_drafts_total",
            "spec_decode_num_draft_tokens": "vllm:spec_decode_num_draft_tokens_total",
            "spec_decode_num_accepted_tokens": "vllm:spec_decode_num_accepted_tokens_total"}
SAMPLE_EVERY_S = 1.0


def _headers(api_key: str | None) -> dict:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> our short names (summed over labels); names the server lacks are absent."""
    raw: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            raw[s.name] = raw.get(s.name, 0.0) + s.value
    out = {short: raw[name] for short, name in COUNTERS.items() if name in raw}
    for short, names in GAUGES.items():
        found = next((n for n in names if n in raw), None)
        if found:
            out[short] = raw[found]
    return out


def scrape(base_url: str, api_key: str | None = None) -> dict[str, float] | None:
    """One scrape; None when the server has no (Prometheus) /metrics."""
    try:
        r = httpx.get(base_url.rstrip("/") + "/metrics", headers=_headers(api_key), timeout=5)
        return parse_metrics(r.text) if r.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return None


def counter_deltas(before: dict | None, after: dict | None) -> dict[str, float]:
    """What the server counted during the run, and the run's prefix-cache hit rate (hit tokens over
    looked-up tokens, as vLLM defines it)."""
    if not before or not after:
        return {}
    out = {f"server_{k}": after[k] - before[k] for k in COUNTERS if k in before and k in after}
    queries = out.get("server_prefix_cache_queries")
    if queries:
        out["prefix_cache_hit_rate"] = out.get("server_prefix_cache_hits", 0.0) / queries
    drafts, draft_tokens = out.get("server_spec_decode_num_drafts"), out.get("server_spec_decode_num_draft_tokens")
    if drafts and draft_tokens:  # vLLM's definitions (workbench/bench/throughput.spec_decode_metrics)
        accepted = out.get("server_spec_decode_num_accepted_tokens", 0.0)
        out["spec_decode_acceptance_rate"] = accepted / draft_tokens
        out["spec_decode_mean_accepted_length"] = 1 + accepted / drafts
    return out


async def sample_metrics(base_url: str, api_key: str | None, start: float, stop: asyncio.Event,
                         samples: list[dict], every: float = SAMPLE_EVERY_S) -> None:
    """Append {t, kv_cache_usage, running, waiting, preemptions} every `every` seconds until `stop`;
    gives up quietly on a server without /metrics."""
    async with httpx.AsyncClient(headers=_headers(api_key), timeout=5) as client:
        while not stop.is_set():
            t = time.perf_counter() - start
            try:
                r = await client.get(base_url.rstrip("/") + "/metrics")
                if r.status_code != 200:
                    return
                values = parse_metrics(r.text)
            except (httpx.HTTPError, ValueError):
                return
            samples.append({"t": round(t, 3)} | {k: values[k] for k in (*GAUGES, "preemptions") if k in values})
            try:
                await asyncio.wait_for(stop.wait(), timeout=every)
            except TimeoutError:
                pass


def reset_prefix_cache(base_url: str, api_key: str | None = None) -> bool:
    """POST /reset_prefix_cache (vLLM's semantics). True on 200; False when the server does not have it
    (404/405); any other answer raises RuntimeError, since the next point would not start cold."""
    try:
        r = httpx.post(base_url.rstrip("/") + "/reset_prefix_cache", headers=_headers(api_key), timeout=30)
    except httpx.HTTPError as exc:
        raise RuntimeError(f"POST /reset_prefix_cache failed: {type(exc).__name__}: {exc}") from None
    if r.status_code == 200:
        return True
    if r.status_code in (404, 405):
        return False
    raise RuntimeError(f"POST /reset_prefix_cache answered {r.status_code}: {r.text[:200]}")
