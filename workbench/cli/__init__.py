"""The `workbench` command. Each command lives in its own module of this package (its logic below it, in
workbench/bench/, loadgen/, tune/, gate/, report/); this file only wires them."""
from __future__ import annotations

from importlib import metadata

import typer

DISTRIBUTION = "pagedbench"


def _version(show: bool) -> None:
    if show:
        try:
            version = metadata.version(DISTRIBUTION)
        except metadata.PackageNotFoundError:  # a checkout on PYTHONPATH, never installed
            version = "unknown (not installed: pip install -e .)"
        typer.echo(f"workbench ({DISTRIBUTION}) {version}")
        raise typer.Exit()


app = typer.Typer(help="PagedBench: benchmark and tune LLM serving.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """PagedBench: benchmark and tune LLM serving."""


bench_app = typer.Typer(help="Benchmarks: serving (any OpenAI-compatible endpoint), offline throughput, latency, "
                        "quality (perplexity).", no_args_is_help=True)
app.add_typer(bench_app, name="bench")

# --- command registration: one line per module (keep this block sorted) ---
from workbench.cli.models import app as models_app  # noqa: E402

app.add_typer(models_app, name="models")
from workbench.cli.bench_offline import PASS_THROUGH, compare, latency, quality, throughput  # noqa: E402
from workbench.cli.serve import serve  # noqa: E402

app.command("serve", context_settings=PASS_THROUGH)(serve)
bench_app.command("throughput", context_settings=PASS_THROUGH)(throughput)
bench_app.command("latency", context_settings=PASS_THROUGH)(latency)
bench_app.command("quality", context_settings=PASS_THROUGH)(quality)
bench_app.command("compare", context_settings=PASS_THROUGH)(compare)
from workbench.cli.bench_serve import ceiling, lora_load  # noqa: E402
from workbench.cli.bench_serve import serve as bench_serve  # noqa: E402

bench_app.command("serve", context_settings=PASS_THROUGH)(bench_serve)
bench_app.command("ceiling")(ceiling)
bench_app.command("lora-load")(lora_load)
from workbench.cli.tune import tune  # noqa: E402

app.command("tune")(tune)
from workbench.cli.gate import gate  # noqa: E402
from workbench.cli.report import report  # noqa: E402

app.command("gate")(gate)
app.command("report")(report)
# --- end of command registration ---


def main() -> None:
    """The `workbench` script. A usage error is one line and exit 2 (`workbench tune: error: No such
    option: --x`), as the argparse commands give, rather than the boxed usage of typer's click."""
    try:
        code = app(standalone_mode=False, prog_name="workbench")
    except typer.Abort:
        raise SystemExit(130) from None
    except typer.TyperException as exc:  # click's usage and parameter errors, as typer vendors them
        ctx = getattr(exc, "ctx", None)
        if type(exc).__name__ == "NoArgsIsHelpError":  # a bare group: its help, as click shows it
            typer.echo(ctx.get_help() if ctx else exc.format_message())
            raise SystemExit(2) from None
        typer.echo(f"{ctx.command_path if ctx else 'workbench'}: error: {exc.format_message()}", err=True)
        raise SystemExit(getattr(exc, "exit_code", 1)) from None
    raise SystemExit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
