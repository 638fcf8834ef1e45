"""Load result files and Optuna studies into plain rows and DataFrames."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from workbench.results import BenchResult


@dataclass
class RunFile:
    path: Path
    result: BenchResult

    @property
    def name(self) -> str:
        return self.result.label or self.path.stem


def load_results(results_dir: str | Path | None) -> list[RunFile]:
    """Every readable result file under the folder (malformed ones are skipped, not fatal)."""
    if not results_dir or not Path(results_dir).is_dir():
        return []
    runs = []
    for path in sorted(Path(results_dir).rglob("*.json")):
        try:
            runs.append(RunFile(path, BenchResult.load(path)))
        except ValueError:
            continue
    return runs


def serve_runs(runs: list[RunFile]) -> list[RunFile]:
    return [r for r in runs if r.result.kind == "serve" and r.result.requests]


def gate_runs(runs: list[RunFile]) -> list[RunFile]:
    return sorted((r for r in runs if r.result.kind == "gate" and r.result.extra.get("rows")),
                  key=lambda r: r.result.created)


def sweeps(results_dir: str | Path | None, runs: list[RunFile]) -> dict[str, list[RunFile]]:
    """Sweep summaries written by `bench serve --sweep/--request-rate a,b,c`, each point in rate order."""
    out: dict[str, list[RunFile]] = {}
    if not results_dir or not Path(results_dir).is_dir():
        return out
    by_path = {r.path.resolve(): r for r in runs}
    for summary in sorted(Path(results_dir).rglob("sweep-*.json")):
        try:
            paths = json.loads(summary.read_text()).get("results", [])
        except (json.JSONDecodeError, AttributeError):
            continue
        points = [by_path[Path(p).resolve()] for p in paths if Path(p).resolve() in by_path]
        if len(points) >= 2:
            out[summary.stem] = sorted(points, key=lambda r: r.result.metrics.get("request_throughput") or 0)
    return out


def request_frame(run: RunFile) -> pd.DataFrame:
    rows = [{"ttft_ms": r.ttft * 1e3 if r.ttft is not None else None,
             "tpot_ms": r.tpot * 1e3 if r.tpot is not None else None,
             "e2el_ms": r.e2el * 1e3 if r.e2el is not None else None,
             "output_tokens": r.output_tokens, "success": r.success} for r in run.result.requests]
    return pd.DataFrame(rows)


def itl_values_ms(run: RunFile) -> list[float]:
    return [gap * 1e3 for r in run.result.requests for gap in r.itl]


# ---------------------------------------------------------------- studies
def study_names(storage: str | None) -> list[str]:
    if not storage:
        return []
    import optuna

    return [s.study_name for s in optuna.get_all_study_summaries(storage)]


def load_study(storage: str, name: str):
    import optuna

    return optuna.load_study(study_name=name, storage=storage)


def trials_frame(study) -> pd.DataFrame:
    objectives = [o["metric"] for o in study.user_attrs.get("objectives", [])]
    rows = []
    for t in study.get_trials(deepcopy=False):
        metrics = t.user_attrs.get("metrics", {})
        constraints = t.user_attrs.get("constraints", [])
        row = {"trial": t.number, "state": t.state.name,
               "feasible": t.state.name == "COMPLETE" and all(v <= 0 for v in constraints),
               "duration_s": t.duration.total_seconds() if t.duration else None,
               "fail_reason": t.user_attrs.get("fail_reason", "")}
        row |= {f"param:{k}": v for k, v in t.params.items()}
        for i, metric in enumerate(objectives):
            row[metric] = t.values[i] if t.values else metrics.get(metric)
        for key in ("output_throughput", "request_throughput", "p99_ttft_ms", "p99_tpot_ms", "request_goodput",
                    "error_rate"):
            row.setdefault(key, metrics.get(key))
        rows.append(row)
    return pd.DataFrame(rows)
