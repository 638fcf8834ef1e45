"""Quantized models through the workbench: `models quantize` (its files and its refusals), the
offline benchmarks with --quantization, the server, and a tuning study over a quantized directory."""
from __future__ import annotations

import json

import httpx
import pytest
from typer.testing import CliRunner

from tests.engine_helpers import model_dir
from tests.quant_helpers import quantized_dir
from tests.server_process import ServerProcess
from tests.test_tune import WORKLOAD, study_file
from workbench.bench.quality import BUILTIN_TEXT
from workbench.cli import app
from workbench.results import BenchResult


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def test_models_quantize_writes_the_format(tmp_path):
    out = tmp_path / "q"
    r = invoke("models", "quantize", "tiny", "--method", "gptq", "--bits", "8", "--no-sym", "--group-size", "64",
               "--rtn", "--out", str(out))
    assert r.exit_code == 0, r.output
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc | {"meta": None} == {"quant_method": "gptq", "bits": 8, "group_size": 64, "desc_act": False, "sym": False,
                                   "damp_percent": 0.01, "true_sequential": True, "static_groups": False,
                                   "lm_head": False, "checkpoint_format": "gptq", "meta": None}
    assert {"tokenizer.json", "tokenizer_config.json", "model.safetensors"} <= {f.name for f in out.iterdir()}
    r = invoke("models", "quantize", str(out), "--method", "awq", "--rtn", "--out", str(tmp_path / "again"))
    assert r.exit_code == 2 and "already quantized (gptq)" in r.output


@pytest.mark.parametrize("args,message", [
    (["--method", "awq", "--bits", "8"], "AWQ GEMM is 4-bit"),
    (["--method", "gptq", "--bits", "3"], "--bits must be 4 or 8"),
    (["--method", "gptq", "--desc-act", "--rtn"], "needs calibration"),
    (["--method", "awq", "--desc-act"], "AWQ has no g_idx"),
    (["--method", "awq", "--no-sym"], "AWQ always stores zero points"),
    (["--method", "exl2"], "--method must be awq or gptq"),
    (["--method", "gptq", "--damp", "0"], "--damp must be in (0, 1]"),
    (["--method", "awq", "--damp", "0.1"], "AWQ has no Hessian"),
])
def test_models_quantize_refuses_bad_options(tmp_path, args, message):
    r = invoke("models", "quantize", "tiny", *args, "--out", str(tmp_path / "x"))
    assert r.exit_code == 2 and message in r.output and len(r.output.strip().splitlines()) == 1, r.output


def test_calibration_and_heldout_texts_split_the_builtin_corpus():
    """The quality figures calibrate on one part of the built-in text and score the other (README)."""
    calibration, heldout = (BUILTIN_TEXT.with_name(f"corpus-{part}.txt").read_text(encoding="utf-8")
                            for part in ("calibration", "heldout"))
    assert calibration + "\n" + heldout == BUILTIN_TEXT.read_text(encoding="utf-8")
    assert calibration.startswith("The Declaration of Independence") and heldout.startswith("The Gettysburg Address")


def test_bench_latency_and_throughput_with_quantization(tmp_path):
    qdir = str(quantized_dir("gptq8-sym"))
    engine = ["--model", qdir, "--quantization", "gptq_marlin", "--max-model-len", "128", "--kv-cache-memory",
              "8MiB", "--device", "cpu"]
    out = tmp_path / "lat.json"
    r = invoke("bench", "latency", *engine, "--input-len", "8", "--output-len", "3", "--batch-sizes", "2", "--iters",
               "1", "--warmup-iters", "0", "--output-json", str(out))
    assert r.exit_code == 0, r.output
    result = BenchResult.load(out)
    assert result.config["quantization"] == "gptq_marlin" and result.metrics["tpot_floor_ms_bs2"] > 0
    out = tmp_path / "tp.json"
    r = invoke("bench", "throughput", *engine, "--input-len", "12", "--output-len", "4", "--num-prompts", "4",
               "--output-json", str(out))
    assert r.exit_code == 0, r.output
    assert BenchResult.load(out).metrics["total_output_tokens"] == 16
    r = invoke("bench", "throughput", *engine[:2], "--quantization", "awq", "--device", "cpu")
    assert r.exit_code != 0 and "does not match the checkpoint" in r.output


@pytest.mark.slow
def test_served_and_tuned_quantized_model(tmp_path):
    qdir = str(quantized_dir("awq4-g32"))
    server = ServerProcess(qdir, "--max-model-len", "256", "--kv-cache-memory", "16MiB")
    try:
        r = httpx.post(server.url + "/v1/completions", json={"model": qdir, "prompt": "Hello", "max_tokens": 5,
                                                            "temperature": 0, "ignore_eos": True}, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5
    finally:
        server.stop()
    study = study_file(tmp_path, f"""
        [study]
        name = "quant"
        model = "{qdir}"
        n_trials = 2
        sampler = "random"
        [server]
        max_model_len = 256
        kv_cache_memory = "16MiB"
        [search_space]
        max_num_seqs = {{ type = "int", low = 1, high = 8 }}
        """ + WORKLOAD, name="q")
    r = invoke("tune", str(study), "--results-dir", str(tmp_path / "res"))
    assert r.exit_code == 0, r.output
    best = json.loads((tmp_path / "res" / "quant-best.json").read_text())["best"][0]
    assert best["metrics"]["completed"] == 8 and best["metrics"]["error_rate"] == 0
    assert model_dir("tiny")  # the quantized directory came from the tiny preset
