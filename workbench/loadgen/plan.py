"""What a run sends and when: the prompts (exact lengths through a tokenizer or the server's
/tokenize), the send schedule (constant rate, ramp-up or a trace's own timestamps), and for the
multi-turn dataset the sessions whose turns follow each other's replies."""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from workbench.datasets import PromptMaker, SampleRequest, sample_requests
from workbench.loadgen.arrivals import arrival_times, ramp_arrival_times
from workbench.loadgen.config import ServeBenchConfig
from workbench.loadgen.sessions import Session, sharegpt_sessions, synthetic_sessions
from workbench.loadgen.traces import read_trace, trace_requests, trace_schedule


@dataclass
class Plan:
    """Warm-up requests (sent first, at once, unmeasured), then the measured load: either requests at
    send times, or sessions starting at send times."""
    warmup: list[SampleRequest]
    times: list[float]
    requests: list[SampleRequest] = field(default_factory=list)
    sessions: list[Session] = field(default_factory=list)
    lengths: str = ""  # how prompt lengths were made exact (or why they are approximate)


def server_token_counter(config: ServeBenchConfig):
    """The server's /tokenize (vLLM and ours have it), or None."""
    base = config.base_url.rstrip("/")
    client = httpx.Client(timeout=30, headers={"Authorization": f"Bearer {config.api_key}"} if config.api_key else {})
    try:
        r = client.post(f"{base}/tokenize", json={"model": config.model, "prompt": "probe"})
        if r.status_code != 200 or "count" not in r.json():
            return None
    except (httpx.HTTPError, ValueError):
        return None
    return lambda text: client.post(f"{base}/tokenize", json={"model": config.model, "prompt": text,
                                                              "add_special_tokens": False}).json()["count"]


def token_counting(config: ServeBenchConfig):
    """(tokenizer, count, note): a local tokenizer, else the server's /tokenize, else an approximation."""
    if config.tokenizer:
        from transformers import AutoTokenizer

        return (AutoTokenizer.from_pretrained(tokenizer_dir(config.tokenizer)), None,
                f"exact, with the tokenizer in {config.tokenizer}")
    count = server_token_counter(config)
    return None, count, ("exact, with the server's /tokenize" if count else
                         "APPROXIMATE: no tokenizer given and the server has no /tokenize; ~4 characters per token")


def tokenizer_dir(name: str) -> str:
    """A directory, or a preset name (resolved through the engine's preset cache only if it is there)."""
    if Path(name).is_dir():
        return name
    try:  # optional: presets live with the engine; a plain HTTP user passes a directory
        from engine.presets import resolve_model

        return str(resolve_model(name, with_weights=False))
    except ImportError:
        raise ValueError(f"--tokenizer {name!r} is not a directory") from None


def build_requests(config: ServeBenchConfig) -> tuple[list[SampleRequest], str]:
    """num_prompts + warmup single-turn requests (every dataset but multi-turn and trace)."""
    tokenizer, count, how = token_counting(config)
    reqs = sample_requests(config.dataset, num_prompts=config.num_prompts + config.warmup, input_len=config.input_len,
                           output_len=config.output_len, range_ratio=config.range_ratio, seed=config.seed,
                           path=config.dataset_path, tokenizer=tokenizer, count_tokens=count,
                           prefix_len=config.prefix_len, num_prefixes=config.num_prefixes)
    return reqs, how


def schedule(config: ServeBenchConfig, num: int) -> list[float]:
    """Send times of `num` requests (or session starts) from the start of the run."""
    if config.ramp_up:
        return ramp_arrival_times(num, config.ramp_up, config.ramp_up_start, config.ramp_up_end, config.burstiness,
                                  config.seed, period=config.duration)
    return arrival_times(num, config.request_rate, config.burstiness, config.seed)


def build_plan(config: ServeBenchConfig) -> Plan:
    if config.dataset == "trace":
        tokenizer, count, how = token_counting(config)
        rows = read_trace(config.dataset_path, config.trace_format, limit=config.num_prompts + config.warmup)
        reqs = trace_requests(rows, PromptMaker(random.Random(config.seed), tokenizer, count), config.trace_block_size,
                              config.seed)
        measured = rows[config.warmup:]
        if not measured:
            raise ValueError(f"{config.dataset_path}: {len(rows)} rows, all used as warm-up")
        return Plan(reqs[:config.warmup], trace_schedule(measured, config.time_scale), requests=reqs[config.warmup:],
                    lengths=how + "; lengths and send times from the trace")
    if config.dataset == "multi-turn":
        tokenizer, count, how = token_counting(config)
        rng = random.Random(config.seed)
        maker = PromptMaker(rng, tokenizer, count)
        total = config.num_prompts + config.warmup
        if config.dataset_path:
            sessions = sharegpt_sessions(config.dataset_path, total, config.num_turns, maker.count, rng)
        else:
            sessions = synthetic_sessions(total, config.num_turns, config.input_len, config.output_len, maker, rng,
                                          config.range_ratio)
        warm = [SampleRequest(s.turns[0].message, s.turns[0].message_len, s.turns[0].output_len)
                for s in sessions[:config.warmup]]
        measured = sessions[config.warmup:]
        for k, s in enumerate(measured):
            s.index = k
        return Plan(warm, schedule(config, len(measured)), sessions=measured, lengths=how + " (each user message)")
    reqs, how = build_requests(config)
    measured = reqs[config.warmup:]
    return Plan(reqs[:config.warmup], schedule(config, len(measured)), requests=measured, lengths=how)
