"""`workbench bench throughput`: offline, in-process throughput of the engine, as `vllm bench
throughput` measures it: every request is added at once, generation ignores EOS and runs exactly
max_tokens = output_len, and the clock runs from the first request in to the last token out.

Before the clock: the device's copy bandwidth and matmul rate are measured (workbench/bench/roofline.py)
while the device is still empty, and a warm-up runs 8 random prompts, not taken from the workload
(so that prefix caching cannot find them), of the workload's lengths (the longest included) for
the full output length. `--baseline transformers` runs the same prompt token ids through
transformers' continuous batching after our run, in the same process (workbench/bench/hf_baseline.py).
Also used by `bench latency` (workbench/bench/latency.py): the shared flags and engine set-up.
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import random
import time
from datetime import datetime
from pathlib import Path

import torch
from rich.console import Console

from engine.config import DTYPES, EngineConfig
from engine.server.args import OneLineParser, add_engine_args, engine_config
from workbench.bench.lora import add_lora_args, check_lora_args, lora_plan, lora_summary
from workbench.bench.roofline import ModelShape, measure_device, throughput_floor
from workbench.loadgen.config import LoadProfile
from workbench.loadgen.flags import add_model_flags
from workbench.results import BenchResult, collect_environment

DATASET_CHOICES = ("random", "prefix-repeat", "jsonl")
WARMUP_PROMPTS = 8
PROFILE_STEPS = 8
console = Console(stderr=True)


# The load flags' defaults are LoadProfile's (workbench/loadgen/config.py), as in `bench serve` and a study.
FIXED_LENGTHS = {"input_len": {"type": int, "help": "prompt tokens per request"},
                 "output_len": {"type": int, "help": "generated tokens per request (EOS ignored)"}}


def add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model directory (Hugging Face format) or a preset name, e.g. tiny")
    add_model_flags(p, LoadProfile, ["input_len", "output_len"], custom=FIXED_LENGTHS)
    p.add_argument("--output-json", default=None, help="result file (default results/<kind>-<time>.json)")
    p.add_argument("--label", default="", help="short name for plots and tables")
    add_engine_args(p)


def build_parser(prog: str = "workbench bench throughput") -> argparse.ArgumentParser:
    p = OneLineParser(prog=prog, description="Offline throughput of the engine, in-process (like `vllm bench "
                                             "throughput`); engine flags as `workbench serve`.")
    add_common_args(p)
    add_model_flags(p, LoadProfile, ["num_prompts", "dataset", "dataset_path", "range_ratio", "prefix_len",
                                     "num_prefixes"], custom={
        "num_prompts": {"type": int, "help": "requests"},
        "dataset": {"choices": DATASET_CHOICES},
        "dataset_path": {"help": "the JSONL file for --dataset jsonl ({'prompt': ...} a line, optional 'output_len')"}})
    p.add_argument("--baseline", choices=["transformers"], default=None,
                   help="also run the same workload through transformers' continuous batching (generate_batch)")
    p.add_argument("--baseline-num-prompts", type=int, default=None,
                   help="run the baseline on only the first N prompts of the same workload (it is ~30x slower); "
                        "its throughput is a rate, so the ratio stays meaningful. Default: all prompts")
    p.add_argument("--profile", action="store_true",
                   help="time the engine step's host phases during the timed run (schedule, prepare, forward, "
                        "sample, wait, output, frontend: printed, and in the result's extra.step_profile); then "
                        f"trace {PROFILE_STEPS} decode steps of the first max-num-seqs prompts with torch.profiler, "
                        "next to the result (<name>.trace.json)")
    p.add_argument("--sampling-mix", action="store_true",
                   help="give the requests, in turn, these sampling settings instead of greedy for all: "
                        + "; ".join(", ".join(f"{k}={v}" for k, v in m.items()) for m in SAMPLING_MIX)
                        + " (EOS still ignored, so the token counts stay exact)")
    add_lora_args(p)
    return p


# The per-request mix of --sampling-mix: greedy beside temperatures, nucleus and top-k cuts, min-p and the
# three penalties, so that a batch holds every kind of row at once.
SAMPLING_MIX = (
    {"temperature": 0.0},
    {"temperature": 0.7, "top_p": 0.9},
    {"temperature": 1.0, "top_p": 0.95, "repetition_penalty": 1.1},
    {"temperature": 0.8, "top_k": 50, "min_p": 0.05, "presence_penalty": 0.5, "frequency_penalty": 0.3},
)


# ---------------------------------------------------------------- shared with bench latency
def engine_settings(args: argparse.Namespace) -> EngineConfig:
    """The engine flags as an EngineConfig: a bad flag fails here (ConfigError), before any loading."""
    return engine_config(args, skip=set(vars(args)) - EngineConfig.field_names())


def llm_kwargs(args: argparse.Namespace) -> dict:
    return {k: v for k, v in vars(args).items() if k in EngineConfig.field_names() and k != "model"}


def matmul_dtype(settings: EngineConfig) -> torch.dtype:
    """The dtype the engine will compute in, for the roofline's matmul rate (resolved as the engine does
    for 'auto': float32 on CPU, half precision on GPU)."""
    if settings.dtype != "auto":
        return DTYPES[settings.dtype]
    return torch.bfloat16 if settings.device == "cuda" else torch.float32


def config_record(config: EngineConfig, args: argparse.Namespace) -> dict:
    """The resolved engine config (JSON-safe) and the benchmark's own settings, in one flat dict."""
    record = {name: getattr(config, name) for name in sorted(EngineConfig.field_names())}
    record["torch_dtype"] = str(config.torch_dtype).removeprefix("torch.")
    bench = {k: v for k, v in vars(args).items() if k not in EngineConfig.field_names()}
    if bench.get("lora_modules"):
        bench["lora_modules"] = [{"name": m.name, "path": m.path} for m in bench["lora_modules"]]
    return record | bench


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def output_path(args: argparse.Namespace, kind: str) -> Path:
    return Path(args.output_json or f"results/{kind}-{datetime.now():%Y%m%d-%H%M%S}.json")


