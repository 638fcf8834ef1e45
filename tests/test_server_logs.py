"""The server's log, as vLLM's: the periodic engine stats line under load, a line per request, uvicorn's
access log; each silenced by its flag. Also `python -m engine.server.api_server` (vLLM's module path)."""
import concurrent.futures
import re
import time

import httpx
import pytest

from engine.messages import EngineStats
from engine.stat_logger import DEFAULT_INTERVAL_S, StatLogger, log_stats_interval, stats_line
from tests.server_process import ServerProcess

STATS = re.compile(r"Avg prompt throughput: ([\d.]+) tokens/s, Avg generation throughput: ([\d.]+) tokens/s, "
                   r"Running: (\d+) reqs, Waiting: (\d+) reqs, GPU KV cache usage: ([\d.]+)%, "
                   r"Prefix cache hit rate: ([\d.]+)%")
FLAGS = ("--max-model-len", "256", "--kv-cache-memory", "32MiB")
FAST_STATS = {"VLLM_LOG_STATS_INTERVAL": "0.5"}


def stats(running=0, waiting=0, usage=0.0, queries=0, hits=0, prompt=0, generated=0, steps=0) -> EngineStats:
    return EngineStats(num_running=running, num_waiting=waiting, kv_cache_usage=usage, num_gpu_blocks=100,
                       num_preemptions_total=0, prefix_cache_queries_total=queries, prefix_cache_hits_total=hits,
                       prompt_tokens_total=prompt, generation_tokens_total=generated, num_steps_total=steps,
                       scheduled_tokens_total=prompt + generated)


# ---------------------------------------------------------------- the line, by hand
def test_stats_line_over_an_interval():
    line = stats_line(stats(queries=100, hits=10, prompt=1000, generated=50),
                      stats(running=3, waiting=2, usage=0.4125, queries=300, hits=110, prompt=3000, generated=250), 2.0)
    assert line == ("Avg prompt throughput: 1000.0 tokens/s, Avg generation throughput: 100.0 tokens/s, "
                    "Running: 3 reqs, Waiting: 2 reqs, GPU KV cache usage: 41.2%, Prefix cache hit rate: 50.0%")
    assert "Prefix cache hit rate: 0.0%" in stats_line(stats(), stats(running=1), 1.0)  # no lookups: no division


def test_stat_logger_logs_while_busy_then_once_idle():
    now = [0.0]
    logger = StatLogger(10.0, clock=lambda: now[0])
    assert logger.observe(stats()) is None  # the baseline
    now[0] = 5.0
    assert not logger.due() and logger.observe(stats(running=1, steps=5)) is None  # not yet 10 s
    now[0] = 10.0
    busy = logger.observe(stats(running=2, generated=40, steps=20))
    assert busy and "Avg generation throughput: 4.0 tokens/s" in busy and "Running: 2 reqs" in busy
    now[0] = 20.0
    idle = logger.observe(stats(generated=40, steps=20))  # the work ended: one line says so
    assert idle and "Avg generation throughput: 0.0 tokens/s" in idle and "Running: 0 reqs" in idle
    now[0] = 30.0
    assert logger.observe(stats(generated=40, steps=20)) is None  # idle: silent


def test_interval_from_the_environment():
    assert log_stats_interval({}) == DEFAULT_INTERVAL_S == 10.0
    assert log_stats_interval({"VLLM_LOG_STATS_INTERVAL": "2.5"}) == 2.5
    for bad in ("0", "-1", "soon"):
        with pytest.raises(ValueError, match="VLLM_LOG_STATS_INTERVAL"):
            log_stats_interval({"VLLM_LOG_STATS_INTERVAL": bad})


def test_offline_llm_logs_stats_when_asked(monkeypatch, caplog):
    from engine import LLM, SamplingParams

    monkeypatch.setenv("VLLM_LOG_STATS_INTERVAL", "0.001")
    llm = LLM("tiny", max_model_len=128, kv_cache_memory=16 << 20, disable_log_stats=False)
    with caplog.at_level("INFO", logger="engine"):
        llm.generate(["a", "b"], SamplingParams(max_tokens=8, ignore_eos=True), use_tqdm=False)
    assert any(STATS.search(r.getMessage()) for r in caplog.records)


# ---------------------------------------------------------------- served
def load(url: str, count: int = 4, max_tokens: int = 24) -> list[int]:
    def one(i):
        body = {"model": "tiny", "prompt": f"request {i}", "max_tokens": max_tokens, "ignore_eos": True}
        return httpx.post(url + "/v1/completions", json=body, timeout=120).status_code

    with concurrent.futures.ThreadPoolExecutor(count) as pool:
        return list(pool.map(one, range(count)))


@pytest.mark.slow
def test_api_server_module_logs_stats_requests_and_access():
    srv = ServerProcess("tiny", *FLAGS, "--max-log-len", "7", module="engine.server.api_server", env=FAST_STATS)
    try:
        assert httpx.get(srv.url + "/health").status_code == 200
        assert load(srv.url) == [200] * 4
        time.sleep(1.5)  # the line that says the engine went idle
    finally:
        assert srv.stop() == 0
    out = srv.output()
    lines = [m for m in map(STATS.search, out.splitlines()) if m]
    # Under load: a line that sees requests running, and one that counts the tokens generated (the same
    # line only when the requests outlast an interval, which a fast machine does not guarantee).
    assert any(int(m[3]) >= 1 for m in lines) and any(float(m[2]) > 0 for m in lines), out[-3000:]
    assert int(lines[-1][3]) == 0 and int(lines[-1][4]) == 0  # the last one: idle
    assert out.count("Received request cmpl-") == 4 and out.count("Finished request cmpl-") == 4
    assert out.count("prompt: 'request', prompt tokens: ") == 4  # "request {i}" cut at --max-log-len 7
    assert re.search(r"Finished request cmpl-\S+: \d+ prompt \+ 24 generated tokens in [\d.]+ s \(finish reason: "
                     r"length\)", out)
    assert out.count('"POST /v1/completions HTTP/1.1" 200') == 4  # uvicorn's access log


@pytest.mark.slow
def test_log_flags_silence_their_lines():
    srv = ServerProcess("tiny", *FLAGS, "--disable-log-stats", "--disable-log-requests",
                        "--disable-uvicorn-access-log", env=FAST_STATS)
    try:
        assert load(srv.url) == [200] * 4
        time.sleep(1.5)
    finally:
        assert srv.stop() == 0
    out = srv.output()
    assert "engine ready" in out  # the log itself is on
    for silenced in ("Avg prompt throughput", "Received request", "Finished request", "POST /v1/completions"):
        assert silenced not in out, out[-3000:]
