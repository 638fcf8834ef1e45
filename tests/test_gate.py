"""The performance gate: identical and noisy inputs pass, a planted regression fails, bad input exits 2."""
import json
import random

import pytest
from typer.testing import CliRunner

from workbench.cli import app
from workbench.gate import GateError, Threshold, compare
from workbench.results import BenchResult

METRICS = ["--metric", "output_throughput:-5%", "--metric", "p99_ttft_ms:+10%", "--metric", "num_preemptions:+0"]


def result_file(path, samples: dict[str, list[float]], kind="gate"):
    BenchResult(kind=kind, metrics={k: v[0] for k, v in samples.items()}, extra={"samples": samples}).save(path)
    return str(path)


def noisy(center: float, spread: float, n: int, seed: int) -> list[float]:
    rng = random.Random(seed)
    return [center * (1 + rng.uniform(-spread, spread)) for _ in range(n)]


def run(args):
    return CliRunner().invoke(app, ["gate", *args])


def test_threshold_syntax():
    t = Threshold.parse("output_throughput:-5%")
    assert t.higher_is_better and t.relative and t.amount == 5
    t = Threshold.parse("num_preemptions:+0")
    assert not t.higher_is_better and not t.relative and t.amount == 0
    with pytest.raises(GateError):
        Threshold.parse("output_throughput>5")


def test_identical_inputs_pass(tmp_path):
    samples = {"output_throughput": [1000.0, 1010, 990], "p99_ttft_ms": [200.0, 210, 190], "num_preemptions": [0.0] * 3}
    base = result_file(tmp_path / "b.json", samples)
    r = run(["--baseline", base, "--current", base, *METRICS, "--history-dir", str(tmp_path / "h")])
    assert r.exit_code == 0, r.output
    assert "| output_throughput |" in r.output and "FAIL" not in r.output


def test_noise_within_run_to_run_spread_passes(tmp_path):
    # A 7% median drop, but with +-15% run-to-run noise: not a real regression.
    base = result_file(tmp_path / "b.json", {"output_throughput": noisy(1000, 0.15, 5, 1)})
    cur = result_file(tmp_path / "c.json", {"output_throughput": noisy(930, 0.15, 5, 2)})
    rows = compare({"output_throughput": noisy(1000, 0.15, 5, 1)}, {"output_throughput": noisy(930, 0.15, 5, 2)},
                   [Threshold.parse("output_throughput:-5%")])
    assert rows[0].verdict == "pass"
    assert run(["--baseline", base, "--current", cur, "--metric", "output_throughput:-5%",
                "--history-dir", str(tmp_path / "h")]).exit_code == 0


def test_planted_regression_fails(tmp_path):
    base = result_file(tmp_path / "b.json", {"output_throughput": noisy(1000, 0.02, 5, 1),
                                             "p99_ttft_ms": noisy(200, 0.02, 5, 3), "num_preemptions": [0.0] * 5})
    cur = result_file(tmp_path / "c.json", {"output_throughput": noisy(800, 0.02, 5, 2),
                                            "p99_ttft_ms": noisy(201, 0.02, 5, 4), "num_preemptions": [0.0] * 5})
    summary = tmp_path / "summary.md"
    r = run(["--baseline", base, "--current", cur, *METRICS, "--summary", str(summary),
             "--history-dir", str(tmp_path / "h")])
    assert r.exit_code == 1
    text = summary.read_text()
    assert "FAIL" in text and "output_throughput" in text
    history = list((tmp_path / "h").glob("gate-*.json"))
    assert len(history) == 1 and json.loads(history[0].read_text())["extra"]["verdict"] == "fail"


def test_absolute_threshold_on_single_samples(tmp_path):
    base = result_file(tmp_path / "b.json", {"num_preemptions": [0.0]}, kind="throughput")
    cur = result_file(tmp_path / "c.json", {"num_preemptions": [3.0]}, kind="throughput")
    assert run(["--baseline", base, "--current", cur, "--metric", "num_preemptions:+0",
                "--history-dir", str(tmp_path / "h")]).exit_code == 1
    assert run(["--baseline", base, "--current", cur, "--metric", "num_preemptions:+5",
                "--history-dir", str(tmp_path / "h")]).exit_code == 0


@pytest.mark.parametrize("content,message", [("{not json", "not valid JSON"), ('{"x": 1}', "no 'metrics' field"),
                                              ('{"metrics": {}, "schema_version": 99}', "schema_version")])
def test_malformed_file_is_a_clear_error(tmp_path, content, message):
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    good = result_file(tmp_path / "g.json", {"output_throughput": [1.0]})
    r = run(["--baseline", str(bad), "--current", good, "--metric", "output_throughput:-5%"])
    assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output


def test_mismatched_metric_is_a_clear_error(tmp_path):
    a = result_file(tmp_path / "a.json", {"output_throughput": [1.0]})
    b = result_file(tmp_path / "b.json", {"request_throughput": [1.0]})
    r = run(["--baseline", a, "--current", b, "--metric", "output_throughput:-5%"])
    assert r.exit_code == 2 and "missing from the current results" in r.output


def test_run_repeats_and_update_baseline(tmp_path):
    script = tmp_path / "bench.py"
    script.write_text("import sys, json\nfrom workbench.results import BenchResult\n"
                      "BenchResult(kind='throughput', metrics={'tokens_per_step': 12.0}).save(sys.argv[1])\n")
    baseline = tmp_path / "baseline.json"
    cmd = f"python {script} {{output}}"
    r = run(["--baseline", str(baseline), "--run", cmd, "--repeats", "3", "--metric", "tokens_per_step:-5%",
             "--update-baseline"])
    assert r.exit_code == 0, r.output
    assert BenchResult.load(baseline).extra["samples"]["tokens_per_step"] == [12.0, 12.0, 12.0]
    r = run(["--baseline", str(baseline), "--run", cmd, "--repeats", "3", "--metric", "tokens_per_step:-5%",
             "--history-dir", str(tmp_path / "h")])
    assert r.exit_code == 0, r.output
    r = run(["--baseline", str(baseline), "--run", "python -c pass", "--metric", "tokens_per_step:-5%"])
    assert r.exit_code == 2 and "{output}" in r.output
