"""`workbench bench latency`: a batch-size sweep at fixed input and output lengths.

For each batch size b: TTFT = the time for a batch of b prompts to reach its first token (a
generate with max_tokens=1, so the whole prefill), and TPOT = (E2E - TTFT) / (output_len - 1), where
E2E is a generate of output_len tokens; medians over --iters after --warmup-iters. Every call gets
fresh random prompts, so prefix caching cannot shortcut a repeat. Each row carries its roofline
floor (workbench/bench/roofline.py): TPOT floor = one decode step of b sequences at the mean context
(weights + their KV over bandwidth, or FLOPs over the matmul rate if larger), TTFT floor = the
prefill of b prompts; E2E floor = TTFT floor + (output_len - 1) x TPOT floor.

On CPU the rates are this CPU's own, measured after the model is loaded with a copy the size of the
run's working set (weights + the largest batch's KV), since a small model runs from cache faster than
a large copy streams from memory. Should a measured time still beat its floor (the rates taken under a
load that later eased, say), the floor does not bound this machine and none is reported.
"""
from __future__ import annotations

import argparse
import statistics
import time

from rich.progress import Progress

from engine.server.args import OneLineParser
from workbench.bench.roofline import MiB, ModelShape, decode_step_floor, measure_device, prefill_floor
from workbench.bench.throughput import (
    add_common_args,
    config_record,
    console,
    engine_settings,
    llm_kwargs,
    matmul_dtype,
    random_prompts,
    spec_decode_metrics,
    synchronize,
)
from workbench.results import BenchResult, collect_environment

FLOOR_KEYS = ("ttft", "tpot", "e2e")
CPU_COPY_BYTES = (1 * MiB, 256 * MiB)  # the working-set copy on CPU, clamped: past the caches, DRAM's rate


def build_parser(prog: str = "workbench bench latency") -> argparse.ArgumentParser:
    p = OneLineParser(prog=prog, description="Batch-size sweep of TTFT and time per output token, in-process "
                                             "(like `vllm bench latency`); engine flags as `workbench serve`.")
    add_common_args(p)
    p.add_argument("--batch-sizes", default="1,8,32,64", help="comma-separated batch sizes")
    p.add_argument("--iters", type=int, default=5, help="timed repetitions per measurement (median reported)")
    p.add_argument("--warmup-iters", type=int, default=2, help="untimed repetitions per batch size")
    return p


def parse_batch_sizes(text: str) -> list[int]:
    try:
        sizes = [int(b) for b in str(text).split(",") if b.strip()]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise ValueError(f"--batch-sizes must be comma-separated positive integers, got {text!r}")
    return sizes


def check_args(args: argparse.Namespace, max_num_seqs: int) -> list[int]:
    sizes = parse_batch_sizes(args.batch_sizes)
    if max(sizes) > max_num_seqs:
        raise ValueError(f"batch size {max(sizes)} exceeds --max-num-seqs {max_num_seqs}: the batch would not run "
                         "as one")
    if args.input_len < 1:
        raise ValueError(f"--input-len must be at least 1, got {args.input_len}")
    if args.output_len < 2:
        raise ValueError(f"--output-len must be at least 2 (TPOT needs a token after the first), got {args.output_len}")
    if args.iters < 1 or args.warmup_iters < 0:
        raise ValueError(f"--iters must be >= 1 and --warmup-iters >= 0, got {args.iters} and {args.warmup_iters}")
    return sizes