def random_prompts(lengths: list[int], vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(10, vocab) for _ in range(n)] for n in lengths]


# ---------------------------------------------------------------- throughput
def check_args(args: argparse.Namespace) -> None:
    """What can be refused before the model loads (the dataset module checks the rest)."""
    for name in ("num_prompts", "input_len", "output_len", "num_prefixes"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.prefix_len < 0:
        raise ValueError(f"--prefix-len must be >= 0, got {args.prefix_len}")
    if not 0.0 <= args.range_ratio < 1.0:
        raise ValueError(f"--range-ratio must be in [0, 1), got {args.range_ratio}")
    if args.dataset == "jsonl":
        if not args.dataset_path:
            raise ValueError("--dataset jsonl needs --dataset-path FILE")
        if not Path(args.dataset_path).is_file():
            raise ValueError(f"--dataset-path {args.dataset_path}: no such file")
    if args.baseline_num_prompts is not None and args.baseline_num_prompts < 1:
        raise ValueError(f"--baseline-num-prompts must be at least 1, got {args.baseline_num_prompts}")
    if args.baseline and args.range_ratio > 0:
        raise ValueError("--baseline transformers needs one output length for all requests (generate_batch takes "
                         "one max_new_tokens): use --range-ratio 0")
    check_lora_args(args)


def build_workload(args: argparse.Namespace, tokenizer, max_model_len: int) -> tuple[list[list[int]], list[int]]:
    from workbench.datasets import sample_requests

    requests = sample_requests(args.dataset, num_prompts=args.num_prompts, input_len=args.input_len,
                               output_len=args.output_len, range_ratio=args.range_ratio, seed=args.seed,
                               path=args.dataset_path, tokenizer=tokenizer, prefix_len=args.prefix_len,
                               num_prefixes=args.num_prefixes)
    prompts = [tokenizer.encode(r.prompt, add_special_tokens=False) for r in requests]
    output_lens = [r.output_len for r in requests]
    for i, (p, o) in enumerate(zip(prompts, output_lens)):
        if not p:
            raise ValueError(f"request {i} has an empty prompt")
        if len(p) + o > max_model_len:
            raise ValueError(f"request {i} needs {len(p)} prompt + {o} output tokens, more than max_model_len "
                             f"({max_model_len}); shorten --input-len/--output-len or raise --max-model-len")
    return prompts, output_lens


def run_throughput(args: argparse.Namespace, progress: bool = True) -> BenchResult:
    from engine import LLM

    check_args(args)
    settings = engine_settings(args)
    console.log(f"measuring {settings.device} bandwidth and matmul rate (roofline)")
    rates = measure_device(settings.device, matmul_dtype(settings))
    console.log(f"loading {args.model}")
    llm = LLM(args.model, **llm_kwargs(args))
    engine, config = llm.llm_engine, llm.llm_engine.config
    prompts, output_lens = build_workload(args, llm.get_tokenizer(), config.max_model_len)
    if args.baseline and len(set(output_lens)) > 1:
        raise ValueError("--baseline transformers needs one output length for all requests (generate_batch takes "
                         "one max_new_tokens); this dataset gives several (a per-line output_len?)")
    vocab = min(config.hf_config.vocab_size, len(llm.get_tokenizer()))
    warmup = random_prompts([max(map(len, prompts))] + [len(p) for p in prompts[:WARMUP_PROMPTS - 1]], vocab,
                            seed=args.seed + 1)
    loras = lora_plan(args, len(prompts))
    console.log(f"warm-up: {len(warmup)} random prompts x {max(output_lens)} tokens (not timed)")
    _generate(llm, warmup, [max(output_lens)] * len(warmup), progress=False, mix=args.sampling_mix,
              loras=lora_plan(args, len(warmup), 1))

    timer = engine.core.step_timer
    if args.profile:
        timer.enable()  # host clock reads at phase boundaries only: no device syncs
    before = engine.get_stats()
    outs, elapsed = _generate(llm, prompts, output_lens, progress, mix=args.sampling_mix, loras=loras)
    after = engine.get_stats()
    timer.enabled = False
    out_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    metrics = _metrics(len(prompts), sum(map(len, prompts)), out_tokens, elapsed, before, after)
    floor = throughput_floor(ModelShape.from_engine(engine), rates, [len(p) for p in prompts], output_lens,
                             config.max_num_seqs, config.max_num_batched_tokens,
                             kv_capacity_tokens=None if config.enable_prefix_caching
                             else after.num_gpu_blocks * config.block_size,
                             cached_prompt_tokens=after.prefix_cache_hits_total - before.prefix_cache_hits_total)
    metrics["roofline_floor_s"] = floor["floor_s"]
    metrics["time_over_floor"] = elapsed / floor["floor_s"] if floor["floor_s"] > 0 else None
    extra = {"roofline": floor, "num_gpu_blocks": after.num_gpu_blocks, "notes": [],
             "warmup": f"{len(warmup)} random prompts (not from the workload) x {max(output_lens)} tokens, "
                       "before timing"}
    if out_tokens != sum(output_lens):
        extra["notes"].append(f"the engine produced {out_tokens} output tokens; the workload asked for "
                              f"{sum(output_lens)}")
    if args.profile:
        extra["step_profile"] = step_profile(timer, elapsed, metrics["num_steps"])
        print_step_profile(extra["step_profile"])
        extra["profile"] = profile_steps(engine, prompts, output_lens, output_path(args, "throughput"))
    if loras is not None:
        extra["lora"] = {"prompts_per_adapter": lora_summary(loras)}
        if args.compare_base:
            engine.shutdown()  # free the device for the base engine
            del llm, engine, outs
            extra["lora"]["base"] = _run_base(args, prompts, output_lens, warmup)
            base_tps = extra["lora"]["base"]["output_throughput"]
            metrics["base_output_throughput"] = base_tps
            metrics["lora_vs_base_output_throughput"] = metrics["output_throughput"] / base_tps

    if args.baseline == "transformers":
        from workbench.bench.hf_baseline import BaselineLimits

        limits = BaselineLimits(kv_tokens=after.num_gpu_blocks * config.block_size,
                                max_num_batched_tokens=config.max_num_batched_tokens,
                                max_num_seqs=config.max_num_seqs, prefix_sharing=config.enable_prefix_caching)
        model_dir = engine.model_dir
        engine.shutdown()  # free the device before transformers loads
        del llm, engine, outs
        subset = prompts[:args.baseline_num_prompts] if args.baseline_num_prompts else prompts
        extra["baseline"] = _run_baseline(model_dir, subset, warmup, output_lens[0], config, limits)
        extra["baseline"]["num_prompts"] = len(subset)
        if len(subset) < len(prompts):
            extra["baseline"].setdefault("notes", []).append(
                f"the baseline ran the first {len(subset)} of the {len(prompts)} prompts (--baseline-num-prompts)")
        base_tps = extra["baseline"].get("output_throughput")
        metrics["baseline_output_throughput"] = base_tps
        metrics["speedup_vs_baseline"] = metrics["output_throughput"] / base_tps if base_tps else None
    return BenchResult(kind="throughput", label=args.label, config=config_record(config, args), metrics=metrics,
                       extra=extra, environment=collect_environment(rates.device))


def _run_base(args: argparse.Namespace, prompts, output_lens: list[int], warmup) -> dict:
    """--compare-base: the same prompts through the base model, in a fresh engine with LoRA off (the
    same warm-up first); its figures under the same names."""
    from engine import LLM

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    console.log("base model: the same prompts, LoRA off")
    llm = LLM(args.model, **(llm_kwargs(args) | {"enable_lora": False}))
    _generate(llm, warmup, [max(output_lens)] * len(warmup), progress=False, mix=args.sampling_mix)
    before = llm.llm_engine.get_stats()
    outs, elapsed = _generate(llm, prompts, output_lens, progress=False, mix=args.sampling_mix)
    after = llm.llm_engine.get_stats()
    out_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    llm.llm_engine.shutdown()
    return _metrics(len(prompts), sum(map(len, prompts)), out_tokens, elapsed, before, after)


def _generate(llm, prompts: list[list[int]], output_lens: list[int], progress: bool, mix: bool = False, loras=None):
    """Greedy (or the --sampling-mix in turn), EOS ignored, exactly output_len tokens each; timed between
    device synchronizations. `loras`: each prompt's LoRARequest (None: the base model)."""
    from engine import SamplingParams

    kinds = SAMPLING_MIX if mix else ({"temperature": 0.0},)
    params = [SamplingParams(**kinds[i % len(kinds)], max_tokens=o, ignore_eos=True) for i, o in enumerate(output_lens)]
    device = llm.llm_engine.config.device
    synchronize(device)
    start = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=progress, lora_request=loras)
    synchronize(device)
    return outs, time.perf_counter() - start


