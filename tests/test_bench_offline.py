"""`workbench bench throughput` / `bench latency` on the tiny preset (CPU), the transformers baseline,
the roofline arithmetic, and refusals of bad input."""
from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from workbench.bench.roofline import DeviceRates, ModelShape, decode_step_floor, prefill_floor, throughput_floor
from workbench.cli import app
from workbench.results import BenchResult

SMALL_ENGINE = ["--model", "tiny", "--max-model-len", "128", "--kv-cache-memory", "8MiB", "--device", "cpu"]


def invoke(*args: str):
    return CliRunner().invoke(app, ["bench", *args])


# ---------------------------------------------------------------- roofline arithmetic
SHAPE = ModelShape(matmul_params=1000, layers=2, heads=2, kv_heads=1, head_dim=4, dtype_bytes=2)
RATES = DeviceRates(bandwidth_Bps=1000.0, matmul_flops=10_000.0, device="test")


def test_roofline_shape_and_decode_step():
    assert SHAPE.weight_bytes == 2000
    assert SHAPE.kv_bytes_per_token == 2 * 2 * 1 * 4 * 2  # layers x (K, V) x kv_heads x head_dim x bytes
    # batch 2 over 10 context tokens: (2000 + 10 x 32) bytes / 1000 B/s beats (4000 + 640) FLOPs / 1e4
    assert decode_step_floor(SHAPE, RATES, batch=2, context_tokens=10) == pytest.approx(2.32)
    compute_bound = DeviceRates(bandwidth_Bps=1e9, matmul_flops=1000.0, device="test")
    assert decode_step_floor(SHAPE, compute_bound, batch=2, context_tokens=10) == pytest.approx(4.64)


def test_roofline_throughput_floor_by_hand():
    # Prompts of 3 and 5 tokens, 4 output tokens each; one sequence at a time.
    f = throughput_floor(SHAPE, RATES, [3, 5], [4, 4], max_num_seqs=1, max_num_batched_tokens=4)
    assert f["decode_tokens"] == 6 and f["decode_steps"] == 6  # the first token of each comes from prefill
    # KV read: sum over decode steps of context = (3+1)+(3+2)+(3+3) + (5+1)+(5+2)+(5+3) = 36 tokens x 32 B
    assert f["decode_bytes"] == pytest.approx(6 * 2000 + 36 * 32)
    assert f["decode_flops"] == pytest.approx(2 * 1000 * 6 + 4 * 2 * 2 * 4 * 36)
    assert f["decode_floor_s"] == pytest.approx(13.152) and f["decode_bound"] == "bandwidth"
    # Prefill: 8 tokens in 2 steps of 4; causal pairs 3*4/2 + 5*6/2 = 21
    assert f["prefill_bytes"] == pytest.approx(2 * 2000 + 8 * 32)
    assert f["prefill_flops"] == pytest.approx(2 * 1000 * 8 + 4 * 2 * 2 * 4 * 21)
    assert f["prefill_floor_s"] == pytest.approx(4.256)
    assert f["floor_s"] == pytest.approx(13.152 + 4.256)
    assert f["overlap_floor_s"] == pytest.approx((12000 + 1152 + 4256) / 1000)
    # Two at a time halves the weight reads; a KV cache that holds one sequence undoes it.
    assert throughput_floor(SHAPE, RATES, [3, 5], [4, 4], 2, 4)["decode_steps"] == 3
    assert throughput_floor(SHAPE, RATES, [3, 5], [4, 4], 2, 4, kv_capacity_tokens=8)["decode_steps"] == 6
    # Cached prefix tokens are not computed: 4 of 8 left, one step.
    cached = throughput_floor(SHAPE, RATES, [3, 5], [4, 4], 1, 4, cached_prompt_tokens=4)
    assert cached["prefill_bytes"] == pytest.approx(2000 + 4 * 32)
    assert prefill_floor(SHAPE, RATES, [3, 5], 4) == pytest.approx(4.256)
    with pytest.raises(ValueError):
        throughput_floor(SHAPE, RATES, [3], [4, 4], 1, 4)


