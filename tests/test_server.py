"""The OpenAI-compatible server as a real process, driven by the official openai client."""
import asyncio
import signal
import socket
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.server_process import ServerProcess

FLAGS = ("--max-model-len", "512", "--kv-cache-memory", "64MiB", "--max-num-seqs", "64", "--enable-prefix-caching")
GREEDY = {"temperature": 0.0}


@pytest.fixture(scope="module")
def server():
    srv = ServerProcess("tiny", *FLAGS)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def metric(server, name: str, **labels) -> float:
    text = httpx.get(server.url + "/metrics").text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    raise KeyError(name)


def test_completion_and_usage(server, client):
    res = client.completions.create(model="tiny", prompt="Hello there", max_tokens=7, extra_body={"ignore_eos": True},
                                    **GREEDY)
    count = httpx.post(server.url + "/tokenize", json={"prompt": "Hello there"}).json()["count"]
    assert res.usage.prompt_tokens == count and res.usage.completion_tokens == 7
    assert res.usage.total_tokens == count + 7 and res.choices[0].finish_reason == "length"


def test_chat_streamed_equals_non_streamed(client):
    messages = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Tell me about 🙂 and 中文."}]
    full = client.chat.completions.create(model="tiny", messages=messages, max_tokens=24, **GREEDY)
    chunks = client.chat.completions.create(model="tiny", messages=messages, max_tokens=24, stream=True,
                                            stream_options={"include_usage": True}, **GREEDY)
    text, usage, finish = "", None, None
    for chunk in chunks:
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
    assert text == full.choices[0].message.content
    assert usage.completion_tokens == full.usage.completion_tokens and usage.prompt_tokens == full.usage.prompt_tokens
    assert finish == full.choices[0].finish_reason


def test_completions_stream_equals_non_streamed_with_stop(client):
    base = client.completions.create(model="tiny", prompt="Once upon", max_tokens=20, **GREEDY).choices[0].text
    stop = base[5:8]
    full = client.completions.create(model="tiny", prompt="Once upon", max_tokens=20, stop=[stop], **GREEDY)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt="Once upon", max_tokens=20, stop=[stop], stream=True, **GREEDY) if c.choices)
    assert streamed == full.choices[0].text == base[:base.index(stop)]


def test_n_logprobs_and_batch_prompts(client):
    res = client.completions.create(model="tiny", prompt=["a b c", "d e f"], n=2, max_tokens=3, logprobs=2,
                                    temperature=1.0, seed=3)
    assert sorted(c.index for c in res.choices) == [0, 1, 2, 3]
    lp = res.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == 3 and all(len(t) >= 1 for t in lp.top_logprobs)
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                          logprobs=True, top_logprobs=2, **GREEDY)
    content = chat.choices[0].logprobs.content
    assert len(content) == 3 and len(content[0].top_logprobs) == 2


def test_async_client_64_concurrent_streams(server):
    async def one(client, i):
        stream = await client.completions.create(model="tiny", prompt=f"Request {i}", max_tokens=16 + i % 5,
                                                 stream=True, extra_body={"ignore_eos": True},
                                                 stream_options={"include_usage": True})
        usage = None
        async for chunk in stream:
            usage = chunk.usage or usage
        return usage.completion_tokens, 16 + i % 5

    async def main():
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        return await asyncio.gather(*(one(client, i) for i in range(64)))

    results = asyncio.run(main())
    assert all(got == want for got, want in results)


