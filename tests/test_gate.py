"""The performance gate: identical and noisy inputs pass, a planted regression fails, bad input exits 2."""
import json
import random
import re
import statistics
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from workbench.cli import app
from workbench.gate.compare import GateError, Rules, Threshold, compare, samples_of
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
    summary = tmp_path / "not-yet" / "summary.md"  # its folder is created
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


# ---------------------------------------------------------------- the statistics, at every repeat count
ALPHA = 0.05
TRIALS = 300


def fail_rate(n: int, true_change: float, seed: int, threshold: str = "output_throughput:-5%", noise: float = 0.03,
              metrics: int = 1) -> float:
    """Share of seeded trials that fail: n samples a side, lognormal noise, a true relative change."""
    rng = np.random.default_rng(seed)
    specs = [threshold.replace("output_throughput", f"m{i}") for i in range(metrics)]
    thresholds = [Threshold.parse(s) for s in specs]
    fails = 0
    for trial in range(TRIALS):
        base = {t.metric: (1000 * np.exp(rng.normal(0, noise, n))).tolist() for t in thresholds}
        cur = {t.metric: (1000 * (1 + true_change) * np.exp(rng.normal(0, noise, n))).tolist() for t in thresholds}
        rows = compare(base, cur, thresholds, Rules(seed=trial))
        fails += any(r.verdict == "fail" for r in rows)
    return fails / TRIALS


def binomial_slack(p: float) -> float:
    return 3 * (p * (1 - p) / TRIALS) ** 0.5 + 1 / TRIALS


def test_what_the_exact_test_can_show():
    from workbench.gate.compare import repeats_needed, smallest_p

    assert smallest_p(2, 2) == pytest.approx(1 / 6) and smallest_p(3, 3) == pytest.approx(0.05)
    assert repeats_needed(0.05) == 3 and repeats_needed(0.05 / 4) == 5 and repeats_needed(0.05 / 13) == 6


@pytest.mark.parametrize("n", [2, 3, 4, 5, 6])
def test_rule_chosen_from_the_sample_size(n):
    rows = compare({"x": [1000.0 + i for i in range(n)]}, {"x": [500.0 + i for i in range(n)]},
                   [Threshold.parse("x:-5%")])
    assert rows[0].rule == ("bootstrap" if n == 2 else "mann-whitney")
    assert rows[0].verdict == "fail"  # a halving, perfectly separated, fails at every count
    if n == 2:
        assert "3 a side needed" in rows[0].note


@pytest.mark.slow
@pytest.mark.parametrize("n", [2, 3, 4, 5, 6])
def test_planted_regressions_are_detected(n):
    # -15% and -25% under 3% noise against a -5% threshold: detected nearly every time, at every repeat count.
    assert fail_rate(n, -0.15, seed=n) >= 0.95
    assert fail_rate(n, -0.25, seed=n) >= 0.95
    # Lower is better: a latency up 40% against +10%.
    assert fail_rate(n, +0.40, seed=10 + n, threshold="p99_ttft_ms:+10%") >= 0.95


@pytest.mark.slow
def test_more_repeats_detect_smaller_regressions():
    # -10% (twice the threshold) under 3% noise: about 0.6 at 3 a side, about 0.9 at 6.
    assert fail_rate(6, -0.10, seed=1) > fail_rate(3, -0.10, seed=1) + 0.15


@pytest.mark.slow
@pytest.mark.parametrize("n", [2, 3, 4, 5, 6])
def test_null_changes_pass_at_the_stated_rate(n):
    # No change at all: far below alpha.
    assert fail_rate(n, 0.0, seed=100 + n) <= ALPHA
    # A change sitting exactly on the threshold is the hardest null. Where the exact test decides (3 a
    # side and up) the false-positive rate is at most alpha; the bootstrap at 2 a side is not
    # controlled (about 1/6, which the gate's note states).
    stated = ALPHA if n >= 3 else 1 / 6
    assert fail_rate(n, -0.05, seed=200 + n, noise=0.01) <= stated + binomial_slack(stated)


