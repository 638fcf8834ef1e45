"""LoRA in `bench throughput` and the runtime load latency of a server (`bench lora-load`).

`bench throughput --enable-lora --lora-modules a=DIR b=DIR ...` spreads the prompts over the adapters
(seeded; uniformly, or with --lora-weights); `--compare-base` then runs the same prompts through the
base model in a second engine without LoRA, in the same process right after, and reports the ratio
of output throughputs (the cost of mixing adapters, measured in one run).
"""
from __future__ import annotations

import argparse
import random

from engine.lora.request import LoRARequest, parse_lora_module


def add_lora_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("LoRA")
    g.add_argument("--lora-modules", nargs="+", type=_module, default=None, metavar="NAME=PATH",
                   help="adapters to spread the prompts over (NAME=PATH or vLLM's JSON); needs --enable-lora")
    g.add_argument("--lora-weights", default=None,
                   help="comma-separated weights, one per --lora-modules entry (default: uniform); 'base=W' "
                        "as an extra entry sends that share of prompts to the base model")
    g.add_argument("--compare-base", action="store_true",
                   help="also run the same prompts through the base model (a second engine, LoRA off) and "
                        "report lora_vs_base_output_throughput")


def _module(text: str):
    try:
        return parse_lora_module(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def check_lora_args(args: argparse.Namespace) -> None:
    if args.lora_modules and not args.enable_lora:
        raise ValueError("--lora-modules needs --enable-lora")
    if (args.lora_weights or args.compare_base) and not args.lora_modules:
        raise ValueError(f"{'--lora-weights' if args.lora_weights else '--compare-base'} needs --lora-modules")
    if args.lora_modules and args.baseline:
        raise ValueError("--baseline transformers runs the base model only; use --compare-base with --lora-modules")
    spread_weights(args)  # raises on a malformed --lora-weights


def spread_weights(args: argparse.Namespace) -> tuple[list[float], float]:
    """(weight per module, weight of the base model)."""
    modules = args.lora_modules or []
    if not args.lora_weights:
        return [1.0] * len(modules), 0.0
    weights, base = [], 0.0
    for item in args.lora_weights.split(","):
        key, sep, value = item.strip().partition("=")
        try:
            if sep and key == "base":
                base = float(value)
            else:
                weights.append(float(item))
        except ValueError:
            raise ValueError(f"--lora-weights {item!r} is not a number (or base=NUMBER)") from None
    if len(weights) != len(modules):
        raise ValueError(f"--lora-weights has {len(weights)} weights for {len(modules)} --lora-modules")
    if min(weights + [base]) < 0 or not sum(weights) + base > 0:
        raise ValueError("--lora-weights must be >= 0 and not all 0")
    return weights, base


def lora_plan(args: argparse.Namespace, num_prompts: int, seed_offset: int = 0) -> list[LoRARequest | None] | None:
    """Each prompt's adapter (None: the base), a seeded draw; None when no adapters are given."""
    if not args.lora_modules:
        return None
    requests = [LoRARequest(m.name, i + 1, m.path, m.base_model_name) for i, m in enumerate(args.lora_modules)]
    weights, base = spread_weights(args)
    rng = random.Random(args.seed + seed_offset)
    return rng.choices(requests + [None], weights=weights + [base], k=num_prompts)


def lora_summary(plan: list[LoRARequest | None]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in plan:
        name = r.lora_name if r is not None else "(base)"
        counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items()))


