"""The result files that benchmarks write and the report, the gate and tuning read.

Every result is one JSON document with a `kind`, a `schema_version`, the exact command, the
environment it ran in, and a flat `metrics` dict (name -> number) that the gate compares.
Metric names follow `vllm bench serve`: request_throughput, output_throughput,
total_token_throughput, {mean,median,p90,p95,p99}_{ttft,tpot,itl,e2el}_ms, goodput, ...
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

SCHEMA_VERSION = 2
# Version 2 only added optional fields (request sessions/turns/cached tokens; telemetry, windows and
# turns on a result), so version 1 files still read.
READABLE_VERSIONS = (1, 2)


class Environment(BaseModel):
    hostname: str = ""
    platform: str = ""
    python: str = ""
    device: str = ""  # e.g. "NVIDIA H100 80GB HBM3" or "cpu"
    commit: str = ""  # git commit of this project when it ran ("" outside a checkout)
    packages: dict[str, str] = Field(default_factory=dict)


class RequestRecord(BaseModel):
    """One request of a serving benchmark, as the client saw it (times in seconds)."""
    index: int
    start_time: float  # seconds since the run started
    scheduled_time: float | None = None  # when the arrival schedule wanted it sent
    success: bool
    error: str | None = None  # error type when not success, e.g. "APIStatusError:429"
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float | None = None
    e2el: float | None = None
    itl: list[float] = Field(default_factory=list)
    session: int | None = None  # multi-turn: which conversation, and which turn of it (0-based)
    turn: int | None = None
    cached_tokens: int | None = None  # prompt tokens the server served from its prefix cache, when known

    @property
    def queue_delay(self) -> float | None:
        """Time the request waited in the client (concurrency cap, a busy event loop) past its
        scheduled send time."""
        return None if self.scheduled_time is None else max(0.0, self.start_time - self.scheduled_time)

    @property
    def sched_ttft(self) -> float | None:
        """TTFT as the user of an open-loop schedule sees it: from the scheduled send time."""
        return None if self.ttft is None else self.ttft + (self.queue_delay or 0.0)

    @property
    def sched_e2el(self) -> float | None:
        return None if self.e2el is None else self.e2el + (self.queue_delay or 0.0)

    @property
    def tpot(self) -> float | None:
        if self.e2el is None or self.ttft is None or self.output_tokens < 2:
            return None
        return (self.e2el - self.ttft) / (self.output_tokens - 1)


class BenchResult(BaseModel):
    schema_version: int = SCHEMA_VERSION
    kind: Literal["serve", "throughput", "latency", "gate", "quality"] = "serve"
    created: str = Field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    label: str = ""  # a short name for plots and tables, e.g. "prefix-on" or "rate=4"
    command: str = Field(default_factory=lambda: command_line())
    config: dict[str, Any] = Field(default_factory=dict)  # the benchmark's own settings
    environment: Environment = Field(default_factory=Environment)
    server: dict[str, Any] = Field(default_factory=dict)  # /version, /v1/models, engine config
    metrics: dict[str, float | None] = Field(default_factory=dict)
    requests: list[RequestRecord] = Field(default_factory=list)
    telemetry: list[dict[str, float]] = Field(default_factory=list)  # /metrics every second: t, kv usage, ...
    windows: list[dict[str, float | None]] = Field(default_factory=list)  # per time window: offered load, latency
    turns: list[dict[str, float | None]] = Field(default_factory=list)  # multi-turn: figures per turn number
    extra: dict[str, Any] = Field(default_factory=dict)  # e.g. roofline, sweep points, per-batch rows

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.model_dump_json(indent=2))
        return path

    @classmethod
    def load(cls, path: str | Path) -> BenchResult:
        """Read a result file; a missing, non-JSON or wrongly shaped file raises ValueError naming it."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ValueError(f"{path}: no such result file") from None
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
        if not isinstance(data, dict) or "metrics" not in data:
            raise ValueError(f"{path}: not a PagedBench result file (no 'metrics' field)")
        version = data.get("schema_version")
        if version not in READABLE_VERSIONS:
            raise ValueError(f"{path}: schema_version {version!r}, this workbench reads "
                             f"{', '.join(map(str, READABLE_VERSIONS))}")
        try:
            return cls.model_validate(data)
        except Exception as exc:  # pydantic's message lists every bad field
            raise ValueError(f"{path}: malformed result file: {exc}") from None


def command_line(argv: list[str] | None = None) -> str:
    """The command as a user would type it again: `workbench ...` however it was started (the console
    script, `python -m workbench.cli`, or a path to it)."""
    argv = list(sys.argv if argv is None else argv)
    if argv and (Path(argv[0]).name == "workbench" or argv[0].endswith(("workbench/cli/__main__.py", "-m"))):
        argv[0] = "workbench"
    return " ".join(argv)


def git_commit(cwd: str | Path | None = None) -> str:
    """This checkout's commit; PAGEDBENCH_COMMIT names it where the tree was copied without .git
    (the GPU machine gets a copy of the working tree)."""
    if os.environ.get("PAGEDBENCH_COMMIT"):
        return os.environ["PAGEDBENCH_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd or Path(__file__).parent, text=True,
                             capture_output=True, timeout=5)
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.TimeoutExpired):
        return ""


def collect_environment(device: str = "") -> Environment:
    from importlib import metadata

    packages = {}
    for name in ("pagedbench", "torch", "triton", "transformers", "openai", "vllm"):
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return Environment(hostname=platform.node(), platform=platform.platform(), python=platform.python_version(),
                       device=device or os.environ.get("PAGEDBENCH_DEVICE", ""), commit=git_commit(),
                       packages=packages)
