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


@dataclass
class OtherFile:
    """A committed measurement that is not a BenchResult: `python -m kernels.bench` or `bench ceiling` output."""
    path: Path
    kind: str  # kernels | ceiling
    data: dict


def offline_runs(runs: list[RunFile], kind: str) -> list[RunFile]:
    """`bench throughput` or `bench latency` results, oldest first; a tuning study's own trial runs
    (their folder holds the study's *-best.json) belong to the study, not among the benchmarks."""
    return sorted((r for r in runs if r.result.kind == kind and not from_a_study(r)),
                  key=lambda r: r.result.created)


def from_a_study(run: RunFile) -> bool:
    return any(run.path.parent.glob("*-best.json"))


def run_title(run: RunFile) -> str:
    """What tells runs apart across commits, devices and labels: label (or model), device, commit."""
    res = run.result
    name = res.label or str(res.config.get("model") or run.path.stem)
    device = short_device(res.environment.device or str(res.config.get("device") or ""))
    return " · ".join(filter(None, [name, device, res.environment.commit[:7]]))


def model_of(run: RunFile) -> str:
    return str(run.result.config.get("model") or run.result.server.get("model") or "runs")


def has_repeats(runs: list[RunFile]) -> bool:
    """Is there a model with two runs or more (something to compare across commits, devices, labels)?"""
    models = [model_of(r) for r in runs]
    return len(set(models)) < len(models)


def short_device(device: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'H100 80GB'."""
    words = device.replace("NVIDIA ", "").split()
    return " ".join(words[:2]) if words else ""


def other_files(results_dir: str | Path | None) -> list[OtherFile]:
    if not results_dir or not Path(results_dir).is_dir():
        return []
    found = []
    for path in sorted(Path(results_dir).rglob("*.json")):
        try:
            doc = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if isinstance(doc, dict) and isinstance(doc.get("decode"), list) and "copy_bandwidth_GBps" in doc:
            found.append(OtherFile(path, "kernels", doc))
        elif isinstance(doc, dict) and isinstance(doc.get("runs"), dict) and "median_request_throughput" in doc:
            found.append(OtherFile(path, "ceiling", doc))
    return found


def history_frame(results_dir: str | Path | None) -> pd.DataFrame:
    """Every `workbench gate --history FILE.jsonl` line under the folder, one row per run and metric
    (unreadable files and lines are skipped: the gate itself reports those)."""
    rows = []
    for path in sorted(Path(results_dir).rglob("*.jsonl")) if results_dir and Path(results_dir).is_dir() else []:
        for i, line in enumerate(path.read_text(errors="replace").splitlines()):
            try:
                entry = json.loads(line)
                metrics = entry["metrics"]
                rows += [{"file": path.name, "run": i, "created": entry.get("created", ""),
                          "commit": str(entry.get("commit", ""))[:7], "device": entry.get("device", ""),
                          "verdict": entry.get("verdict", ""), "metric": k, "value": float(v)}
                         for k, v in metrics.items() if v is not None]
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError, ValueError):
                continue
    return pd.DataFrame(rows, columns=["file", "run", "created", "commit", "device", "verdict", "metric", "value"])


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

    from workbench.tune.storage import resolve_url

    return [s.study_name for s in optuna.get_all_study_summaries(resolve_url(storage))]


def load_study(storage: str, name: str):
    import optuna

    from workbench.tune.storage import resolve_url

    return optuna.load_study(study_name=name, storage=resolve_url(storage))


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