@pytest.mark.slow
def test_holm_keeps_the_family_wise_rate_over_several_metrics():
    # Four noisy metrics, each on its threshold's edge, 5 a side: any false failure counts.
    assert fail_rate(5, -0.05, seed=7, noise=0.01, metrics=4) <= ALPHA + binomial_slack(ALPHA)
    # Holm still lets a real regression through the family.
    assert fail_rate(5, -0.25, seed=8, metrics=4) >= 0.95


def test_deterministic_metrics_are_decided_by_their_change():
    rows = compare({"steps": [23.3] * 3, "x": [1.0, 1.1, 0.9]}, {"steps": [20.0] * 3, "x": [1.0, 1.1, 0.9]},
                   [Threshold.parse("steps:-2%"), Threshold.parse("x:-5%")])
    assert [r.rule for r in rows] == ["exact", "mann-whitney"] and [r.verdict for r in rows] == ["fail", "pass"]
    assert rows[1].holm_level == ALPHA  # the exact metric is not in Holm's family


def test_require_exact_refuses_too_few_samples(tmp_path):
    with pytest.raises(GateError, match="--repeats 3"):
        compare({"x": [1.0, 2.0]}, {"x": [1.0, 2.0]}, [Threshold.parse("x:-5%")], Rules(require_exact=True))
    base = result_file(tmp_path / "b.json", {"x": [1.0, 2.0]})
    r = run(["--baseline", base, "--current", base, "--metric", "x:-5%", "--require-exact"])
    assert r.exit_code == 2 and "--repeats 3" in r.output


# ---------------------------------------------------------------- .ci/gate.sh can fire
def ci_gate() -> tuple[int, list[Threshold], dict[str, list[float]]]:
    root = Path(__file__).resolve().parents[1]
    script = (root / ".ci" / "gate.sh").read_text()
    repeats = int(re.search(r"--repeats (\d+)", script)[1])
    thresholds = [Threshold.parse(s) for s in re.findall(r"--metric (\S+)", script)]
    baseline = samples_of(BenchResult.load(root / re.search(r"--baseline (\S+)", script)[1]), "")
    return repeats, thresholds, baseline


@pytest.mark.parametrize("drop", [0.0, 0.3, 0.75, 0.8, 0.9])
def test_ci_gate_throughput_line_fires_at_its_repeat_count(drop):
    """Current runs as noisy as the committed baseline's own repeats (each a baseline sample, resampled)
    and slower by `drop`; the deterministic metrics as in the baseline."""
    repeats, thresholds, baseline = ci_gate()
    tput = next(t for t in thresholds if t.metric == "output_throughput")
    limit = tput.amount / 100
    rng = np.random.default_rng(int(drop * 100))
    verdicts = []
    for trial in range(50):
        cur = {k: [statistics.median(v)] * repeats for k, v in baseline.items()}
        cur["output_throughput"] = (rng.choice(baseline["output_throughput"], repeats) * (1 - drop)).tolist()
        rows = compare(baseline, cur, thresholds, Rules(seed=trial))
        verdicts.append({r.metric: r.verdict for r in rows})
    assert all(v["output_throughput"] == ("fail" if drop > limit + 0.1 else "pass") for v in verdicts), drop
    assert all(v[t.metric] == "pass" for v in verdicts for t in thresholds if t.metric != "output_throughput")


def test_ci_gate_deterministic_lines_fire():
    repeats, thresholds, baseline = ci_gate()
    cur = {k: [statistics.median(v)] * repeats for k, v in baseline.items()}
    cur["num_preemptions"] = [v + 3 for v in cur["num_preemptions"]]
    cur["tokens_per_step"] = [v * 0.9 for v in cur["tokens_per_step"]]
    verdicts = {r.metric: r.verdict for r in compare(baseline, cur, thresholds)}
    assert verdicts["num_preemptions"] == verdicts["tokens_per_step"] == "fail"


# ---------------------------------------------------------------- history and dashboards
def history_file(path, values: list[float], device="cpu", metric="output_throughput"):
    with open(path, "a") as f:
        for i, v in enumerate(values):
            f.write(json.dumps({"created": f"2026-11-01T00:00:{i:02d}+00:00", "commit": f"c{i}", "device": device,
                                "verdict": "pass", "metrics": {metric: v}}) + "\n")
    return path


