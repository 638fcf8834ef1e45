"""Small, known result files and an Optuna study for the report and gate tests."""
from __future__ import annotations

import json
import random
from pathlib import Path

import optuna

from workbench.results import BenchResult, Environment, RequestRecord


def serve_result(label: str, scale: float, seed: int, rate: float | str = "inf") -> BenchResult:
    rng = random.Random(seed)
    requests = []
    for i in range(40):
        ttft = scale * rng.uniform(0.05, 0.3)
        itl = [scale * rng.uniform(0.01, 0.03) for _ in range(15)]
        requests.append(RequestRecord(index=i, start_time=i * 0.05, success=True, prompt_tokens=100, output_tokens=16,
                                      ttft=ttft, e2el=ttft + sum(itl), itl=itl))
    ttfts = sorted(r.ttft * 1e3 for r in requests)
    metrics = {"output_throughput": 1000 / scale, "request_throughput": 60 / scale, "median_ttft_ms": ttfts[20],
               "p99_ttft_ms": ttfts[-1], "median_tpot_ms": 20 * scale, "p99_tpot_ms": 30 * scale,
               "median_itl_ms": 20 * scale, "p99_itl_ms": 30 * scale, "median_e2el_ms": 500 * scale,
               "p99_e2el_ms": 700 * scale, "p90_ttft_ms": ttfts[36]}
    return BenchResult(kind="serve", label=label, config={"request_rate": rate}, metrics=metrics, requests=requests)


def offline_results(results: Path) -> None:
    """Two `bench throughput` runs of one model (labels, devices and commits differ) and a `bench latency` run."""
    for label, device, commit, tput in [("ours", "NVIDIA H100 80GB HBM3", "a" * 40, 5000.0),
                                        ("vllm", "NVIDIA H200", "b" * 40, 6000.0)]:
        BenchResult(kind="throughput", label=label, config={"model": "tiny", "num_prompts": 100, "input_len": 64,
                                                            "output_len": 32},
                    environment=Environment(device=device, commit=commit),
                    metrics={"output_throughput": tput, "total_output_tokens": 3200.0, "roofline_floor_s": 0.2,
                             "time_over_floor": 3.2, "baseline_output_throughput": 100.0,
                             "speedup_vs_baseline": tput / 100}).save(results / f"throughput-{label}.json")
    rows = [{"batch_size": b, "ttft_ms": 10.0 * b, "ttft_floor_ms": 8.0 * b, "tpot_ms": 5 + 0.1 * b,
             "tpot_floor_ms": 4 + 0.1 * b, "e2e_ms": 100.0 * b, "output_throughput": 100.0 * b} for b in (1, 4, 16)]
    BenchResult(kind="latency", config={"model": "tiny"}, environment=Environment(device="cpu"),
                metrics={"tpot_ms_bs1": 5.1}, extra={"rows": rows}).save(results / "latency-tiny.json")


def make_fixtures(root: Path) -> tuple[str, Path]:
    """Returns (storage URL, results folder)."""
    results = root / "results"
    results.mkdir(parents=True, exist_ok=True)
    serve_result("prefix-on", 1.0, 1).save(results / "serve-a-prefix-on.json")
    serve_result("prefix-off", 1.6, 2).save(results / "serve-b-prefix-off.json")
    offline_results(results)
    sweep = []
    for i, rate in enumerate([2, 4, 8]):
        path = serve_result(f"rate={rate}", 1 + i * 0.5, 10 + i, rate).save(results / f"serve-sweep-{rate}.json")
        sweep.append(str(path))
    (results / "sweep-1.json").write_text(json.dumps({"kind": "sweep", "results": sweep}))
    for i, verdict in enumerate(["pass", "fail"]):
        BenchResult(kind="gate", label=f"gate {verdict}", created=f"2026-11-2{i}T00:00:00+00:00",
                    metrics={"output_throughput": 900.0},
                    extra={"verdict": verdict, "rows": [{"metric": "output_throughput", "baseline": 1000.0,
                                                          "current": 900.0, "change_pct": -10.0 * (i + 1),
                                                          "threshold": "-5%", "verdict": verdict}]}
                    ).save(results / "gate" / f"gate-{i}.json")
    with open(results / "gate" / "history.jsonl", "w") as f:  # as `workbench gate --history` writes it
        for i in range(14):
            value, verdict = (1000.0 + 5 * (i % 3), "pass") if i < 11 else (800.0, "fail")
            f.write(json.dumps({"created": f"2026-11-01T00:00:{i:02d}+00:00", "commit": f"{i:07d}",
                                "device": "cpu", "verdict": verdict, "metrics": {"output_throughput": value,
                                                                                 "tokens_per_step": 23.3}}) + "\n")
        f.write("{not json\n")  # skipped by the report
    storage = f"sqlite:///{root / 'study.db'}"
    study = optuna.create_study(storage=storage, study_name="fixture", direction="maximize")
    study.set_user_attr("objectives", [{"metric": "output_throughput", "direction": "maximize"}])
    study.set_user_attr("constraints", [{"metric": "p99_ttft_ms", "op": "<=", "value": 500}])
    for seqs, tput, ttft in [(8, 500, 200), (16, 800, 350), (32, 1100, 700), (64, 1200, 900), (4, 300, 100)]:
        study.enqueue_trial({"max_num_seqs": seqs})
        trial = study.ask({"max_num_seqs": optuna.distributions.IntDistribution(1, 128)})
        trial.set_user_attr("flags", {"max_num_seqs": trial.params["max_num_seqs"]})
        trial.set_user_attr("metrics", {"output_throughput": tput, "p99_ttft_ms": ttft})
        trial.set_user_attr("constraints", [ttft - 500])
        trial.set_user_attr("serve_command", f"workbench serve tiny --max-num-seqs {seqs}")
        study.tell(trial, tput)
    failed = study.ask()
    failed.set_user_attr("fail_reason", "the server exited with code 2 at start: bad flag")
    study.tell(failed, state=optuna.trial.TrialState.FAIL)
    return storage, results