def _metrics(num_prompts: int, in_tokens: int, out_tokens: int, elapsed: float, before, after) -> dict:
    """vLLM's throughput names, and the engine's counters as deltas over the timed run."""
    steps = after.num_steps_total - before.num_steps_total
    queries = after.prefix_cache_queries_total - before.prefix_cache_queries_total
    hits = after.prefix_cache_hits_total - before.prefix_cache_hits_total
    return {"num_prompts": num_prompts, "elapsed_s": elapsed, "requests_per_s": num_prompts / elapsed,
            "request_throughput": num_prompts / elapsed, "output_throughput": out_tokens / elapsed,
            "total_token_throughput": (in_tokens + out_tokens) / elapsed, "total_input_tokens": in_tokens,
            "total_output_tokens": out_tokens, "num_steps": steps,
            "tokens_per_step": (after.scheduled_tokens_total - before.scheduled_tokens_total) / max(1, steps),
            "num_preemptions": after.num_preemptions_total - before.num_preemptions_total,
            "prefix_cache_hit_rate": hits / queries if queries else 0.0} | spec_decode_metrics(before, after)


def spec_decode_metrics(before, after) -> dict:
    """Speculative decoding over the run, from the engine's counters (vLLM's definitions): acceptance
    rate = accepted / draft tokens; mean accepted length = 1 + accepted / drafts, the tokens each
    verification of a request yields. Empty when speculation is off."""
    if not after.spec_decode_num_accepted_tokens_per_pos:
        return {}
    drafts = after.spec_decode_num_drafts_total - before.spec_decode_num_drafts_total
    tokens = after.spec_decode_num_draft_tokens_total - before.spec_decode_num_draft_tokens_total
    accepted = after.spec_decode_num_accepted_tokens_total - before.spec_decode_num_accepted_tokens_total
    per_pos = [a - b for a, b in zip(after.spec_decode_num_accepted_tokens_per_pos,
                                     before.spec_decode_num_accepted_tokens_per_pos or
                                     [0] * len(after.spec_decode_num_accepted_tokens_per_pos))]
    return {"spec_decode_num_drafts": drafts, "spec_decode_num_draft_tokens": tokens,
            "spec_decode_num_accepted_tokens": accepted,
            "spec_decode_acceptance_rate": accepted / tokens if tokens else 0.0,
            "spec_decode_mean_accepted_length": 1 + accepted / drafts if drafts else 1.0,
            **{f"spec_decode_acceptance_rate_pos{i}": a / drafts if drafts else 0.0 for i, a in enumerate(per_pos)}}


