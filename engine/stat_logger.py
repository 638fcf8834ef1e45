"""The periodic engine stats line vLLM users watch in a server's log:

    Avg prompt throughput: 812.4 tokens/s, Avg generation throughput: 95.1 tokens/s, Running: 12 reqs,
    Waiting: 3 reqs, GPU KV cache usage: 41.2%, Prefix cache hit rate: 37.5%

Every VLLM_LOG_STATS_INTERVAL seconds (vLLM's variable and default, 10 s) while the engine has work,
plus one line when it falls idle, so that the last figures are not left standing; nothing while idle.
Throughputs and the hit rate are over the interval since the previous line; the counts and the KV
usage are the moment's. The server logs it unless --disable-log-stats; offline, LLM(...,
disable_log_stats=False) does. It is computed from the counters the engine keeps anyway (EngineStats)."""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

from engine.config import ConfigError
from engine.messages import EngineStats

log = logging.getLogger("engine")

INTERVAL_ENV = "VLLM_LOG_STATS_INTERVAL"
DEFAULT_INTERVAL_S = 10.0


def log_stats_interval(environ=os.environ) -> float:
    text = environ.get(INTERVAL_ENV, "").strip()
    if not text:
        return DEFAULT_INTERVAL_S
    try:
        interval = float(text)
    except ValueError:
        interval = 0.0
    if not interval > 0:
        raise ConfigError(f"{INTERVAL_ENV}={text!r} must be a number of seconds above 0")
    return interval


def stats_line(before: EngineStats, now: EngineStats, seconds: float) -> str:
    queries = now.prefix_cache_queries_total - before.prefix_cache_queries_total
    hits = now.prefix_cache_hits_total - before.prefix_cache_hits_total
    return (f"Avg prompt throughput: {(now.prompt_tokens_total - before.prompt_tokens_total) / seconds:.1f} tokens/s, "
            f"Avg generation throughput: "
            f"{(now.generation_tokens_total - before.generation_tokens_total) / seconds:.1f} tokens/s, "
            f"Running: {now.num_running} reqs, Waiting: {now.num_waiting} reqs, "
            f"GPU KV cache usage: {100 * now.kv_cache_usage:.1f}%, "
            f"Prefix cache hit rate: {100 * hits / queries if queries else 0.0:.1f}%")


def _active(before: EngineStats, now: EngineStats) -> bool:
    return bool(now.num_running or now.num_waiting or now.num_steps_total != before.num_steps_total)


class StatLogger:
    def __init__(self, interval: float, clock: Callable[[], float] = time.monotonic):
        self.interval = interval
        self.clock = clock
        self._last: EngineStats | None = None
        self._last_time = 0.0
        self._was_active = False

    def due(self) -> bool:
        return self._last is None or self.clock() - self._last_time >= self.interval

    def observe(self, stats: EngineStats) -> str | None:
        """Log a line if one is due and there was work; returns it (None if nothing was logged)."""
        now = self.clock()
        if self._last is None:  # the baseline: the first interval starts here
            self._last, self._last_time = stats, now
            return None
        if now - self._last_time < self.interval:
            return None
        active = _active(self._last, stats)
        line = stats_line(self._last, stats, now - self._last_time) if active or self._was_active else None
        self._last, self._last_time, self._was_active = stats, now, active
        if line is not None:
            log.info(line)
        return line
