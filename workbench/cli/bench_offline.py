"""`workbench bench throughput`, `bench latency` and `bench quality`. Their flags are argparse (the
engine's flags are shared with `workbench serve`), so typer passes the arguments through untouched;
`--help` prints argparse's help."""
from __future__ import annotations

import typer
from rich.table import Table

from workbench.cli.console import console, fail, stdout

PASS_THROUGH = {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []}


def _run(kind: str, argv: list[str]) -> None:
    from workbench.bench import latency as bench_latency
    from workbench.bench import throughput as bench_throughput

    module = bench_latency if kind == "latency" else bench_throughput
    args = module.build_parser().parse_args(argv)  # bad flags: one line, exit 2
    path = bench_throughput.output_path(args, kind)
    args.output_json = str(path)  # fixed now, so that a --profile trace lands beside it
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        result = module.run_latency(args) if kind == "latency" else module.run_throughput(args)
        result.save(path)
    except (ValueError, OSError, RuntimeError, ImportError) as exc:  # ConfigError is a ValueError
        fail(str(exc), 2)
    stdout.print(_latency_table(result) if kind == "latency" else _metrics_table(result, args.model))
    for note in result.extra.get("notes", []):
        console.print(f"[yellow]note:[/] {note}")
    baseline = result.extra.get("baseline", {})
    for note in baseline.get("notes", []):
        console.print(f"[yellow]baseline:[/] {note}")
    console.print(f"result written to {path}")
    if "error" in baseline:
        fail(f"the transformers baseline failed: {baseline['error']}")


def _metrics_table(result, model: str) -> Table:
    table = Table(title=f"bench throughput: {model}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in result.metrics.items():
        table.add_row(name, "-" if value is None else f"{value:,.0f}" if float(value).is_integer() else f"{value:,.3f}")
    return table


def _latency_table(result) -> Table:
    table = Table(title=f"bench latency: {result.config.get('model')}")
    spec = any("acceptance_rate" in r for r in result.extra["rows"])
    for column in ("batch", "TTFT ms", "TPOT ms", "E2E ms", "tok/s", "TPOT floor ms", "TPOT / floor", "preempted",
                   *(("accepted", "mean accepted len") if spec else ())):
        table.add_column(column, justify="right")
    for r in result.extra["rows"]:
        table.add_row(str(r["batch_size"]), f"{r['ttft_ms']:.2f}", f"{r['tpot_ms']:.3f}", f"{r['e2e_ms']:.1f}",
                      f"{r['output_throughput']:,.1f}", _maybe(r.get("tpot_floor_ms"), ".3f"),
                      _maybe(r.get("tpot_over_floor"), ".2f"),
                      str(r["preemptions"]),
                      *((f"{r.get('acceptance_rate', 0):.1%}", f"{r.get('mean_accepted_length', 1):.2f}") if spec
                        else ()))
    return table


def _maybe(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)  # no floor where the measurement beat it (CPU)


def _quality_table(result) -> Table:
    m = result.metrics
    table = Table(title=f"bench quality: {result.config.get('model')} on {result.config['text_name']}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("perplexity", f"{m['perplexity']:.4f}")
    if m.get("baseline_perplexity") is not None:
        table.add_row("transformers perplexity", f"{m['baseline_perplexity']:.4f}")
        table.add_row("ratio (ours / transformers)", f"{m['perplexity_ratio']:.5f}")
    table.add_row("scored tokens", f"{int(m['num_scored_tokens']):,}")
    table.add_row("windows", str(int(m["num_windows"])))
    table.add_row("scored tokens/s", f"{m['scored_tokens_per_s']:,.0f}")
    return table


def quality(ctx: typer.Context) -> None:
    """Perplexity of a model on a fixed text through prompt logprobs; --help for the flags."""
    from workbench.bench import quality as bench_quality
    from workbench.bench.throughput import output_path

    args = bench_quality.build_parser().parse_args(list(ctx.args))  # bad flags: one line, exit 2
    path = output_path(args, "quality")
    try:
        result = bench_quality.run_quality(args)
        result.save(path)
    except (ValueError, OSError, RuntimeError, ImportError) as exc:  # ConfigError is a ValueError
        fail(str(exc), 2)
    stdout.print(_quality_table(result))
    console.print(f"result written to {path}")
    baseline = result.extra.get("baseline", {})
    if "error" in baseline:
        fail(f"the transformers baseline failed: {baseline['error']}")


def throughput(ctx: typer.Context) -> None:
    """Offline throughput, in-process (like `vllm bench throughput`); --help for the flags."""
    _run("throughput", list(ctx.args))


def latency(ctx: typer.Context) -> None:
    """Batch-size sweep of TTFT and time per output token; --help for the flags."""
    _run("latency", list(ctx.args))


def compare(ctx: typer.Context) -> None:
    """The same workload offline and served, in one run (flags: `workbench bench compare --help`)."""
    from workbench.bench.compare import main

    raise typer.Exit(main(list(ctx.args)))
