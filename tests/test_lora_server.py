"""LoRA through the server: adapters by name (--lora-modules), /v1/models, runtime load and unload
(vLLM's endpoints, behind the API key and VLLM_ALLOW_RUNTIME_LORA_UPDATING), reuse of a name, and a
bad adapter that leaves the server healthy."""
import json
import os

import httpx
import pytest

from engine.model_loader import load_tokenizer
from tests.engine_helpers import model_dir, random_prompts
from tests.lora_helpers import adapter_dir, peft_greedy
from tests.server_process import ServerProcess

KEY = {"Authorization": "Bearer k"}


@pytest.fixture(scope="module")
def server():
    os.environ["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    try:
        proc = ServerProcess("tiny", "--enable-lora", "--max-loras", "2", "--api-key", "k", "--api-server-count", "2",
                             "--lora-modules", f"qv8={adapter_dir('tiny', 'qv8')}",
                             json.dumps({"name": "all16", "path": str(adapter_dir("tiny", "all16")),
                                         "base_model_name": "tiny"}))
    finally:
        del os.environ["VLLM_ALLOW_RUNTIME_LORA_UPDATING"]
    yield proc
    proc.stop()


def complete(server, model: str, prompt: list[int], max_tokens: int = 8) -> httpx.Response:
    return httpx.post(server.url + "/v1/completions", headers=KEY, timeout=60, json={
        "model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True})


def models(server) -> dict[str, dict]:
    r = httpx.get(server.url + "/v1/models", headers=KEY)
    assert r.status_code == 200
    return {m["id"]: m for m in r.json()["data"]}


def test_models_lists_adapters_with_their_parent(server):
    cards = models(server)
    assert set(cards) == {"tiny", "qv8", "all16"}
    assert cards["qv8"]["parent"] == "tiny" and cards["all16"]["parent"] == "tiny"
    assert cards["qv8"]["root"] == str(adapter_dir("tiny", "qv8"))


def test_the_model_field_picks_the_adapter(server):
    prompt = random_prompts(1, 4000, seed=21)[0]
    tokenizer = load_tokenizer(model_dir("tiny"))
    for name in ["qv8", "all16", "tiny"]:
        r = complete(server, name, prompt)
        assert r.status_code == 200, r.text
        assert r.json()["model"] == name
        want = peft_greedy("tiny", None if name == "tiny" else name, prompt, 8)
        assert r.json()["choices"][0]["text"] == tokenizer.decode(want)
    r = complete(server, "nope", prompt)
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"


def test_load_use_unload_and_reuse_a_name(server):
    prompt = random_prompts(1, 4000, seed=22)[0]
    tokenizer = load_tokenizer(model_dir("tiny"))
    load = lambda name, path: httpx.post(server.url + "/v1/load_lora_adapter", headers=KEY,  # noqa: E731
                                         json={"lora_name": name, "lora_path": str(path)})
    unload = lambda name: httpx.post(server.url + "/v1/unload_lora_adapter", headers=KEY,  # noqa: E731
                                     json={"lora_name": name})
    r = load("runtime", adapter_dir("tiny", "mlp4rs"))
    assert r.status_code == 200 and "added successfully" in r.text
    assert "runtime" in models(server)  # every API process knows it (two here)
    for _ in range(4):  # requests spread over both API processes
        r = complete(server, "runtime", prompt)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == tokenizer.decode(
            peft_greedy("tiny", "mlp4rs", prompt, 8))
    assert load("runtime", adapter_dir("tiny", "k1")).status_code == 400  # the name is taken
    assert unload("runtime").status_code == 200
    assert "runtime" not in models(server)
    assert complete(server, "runtime", prompt).status_code == 404
    assert unload("runtime").status_code == 404
    # The name again, for another adapter; then replaced in place (vLLM's load_inplace).
    assert load("runtime", adapter_dir("tiny", "k1")).status_code == 200
    r = complete(server, "runtime", prompt)
    assert r.json()["choices"][0]["text"] == tokenizer.decode(peft_greedy("tiny", "k1", prompt, 8))
    r = httpx.post(server.url + "/v1/load_lora_adapter", headers=KEY, json={
        "lora_name": "runtime", "lora_path": str(adapter_dir("tiny", "qv8")), "load_inplace": True})
    assert r.status_code == 200
    r = complete(server, "runtime", prompt)
    assert r.json()["choices"][0]["text"] == tokenizer.decode(peft_greedy("tiny", "qv8", prompt, 8))
    r = httpx.post(server.url + "/tokenize", headers=KEY, json={"model": "runtime", "prompt": "hello"})
    assert r.status_code == 200 and r.json()["count"] > 0
    assert unload("runtime").status_code == 200


@pytest.mark.parametrize("body,fragment", [
    ({"lora_name": "bad", "lora_path": "/nonexistent/adapter"}, "is not a directory"),
    ({"lora_name": "bad", "lora_path": str(model_dir("tiny"))}, "no adapter_config.json"),
    ({"lora_name": "qv8", "lora_path": "/x"}, "already been loaded"),
    ({"lora_name": "tiny", "lora_path": "/x"}, "base model's name"),
    ({"lora_name": "bad"}, "lora_path"),
])
def test_a_bad_adapter_leaves_the_server_healthy(server, body, fragment):
    r = httpx.post(server.url + "/v1/load_lora_adapter", headers=KEY, json=body)
    assert r.status_code == 400, r.text
    assert fragment in r.json()["error"]["message"]
    assert httpx.get(server.url + "/health").status_code == 200
    assert complete(server, "tiny", [11, 12, 13]).status_code == 200
    assert "bad" not in models(server)


def test_rank_too_large_is_refused(server, tmp_path):
    from engine.lora.synthetic import write_adapter

    write_adapter(model_dir("tiny"), tmp_path / "r32", rank=32)
    r = httpx.post(server.url + "/v1/load_lora_adapter", headers=KEY,
                   json={"lora_name": "r32", "lora_path": str(tmp_path / "r32")})
    assert r.status_code == 400 and "max_lora_rank" in r.json()["error"]["message"]


def test_endpoints_need_the_key(server):
    r = httpx.post(server.url + "/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "/x"})
    assert r.status_code == 401


@pytest.mark.slow
def test_runtime_updates_are_off_by_default_and_bad_modules_stop_the_start(tmp_path):
    proc = ServerProcess("tiny", "--enable-lora", "--lora-modules", f"qv8={adapter_dir('tiny', 'qv8')}")
    try:
        r = httpx.post(proc.url + "/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "/x"})
        assert r.status_code == 404  # no such route without VLLM_ALLOW_RUNTIME_LORA_UPDATING
        assert "qv8" in {m["id"] for m in httpx.get(proc.url + "/v1/models").json()["data"]}
    finally:
        proc.stop()
    with pytest.raises(RuntimeError, match="--lora-modules broken: .*no adapter_config.json"):
        ServerProcess("tiny", "--enable-lora", "--lora-modules", f"broken={tmp_path}")
    with pytest.raises(RuntimeError, match="--lora-modules needs --enable-lora"):
        ServerProcess("tiny", "--lora-modules", f"qv8={adapter_dir('tiny', 'qv8')}")