def run_latency(args: argparse.Namespace, progress: bool = True) -> BenchResult:
    from engine import LLM, SamplingParams

    settings = engine_settings(args)
    sizes = check_args(args, settings.max_num_seqs)
    on_cpu = settings.device == "cpu"
    if not on_cpu:  # before the engine takes the device's memory
        console.log(f"measuring {settings.device} bandwidth and matmul rate (roofline)")
        rates = measure_device(settings.device, matmul_dtype(settings))
    console.log(f"loading {args.model}")
    llm = LLM(args.model, **llm_kwargs(args))
    engine = llm.llm_engine
    config, device = engine.config, engine.config.device
    if args.input_len + args.output_len > config.max_model_len:
        raise ValueError(f"--input-len {args.input_len} + --output-len {args.output_len} exceeds max_model_len "
                         f"({config.max_model_len})")
    vocab = min(config.hf_config.vocab_size, len(llm.get_tokenizer()))
    shape = ModelShape.from_engine(engine)
    if on_cpu:
        working_set = shape.weight_bytes + shape.kv_bytes_per_token * max(sizes) * (args.input_len + args.output_len)
        copy_bytes = min(max(working_set, CPU_COPY_BYTES[0]), CPU_COPY_BYTES[1])
        console.log(f"measuring this CPU's bandwidth ({copy_bytes / MiB:.0f} MiB copies: the run's working set) "
                    "and matmul rate (roofline)")
        rates = measure_device("cpu", matmul_dtype(settings), copy_bytes=copy_bytes)
    calls = iter(range(1 << 30))  # a fresh prompt seed per call

    def timed(batch: int, max_tokens: int) -> float:
        prompts = random_prompts([args.input_len] * batch, vocab, seed=args.seed * 1_000_003 + next(calls))
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        synchronize(device)
        start = time.perf_counter()
        llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        synchronize(device)
        return time.perf_counter() - start

    rows = []
    first_stats = engine.get_stats()
    with Progress(console=console, disable=not progress) as bar:
        task = bar.add_task("latency sweep", total=len(sizes) * (args.warmup_iters + 2 * args.iters))
        for bs in sizes:
            bar.update(task, description=f"batch {bs}")
            preempted = engine.get_stats().num_preemptions_total
            for _ in range(args.warmup_iters):
                timed(bs, args.output_len)
                bar.advance(task)
            timed_start = engine.get_stats()
            ttfts, e2es = [], []
            for _ in range(args.iters):
                ttfts.append(timed(bs, 1))
                bar.advance(task)
                e2es.append(timed(bs, args.output_len))
                bar.advance(task)
            row = _row(bs, statistics.median(ttfts), statistics.median(e2es), args, shape, rates,
                       config.max_num_batched_tokens)
            row["preemptions"] = engine.get_stats().num_preemptions_total - preempted
            spec = spec_decode_metrics(timed_start, engine.get_stats())  # over the timed runs
            if spec:
                row["acceptance_rate"] = spec["spec_decode_acceptance_rate"]
                row["mean_accepted_length"] = spec["spec_decode_mean_accepted_length"]
            rows.append(row)
    rows, metrics, roofline = summarize(rows, shape, rates, check_floors=on_cpu)
    metrics |= spec_decode_metrics(first_stats, engine.get_stats())
    extra = {"rows": rows, "warmup": f"{args.warmup_iters} untimed generate(s) per batch size", "roofline": roofline}
    return BenchResult(kind="latency", label=args.label, config=config_record(config, args), metrics=metrics,
                       extra=extra, environment=collect_environment(rates.device))


def summarize(rows: list[dict], shape: ModelShape, rates, check_floors: bool) -> tuple[list[dict], dict, dict]:
    """(rows, metrics, the roofline record); check_floors: drop every floor if a measured time beats one."""
    roofline = {"model": "per row: TPOT floor = one decode step of the batch at the mean context, TTFT "
                         "floor = its prefill, E2E floor = TTFT floor + (output_len - 1) x TPOT floor; "
                         "roofline_floor_s sums the E2E floors of all rows (see workbench/bench/roofline.py)",
                "weight_bytes": shape.weight_bytes, "kv_bytes_per_token": shape.kv_bytes_per_token,
                "rates": rates.as_dict()}
    if check_floors and not floors_hold(rows):
        rows = [without_floors(r) for r in rows]
        roofline["note"] = ("no floor: a measured time beat the floor that this CPU's measured rates give, so those "
                            "rates do not bound this run (they were measured under a different load, or caches "
                            "served more than the copy saw)")
        console.log(f"roofline: {roofline['note']}")
    metrics = {}
    for row in rows:
        for name in ("ttft_ms", "tpot_ms", "e2e_ms", "output_throughput", "tpot_floor_ms", "tpot_over_floor",
                     "acceptance_rate", "mean_accepted_length"):
            if name in row:
                metrics[f"{name}_bs{row['batch_size']}"] = row[name]
    if rows and "e2e_floor_ms" in rows[0]:
        floor_s = sum(r["e2e_floor_ms"] for r in rows) / 1e3
        metrics["roofline_floor_s"] = floor_s
        metrics["time_over_floor"] = sum(r["e2e_ms"] for r in rows) / 1e3 / floor_s
    return rows, metrics, roofline


def floors_hold(rows: list[dict]) -> bool:
    """Every measured TTFT, TPOT and E2E at or above its floor."""
    return all(r[f"{k}_ms"] >= r[f"{k}_floor_ms"] for r in rows for k in FLOOR_KEYS)


def without_floors(row: dict) -> dict:
    return {k: v for k, v in row.items() if not any(k.startswith(f"{f}_floor") or k == f"{f}_over_floor"
                                                    for f in FLOOR_KEYS)}


def _row(bs: int, ttft: float, e2e: float, args, shape, rates, max_num_batched_tokens: int) -> dict:
    tpot = (e2e - ttft) / (args.output_len - 1)
    mean_context = args.input_len + args.output_len / 2
    tpot_floor = decode_step_floor(shape, rates, bs, round(bs * mean_context))
    ttft_floor = prefill_floor(shape, rates, [args.input_len] * bs, max_num_batched_tokens)
    e2e_floor = ttft_floor + (args.output_len - 1) * tpot_floor
    return {"batch_size": bs, "ttft_ms": ttft * 1e3, "tpot_ms": tpot * 1e3, "e2e_ms": e2e * 1e3,
            "output_throughput": bs * args.output_len / e2e, "ttft_floor_ms": ttft_floor * 1e3,
            "tpot_floor_ms": tpot_floor * 1e3, "e2e_floor_ms": e2e_floor * 1e3,
            "ttft_over_floor": ttft / ttft_floor, "tpot_over_floor": tpot / tpot_floor,
            "e2e_over_floor": e2e / e2e_floor}