def test_disconnect_frees_kv_cache(server):
    aborted_before = metric(server, "vllm:request_success_total", finished_reason="abort")
    body = {"model": "tiny", "prompt": "long one", "max_tokens": 500, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()  # held, not abandoned: dropping the iterator closes the connection
        next(lines), next(lines)
        assert metric(server, "vllm:kv_cache_usage_perc") > 0
    deadline = time.monotonic() + 20
    while metric(server, "vllm:kv_cache_usage_perc") > 0 or metric(server, "vllm:num_requests_running") > 0:
        assert time.monotonic() < deadline, "the aborted request still holds KV blocks"
        time.sleep(0.2)
    # It ended by abort, not by running to its 500 tokens.
    assert metric(server, "vllm:request_success_total", finished_reason="abort") == aborted_before + 1


BAD_INPUTS = [
    ("/v1/completions", b"{not json", 400),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": "many"}, 400),
    ("/v1/completions", {"model": "nope", "prompt": "x"}, 404),
    ("/v1/completions", {"model": "tiny", "prompt": "word " * 600, "max_tokens": 1}, 400),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 100000}, 400),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 0}, 400),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "n": 100000}, 400),
    ("/v1/completions", {"model": "tiny", "prompt": ""}, 400),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "temperature": -1}, 400),
    ("/v1/chat/completions", {"model": "tiny", "messages": []}, 400),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "wizard", "content": "hi"}]}, 400),
    ("/v1/chat/completions", {"model": "tiny"}, 400),
]


@pytest.mark.parametrize("path,body,status", BAD_INPUTS)
def test_bad_input_gets_openai_error(server, path, body, status):
    kwargs = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) \
        else {"json": body}
    r = httpx.post(server.url + path, timeout=30, **kwargs)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert httpx.get(server.url + "/health").status_code == 200


def test_tokenize_detokenize_version_models(server):
    toks = httpx.post(server.url + "/tokenize", json={"prompt": "héllo 🙂"}).json()
    assert httpx.post(server.url + "/detokenize", json={"tokens": toks["tokens"]}).json()["prompt"] == "héllo 🙂"
    chat = httpx.post(server.url + "/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()
    assert chat["count"] > 3 and chat["max_model_len"] == 512
    assert httpx.get(server.url + "/version").json()["version"]
    models = httpx.get(server.url + "/v1/models").json()
    assert models["data"][0]["id"] == "tiny"


def test_metrics_parse_and_move(server, client):
    before = metric(server, "vllm:generation_tokens_total", model_name="tiny")
    client.completions.create(model="tiny", prompt="metrics", max_tokens=5, extra_body={"ignore_eos": True})
    assert metric(server, "vllm:generation_tokens_total", model_name="tiny") >= before + 5
    names = {f.name for f in text_string_to_metric_families(httpx.get(server.url + "/metrics").text)}
    for name in ["vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:gpu_cache_usage_perc",
                 "vllm:cpu_cache_usage_perc", "vllm:kv_cache_usage_perc", "vllm:prompt_tokens",
                 "vllm:generation_tokens", "vllm:time_to_first_token_seconds", "vllm:inter_token_latency_seconds",
                 "vllm:e2e_request_latency_seconds", "vllm:request_success", "vllm:num_preemptions",
                 "vllm:prefix_cache_queries", "vllm:prefix_cache_hits"]:
        assert name in names, name
    assert metric(server, "vllm:time_to_first_token_seconds_count") > 0
    assert metric(server, "vllm:request_success_total", finished_reason="length") > 0


def test_api_key_and_graceful_shutdown():
    srv = ServerProcess("tiny", "--api-key", "sekret", "--max-model-len", "256", "--kv-cache-memory", "32MiB")
    try:
        r = httpx.get(srv.url + "/v1/models")
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert httpx.get(srv.url + "/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert httpx.get(srv.url + "/health").status_code == 200
        assert httpx.get(srv.url + "/metrics").status_code == 200
        ok = openai.OpenAI(base_url=srv.url + "/v1", api_key="sekret", max_retries=0)
        assert ok.completions.create(model="tiny", prompt="hi", max_tokens=2).choices
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=srv.url + "/v1", api_key="nope", max_retries=0).models.list()
    finally:
        code = srv.stop(signal.SIGTERM)
    out = srv.output()
    assert code == 0, out
    assert "Traceback" not in out
    with socket.socket() as s:  # the port is free again for a new server (which sets SO_REUSEADDR, as uvicorn does)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", srv.port))
        s.listen()


def test_bad_flags_exit_cleanly():
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "engine.server", "tiny", "--distributed-executor-backend", "ray"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "distributed_executor_backend" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "engine.server", "no-such-model"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and "neither a model directory nor a preset" in r.stderr