def test_history_rule_needs_k_consecutive_violations():
    from workbench.gate import history as gate_history

    t = [Threshold.parse("output_throughput:-5%")]
    rule = gate_history.HistoryRule(window=10, consecutive=3)
    stable = [1000.0 + 10 * (i % 3) for i in range(10)]

    def entries(values, device="cpu"):
        return [{"device": device, "metrics": {"output_throughput": v}} for v in values]

    assert gate_history.check(entries(stable + [900, 890, 910]), t, rule, "cpu")[0].verdict == "fail"
    assert gate_history.check(entries(stable + [900, 1000, 910]), t, rule, "cpu")[0].verdict == "pass"  # one recovered
    assert gate_history.check(entries(stable + [980, 975, 985]), t, rule, "cpu")[0].verdict == "pass"  # within 5%
    short = gate_history.check(entries(stable[:5] + [900, 890, 910]), t, rule, "cpu")[0]
    assert short.verdict == "too-short" and "needs 13" in short.note
    # Runs on another device are not compared.
    mixed = entries(stable) + entries([500.0] * 3, device="gpu") + entries([1000.0] * 3)
    assert gate_history.check(mixed, t, rule, "cpu")[0].verdict == "pass"


def test_gate_with_history_and_emits(tmp_path, monkeypatch):
    monkeypatch.setenv("PAGEDBENCH_DEVICE", "cpu")
    hist = history_file(tmp_path / "h.jsonl", [1000.0 + i for i in range(10)] + [800.0, 810.0])
    cur = result_file(tmp_path / "c.json", {"output_throughput": [805.0]}, kind="throughput")
    args = ["--current", cur, "--metric", "output_throughput:-5%", "--history", str(hist),
            "--history-dir", str(tmp_path / "g"), "--emit", f"json:{tmp_path / 'gate.json'}",
            "--emit", f"pytorch-hud:{tmp_path / 'hud.json'}", "--label", "tiny-cpu"]
    r = run(args)
    assert r.exit_code == 1 and "output_throughput (history)" in r.output
    lines = [json.loads(x) for x in hist.read_text().splitlines()]
    assert len(lines) == 13 and lines[-1]["verdict"] == "fail" and lines[-1]["device"] == "cpu"
    assert lines[-1]["metrics"] == {"output_throughput": 805.0} and lines[-1]["label"] == "tiny-cpu"
    out = json.loads((tmp_path / "gate.json").read_text())
    assert out["schema"] == "pagedbench-gate/1" and out["verdict"] == "fail" and out["history"][0]["verdict"] == "fail"
    hud = json.loads((tmp_path / "hud.json").read_text())
    assert hud[0]["metric"]["name"] == "output_throughput" and hud[0]["metric"]["benchmark_values"] == [805.0]
    assert hud[0]["model"]["name"] == "tiny-cpu" and hud[0]["runners"][0]["type"] == "cpu"
    # With a baseline as well, both rules are reported and the HUD records carry the baseline as target.
    base = result_file(tmp_path / "b.json", {"output_throughput": [1000.0]})
    hist.write_text("\n".join(json.dumps(x) for x in lines[:-1]) + "\n")
    r = run([*args, "--baseline", base])
    assert r.exit_code == 1 and "output_throughput, output_throughput (history)" in r.output
    assert json.loads((tmp_path / "hud.json").read_text())[0]["metric"]["target_value"] == 1000.0


@pytest.mark.parametrize("args,message", [
    (["--emit", "csv:x.csv"], "FORMAT one of json, pytorch-hud"),
    (["--history-window", "0"], "at least 1"),
    (["--alpha", "1.5"], "between 0 and 1"),
    ([], "give --baseline FILE or --history FILE"),
])
def test_bad_gate_options_are_clear_errors(tmp_path, args, message):
    cur = result_file(tmp_path / "c.json", {"output_throughput": [1.0]})
    r = run(["--current", cur, "--metric", "output_throughput:-5%", *args])
    assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output


def test_bad_history_line_is_a_clear_error(tmp_path):
    hist = tmp_path / "h.jsonl"
    hist.write_text('{"metrics": {"x": 1}}\n{oops\n')
    cur = result_file(tmp_path / "c.json", {"x": [1.0]})
    r = run(["--current", cur, "--metric", "x:-5%", "--history", str(hist)])
    assert r.exit_code == 2 and "h.jsonl:2: not a JSON line" in r.output
