"""`workbench tune [STUDY]`: run an Optuna study over engine settings (the default one without arguments)."""
from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from workbench.cli.console import console, stdout


def tune(study: str = typer.Argument(None, help="study file or name (studies/NAME.toml); default: the "
                                                 "embedded tiny-on-CPU study"),
         storage: str = typer.Option(None, help="Optuna storage URL: sqlite:///x.db (default results/tune.db), "
                                                "postgresql://..., or journal:FILE"),
         study_name: str = typer.Option(None, help="name in the storage (default: the study file's name); "
                                                   "workers with the same name share the study"),
         n_trials: int = typer.Option(None, help="total finished trials wanted (all workers together)"),
         timeout: float = typer.Option(None, help="stop starting trials after this many seconds"),
         launch: str = typer.Option(None, help="server command template, e.g. \"vllm serve {model} --port {port} "
                                               "{flags}\" ({host} too); default: this engine's server"),
         model: str = typer.Option(None, help="override the study's model"),
         repeats: int = typer.Option(None, min=1, help="override the study's repeats (runs per trial)"),
         validate: int = typer.Option(None, min=0, help="override the study's validate (interleaved re-runs; "
                                                         "0: none, e.g. for all but the last of several sittings)"),
         results_dir: Path = typer.Option(Path("results"), help="where trial results and the best config go"),
         fresh: bool = typer.Option(False, "--fresh", help="delete the stored study of this name first and "
                                                            "start over (not for a second worker of a shared "
                                                            "study)")) -> None:
    """Find the engine settings that serve a workload best within its constraints."""
    from workbench.tune.checks import check_study
    from workbench.tune.runner import TuneOptions, failure_text, first_failure, run_study, run_validation, summarize
    from workbench.tune.storage import StorageError
    from workbench.tune.study_file import StudyError, find_study, load_study

    try:
        path = find_study(study)
        spec, text = load_study(path)
    except StudyError as exc:
        console.print(f"[red]error:[/] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(2) from None
    if model:
        spec.study.model = model
    if repeats:
        spec.study.repeats = repeats
    if validate is not None:
        if validate == 1:
            console.print("[red]error:[/] --validate: give 0 (off) or at least 2")
            raise typer.Exit(2)
        spec.study.validate_rounds = validate
    try:
        check_study(spec, path, launch)
    except StudyError as exc:
        console.print(f"[red]error:[/] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(2) from None
    name = study_name or spec.study.name
    if storage is None:
        results_dir.mkdir(parents=True, exist_ok=True)
        storage = f"sqlite:///{results_dir / 'tune.db'}"
    opts = TuneOptions(storage=storage, study_name=name, n_trials=n_trials, timeout=timeout, launch=launch,
                       results_dir=results_dir, fresh=fresh)
    console.print(f"study [bold]{name}[/] from {path}: model {spec.study.model}, "
                  f"{opts.n_trials or spec.study.n_trials or 'unlimited'} trials, storage {storage}")
    try:
        ostudy = run_study(spec, text, opts)
        validation = run_validation(ostudy, spec, opts)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]: finished trials are stored; run the same command again to resume")
        raise typer.Exit(130) from None
    except StorageError as exc:  # a bad URL, an unreachable database, a missing driver
        console.print(f"[red]error:[/] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(1) from None
    except Exception as exc:
        console.print(f"[red]error:[/] {escape(f'{type(exc).__name__}: {exc}')}", soft_wrap=True)
        raise typer.Exit(1) from None
    summary = summarize(ostudy, spec, opts, validation)
    show(summary)
    console.print(f"best configuration written to {summary['path']}")
    console.print(f"open the report: workbench report --storage {storage} --results {results_dir}")
    failed = first_failure(ostudy)
    if failed is not None:
        console.print("[red]every trial failed[/]; the first one in full:")
        console.print(failure_text(failed), markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(1)
    if not summary["best"]:
        console.print("[yellow]no trial satisfied every constraint[/]; relax the constraints or widen the search")


def show(summary: dict) -> None:
    counts = ", ".join(f"{n.lower()} {c}" for n, c in summary["trials"].items() if c)
    console.print(f"trials: {counts}")
    if not summary["best"]:
        return
    title = "best configuration" if len(summary["best"]) == 1 else "Pareto set (feasible trials)"
    table = Table(title=title)
    table.add_column("trial", justify="right")
    for o in summary["objectives"]:
        table.add_column(o["metric"], justify="right")
    table.add_column("vs defaults")
    table.add_column("command")
    rows = list(summary["best"])
    for c in (summary["validation"] or {}).get("candidates", []):  # validated, though not the search's best
        if c["trial"] not in [b["trial"] for b in rows] and c["median"] is not None:
            rows.append({"trial": c["trial"], "values": [c["median"]], "vs_defaults": c["comparison"]["verdict"],
                         "serve_command": c.get("serve_command", "")})
    if summary["defaults"] and summary["defaults"]["trial"] not in [b["trial"] for b in rows]:
        rows.append(summary["defaults"] | {"vs_defaults": "baseline"})
    for b in rows:
        name = f"{b['trial']} (defaults)" if b.get("label") == "defaults" else str(b["trial"])
        table.add_row(name, *(f"{v:,.2f}" for v in b["values"]), b["vs_defaults"], b["serve_command"])
    stdout.print(table)
    if summary["validation"]:
        v = summary["validation"]
        console.print(f"validated over {v['rounds']} interleaved rounds: [bold]{escape(v['verdict'])}[/]")
        if "recommended" in summary:
            console.print(f"recommended: {summary['recommended']['serve_command']}")
    else:
        console.print(summary["verdict"], markup=False)


