"""`workbench bench serve` (any OpenAI-compatible endpoint) and `workbench bench ceiling` (the load
generator's own limit, against a compute-free server)."""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
from datetime import datetime
from pathlib import Path

import httpx
import typer
from pydantic import ValidationError
from rich.table import Table

from workbench.cli.console import console, fail, stdout
from workbench.results import BenchResult

SHOWN = ["completed", "failed", "duration_s", "request_throughput", "output_throughput", "total_token_throughput",
         "request_goodput", "request_goodput_sched", "peak_concurrency", "mean_ttft_ms", "median_ttft_ms",
         "p99_ttft_ms", "mean_tpot_ms", "median_tpot_ms", "p99_tpot_ms", "mean_itl_ms", "median_itl_ms", "p99_itl_ms",
         "mean_e2el_ms", "p99_e2el_ms", "mean_queue_delay_ms", "p99_queue_delay_ms", "p99_sched_ttft_ms",
         "p99_sched_e2el_ms", "prefix_cache_hit_rate", "server_preemptions", "sessions", "mean_session_duration_s"]


LOAD_FLAGS = ["endpoint", "dataset", "dataset_path", "num_prompts", "input_len", "output_len", "range_ratio",
              "prefix_len", "num_prefixes", "burstiness", "max_concurrency", "seed", "warmup", "duration", "goodput",
              "num_turns", "think_time", "trace_format", "time_scale", "trace_block_size", "ramp_up", "ramp_up_start",
              "ramp_up_end"]
CLIENT_FLAGS = ["base_url", "model", "api_key", "workers", "ignore_eos", "tokenizer", "reset_prefix_cache", "label"]


def build_parser() -> argparse.ArgumentParser:
    """vLLM's `bench serve` spellings; every default from ServeBenchConfig (workbench/loadgen/config.py)."""
    from engine.server.args import OneLineParser
    from workbench.loadgen.config import ServeBenchConfig
    from workbench.loadgen.flags import add_model_flags

    p = OneLineParser(prog="workbench bench serve", description="Measure any OpenAI-compatible server with "
                      "streamed requests.")
    add_model_flags(p, ServeBenchConfig, CLIENT_FLAGS, custom={
        "model": {"required": True, "help": "model name as the server serves it"},
        "api_key": {"help": "the server's API key (env: OPENAI_API_KEY)"}})
    p.set_defaults(api_key=os.environ.get("OPENAI_API_KEY"))
    add_model_flags(p, ServeBenchConfig, LOAD_FLAGS, custom={
        "goodput": {"nargs": "+", "action": "extend", "metavar": "KEY:MS", "default": []}})
    p.add_argument("--request-rate", default="inf", help="requests/s; 'inf', or a comma list for a sweep")
    p.add_argument("--lora-names", default=None, help="spread requests over these model names (LoRA adapters; list "
                   "the base model too to mix it in): a,b,c uniformly, or a:3,b:1 with weights")
    p.add_argument("--sweep", type=int, default=None, help="GuideLLM-style sweep: sync, max, and N rates between")
    p.add_argument("--result-dir", type=Path, default=Path("results"))
    return p


def parse_rates(text: str) -> list[float]:
    rates = []
    for part in text.split(","):
        part = part.strip().lower()
        try:
            rate = math.inf if part in ("inf", "infinity") else float(part)
        except ValueError:
            fail(f"--request-rate takes numbers or 'inf', comma-separated; got {part!r}", 2)
        if not rate > 0:
            fail(f"--request-rate must be positive, got {part!r}", 2)
        rates.append(rate)
    return rates


def save(result: BenchResult, result_dir: Path) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    label = "".join(c if c.isalnum() or c in "-_.=" else "-" for c in result.label) or "run"
    path = result.save(result_dir / f"serve-{stamp}-{label}.json")
    with open(path.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["index", "start_time", "scheduled_time", "success", "error", "prompt_tokens",
                         "output_tokens", "ttft_s", "tpot_s", "e2el_s", "itl_count", "queue_delay_s", "session",
                         "turn", "cached_tokens"])
        for r in result.requests:
            writer.writerow([r.index, r.start_time, r.scheduled_time, r.success, r.error or "", r.prompt_tokens,
                             r.output_tokens, r.ttft, r.tpot, r.e2el, len(r.itl), r.queue_delay, r.session, r.turn,
                             r.cached_tokens])
    return path


def show(result: BenchResult) -> None:
    table = Table(title=f"bench serve {result.label}".strip())
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name in SHOWN:
        if name not in result.metrics:
            continue  # e.g. no /metrics on the server, or not a multi-turn run
        value = result.metrics.get(name)
        table.add_row(name, "-" if value is None else f"{value:,.2f}")
    stdout.print(table)
    for kind, count in result.extra.get("errors", {}).items():
        console.print(f"[red]{count} failed[/] with {kind}")
    console.print(f"prompt lengths: {result.extra.get('lengths')}")
    if result.turns:
        console.print("per turn: " + ", ".join(
            f"#{int(t['turn']) + 1} ttft {_ms(t['median_ttft_ms'])} hit {_pct(t['prefix_cache_hit_rate'])}"
            for t in result.turns))


