"""Offline benchmarks, in-process like `vllm bench throughput` / `vllm bench latency`."""
from __future__ import annotations

import argparse
import dataclasses
import logging
import statistics
import sys
import time

import torch

from engine.server.args import add_engine_args, engine_config
from workbench.datasets import DATASETS, sample_requests
from workbench.results import BenchResult, collect_environment
from workbench.roofline import ModelShape, decode_step_floor, measure_device, throughput_floor

BENCH_ONLY = {"input_len", "output_len", "num_prompts", "dataset", "dataset_path", "range_ratio", "prefix_len",
              "num_prefixes", "baseline", "output_json", "label", "batch_sizes", "iters", "warmup_iters"}


def build_parser(prog: str, latency: bool) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Offline benchmark of the engine, in-process.")
    p.add_argument("--model", required=True, help="model directory or preset name")
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=256 if not latency else 128)
    p.add_argument("--output-json", default=None, help="where to write the result (default results/<kind>-<time>.json)")
    p.add_argument("--label", default="")
    if latency:
        p.add_argument("--batch-sizes", default="1,8,32,64", help="comma-separated batch sizes")
        p.add_argument("--iters", type=int, default=5)
        p.add_argument("--warmup-iters", type=int, default=2)
    else:
        p.add_argument("--num-prompts", type=int, default=1000)
        p.add_argument("--dataset", default="random", choices=[d for d in DATASETS if d != "sharegpt"])
        p.add_argument("--dataset-path", default=None)
        p.add_argument("--range-ratio", type=float, default=0.0)
        p.add_argument("--prefix-len", type=int, default=0)
        p.add_argument("--num-prefixes", type=int, default=1)
        p.add_argument("--baseline", choices=["transformers"], default=None,
                       help="run the same workload through transformers' continuous batching in the same run")
    add_engine_args(p)
    return p


def config_dict(config) -> dict:
    out = {}
    for f in dataclasses.fields(config):
        if f.name in ("hf_config", "torch_dtype"):
            continue
        out[f.name] = getattr(config, f.name)
    out["torch_dtype"] = str(config.torch_dtype)
    return out


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run_throughput(args: argparse.Namespace, progress: bool = True) -> BenchResult:
    from engine import LLM, SamplingParams

    llm = LLM(args.model, **_engine_kwargs(args))
    engine = llm.llm_engine
    tokenizer = llm.get_tokenizer()
    requests = sample_requests(args.dataset, num_prompts=args.num_prompts, input_len=args.input_len,
                               output_len=args.output_len, range_ratio=args.range_ratio, seed=args.seed,
                               path=args.dataset_path, tokenizer=tokenizer, prefix_len=args.prefix_len,
                               num_prefixes=args.num_prefixes)
    prompts = [tokenizer.encode(r.prompt, add_special_tokens=False)[:engine.config.max_model_len - r.output_len]
               for r in requests]
    params = [SamplingParams(temperature=0.0, max_tokens=r.output_len, ignore_eos=True) for r in requests]
    # Warm-up (not timed): a few short requests compile kernels and fill allocator caches.
    llm.generate([{"prompt_token_ids": p} for p in prompts[:8]], SamplingParams(max_tokens=4, ignore_eos=True),
                 use_tqdm=False)
    before = engine.get_stats()
    device = engine.config.device
    _sync(device)
    start = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=progress)
    _sync(device)
    elapsed = time.perf_counter() - start
    after = engine.get_stats()
    out_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    in_tokens = sum(len(p) for p in prompts)
    steps = after.num_steps_total - before.num_steps_total
    queries = after.prefix_cache_queries_total - before.prefix_cache_queries_total
    metrics = {
        "num_prompts": len(prompts), "elapsed_s": elapsed, "requests_per_s": len(prompts) / elapsed,
        "request_throughput": len(prompts) / elapsed, "output_throughput": out_tokens / elapsed,
        "total_token_throughput": (in_tokens + out_tokens) / elapsed, "total_input_tokens": in_tokens,
        "total_output_tokens": out_tokens, "num_steps": steps,
        "tokens_per_step": (after.scheduled_tokens_total - before.scheduled_tokens_total) / max(1, steps),
        "num_preemptions": after.num_preemptions_total - before.num_preemptions_total,
        "prefix_cache_hit_rate": (after.prefix_cache_hits_total - before.prefix_cache_hits_total) / queries
        if queries else 0.0}
    rates = measure_device(device)
    floor = throughput_floor(ModelShape.from_engine(engine), rates, [len(p) for p in prompts], args.output_len,
                             engine.config.max_num_seqs)
    metrics["roofline_floor_s"] = floor["floor_s"]
    metrics["time_over_floor"] = elapsed / floor["floor_s"]
    extra = {"roofline": floor, "warmup": "8 prompts x 4 tokens before timing"}
    config = {"benchmark": {k: getattr(args, k) for k in sorted(BENCH_ONLY) if hasattr(args, k)},
              "engine": config_dict(engine.config)}
    if args.baseline == "transformers":
        del llm, engine
        if device == "cuda":
            torch.cuda.empty_cache()
        from workbench.hf_baseline import run_baseline

        base = run_baseline(str(_model_dir(args)), prompts, args.output_len,
                            _torch_dtype(config["engine"]["torch_dtype"]), device)
        metrics["baseline_output_throughput"] = base.output_throughput
        metrics["speedup_vs_baseline"] = metrics["output_throughput"] / base.output_throughput
        extra["baseline"] = dataclasses.asdict(base) | {"name": "transformers generate_batch (continuous batching)"}
    return BenchResult(kind="throughput", label=args.label, config=config, metrics=metrics, extra=extra,
                       environment=collect_environment(rates.device))


