"""LoRA in the workbench: `models lora`, `bench throughput --lora-modules --compare-base`, `bench serve
--lora-names` against a real server, and `bench lora-load`."""
from __future__ import annotations

import json
import os

import httpx
import pytest
from typer.testing import CliRunner

from tests.lora_helpers import adapter_dir
from tests.server_process import ServerProcess
from workbench.cli import app
from workbench.results import BenchResult

SMALL_ENGINE = ["--model", "tiny", "--max-model-len", "128", "--kv-cache-memory", "8MiB", "--device", "cpu"]


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def test_models_lora_writes_a_peft_adapter(tmp_path):
    r = invoke("models", "lora", "tiny", "--rank", "4", "--targets", "q,v,down", "--alpha", "8", "--seed", "2",
               "--out", str(tmp_path / "a"))
    assert r.exit_code == 0, r.output
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["target_modules"] == ["q_proj", "v_proj", "down_proj"] and cfg["lora_alpha"] == 8
    for args, message in [(["--rank", "0"], "--rank must be at least 1"), (["--rank", "4", "--targets", "q,embed"],
                                                                          "unknown projection(s) embed")]:
        r = invoke("models", "lora", "tiny", *args, "--out", str(tmp_path / "b"))
        assert r.exit_code == 2 and message in r.output
    r = invoke("models", "lora", "tiny", "--rank", "4", "--out", str(tmp_path / "a"))
    assert r.exit_code == 1 and "not empty" in r.output


def test_throughput_spreads_over_adapters_and_compares_with_the_base(tmp_path):
    out = tmp_path / "lora.json"
    modules = [f"{n}={adapter_dir('tiny', n)}" for n in ("qv8", "all16", "mlp4rs")]
    r = CliRunner().invoke(app, ["bench", "throughput", *SMALL_ENGINE, "--input-len", "12", "--output-len", "4",
                                 "--num-prompts", "12", "--enable-lora", "--max-loras", "2", "--lora-modules", *modules,
                                 "--compare-base", "--output-json", str(out)])
    assert r.exit_code == 0, r.output
    result = BenchResult.load(out)
    m = result.metrics
    assert m["total_output_tokens"] == 12 * 4
    assert m["base_output_throughput"] > 0
    assert m["lora_vs_base_output_throughput"] == pytest.approx(m["output_throughput"] / m["base_output_throughput"])
    spread = result.extra["lora"]["prompts_per_adapter"]
    assert set(spread) == {"qv8", "all16", "mlp4rs"} and sum(spread.values()) == 12
    assert result.extra["lora"]["base"]["total_output_tokens"] == 12 * 4
    assert result.config["lora_modules"][0]["name"] == "qv8"


@pytest.mark.parametrize("args, message", [
    (["--lora-modules", "a=/x"], "--lora-modules needs --enable-lora"),
    (["--compare-base"], "--compare-base needs --lora-modules"),
    (["--enable-lora", "--lora-modules", "a=/x", "--lora-weights", "1,2"], "2 weights for 1 --lora-modules"),
    (["--enable-lora", "--lora-modules", "a=/x", "--baseline", "transformers"], "use --compare-base"),
    (["--enable-lora", "--lora-modules", "a"], "neither NAME=PATH nor JSON"),
    (["--enable-lora", "--max-loras", "0"], "max_loras must be at least 1"),
    (["--enable-lora", "--max-loras", "4", "--max-cpu-loras", "2"], "max_cpu_loras (2) must be at least"),
])
def test_bad_lora_flags_are_named(args, message):
    r = CliRunner().invoke(app, ["bench", "throughput", "--model", "tiny", "--device", "cpu", *args])
    assert r.exit_code == 2, r.output
    assert message in r.stderr and "Traceback" not in r.output


@pytest.fixture(scope="module")
def lora_server():
    os.environ["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "1"
    try:
        proc = ServerProcess("tiny", "--enable-lora", "--max-loras", "2",
                             "--lora-modules", f"qv8={adapter_dir('tiny', 'qv8')}", f"k1={adapter_dir('tiny', 'k1')}")
    finally:
        del os.environ["VLLM_ALLOW_RUNTIME_LORA_UPDATING"]
    yield proc
    proc.stop()


def test_bench_serve_spreads_requests_over_adapters(lora_server, tmp_path):
    r = invoke("bench", "serve", "--base-url", lora_server.url, "--model", "tiny", "--num-prompts", "12",
               "--input-len", "8", "--output-len", "4", "--lora-names", "qv8:2,k1:1,tiny:1",
               "--result-dir", str(tmp_path))
    assert r.exit_code == 0, r.output
    result = BenchResult.load(next(tmp_path.glob("serve-*.json")))
    assert result.metrics["completed"] == 12 and result.metrics["failed"] == 0
    r = invoke("bench", "serve", "--base-url", lora_server.url, "--model", "tiny", "--num-prompts", "2",
               "--lora-names", "qv8,nope", "--result-dir", str(tmp_path))
    assert r.exit_code != 0 and "'nope'" in r.output


def test_bench_lora_load_measures_until_served(lora_server, tmp_path):
    out = tmp_path / "load.json"
    r = invoke("bench", "lora-load", "--base-url", lora_server.url, "--adapter", str(adapter_dir("tiny", "all16")),
               "--repeats", "3", "--output-json", str(out))
    assert r.exit_code == 0, r.output
    result = json.loads(out.read_text())
    assert len(result["samples"]) == 3
    s = result["samples"][0]
    assert s["until_served_ms"] == pytest.approx(s["load_ms"] + s["first_request_ms"])
    assert result["median_until_served_ms"] > 0
    served = {m["id"] for m in httpx.get(lora_server.url + "/v1/models").json()["data"]}
    assert served == {"tiny", "qv8", "k1"}  # every adapter it loaded was unloaded again


def test_bench_lora_load_in_process(tmp_path):
    out = tmp_path / "load.json"
    r = invoke("bench", "lora-load", "--model", "tiny", "--load-format", "auto", "--adapter",
               str(adapter_dir("tiny", "all16")), "--repeats", "2", "--max-loras", "2", "--output-json", str(out))
    assert r.exit_code == 0, r.output
    result = json.loads(out.read_text())
    assert len(result["samples"]) == 2 and result["median_until_served_ms"] > 0
    assert result["mode"].startswith("offline")
    r = invoke("bench", "lora-load", "--model", "tiny", "--adapter", str(tmp_path), "--repeats", "1")
    assert r.exit_code == 1 and "no adapter_config.json" in r.output
