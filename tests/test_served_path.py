"""The served path's process tree: the engine core process, several API processes, failure of
the core, hostile input, admission control, and a tripwire against a pathological slow path."""
import concurrent.futures
import json
import os
import signal
import time
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.server_process import ServerProcess

FLAGS = ("--max-model-len", "256", "--kv-cache-memory", "64MiB", "--max-num-seqs", "256")


def children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def core_pid(server: ServerProcess) -> int:
    for pid in children(server.proc.pid):
        if "resource_tracker" not in Path(f"/proc/{pid}/cmdline").read_text() and _is_core(pid):
            return pid
    raise AssertionError("no engine core child process")


def _is_core(pid: int) -> bool:
    return Path(f"/proc/{pid}/comm").read_text().strip().startswith(("python", "EngineCore", "pt_main"))


def samples(url: str, name: str) -> list:
    text = httpx.get(url + "/metrics").text
    return [s for f in text_string_to_metric_families(text) for s in f.samples if s.name == name]


def stream_tokens(url: str, max_tokens: int, timeout: float = 60, started=None) -> tuple[int, list[str]]:
    """Stream one completion; returns (completion tokens from usage, the finish reasons seen)."""
    body = {"model": "tiny", "prompt": "count with me", "max_tokens": max_tokens, "stream": True,
            "ignore_eos": True, "temperature": 0.0, "stream_options": {"include_usage": True}}
    usage, reasons = 0, []
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=timeout) as r:
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if started is not None:
                started.release()
                started = None
            if "error" in event:
                reasons.append("error")
            for choice in event.get("choices", []):
                if choice.get("finish_reason"):
                    reasons.append(choice["finish_reason"])
            if event.get("usage"):
                usage = event["usage"]["completion_tokens"]
    return usage, reasons


def test_the_engine_runs_in_its_own_process():
    srv = ServerProcess("tiny", *FLAGS)
    try:
        pid = core_pid(srv)
        assert pid != srv.proc.pid
        usage, reasons = stream_tokens(srv.url, 8)
        assert usage == 8 and reasons == ["length"]
    finally:
        assert srv.stop() == 0


def test_256_sequences_in_one_step_each_stream_complete_and_in_order():
    srv = ServerProcess("tiny", *FLAGS)
    try:
        with concurrent.futures.ThreadPoolExecutor(64) as pool:
            results = list(pool.map(lambda _: stream_tokens(srv.url, 12), range(256)))
        assert all(r == (12, ["length"]) for r in results), results[:3]
        # One request of n=256: every sample's chunks arrive, each sample in order.
        body = {"model": "tiny", "prompt": "x", "max_tokens": 6, "n": 256, "stream": True, "ignore_eos": True}
        seen: dict[int, int] = {}
        with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    for c in json.loads(line[6:])["choices"]:
                        assert seen.get(c["index"], 0) >= 0
                        seen[c["index"]] = seen.get(c["index"], 0) + 1
        assert sorted(seen) == list(range(256))
    finally:
        srv.stop()


def test_core_killed_under_load_fails_requests_and_exits_nonzero():
    import threading

    srv = ServerProcess("tiny", "--max-model-len", "2048", "--kv-cache-memory", "64MiB")
    started = threading.Semaphore(0)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(stream_tokens, srv.url, 2000, 60, started) for _ in range(8)]
        for _ in range(8):  # every stream has its first chunk: all are mid-way
            assert started.acquire(timeout=60)
        os.kill(core_pid(srv), signal.SIGKILL)
        start = time.monotonic()
        outcomes = [f.result(timeout=20) for f in futures]
    assert time.monotonic() - start < 10, "in-flight requests must fail at once, not hang"
    assert all("error" in reasons and usage == 0 for usage, reasons in outcomes), outcomes
    code = srv.proc.wait(20)
    assert code == 1, f"the server must exit non-zero when its core dies, got {code}"
    assert "engine core process has exited" in srv.output()


def test_two_api_processes_share_the_port_and_the_metrics():
    srv = ServerProcess("tiny", *FLAGS, "--api-server-count", "2")
    try:
        answered = set()
        for _ in range(40):  # a new connection each time: the kernel spreads them over the processes
            answered.add(httpx.get(srv.url + "/version", headers={"connection": "close"}).json()["api_server"])
        assert answered == {0, 1}
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
        for i in range(10):
            httpx.post(srv.url + "/v1/completions", json={"model": "tiny", "prompt": f"p{i}", "max_tokens": 3,
                                                           "ignore_eos": True}, headers={"connection": "close"})
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        for _ in range(4):  # whichever process answers the scrape, it counts every request
            done = sum(s.value for s in samples(srv.url, "vllm:request_success_total"))
            e2e = [s.value for s in samples(srv.url, "vllm:e2e_request_latency_seconds_count")]
            gen = [s.value for s in samples(srv.url, "vllm:generation_tokens_total")]
            assert done == 11 and e2e == [11] and gen == [32]
    finally:
        assert srv.stop() == 0


@pytest.mark.slow
def test_served_path_is_not_pathological_on_cpu(tmp_path):
    """A tripwire, not the target (the GPU figures are): on 2 CPU cores the served path measured 0.71
    of offline on this workload; the old one-process server was at 1/12 on the GPU. The best of two
    attempts counts: a systematic slow path fails both, while one run squeezed by another process on
    the 2 cores (torch's threads in the core starve; 0.09 was seen so) does not fail CI."""
    from workbench.bench.compare import main

    ratios = []
    for attempt in range(2):
        out = tmp_path / f"compare{attempt}.json"
        assert main(["--model", "tiny", "--num-prompts", "64", "--input-len", "192", "--output-len", "32",
                     "--warmup", "8", "--output-json", str(out), "--max-model-len", "256",
                     "--max-num-seqs", "64"]) == 0
        served = json.loads((tmp_path / f"compare{attempt}" / "served.json").read_text())
        assert {r["prompt_tokens"] for r in served["requests"]} == {192}, "random prompts must be exact"
        assert served["metrics"]["completed"] == 64
        ratios.append(json.loads(out.read_text())["served_over_offline"])
        if ratios[-1] >= 0.5:
            break
    assert max(ratios) >= 0.5, ratios
