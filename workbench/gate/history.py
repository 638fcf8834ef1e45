"""The gate's history: one JSON line per gate run (metric medians, device, commit, verdict), and the
rule that flags a regression from it without any baseline file: the last K runs all fall outside
the window of the N runs before them (the consecutive-violation rule of PyTorch's benchmark
dashboard, so one noisy run never flags and a lasting step down always does).

A run violates when it is worse than every run of the window AND its change from the window's
median is past the metric's threshold. Only runs on the same device are compared.

History line (`--history FILE`), one per gate run:
  {"created": ISO time, "commit": sha, "device": str, "label": str, "verdict": "pass"|"fail",
   "metrics": {name: median of this run's samples}, "samples": {name: [every repeat]}}

`--emit json:PATH` writes the gate's own result (schema "pagedbench-gate/1"):
  {"schema", "verdict", "created", "commit", "device", "alpha",
   "rows": [{metric, baseline, current, change, change_pct, threshold, rule, p_value, holm_level,
             n_baseline, n_current, verdict, note}],
   "history": [{metric, verdict, window, consecutive, window_median, window_worst, recent, note}]}
`--emit pytorch-hud:PATH` writes the records of PyTorch's OSS benchmark database (its HUD dashboard),
one per metric, in the shape vLLM's benchmarks write them:
  {"benchmark": {name, mode, extra_info}, "model": {name},
   "metric": {name, benchmark_values, target_value, extra_info}, "runners": [{name, type}]}
"""
from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

from workbench.gate.compare import GateError, Row, Threshold
from workbench.results import Environment

EMIT_FORMATS = ("json", "pytorch-hud")
SCHEMA = "pagedbench-gate/1"


@dataclass
class HistoryRule:
    window: int = 10  # N: the runs the latest ones are judged against
    consecutive: int = 3  # K: how many latest runs must all violate

    def __post_init__(self) -> None:
        if self.window < 1 or self.consecutive < 1:
            raise GateError("--history-window and --history-consecutive must be at least 1")


@dataclass
class HistoryRow:
    metric: str
    verdict: str  # pass | fail | too-short
    window: int
    consecutive: int
    window_median: float | None = None
    window_worst: float | None = None
    recent: list[float] | None = None
    note: str = ""


def read(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    entries = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as exc:
            raise GateError(f"{path}:{number}: not a JSON line ({exc.msg})") from None
        if not isinstance(entry, dict) or not isinstance(entry.get("metrics"), dict):
            raise GateError(f"{path}:{number}: a history line needs a 'metrics' object")
        entries.append(entry)
    return entries


def entry(samples: dict[str, list[float]], env: Environment, verdict: str, created: str, label: str = "") -> dict:
    return {"created": created, "commit": env.commit, "device": env.device or env.platform, "label": label,
            "verdict": verdict, "metrics": {k: statistics.median(v) for k, v in samples.items() if v},
            "samples": samples}


def append(path: Path, line: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(line) + "\n")


def check(entries: list[dict], thresholds: list[Threshold], rule: HistoryRule, device: str) -> list[HistoryRow]:
    """Judge the latest runs (the current one included, appended last) against the window before them."""
    same = [e for e in entries if e.get("device") == device]
    rows = []
    for t in thresholds:
        values = [float(e["metrics"][t.metric]) for e in same if e["metrics"].get(t.metric) is not None]
        row = HistoryRow(t.metric, "pass", rule.window, rule.consecutive)
        if len(values) < rule.window + rule.consecutive:
            row.verdict = "too-short"
            row.note = (f"{len(values)} runs on this device; the rule needs {rule.window + rule.consecutive} "
                        f"(window {rule.window} + last {rule.consecutive})")
            rows.append(row)
            continue
        window, recent = values[-(rule.window + rule.consecutive):-rule.consecutive], values[-rule.consecutive:]
        row.window_median = statistics.median(window)
        row.window_worst = min(window) if t.higher_is_better else max(window)
        row.recent = recent

        def violates(v: float) -> bool:
            worse = v < row.window_worst if t.higher_is_better else v > row.window_worst
            return worse and t.past(t.change(row.window_median, v))

        if all(violates(v) for v in recent):
            row.verdict = "fail"
            row.note = f"the last {rule.consecutive} runs are all worse than the previous {rule.window}"
        rows.append(row)
    return rows


def _fmt(v: float | None) -> str:
    return "" if v is None else f"{v:,.4g}"


def markdown(rows: list[HistoryRow]) -> str:
    lines = ["| metric | window median | window worst | last runs | verdict |", "|---|---:|---:|---|---|"]
    for r in rows:
        recent = ", ".join(f"{v:,.4g}" for v in r.recent or [])
        mark = {"pass": "✅ pass", "fail": "❌ FAIL", "too-short": "… too short"}[r.verdict]
        lines.append(f"| {r.metric} | {_fmt(r.window_median)} | {_fmt(r.window_worst)} | {recent} | {mark} |")
    return "\n".join(lines)


def parse_emit(spec: str) -> tuple[str, Path]:
    fmt, sep, path = spec.partition(":")
    if not sep or fmt not in EMIT_FORMATS or not path:
        raise GateError(f"--emit {spec!r}: expected FORMAT:PATH with FORMAT one of {', '.join(EMIT_FORMATS)}")
    return fmt, Path(path)


def emit(fmt: str, rows: list[Row], history: list[HistoryRow], samples: dict[str, list[float]], env: Environment,
         verdict: str, created: str, alpha: float, label: str = "") -> object:
    if fmt == "json":
        return {"schema": SCHEMA, "verdict": verdict, "created": created, "commit": env.commit,
                "device": env.device or env.platform, "alpha": alpha, "rows": [r.as_dict() for r in rows],
                "history": [asdict(h) for h in history]}
    names = [r.metric for r in rows] or [h.metric for h in history]
    by_metric = {r.metric: r for r in rows}
    return [{"benchmark": {"name": "PagedBench gate", "mode": "inference",
                           "extra_info": {"verdict": verdict, "commit": env.commit, "label": label}},
             "model": {"name": label or "pagedbench"},
             "metric": {"name": name, "benchmark_values": samples.get(name, []),
                        "target_value": by_metric[name].baseline if name in by_metric else None,
                        "extra_info": by_metric[name].as_dict() if name in by_metric else {}},
             "runners": [{"name": env.hostname, "type": env.device or env.platform}]} for name in names]
