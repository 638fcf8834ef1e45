"""What one serving benchmark does."""
from __future__ import annotations

import math
import random
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from workbench.datasets import parse_length

SLO_KEYS = ("ttft", "tpot", "e2el")


class LoadProfile(BaseModel):
    """What load to send: shared by `bench serve` and a tuning study's workload."""
    model_config = ConfigDict(extra="forbid")
    # The descriptions are the flags' help (workbench/loadgen/flags.py).
    endpoint: Literal["completions", "chat"] = "completions"
    dataset: Literal["random", "prefix-repeat", "sharegpt", "jsonl", "multi-turn", "trace"] = "random"
    dataset_path: str | None = Field(None, description="file for sharegpt / jsonl / trace; multi-turn: a ShareGPT "
                                                       "file replayed turn by turn (synthetic sessions without one)")
    num_prompts: int = Field(100, ge=1, description="requests; multi-turn: sessions; trace: the first N rows")
    input_len: int | str = Field(256, description="prompt tokens, or uniform:a,b | normal:mean,std | "
                                                  "lognormal:mu,sigma | empirical:FILE (multi-turn: each user message)")
    output_len: int | str = Field(128, description="output tokens, or a distribution as --input-len")
    range_ratio: float = Field(0.0, ge=0.0, lt=1.0, description="random lengths in [len x (1 - r), len x (1 + r)]")
    prefix_len: int = Field(0, ge=0, description="shared prefix tokens (prefix-repeat)")
    num_prefixes: int = Field(1, ge=1, description="distinct shared prefixes (prefix-repeat)")
    burstiness: float = Field(1.0, gt=0.0, description="gamma shape of arrival gaps: 1 = Poisson, < 1 burstier, "
                                                       "> 1 more regular")
    max_concurrency: int | None = Field(None, ge=1, description="requests in flight at most (default: no cap)")
    seed: int = 0
    warmup: int = Field(0, ge=0, description="requests sent first and not measured")
    duration: float | None = Field(None, gt=0, description="stop sending new requests after S seconds")
    goodput: dict[str, float] = Field(default_factory=dict, description="SLOs as KEY:MS (ttft, tpot, e2el), "
                                                                        "e.g. ttft:500 tpot:50")
    num_turns: int = Field(4, ge=1, description="multi-turn: turns per session (ShareGPT: at most)")
    think_time: float = Field(0.0, ge=0.0, description="multi-turn: seconds between a reply and the next turn")
    trace_format: Literal["mooncake", "burstgpt", "azure", "jsonl"] | None = None
    time_scale: float = Field(1.0, gt=0.0, description="trace: recorded gaps x this (0.5 = twice as fast)")
    trace_block_size: int = Field(512, ge=1, description="mooncake: tokens per hash id")
    ramp_up: Literal["linear", "exponential"] | None = Field(None, description="the rate goes from --ramp-up-start "
                                                             "to --ramp-up-end over the run (or --duration)")
    ramp_up_start: float | None = Field(None, gt=0.0, description="requests/s at the start of the ramp")
    ramp_up_end: float | None = Field(None, gt=0.0, description="requests/s at the end of the ramp")

    @field_validator("input_len", "output_len")
    @classmethod
    def _length_spec(cls, v: int | str) -> int | str:
        spec = parse_length(v)  # raises with the problem named
        return int(spec.params[0]) if spec.kind == "fixed" else v

    @model_validator(mode="after")
    def _consistent(self) -> LoadProfile:
        if self.dataset == "trace" and not (self.dataset_path and self.trace_format):
            raise ValueError("the trace dataset needs dataset_path (--dataset-path) and trace_format "
                             "(--trace-format mooncake|burstgpt|azure|jsonl)")
        if self.trace_format and self.dataset != "trace":
            raise ValueError("trace_format is for dataset 'trace'")
        if self.ramp_up and (self.ramp_up_start is None or self.ramp_up_end is None):
            raise ValueError("ramp_up needs ramp_up_start and ramp_up_end (requests/s)")
        if not self.ramp_up and (self.ramp_up_start is not None or self.ramp_up_end is not None):
            raise ValueError("ramp_up_start/ramp_up_end need ramp_up (linear or exponential)")
        if self.ramp_up and self.dataset == "trace":
            raise ValueError("a trace is replayed at its own timestamps; ramp_up does not apply")
        return self

    @field_validator("goodput")
    @classmethod
    def _known_slos(cls, v: dict[str, float]) -> dict[str, float]:
        unknown = set(v) - set(SLO_KEYS)
        if unknown:
            raise ValueError(f"unknown SLO(s) {sorted(unknown)}; use {', '.join(SLO_KEYS)}")
        if any(ms <= 0 for ms in v.values()):
            raise ValueError("SLO thresholds must be positive milliseconds")
        return v