# ---------------------------------------------------------------- bench lora-load
def measure_load_latency(base_url: str, adapter_path: str, repeats: int, api_key: str | None = None,
                         prompt: str = "Hello", timeout: float = 60.0) -> dict:
    """Against a running server (VLLM_ALLOW_RUNTIME_LORA_UPDATING=True): per repeat, POST
    /v1/load_lora_adapter under a fresh name, then at once a 1-token completion under it; the time from
    the load's POST to that completion's answer is `until_served_ms` (the issue's target). Then a second
    request under it (warm) and one under the base model for reference, and the adapter is unloaded."""
    import statistics
    import time

    import httpx

    from workbench.loadgen.config import server_root

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    base = server_root(base_url)
    with httpx.Client(timeout=timeout, headers=headers) as client:
        models = client.get(f"{base}/v1/models")
        if models.status_code != 200:
            raise RuntimeError(f"{base}/v1/models answered {models.status_code}: {models.text[:200]}")
        base_model = models.json()["data"][0]["id"]

        def complete(model: str) -> float:
            start = time.perf_counter()
            r = client.post(f"{base}/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": 1,
                                                           "temperature": 0.0})
            if r.status_code != 200:
                raise RuntimeError(f"a completion under {model!r} answered {r.status_code}: {r.text[:300]}")
            return time.perf_counter() - start

        complete(base_model)  # warm the path
        samples = []
        for i in range(repeats):
            name = f"load-latency-{i}-{int(time.time() * 1000) % 100000}"
            start = time.perf_counter()
            r = client.post(f"{base}/v1/load_lora_adapter", json={"lora_name": name, "lora_path": adapter_path})
            loaded = time.perf_counter()
            if r.status_code == 404 and "Not Found" in r.text:
                raise RuntimeError(f"{base} has no /v1/load_lora_adapter: start it with "
                                   "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True and --enable-lora")
            if r.status_code != 200:
                raise RuntimeError(f"loading the adapter answered {r.status_code}: {r.text[:300]}")
            first = complete(name)
            samples.append({"load_ms": (loaded - start) * 1e3, "first_request_ms": first * 1e3,
                            "until_served_ms": (loaded - start + first) * 1e3, "warm_request_ms": complete(name) * 1e3,
                            "base_request_ms": complete(base_model) * 1e3})
            client.post(f"{base}/v1/unload_lora_adapter", json={"lora_name": name})
    medians = {f"median_{k}": statistics.median(s[k] for s in samples) for k in samples[0]}
    return {"base_url": base, "adapter_path": adapter_path, "base_model": base_model, "repeats": repeats,
            "samples": samples, **medians}


def measure_load_latency_offline(model: str, adapter_path: str, repeats: int, engine_kwargs: dict,
                                 prompt_len: int = 16) -> dict:
    """The same measurement in-process, for a machine without the server's packages: per repeat, a
    fresh adapter id is added to the engine (read and checked, as POST /v1/load_lora_adapter does in
    the core) and a 1-token request under it runs at once (GPU slot load, prefill, first token). The
    server adds its HTTP and IPC hops (a few ms) on top."""
    import statistics
    import time

    from engine import LLM, SamplingParams

    llm = LLM(model, enable_lora=True, **engine_kwargs)
    engine = llm.llm_engine
    prompt = {"prompt_token_ids": list(range(10, 10 + prompt_len))}
    one = SamplingParams(temperature=0.0, max_tokens=1)

    def run(lora) -> float:
        start = time.perf_counter()
        llm.generate(prompt, one, use_tqdm=False, lora_request=lora)
        return time.perf_counter() - start

    run(None)  # warm the path
    run(LoRARequest("warm-up", 10_000, adapter_path))  # compiles the LoRA kernels outside the timing
    samples = []
    for i in range(repeats):
        request = LoRARequest(f"load-latency-{i}", 10_001 + i, adapter_path)
        start = time.perf_counter()
        engine.core.add_lora(request)
        loaded = time.perf_counter()
        first = run(request)
        samples.append({"load_ms": (loaded - start) * 1e3, "first_request_ms": first * 1e3,
                        "until_served_ms": (loaded - start + first) * 1e3, "warm_request_ms": run(request) * 1e3,
                        "base_request_ms": run(None) * 1e3})
        engine.core.remove_lora(request.lora_int_id)
    engine.shutdown()
    medians = {f"median_{k}": statistics.median(s[k] for s in samples) for k in samples[0]}
    return {"mode": "offline (in-process engine; the server adds its HTTP and IPC hops)", "model": model,
            "adapter_path": adapter_path, "repeats": repeats, "engine": engine_kwargs, "samples": samples, **medians}
