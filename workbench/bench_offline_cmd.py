"""`workbench bench throughput` and `workbench bench latency`: argparse flags (shared with the server's
engine flags) passed through typer."""
from __future__ import annotations

from datetime import datetime
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

PASS_THROUGH = {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []}
console = Console(stderr=True)


def _run(kind: str, argv: list[str]) -> None:
    from engine.config import ConfigError
    from workbench.bench_offline import build_parser, run_latency, run_throughput

    args = build_parser(f"workbench bench {kind}", latency=kind == "latency").parse_args(argv)
    try:
        result = (run_latency if kind == "latency" else run_throughput)(args)
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2) from None
    path = Path(args.output_json or f"results/{kind}-{datetime.now():%Y%m%d-%H%M%S}.json")
    result.save(path)
    table = Table(title=f"bench {kind}: {args.model}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in result.metrics.items():
        table.add_row(name, f"{value:,.3f}" if isinstance(value, float) else str(value))
    Console().print(table)
    for note in result.extra.get("baseline", {}).get("notes", []):
        console.print(f"[yellow]baseline:[/] {note}")
    console.print(f"result written to {path}")


def throughput(ctx: typer.Context) -> None:
    """Offline throughput, in-process (like `vllm bench throughput`); --help for the flags."""
    _run("throughput", list(ctx.args))


def latency(ctx: typer.Context) -> None:
    """Batch-size sweep of TTFT and time per output token; --help for the flags."""
    _run("latency", list(ctx.args))
