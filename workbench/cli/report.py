"""`workbench report`: the Streamlit app, or a static export for CI artifacts."""
from __future__ import annotations

import sys
from pathlib import Path

import typer

from workbench.cli.console import console, fail
from workbench.report.launch import run_child

APP = Path(__file__).resolve().parents[1] / "report" / "app.py"


def report(storage: str = typer.Option(None, help="Optuna storage URL (e.g. sqlite:///results/tune.db)"),
           results: Path = typer.Option(Path("results"), help="folder of benchmark and gate result files"),
           port: int = typer.Option(8501), export: Path = typer.Option(None, help="write PNGs + report.md/.html "
                                                                                  "here instead of serving")) -> None:
    """Look at studies, benchmark runs and the gate's history."""
    if storage is None and (results / "tune.db").is_file():
        storage = f"sqlite:///{results / 'tune.db'}"
    if storage:
        from workbench.tune.storage import StorageError, check_readable

        try:
            check_readable(storage)
        except StorageError as exc:
            fail(str(exc))
    if export is not None:
        from workbench.report.export import export as do_export

        files = do_export(storage, str(results), export)
        console.print(f"wrote {len(files)} files to {export} (open {export / 'report.html'})")
        return
    args = [sys.executable, "-m", "streamlit", "run", str(APP), "--server.headless", "true", "--server.port",
            str(port), "--browser.gatherUsageStats", "false", "--", "--results", str(results)]
    if storage:
        args += ["--storage", storage]
    console.print(f"report at http://localhost:{port} (Ctrl-C to stop)")
    raise typer.Exit(run_child(args))
