"""Hostile and careless clients: every bad request gets OpenAI's error JSON, and the engine lives on."""
import json
import socket
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.server_process import ServerProcess

KEY = "K"
AUTH = {"Authorization": f"Bearer {KEY}"}
FAULT_REQUEST, FAULT_STEP = 4001, 4002  # prompts starting with these token ids fail (PAGEDBENCH_TEST_FAULTS)


@pytest.fixture(scope="module")
def server(monkeypatch_module):
    monkeypatch_module.setenv("PAGEDBENCH_TEST_FAULTS", f"request:{FAULT_REQUEST},step:{FAULT_STEP}")
    srv = ServerProcess("tiny", "--api-key", KEY, "--max-model-len", "256", "--kv-cache-memory", "64MiB",
                        "--enable-prefix-caching")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def metric(url: str, name: str, **labels) -> float:
    for family in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    raise KeyError(name)


def alive(url: str) -> None:
    assert httpx.get(url + "/health").status_code == 200
    r = httpx.post(url + "/v1/completions", headers=AUTH, json={"model": "tiny", "prompt": "ok", "max_tokens": 2})
    assert r.status_code == 200, r.text


CMPL, CHAT = "/v1/completions", "/v1/chat/completions"
CASES = [
    (CMPL, {"model": "tiny", "prompt": "hi", "max_tokens": 4, "top_k": 5000}, 200),  # clamped, as vLLM
    (CMPL, {"model": "tiny", "prompt": "hi", "max_tokens": 4, "min_tokens": 2, "stop_token_ids": [4096]}, 400),
    (CMPL, {"model": "tiny", "prompt": "hi", "max_tokens": 4, "stop_token_ids": [-1]}, 400),
    (CMPL, {"model": "tiny", "prompt": "hi", "seed": 2**64}, 400),
    (CMPL, {"model": "tiny", "prompt": "hi", "logprobs": 21}, 400),
    (CMPL, {"model": "tiny", "prompt": [999999]}, 400),
    (CMPL, {"model": "tiny", "prompt": []}, 400),
    (CMPL, {"model": "tiny", "prompt": "hi", "max_tokens": 100000}, 400),
    (CMPL, {"model": "tiny", "prompt": "hi", "n": 0}, 400),
    (CMPL, {"model": "tiny", "prompt": "hi", "temperature": -1}, 400),
    (CMPL, {"model": "other", "prompt": "hi"}, 404),
    (CMPL, {"model": "tiny", "prompt": "hi", "logit_bias": {"word": 1}}, 400),
    (CMPL, {"model": "tiny", "prompt": "hi", "logit_bias": {"99999": 1}}, 400),
    (CMPL, {"model": "tiny", "prompt": "hi", "logit_bias": {"5": 500}}, 400),
    (CMPL, {"model": "tiny", "prompt": "hi", "allowed_token_ids": [99999]}, 400),
    (CMPL, {"model": "tiny", "prompt": "hi", "allowed_token_ids": [5, 6], "max_tokens": 3}, 200),
    (CMPL, {"prompt": 5}, 400),
    (CHAT, {"model": "tiny", "messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, 400),
    (CHAT, {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "continue_final_message": True}, 400),
    (CHAT, {"model": "tiny", "messages": [{"role": "wizard", "content": "hi"}]}, 400),
    (CHAT, {"model": "tiny", "messages": []}, 400),
    (CHAT, {"model": "tiny", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400),
    (CHAT, {"model": "tiny", "messages": "hi"}, 400),
]


@pytest.mark.parametrize("path,body,status", CASES)
def test_hostile_json_bodies(server, path, body, status):
    r = httpx.post(server.url + path, headers=AUTH, json=body, timeout=30)
    assert r.status_code == status, r.text
    if status != 200:
        error = r.json()["error"]
        assert error["message"] and error["type"]
    alive(server.url)


@pytest.mark.parametrize("path,body,param", [
    (CMPL, {"model": "tiny", "prompt": "hi", "seed": 2**64}, "seed"),
    (CMPL, {"model": "tiny", "prompt": "hi", "temperature": -1}, "temperature"),
    (CMPL, {"model": "tiny", "prompt": "hi", "logprobs": 21}, "logprobs"),
    (CMPL, {"model": "tiny", "prompt": "hi", "stop_token_ids": [4096]}, "stop_token_ids"),
    (CHAT, {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 25},
     "top_logprobs"),
])
def test_errors_name_the_field(server, path, body, param):
    r = httpx.post(server.url + path, headers=AUTH, json=body, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    assert param in r.json()["error"]["message"]


@pytest.mark.parametrize("raw", [b"{not json", b"\xff\xfe\x00bad utf-8", b"[" * 100_000 + b"]" * 100_000, b""])
def test_unparseable_bodies_get_openai_errors(server, raw):
    r = httpx.post(server.url + CMPL, headers={**AUTH, "content-type": "application/json"}, content=raw, timeout=30)
    assert 400 <= r.status_code < 500 and "error" in r.json(), r.text
    alive(server.url)


def test_unknown_route_and_method_in_openai_format(server):
    assert httpx.get(server.url + "/v1/nothing", headers=AUTH).json()["error"]["code"] == "not_found"
    assert httpx.get(server.url + CMPL, headers=AUTH).status_code == 405
    assert httpx.post(server.url + CMPL, json={"model": "tiny", "prompt": "x"}).status_code == 401


def test_a_fault_in_one_request_fails_only_it(server):
    for token in (FAULT_REQUEST, FAULT_STEP):
        r = httpx.post(server.url + CMPL, headers=AUTH, json={"model": "tiny", "prompt": [token, 5, 6],
                                                              "max_tokens": 4}, timeout=30)
        assert r.status_code == 500 and "injected" in r.json()["error"]["message"], r.text
        alive(server.url)
    assert metric(server.url, "vllm:kv_cache_usage_perc") == 0.0


def test_abandoned_non_streamed_request_is_aborted(server):
    before = metric(server.url, "vllm:request_success_total", finished_reason="abort")
    body = json.dumps({"model": "tiny", "prompt": "go", "n": 4, "max_tokens": 240, "ignore_eos": True}).encode()
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                     + f"authorization: Bearer {KEY}\r\ncontent-length: {len(body)}\r\n\r\n".encode() + body)
        time.sleep(0.5)
    deadline = time.monotonic() + 10
    while metric(server.url, "vllm:request_success_total", finished_reason="abort") < before + 4:
        assert time.monotonic() < deadline, "the abandoned request was not aborted"
        time.sleep(0.2)
    # The API process counts the abort at once; the gauges come with the core's next message, after it
    # has freed the sequences' blocks.
    while metric(server.url, "vllm:num_requests_running") != 0 or metric(server.url, "vllm:kv_cache_usage_perc"):
        assert time.monotonic() < deadline, "the aborted sequences still hold the engine's KV blocks"
        time.sleep(0.1)


def worst_health_latency(url: str, busy) -> float:
    """The slowest /health answer while `busy` (a thread) runs, or for 1 s if it is None."""
    worst, end = 0.0, time.monotonic() + 1.0
    while busy.is_alive() if busy is not None else time.monotonic() < end:
        start = time.monotonic()
        httpx.get(url + "/health", timeout=5)
        worst = max(worst, time.monotonic() - start)
        time.sleep(0.02)
    return worst


def test_huge_prompt_does_not_stall_health(server):
    import threading

    result = {}

    def send():
        result["r"] = httpx.post(server.url + CMPL, headers=AUTH, json={"model": "tiny", "prompt": "word " * 200_000},
                                 timeout=60)

    t = threading.Thread(target=send)
    t.start()
    worst = worst_health_latency(server.url, t)
    t.join()
    assert result["r"].status_code == 400 and "context length" in result["r"].json()["error"]["message"]
    if worst >= 0.1:  # a loaded machine is slow anyway: the stall this guards against was 1-2.5 s
        assert worst < 2 * worst_health_latency(server.url, None) + 0.05, f"/health took {worst * 1e3:.0f} ms"


def test_long_prompt_within_the_char_bound_is_tokenized_off_the_loop(server):
    """Below the length bound a long text is tokenized in a worker thread and measured exactly."""
    r = httpx.post(server.url + CMPL, headers=AUTH, json={"model": "tiny", "prompt": "word " * 5_000}, timeout=60)
    assert r.status_code == 400 and "your prompt has" in r.json()["error"]["message"]


def test_reset_prefix_cache(server):
    prompt = "a shared prefix " * 8
    for _ in range(2):
        httpx.post(server.url + CMPL, headers=AUTH, json={"model": "tiny", "prompt": prompt, "max_tokens": 1})
    hits = metric(server.url, "vllm:prefix_cache_hits_total")
    assert hits > 0
    warm = httpx.post(server.url + CMPL, headers=AUTH, json={"model": "tiny", "prompt": prompt, "max_tokens": 1})
    assert warm.json()["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    hits = metric(server.url, "vllm:prefix_cache_hits_total")
    assert httpx.post(server.url + "/reset_prefix_cache").status_code == 401
    assert httpx.post(server.url + "/reset_prefix_cache", headers=AUTH).status_code == 200
    cold = httpx.post(server.url + CMPL, headers=AUTH, json={"model": "tiny", "prompt": prompt, "max_tokens": 1})
    assert cold.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert metric(server.url, "vllm:prefix_cache_hits_total") == hits  # cold again


def test_max_waiting_requests_sheds_load_with_429():
    srv = ServerProcess("tiny", "--max-num-seqs", "2", "--max-waiting-requests", "2", "--max-model-len", "2048",
                        "--kv-cache-memory", "64MiB")
    host, port = srv.url.removeprefix("http://").split(":")

    def blocker() -> socket.socket:  # a long streamed request on a raw socket, so the test can hang up at once
        body = json.dumps({"model": "tiny", "prompt": "hi", "max_tokens": 2000, "ignore_eos": True, "stream": True})
        sock = socket.create_connection((host, int(port)))
        sock.sendall(f"POST {CMPL} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n{body}".encode())
        return sock

    blockers: list[socket.socket] = []
    try:
        # Two streaming, then two waiting: the queue is full for as long as the blockers last (thousands of
        # steps), so every request below must be shed, however slowly a loaded machine sends them.
        blockers = [blocker(), blocker()]
        for sock in blockers:  # both streaming: no longer waiting for a first token in the server's count
            received = b""
            while b"data:" not in received:
                received += sock.recv(4096)
        blockers += [blocker(), blocker()]
        deadline = time.monotonic() + 60
        while metric(srv.url, "vllm:num_requests_waiting") < 2:
            assert time.monotonic() < deadline, "the last two blockers are not waiting"
            time.sleep(0.05)
        shed = httpx.post(srv.url + CMPL, json={"model": "tiny", "prompt": "hi", "max_tokens": 4}, timeout=60)
        assert shed.status_code == 429, shed.text
        assert shed.json()["error"]["type"] == "rate_limit_error"
        assert httpx.get(srv.url + "/health").status_code == 200
        from workbench.loadgen.config import ServeBenchConfig
        from workbench.loadgen.runner import run_serve_benchmark

        result = run_serve_benchmark(ServeBenchConfig(base_url=srv.url, model="tiny", num_prompts=12, input_len=8,
                                                      output_len=8, ignore_eos=True), progress=False)
        assert result.metrics["failed"] == 12 and result.metrics["completed"] == 0, result.metrics
        assert set(result.extra["errors"]) == {"RateLimitError:429"}, result.extra["errors"]
        for sock in blockers:  # hang up: the server aborts them and admits again
            sock.close()
        deadline = time.monotonic() + 60
        while metric(srv.url, "vllm:num_requests_running") + metric(srv.url, "vllm:num_requests_waiting") > 0:
            assert time.monotonic() < deadline, "the abandoned blockers were not aborted"
            time.sleep(0.05)
        again = httpx.post(srv.url + CMPL, json={"model": "tiny", "prompt": "hi", "max_tokens": 4}, timeout=60)
        assert again.status_code == 200, again.text
    finally:
        for sock in blockers:
            sock.close()
        srv.stop()