def _run_baseline(model_dir: Path, prompts, warmup, output_len: int, config: EngineConfig, limits) -> dict:
    """The baseline's record; a failure is recorded (with its reason) rather than losing our result."""
    from workbench.bench.hf_baseline import run_baseline

    gc.collect()
    if config.device == "cuda":
        torch.cuda.empty_cache()
        left = torch.cuda.memory_allocated()
    console.log("baseline: transformers generate_batch on the same prompt token ids")
    try:
        result = run_baseline(model_dir, prompts, warmup, output_len, config.torch_dtype, config.device, limits)
    except Exception as exc:  # noqa: BLE001 -- any failure inside transformers is reported, not raised
        error = f"{type(exc).__name__}: {exc}"
        if config.device == "cpu" and importlib.util.find_spec("psutil") is None:
            error += " (transformers 5.17 sizes its CPU cache with psutil, which is not installed here)"
        return {"error": error, "name": "transformers generate_batch (continuous batching)"}
    record = result.as_dict()
    if config.device == "cuda" and left > (1 << 30):
        record["notes"].append(f"{left / (1 << 30):.1f} GiB of device memory was still held by our engine")
    return record


def step_profile(timer, elapsed: float, num_steps: int) -> dict:
    """The step timer's per-phase host time, with the wall time per step beside it (what the phases do
    not cover is the offline loop's own overhead)."""
    summary = timer.summary()
    summary["wall_ms_per_step"] = 1e3 * elapsed / max(1, num_steps)
    return summary