# ---------------------------------------------------------------- the commands on the tiny preset
def test_throughput_with_transformers_baseline(tmp_path):
    out = tmp_path / "tp.json"
    r = invoke("throughput", *SMALL_ENGINE, "--input-len", "16", "--output-len", "6", "--num-prompts", "10",
               "--baseline", "transformers", "--output-json", str(out))
    assert r.exit_code == 0, r.output
    result = BenchResult.load(out)
    m = result.metrics
    assert result.kind == "throughput" and result.environment.device == "cpu"
    assert m["num_prompts"] == 10 and m["total_output_tokens"] == 10 * 6
    assert m["total_input_tokens"] >= 10 * 16 * 0.9  # re-encoded text; the dataset aims at exactly 16 each
    assert m["output_throughput"] > 0 and m["requests_per_s"] == m["request_throughput"] > 0
    assert m["total_token_throughput"] > m["output_throughput"]
    assert m["tokens_per_step"] > 1 and 6 <= m["num_steps"] < 10 * 6  # batched, not one request at a time
    assert m["num_preemptions"] == 0 and m["prefix_cache_hit_rate"] == 0
    assert m["roofline_floor_s"] > 0 and m["time_over_floor"] == pytest.approx(m["elapsed_s"] / m["roofline_floor_s"])
    assert result.extra["roofline"]["rates"]["bandwidth_Bps"] > 0
    base = result.extra["baseline"]
    assert "error" not in base, base
    assert base["output_tokens"] == base["expected_tokens"] == 10 * 6 and base["failed"] == 0
    assert "sdpa" in base["attn_implementation"]
    assert m["baseline_output_throughput"] > 0
    assert m["speedup_vs_baseline"] == pytest.approx(m["output_throughput"] / m["baseline_output_throughput"])
    assert result.config["max_num_seqs"] == 256 and result.config["input_len"] == 16
    assert result.config["torch_dtype"] == "float32" and result.config["max_model_len"] == 128
    json.dumps(result.config)  # JSON-safe


def test_throughput_prefix_repeat_with_caching_and_profile(tmp_path):
    out = tmp_path / "prefix.json"
    r = invoke("throughput", *SMALL_ENGINE, "--dataset", "prefix-repeat", "--prefix-len", "48", "--input-len", "8",
               "--output-len", "4", "--num-prompts", "6", "--enable-prefix-caching", "--profile",
               "--output-json", str(out))
    assert r.exit_code == 0, r.output
    result = BenchResult.load(out)
    assert result.metrics["total_output_tokens"] == 6 * 4
    assert result.metrics["prefix_cache_hit_rate"] > 0.3  # 48 of every 56 tokens are shared
    assert result.extra["roofline"]["cached_prompt_tokens"] > 0
    trace = tmp_path / "prefix.trace.json"
    assert result.extra["profile"]["trace"] == str(trace) and result.extra["profile"]["steps"] >= 1
    assert json.loads(trace.read_text())["traceEvents"]
    steps = result.extra["step_profile"]  # the host time of the timed run's steps, by phase
    assert steps["steps"] >= result.metrics["num_steps"]
    assert set(steps["ms_per_step"]) == {"schedule", "prepare", "forward", "sample", "wait", "output", "frontend"}
    assert sum(steps["ms_per_step"].values()) == pytest.approx(steps["measured_ms_per_step"])
    assert 0 < steps["measured_ms_per_step"] <= steps["wall_ms_per_step"] * steps["steps"] / result.metrics["num_steps"]
    assert "host time per engine step" in r.output


def test_throughput_sampling_mix_keeps_exact_token_counts(tmp_path):
    out = tmp_path / "mix.json"
    r = invoke("throughput", *SMALL_ENGINE, "--input-len", "12", "--output-len", "5", "--num-prompts", "8",
               "--sampling-mix", "--output-json", str(out))
    assert r.exit_code == 0, r.output
    result = BenchResult.load(out)
    assert result.metrics["total_output_tokens"] == 8 * 5 and result.config["sampling_mix"] is True


def test_latency_sweep(tmp_path):
    out = tmp_path / "lat.json"
    r = invoke("latency", *SMALL_ENGINE, "--input-len", "8", "--output-len", "3", "--batch-sizes", "1,3",
               "--iters", "1", "--warmup-iters", "0", "--output-json", str(out))
    assert r.exit_code == 0, r.output
    result = BenchResult.load(out)
    assert result.kind == "latency"
    assert [row["batch_size"] for row in result.extra["rows"]] == [1, 3]
    for bs in (1, 3):
        assert result.metrics[f"ttft_ms_bs{bs}"] > 0 and result.metrics[f"e2e_ms_bs{bs}"] > 0
        assert f"tpot_ms_bs{bs}" in result.metrics
    # On CPU the floor comes from this CPU's rates, measured over the run's working set, and is never
    # above the measurement: where a measured time beats it, no floor is reported, with the reason.
    roofline = result.extra["roofline"]
    assert roofline["rates"]["device"] == "cpu" and 1 << 20 <= roofline["rates"]["copy_bytes"] <= 256 << 20
    if "note" in roofline:
        assert roofline["note"].startswith("no floor") and "roofline_floor_s" not in result.metrics
        assert not any("floor" in k for row in result.extra["rows"] for k in row)
    else:
        for row in result.extra["rows"]:
            assert all(row[f"{k}_ms"] >= row[f"{k}_floor_ms"] > 0 for k in ("ttft", "tpot", "e2e"))
        assert result.metrics["roofline_floor_s"] > 0 and result.metrics["time_over_floor"] >= 1


