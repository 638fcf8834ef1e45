"""`workbench gate`: fail CI on a performance regression (see workbench/gate.py for the rules)."""
from __future__ import annotations

import os
import shlex
import subprocess
import tempfile
from pathlib import Path

import typer
from rich.console import Console

from workbench.gate import GateError, Threshold, compare, markdown, merge, samples_of
from workbench.results import BenchResult, collect_environment

console = Console(stderr=True)


def _error(message: str) -> None:
    console.print(f"[red]error:[/] {message}")
    raise typer.Exit(2)


def _load(path: Path) -> dict[str, list[float]]:
    try:
        return samples_of(BenchResult.load(path), str(path))
    except ValueError as exc:
        _error(str(exc))


def _run_repeats(command: str, repeats: int) -> dict[str, list[float]]:
    if "{output}" not in command:
        _error("--run needs an {output} placeholder where the command writes its result file, e.g. "
               "\"workbench bench throughput --model tiny --output-json {output}\"")
    samples = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(repeats):
            out = Path(tmp) / f"run{i}.json"
            console.print(f"[bold]repeat {i + 1}/{repeats}[/]: {command.format(output=out)}")
            done = subprocess.run(shlex.split(command.format(output=out)), capture_output=True, text=True)
            if done.returncode != 0:
                _error(f"the benchmark command failed (exit {done.returncode}): "
                       f"{(done.stderr or done.stdout).strip()[-500:]}")
            samples.append(_load(out))
    return merge(samples)


def gate(baseline: Path = typer.Option(..., help="baseline result (a gate baseline or any result file)"),
         current: list[Path] = typer.Option(None, help="current result file(s); repeat for several samples"),
         run: str = typer.Option(None, help="benchmark command to run --repeats times; {output} = its result file"),
         repeats: int = typer.Option(1, min=1),
         metric: list[str] = typer.Option(..., help="NAME:-5% | NAME:+10% | NAME:+0 | NAME:-0.02 (repeatable)"),
         summary: Path = typer.Option(None, help="also write the Markdown table here"),
         update_baseline: bool = typer.Option(False, help="write the current samples as the new baseline"),
         history_dir: Path = typer.Option(Path("results/gate"), help="where each gate run is recorded")) -> None:
    """Compare current performance against a baseline; exit 0 pass, 1 regression, 2 bad input."""
    try:
        thresholds = [Threshold.parse(m) for m in metric]
    except GateError as exc:
        _error(str(exc))
    if bool(current) == bool(run):
        _error("give either --current FILE(s) or --run COMMAND")
    cur = merge([_load(p) for p in current]) if current else _run_repeats(run, repeats)
    if update_baseline:
        result = BenchResult(kind="gate", label="baseline", environment=collect_environment(),
                             metrics={k: sorted(v)[len(v) // 2] for k, v in cur.items()},
                             extra={"samples": cur, "source": run or [str(p) for p in current]})
        result.save(baseline)
        console.print(f"baseline written to {baseline} ({len(next(iter(cur.values()), []))} samples per metric)")
        return
    base = _load(baseline)
    try:
        rows = compare(base, cur, thresholds)
    except GateError as exc:
        _error(str(exc))
    table = markdown(rows)
    failed = [r for r in rows if r.verdict == "fail"]
    verdict = "fail" if failed else "pass"
    print(table)
    for target in filter(None, [summary, os.environ.get("GITHUB_STEP_SUMMARY")]):
        with open(target, "a") as f:
            f.write(f"### Performance gate: {verdict.upper()}\n\n{table}\n\n")
    record = BenchResult(kind="gate", label=f"gate {verdict}", environment=collect_environment(),
                         metrics={r.metric: r.current for r in rows},
                         extra={"rows": [r.as_dict() for r in rows], "verdict": verdict, "baseline": str(baseline),
                                "samples": cur})
    record.save(history_dir / f"gate-{record.created.replace(':', '')}.json")
    if failed:
        console.print(f"[red]regression[/] in {', '.join(r.metric for r in failed)}")
        raise typer.Exit(1)
    console.print("[green]no regression[/]")