def print_step_profile(profile: dict) -> None:
    from rich.table import Table

    table = Table(title=f"host time per engine step ({profile['steps']} steps; wall {profile['wall_ms_per_step']:.3f} "
                        f"ms per step)")
    for column in ("phase", "ms per step", "share"):
        table.add_column(column, justify="left" if column == "phase" else "right")
    for phase, ms in profile["ms_per_step"].items():
        table.add_row(phase, f"{ms:.3f}", f"{profile['share'][phase]:.1%}")
    table.add_row("measured", f"{profile['measured_ms_per_step']:.3f}", "100%")
    console.print(table)


def profile_steps(engine, prompts: list[list[int]], output_lens: list[int], result_path: Path) -> dict:
    """A torch.profiler trace of PROFILE_STEPS decode steps: the first max_num_seqs prompts are added
    and prefilled untraced (every request has its first token), then the steps are traced; written as
    a Chrome trace beside the result file. With prefix caching on, their prefill hits the cache."""
    from torch.profiler import ProfilerActivity, profile

    from engine import SamplingParams

    ids = [f"profile-{i}" for i in range(min(len(prompts), engine.config.max_num_seqs))]
    for rid, p, o in zip(ids, prompts, output_lens):
        engine.add_request(rid, p, SamplingParams(temperature=0.0, max_tokens=o, ignore_eos=True))
    started: set[str] = set()
    while len(started) < len(ids) and engine.has_unfinished_requests():  # ends: requests finish
        started.update(out.request_id for out in engine.step())
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if engine.config.device == "cuda" else [])
    steps = 0
    with profile(activities=activities) as prof:
        while steps < PROFILE_STEPS and engine.has_unfinished_requests():
            engine.step()
            steps += 1
        synchronize(engine.config.device)
    engine.abort_request(ids)
    while engine.has_unfinished_requests():
        engine.step()
    trace = result_path.with_suffix(".trace.json")
    trace.parent.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(trace))
    sort_key = "self_device_time_total" if engine.config.device == "cuda" else "self_cpu_time_total"
    top = sorted(prof.key_averages(), key=lambda e: getattr(e, sort_key, 0), reverse=True)[:10]
    return {"trace": str(trace), "steps": steps, "requests": len(ids), "phase": "decode (after every prefill)",
            "top_ops": [{"name": e.key, "calls": e.count, f"{sort_key}_ms": getattr(e, sort_key, 0) / 1e3}
                        for e in top]}