class ServeBenchConfig(LoadProfile):
    base_url: str = Field("http://127.0.0.1:8000", description="the server, with or without /v1")
    model: str = Field(description="model name as the server serves it")
    api_key: str | None = None
    request_rate: float = math.inf  # requests per second; inf sends everything at once
    workers: int = Field(1, ge=1, description="client processes sharing the run (one event loop tops out at a few "
                                              "hundred req/s; see `workbench bench ceiling`)")
    ignore_eos: bool = False
    tokenizer: str | None = Field(None, description="tokenizer directory (or preset) for exact prompt lengths")
    label: str = Field("", description="short name for plots and tables")
    timeout: float = Field(600.0, gt=0)
    extra_body: dict = Field(default_factory=dict)
    reset_prefix_cache: bool = Field(True, description="sweeps: POST /reset_prefix_cache before each point (where "
                                                       "the server has it)")
    # Spread requests over these model names (LoRA adapters, the base too if listed), with these weights
    # (default: uniform); empty: every request names `model`.
    lora_names: list[str] = Field(default_factory=list)
    lora_weights: list[float] | None = None

    @model_validator(mode="after")
    def _lora_spread(self) -> ServeBenchConfig:
        if self.lora_weights is not None:
            if len(self.lora_weights) != len(self.lora_names):
                raise ValueError(f"lora_weights has {len(self.lora_weights)} entries for {len(self.lora_names)} "
                                 "lora_names")
            if any(w < 0 for w in self.lora_weights) or not sum(self.lora_weights) > 0:
                raise ValueError("lora_weights must be >= 0 and not all 0")
        if len(set(self.lora_names)) != len(self.lora_names):
            raise ValueError(f"lora_names has duplicates: {self.lora_names}")
        return self

    def model_for(self, index: int) -> str:
        """The model name request `index` asks for: a seeded draw over lora_names (the same in every
        worker process and every run of a seed), or `model`."""
        if not self.lora_names:
            return self.model
        rng = random.Random(self.seed * 1_000_003 + index)
        return rng.choices(self.lora_names, weights=self.lora_weights)[0]

    @model_validator(mode="after")
    def _one_process_for_sessions(self) -> ServeBenchConfig:
        if self.dataset == "multi-turn" and self.workers > 1:
            raise ValueError("workers > 1 is not supported with the multi-turn dataset (a session's turns "
                             "wait on each other's replies in one process); use --workers 1")
        return self

    @field_validator("base_url")
    @classmethod
    def _server_root(cls, v: str) -> str:
        return server_root(v)

    @field_validator("request_rate")
    @classmethod
    def _positive_rate(cls, v: float) -> float:
        if not v > 0:
            raise ValueError("request_rate must be positive (or inf)")
        return v


def server_root(url: str) -> str:
    """The server's root URL. vLLM's users give --base-url with /v1 (the openai client's base_url),
    this tool's without: both are taken, and every path (/v1/..., /metrics, /tokenize) is built
    from the root."""
    return url.strip().rstrip("/").removesuffix("/v1").rstrip("/")


def parse_lora_names(text: str | None) -> tuple[list[str], list[float] | None]:
    """'a,b,c' (uniform) or 'a:3,b:1,c:1' (weights) -> (names, weights or None)."""
    if not text:
        return [], None
    names, weights = [], []
    for item in filter(None, (x.strip() for x in text.split(","))):
        name, sep, weight = item.rpartition(":") if ":" in item else (item, "", "")
        if sep:
            try:
                weights.append(float(weight))
            except ValueError:
                raise ValueError(f"--lora-names {item!r}: {weight!r} is not a weight (NAME or NAME:WEIGHT)") from None
        names.append(name)
    if weights and len(weights) != len(names):
        raise ValueError("--lora-names: give a weight to every name or to none")
    return names, weights or None


def parse_goodput(items: list[str]) -> dict[str, float]:
    """['ttft:200', 'tpot:50'] -> {'ttft': 200.0, 'tpot': 50.0}"""
    out = {}
    for item in items:
        key, sep, value = item.partition(":")
        if not sep:
            raise ValueError(f"--goodput takes KEY:MS pairs such as ttft:200, got {item!r}")
        try:
            out[key.strip()] = float(value)
        except ValueError:
            raise ValueError(f"--goodput {item!r}: {value!r} is not a number of milliseconds") from None
    return out