def _engine_kwargs(args: argparse.Namespace) -> dict:
    config = engine_config(args, BENCH_ONLY)
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
            if f.name not in ("model", "hf_config", "torch_dtype")}


def _model_dir(args):
    from engine.presets import resolve_model

    return resolve_model(args.model, with_weights=args.load_format != "dummy")


def _torch_dtype(name: str) -> torch.dtype:
    return getattr(torch, name.replace("torch.", ""))


def run_latency(args: argparse.Namespace, progress: bool = True) -> BenchResult:
    """Per batch size: TTFT (a whole batch prefilled to its first token) and time per output token."""
    from engine import LLM, SamplingParams

    llm = LLM(args.model, **_engine_kwargs(args))
    engine = llm.llm_engine
    device = engine.config.device
    sizes = [int(b) for b in str(args.batch_sizes).split(",") if b.strip()]
    if not sizes or min(sizes) < 1:
        raise ValueError(f"--batch-sizes must be positive integers, got {args.batch_sizes!r}")
    if max(sizes) > engine.config.max_num_seqs:
        raise ValueError(f"batch size {max(sizes)} exceeds --max-num-seqs {engine.config.max_num_seqs}")
    vocab = min(engine.config.hf_config.vocab_size, len(llm.get_tokenizer()))
    gen = torch.Generator().manual_seed(args.seed)
    shape, rates = ModelShape.from_engine(engine), measure_device(device)
    rows, metrics = [], {}
    for bs in sizes:
        prompts = [{"prompt_token_ids": torch.randint(10, vocab, (args.input_len,), generator=gen).tolist()}
                   for _ in range(bs)]

        def timed(max_tokens: int) -> float:
            _sync(device)
            t0 = time.perf_counter()
            llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True),
                         use_tqdm=False)
            _sync(device)
            return time.perf_counter() - t0

        for _ in range(args.warmup_iters):
            timed(args.output_len)
        ttft = statistics.median(timed(1) for _ in range(args.iters))
        total = statistics.median(timed(args.output_len) for _ in range(args.iters))
        tpot = (total - ttft) / max(1, args.output_len - 1)
        mean_ctx = args.input_len + args.output_len / 2
        floor = decode_step_floor(shape, rates, bs, int(bs * mean_ctx))
        row = {"batch_size": bs, "ttft_ms": ttft * 1e3, "tpot_ms": tpot * 1e3, "e2e_ms": total * 1e3,
               "output_tok_s": bs * args.output_len / total, "tpot_floor_ms": floor * 1e3,
               "tpot_over_floor": tpot / floor}
        rows.append(row)
        metrics |= {f"ttft_ms_bs{bs}": row["ttft_ms"], f"tpot_ms_bs{bs}": row["tpot_ms"],
                    f"tpot_over_floor_bs{bs}": row["tpot_over_floor"]}
        if progress:
            print(f"batch {bs}: TTFT {row['ttft_ms']:.1f} ms, TPOT {row['tpot_ms']:.2f} ms "
                  f"(floor {row['tpot_floor_ms']:.2f} ms, x{row['tpot_over_floor']:.2f})", file=sys.stderr)
    config = {"benchmark": {k: getattr(args, k) for k in sorted(BENCH_ONLY) if hasattr(args, k)},
              "engine": config_dict(engine.config)}
    extra = {"rows": rows, "roofline": {"model": "TPOT floor = (weights + KV of the batch) / bandwidth, or FLOPs / "
                                                 "matmul rate if larger (workbench/roofline.py)",
                                        "rates": rates.as_dict(), "weight_bytes": shape.weight_bytes}}
    logging.getLogger("engine").info("latency sweep done")
    return BenchResult(kind="latency", label=args.label, config=config, metrics=metrics, extra=extra,
                       environment=collect_environment(rates.device))