def _ms(v) -> str:
    return "-" if v is None else f"{v:,.1f} ms"


def _pct(v) -> str:
    return "-" if v is None else f"{v:.0%}"


def serve(ctx: typer.Context) -> None:
    """Measure any OpenAI-compatible server with streamed requests; --help for the flags."""
    from workbench.loadgen.config import ServeBenchConfig, parse_goodput, parse_lora_names
    from workbench.loadgen.runner import ServerUnavailable, run_serve_benchmark
    from workbench.loadgen.sweep import run_rates, run_sweep

    args = build_parser().parse_args(list(ctx.args))  # bad flags: one line, exit 2
    rates = parse_rates(args.request_rate)
    settings = {k: getattr(args, k) for k in CLIENT_FLAGS + LOAD_FLAGS}
    try:
        names, weights = parse_lora_names(args.lora_names)
        settings["goodput"] = parse_goodput(args.goodput)
        config = ServeBenchConfig(**settings, request_rate=rates[0], lora_names=names, lora_weights=weights)
    except (ValidationError, ValueError) as exc:
        fail(_first_error(exc), 2)
    try:
        if args.sweep is not None:
            results = run_sweep(config, args.sweep)
        elif len(rates) > 1:
            results = run_rates(config, rates)
        else:
            results = [run_serve_benchmark(config)]
    except ServerUnavailable as exc:
        fail(str(exc))
    except ValueError as exc:
        fail(str(exc), 2)
    except RuntimeError as exc:  # a worker process failed, or the prefix-cache reset was refused
        fail(str(exc))
    paths = []
    for result in results:
        show(result)
        paths.append(save(result, args.result_dir))
    if len(results) > 1:
        summary = args.result_dir / f"sweep-{datetime.now():%Y%m%d-%H%M%S}.json"
        summary.write_text(json.dumps({"kind": "sweep", "results": [str(p) for p in paths]}, indent=2))
        paths.append(summary)
    for p in paths:
        console.print(f"wrote {p}")


def _first_error(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        e = exc.errors()[0]
        return f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}"
    return str(exc)


def lora_load(adapter: str = typer.Option(..., help="adapter directory (PEFT), as the server sees the path"),
              base_url: str = typer.Option("http://127.0.0.1:8000", help="the server, with or without /v1"),
              api_key: str = typer.Option(None, envvar="OPENAI_API_KEY"),
              repeats: int = typer.Option(10, min=1),
              model: str = typer.Option(None, help="measure in-process on this model instead of a server (for a "
                                                   "machine without the server's packages)"),
              load_format: str = typer.Option("dummy", help="with --model"),
              max_loras: int = typer.Option(8, help="with --model"),
              max_lora_rank: int = typer.Option(16, help="with --model"),
              output_json: Path = typer.Option(None, help="write the measurement here")) -> None:
    """Runtime LoRA load latency: POST /v1/load_lora_adapter, then at once a request under it; the time
    until it is served (the server needs VLLM_ALLOW_RUNTIME_LORA_UPDATING=True and --enable-lora). With
    --model, the same in-process."""
    from workbench.bench.lora import measure_load_latency, measure_load_latency_offline
    from workbench.results import collect_environment

    try:
        if model:
            result = measure_load_latency_offline(model, adapter, repeats, {
                "load_format": load_format, "max_loras": max_loras, "max_lora_rank": max_lora_rank})
        else:
            result = measure_load_latency(base_url, adapter, repeats, api_key)
    except (RuntimeError, ValueError, httpx.HTTPError) as exc:  # ConfigError and LoRAError are ValueErrors
        fail(str(exc))
    result |= {"commit": collect_environment().commit, "command": " ".join(sys.argv)}
    for k in ("load_ms", "first_request_ms", "until_served_ms", "warm_request_ms", "base_request_ms"):
        console.print(f"median {k}: {result[f'median_{k}']:.1f}")
    if output_json:
        output_json.parent.mkdir(parents=True, exist_ok=True)
        output_json.write_text(json.dumps(result, indent=2))
        console.print(f"wrote {output_json}")


def ceiling(num_prompts: int = typer.Option(3000, min=1, help="requests per run"),
            max_concurrency: int = typer.Option(64, min=1), repeats: int = typer.Option(3, min=1),
            workers: int = typer.Option(2, min=1, help="client processes (bench serve --workers)"),
            output_json: Path = typer.Option(None, help="write the measurement here")) -> None:
    """The load generator's own ceiling against a server that does no compute: requests/s with 8-token
    replies, streamed tokens/s with 64-token replies; medians over repeats."""
    from workbench.bench.ceiling import measure_ceiling

    try:
        result = measure_ceiling(num_prompts, max_concurrency, repeats, workers)
    except RuntimeError as exc:  # the null server did not start
        fail(str(exc))
    console.print(f"ceiling: {result['median_request_throughput']:,.0f} req/s (8-token replies), "
                  f"{result['median_streamed_tokens_per_s']:,.0f} streamed tok/s (64-token replies)")
    if output_json:
        output_json.parent.mkdir(parents=True, exist_ok=True)
        output_json.write_text(json.dumps(result, indent=2))
