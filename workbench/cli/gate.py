"""`workbench gate`: fail CI on a performance regression (see workbench/gate/compare.py for the statistics
and workbench/gate/history.py for the history rule and the JSON it emits)."""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import typer

from workbench.cli.console import console, fail
from workbench.gate import history as gate_history
from workbench.gate.compare import ALPHA, GateError, Row, Rules, Threshold, compare, markdown, merge, samples_of
from workbench.results import BenchResult, Environment, collect_environment


def _error(message: str) -> None:
    fail(message, 2)


@dataclass
class Measured:
    samples: dict[str, list[float]]
    device: str  # as the benchmark recorded it ("" when it did not)


def _load(path: Path) -> Measured:
    try:
        result = BenchResult.load(path)
    except ValueError as exc:
        _error(str(exc))
    return Measured(samples_of(result, str(path)), result.environment.device)


def _combine(parts: list[Measured]) -> Measured:
    return Measured(merge([p.samples for p in parts]), next((p.device for p in parts if p.device), ""))


def _run_repeats(command: str, repeats: int) -> Measured:
    if "{output}" not in command:
        _error("--run needs an {output} placeholder where the command writes its result file, e.g. "
               "\"workbench bench throughput --model tiny --output-json {output}\"")
    parts = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(repeats):
            out = Path(tmp) / f"run{i}.json"
            console.print(f"[bold]repeat {i + 1}/{repeats}[/]: {command.format(output=out)}")
            done = subprocess.run(shlex.split(command.format(output=out)), capture_output=True, text=True)
            if done.returncode != 0:
                _error(f"the benchmark command failed (exit {done.returncode}): "
                       f"{(done.stderr or done.stdout).strip()[-500:]}")
            parts.append(_load(out))
    return _combine(parts)


def _write_baseline(path: Path, cur: Measured, source) -> None:
    result = BenchResult(kind="gate", label="baseline", environment=collect_environment(cur.device),
                         metrics={k: sorted(v)[len(v) // 2] for k, v in cur.samples.items()},
                         extra={"samples": cur.samples, "source": source})
    result.save(path)
    console.print(f"baseline written to {path} ({len(next(iter(cur.samples.values()), []))} samples per metric)")


def _history_rows(path: Path, cur: Measured, thresholds: list[Threshold], rule: gate_history.HistoryRule,
                  env: Environment, rows: list[Row], created: str, label: str) -> list[gate_history.HistoryRow]:
    """Append this run to the history file and judge the latest runs against the window before them."""
    entries = gate_history.read(path)
    line = gate_history.entry(cur.samples, env, "pass", created, label)
    hist = gate_history.check(entries + [line], thresholds, rule, line["device"])
    failed = any(r.verdict == "fail" for r in rows) or any(h.verdict == "fail" for h in hist)
    line["verdict"] = "fail" if failed else "pass"
    gate_history.append(path, line)
    return hist


def gate(baseline: Path = typer.Option(None, help="baseline result (a gate baseline or any result file)"),
         current: list[Path] = typer.Option(None, help="current result file(s); repeat for several samples"),
         run: str = typer.Option(None, help="benchmark command to run --repeats times; {output} = its result file"),
         repeats: int = typer.Option(5, min=1, help="repeats of --run (5 a side lets the exact test reach 0.05 "
                                                    "for up to 12 tested metrics)"),
         metric: list[str] = typer.Option(..., help="NAME:-5% | NAME:+10% | NAME:+0 | NAME:-0.02 (repeatable)"),
         alpha: float = typer.Option(ALPHA, help="family-wise false-positive rate over the tested metrics (Holm)"),
         require_exact: bool = typer.Option(False, help="refuse sample sizes where the exact test cannot reach "
                                                        "its level, instead of deciding by bootstrap"),
         summary: Path = typer.Option(None, help="also write the Markdown table here"),
         update_baseline: bool = typer.Option(False, help="write the current samples as the new baseline"),
         history: Path = typer.Option(None, help="JSON-lines history file: append this run, and fail when the last "
                                                 "--history-consecutive runs are all worse than the window before"),
         history_window: int = typer.Option(10, help="N: past runs the latest ones are judged against"),
         history_consecutive: int = typer.Option(3, help="K: latest runs that must all violate"),
         emit: list[str] = typer.Option(None, help="json:PATH (this gate's result) or pytorch-hud:PATH (records for "
                                                   "PyTorch's benchmark dashboard); repeatable"),
         label: str = typer.Option("", help="name of this run in the history and the emitted records"),
         history_dir: Path = typer.Option(Path("results/gate"), help="where each gate run is recorded")) -> None:
    """Compare current performance against a baseline and/or a history; exit 0 pass, 1 regression, 2 bad input."""
    try:
        thresholds = [Threshold.parse(m) for m in metric]
        emits = [gate_history.parse_emit(e) for e in emit or []]
        rule = gate_history.HistoryRule(history_window, history_consecutive)
    except GateError as exc:
        _error(str(exc))
    if not 0 < alpha < 1:
        _error(f"--alpha {alpha}: must lie between 0 and 1")
    if bool(current) == bool(run):
        _error("give either --current FILE(s) or --run COMMAND")
    if baseline is None and (history is None or update_baseline):
        _error("give --baseline FILE" + ("" if update_baseline else " or --history FILE (or both)"))
    cur = _combine([_load(p) for p in current]) if current else _run_repeats(run, repeats)
    if update_baseline:
        return _write_baseline(baseline, cur, run or [str(p) for p in current])
    env = collect_environment(cur.device)
    created = datetime.now(UTC).isoformat(timespec="seconds")
    try:
        rows = compare(_load(baseline).samples, cur.samples, thresholds, Rules(alpha, require_exact)) \
            if baseline else []
        hist = _history_rows(history, cur, thresholds, rule, env, rows, created, label) if history else []
    except GateError as exc:
        _error(str(exc))
    _report(rows, hist, cur, env, created, alpha, label, summary, emits, baseline, history_dir)


def _report(rows, hist, cur: Measured, env: Environment, created: str, alpha: float, label: str, summary, emits,
            baseline, history_dir: Path) -> None:
    failed = [r.metric for r in rows if r.verdict == "fail"] + \
             [f"{h.metric} (history)" for h in hist if h.verdict == "fail"]
    verdict = "fail" if failed else "pass"
    tables = "\n\n".join(filter(None, [markdown(rows) if rows else "",
                                       gate_history.markdown(hist) if hist else ""]))
    print(tables)
    for target in filter(None, [summary, os.environ.get("GITHUB_STEP_SUMMARY")]):
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        with open(target, "a") as f:
            f.write(f"### Performance gate: {verdict.upper()}\n\n{tables}\n\n")
    for fmt, path in emits:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(gate_history.emit(fmt, rows, hist, cur.samples, env, verdict, created, alpha,
                                                     label), indent=2))
    if rows:  # the report's gate page reads these
        record = BenchResult(kind="gate", label=f"gate {verdict}", created=created, environment=env,
                             metrics={r.metric: r.current for r in rows},
                             extra={"rows": [r.as_dict() for r in rows], "verdict": verdict,
                                    "baseline": str(baseline), "samples": cur.samples})
        record.save(history_dir / f"gate-{created.replace(':', '')}.json")
    if failed:
        console.print(f"[red]regression[/] in {', '.join(failed)}")
        raise typer.Exit(1)
    console.print("[green]no regression[/]")