def test_latency_reports_no_floor_that_the_measurement_beats():
    from workbench.bench.latency import summarize

    def row(bs, ms, floor_ms):
        return {"batch_size": bs, "output_throughput": 1.0, **{f"{k}_ms": ms for k in ("ttft", "tpot", "e2e")},
                **{f"{k}_floor_ms": floor_ms for k in ("ttft", "tpot", "e2e")},
                **{f"{k}_over_floor": ms / floor_ms for k in ("ttft", "tpot", "e2e")}}

    held = [row(1, 2.0, 1.0), row(4, 3.0, 2.0)]
    rows, metrics, roofline = summarize(held, SHAPE, RATES, check_floors=True)
    assert rows == held and metrics["tpot_floor_ms_bs4"] == 2.0 and "note" not in roofline
    assert metrics["roofline_floor_s"] == pytest.approx(0.003) and metrics["time_over_floor"] == pytest.approx(5 / 3)
    beaten = [row(1, 2.0, 1.0), row(4, 3.0, 3.5)]
    rows, metrics, roofline = summarize(beaten, SHAPE, RATES, check_floors=True)
    assert roofline["note"].startswith("no floor: a measured time beat the floor")
    assert rows == [{"batch_size": 1, "output_throughput": 1.0, "ttft_ms": 2.0, "tpot_ms": 2.0, "e2e_ms": 2.0},
                    {"batch_size": 4, "output_throughput": 1.0, "ttft_ms": 3.0, "tpot_ms": 3.0, "e2e_ms": 3.0}]
    assert not any("floor" in k for k in metrics) and metrics["tpot_ms_bs4"] == 3.0
    # On GPU the floor stays as computed (a ratio below 1 there says the model is off; README, roofline.py).
    assert summarize(beaten, SHAPE, RATES, check_floors=False)[0] == beaten


# ---------------------------------------------------------------- bad input: one line, non-zero exit
@pytest.mark.parametrize("kind, args, message", [
    ("throughput", ["--dataset", "sharegpt2"], "invalid choice: 'sharegpt2'"),
    ("throughput", ["--dataset", "jsonl", "--dataset-path", "/nonexistent/x.jsonl"], "no such file"),
    ("throughput", ["--dataset", "jsonl"], "needs --dataset-path"),
    ("throughput", ["--num-prompts", "0"], "--num-prompts must be at least 1"),
    ("throughput", ["--baseline", "transformers", "--range-ratio", "0.5"], "one output length"),
    ("throughput", ["--frobnicate"], "unrecognized arguments: --frobnicate"),
    ("throughput", ["--max-num-seqs", "0"], "max_num_seqs must be at least 1"),
    ("latency", ["--batch-sizes", "1,x"], "--batch-sizes must be comma-separated positive integers"),
    ("latency", ["--batch-sizes", "512"], "exceeds --max-num-seqs 256"),
    ("latency", ["--output-len", "1"], "--output-len must be at least 2"),
])
def test_bad_input_is_one_line_and_nonzero(kind, args, message):
    r = invoke(kind, "--model", "tiny", "--device", "cpu", *args)
    assert r.exit_code == 2, r.output
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "error" in lines[0] and message in lines[0], r.stderr
    assert "Traceback" not in r.output


def test_unknown_model_is_one_error_line():
    r = invoke("throughput", "--model", "no-such-model", "--device", "cpu", "--num-prompts", "1")
    assert r.exit_code == 2 and "Traceback" not in r.output
    last = [line for line in r.stderr.splitlines() if line.strip()][-1]
    assert last.startswith("error:") and "neither a model directory nor a preset" in last


def test_help_lists_the_flags():
    r = invoke("throughput", "--help")
    assert r.exit_code == 0
    for flag in ("--num-prompts", "--dataset", "--baseline", "--enable-prefix-caching", "--kv-cache-memory"):
        assert flag in r.output


def test_result_command_reads_as_typed():
    from workbench.results import command_line

    assert command_line(["/srv/repo/workbench/cli/__main__.py", "bench", "throughput"]) == "workbench bench throughput"
    assert command_line(["/usr/local/bin/workbench", "tune"]) == "workbench tune"
    assert command_line(["pytest", "-q"]) == "pytest -q"
