"""What one serving benchmark does."""
from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

SLO_KEYS = ("ttft", "tpot", "e2el")


class LoadProfile(BaseModel):
    """What load to send: shared by `bench serve` and a tuning study's workload."""
    model_config = ConfigDict(extra="forbid")
    endpoint: Literal["completions", "chat"] = "completions"
    dataset: Literal["random", "prefix-repeat", "sharegpt", "jsonl"] = "random"
    dataset_path: str | None = None
    num_prompts: int = Field(100, ge=1)
    input_len: int = Field(256, ge=1)
    output_len: int = Field(128, ge=1)
    range_ratio: float = Field(0.0, ge=0.0, lt=1.0)
    prefix_len: int = Field(0, ge=0)
    num_prefixes: int = Field(1, ge=1)
    burstiness: float = Field(1.0, gt=0.0)  # gamma shape: 1 = Poisson, < 1 burstier, > 1 more regular
    max_concurrency: int | None = Field(None, ge=1)
    seed: int = 0
    warmup: int = Field(0, ge=0)
    duration: float | None = Field(None, gt=0)  # stop sending new requests after this many seconds
    goodput: dict[str, float] = Field(default_factory=dict)  # SLOs in ms: ttft, tpot, e2el

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
    base_url: str
    model: str
    api_key: str | None = None
    request_rate: float = math.inf  # requests per second; inf sends everything at once
    workers: int = Field(1, ge=1)  # client processes; one event loop tops out at a few hundred req/s
    ignore_eos: bool = False
    tokenizer: str | None = None
    label: str = ""
    timeout: float = Field(600.0, gt=0)
    extra_body: dict = Field(default_factory=dict)

    @field_validator("request_rate")
    @classmethod
    def _positive_rate(cls, v: float) -> float:
        if not v > 0:
            raise ValueError("request_rate must be positive (or inf)")
        return v


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
