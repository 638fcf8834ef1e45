"""Prometheus metrics under the names vLLM users scrape, labelled model_name."""
from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from engine.output_processor import RequestState

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0)


class StatsCollector:
    """Gauges and counters read from the engine's latest stats snapshot at scrape time."""

    def __init__(self, model_name: str, stats_fn):
        self.model_name = model_name
        self.stats_fn = stats_fn

    def collect(self):
        s = self.stats_fn()
        label = [self.model_name]

        def gauge(name, doc, value):
            g = GaugeMetricFamily(name, doc, labels=["model_name"])
            g.add_metric(label, value)
            return g

        def counter(name, doc, value):
            c = CounterMetricFamily(name, doc, labels=["model_name"])
            c.add_metric(label, value)
            return c

        yield gauge("vllm:num_requests_running", "Sequences in the running batch.", s.num_running)
        yield gauge("vllm:num_requests_waiting", "Sequences waiting to be scheduled.", s.num_waiting)
        yield gauge("vllm:kv_cache_usage_perc", "Fraction of KV-cache blocks in use (1 = 100%).", s.kv_cache_usage)
        yield gauge("vllm:gpu_cache_usage_perc", "Fraction of device KV-cache blocks in use (older name).",
                    s.kv_cache_usage)
        yield gauge("vllm:cpu_cache_usage_perc", "Swap-space usage; this engine recomputes instead of swapping, "
                    "so always 0.", 0.0)
        yield counter("vllm:num_preemptions", "Preemptions (by recompute).", s.num_preemptions_total)
        yield counter("vllm:prompt_tokens", "Prompt tokens processed.", s.prompt_tokens_total)
        yield counter("vllm:generation_tokens", "Tokens generated.", s.generation_tokens_total)
        yield counter("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                      s.prefix_cache_queries_total)
        yield counter("vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache.", s.prefix_cache_hits_total)
        if s.spec_decode_num_accepted_tokens_per_pos:  # speculative decoding is on
            yield from spec_decode_counters(label, s)


def spec_decode_counters(label: list[str], s):
    """vLLM's speculative-decoding counters (acceptance rate = accepted / draft tokens; mean accepted
    length = 1 + accepted / drafts)."""
    for name, doc, value in (
            ("vllm:spec_decode_num_drafts", "Verification steps of a request with drafts.",
             s.spec_decode_num_drafts_total),
            ("vllm:spec_decode_num_draft_tokens", "Draft tokens verified.", s.spec_decode_num_draft_tokens_total),
            ("vllm:spec_decode_num_accepted_tokens", "Draft tokens accepted.",
             s.spec_decode_num_accepted_tokens_total)):
        c = CounterMetricFamily(name, doc, labels=["model_name"])
        c.add_metric(label, value)
        yield c
    c = CounterMetricFamily("vllm:spec_decode_num_accepted_tokens_per_pos", "Draft tokens accepted, by position "
                            "in the draft (0 = the first).", labels=["model_name", "position"])
    for pos, value in enumerate(s.spec_decode_num_accepted_tokens_per_pos):
        c.add_metric([*label, str(pos)], value)
    yield c


class ServerMetrics:
    """Request histograms and counters, observed in the API process that serves each request, plus
    the engine's gauges and counters from the core's latest stats.

    With several API processes (`--api-server-count`), the request metrics go through Prometheus'
    multiprocess mode (PROMETHEUS_MULTIPROC_DIR, set by the launcher), so a scrape of any process
    sums all of them; the engine's figures come once, from the core's stats that every process holds.
    """

    def __init__(self, model_name: str, stats_fn, multiprocess: bool = False):
        self.registry = CollectorRegistry()
        self.model_name = model_name
        self.registry.register(StatsCollector(model_name, stats_fn))
        target = self.registry
        if multiprocess:
            from prometheus_client import multiprocess as mp

            mp.MultiProcessCollector(self.registry)
            target = None  # written to the shared files, read back through the collector
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Time to first token.", ["model_name"],
                              buckets=TTFT_BUCKETS, registry=target).labels(model_name)
        self.itl = Histogram("vllm:inter_token_latency_seconds", "Time between tokens.", ["model_name"],
                             buckets=ITL_BUCKETS, registry=target).labels(model_name)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "End-to-end request latency.", ["model_name"],
                             buckets=E2E_BUCKETS, registry=target).labels(model_name)
        self.success = Counter("vllm:request_success", "Finished requests by finish reason.",
                               ["model_name", "finished_reason"], registry=target)
        for reason in ("stop", "length", "abort", "error"):
            self.success.labels(model_name, reason)
        self._last_token: dict[str, tuple[float, int]] = {}  # request id -> (time, tokens so far)

    def observe(self, states: list[RequestState]) -> None:
        """Called once per engine step with the requests that moved in it."""
        now = time.monotonic()
        for state in states:
            tokens = sum(len(s.token_ids) for s in state.samples)
            last = self._last_token.get(state.request_id)
            if last is None and tokens:
                self.ttft.observe(now - state.metrics.arrival_time)
            elif last is not None and tokens > last[1]:
                gap = (now - last[0]) / (tokens - last[1])
                for _ in range(tokens - last[1]):
                    self.itl.observe(gap)
            self._last_token[state.request_id] = (now, tokens)
            if state.finished:
                self._last_token.pop(state.request_id, None)
                self.e2e.observe(now - state.metrics.arrival_time)
                for sample in state.samples:
                    self.success.labels(self.model_name, sample.finish_reason or "abort").inc()
