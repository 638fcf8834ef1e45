"""One trial: start a server with the sampled flags on a free port, wait for /health, run the workload,
scrape /metrics, stop the server. Anything that goes wrong becomes a TrialFailed with its reason."""
from __future__ import annotations

import json
import math
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from workbench.tune.study_file import StudyFile

DEFAULT_LAUNCH = f"{shlex.quote(sys.executable)} -m engine.server {{model}} --host {{host}} --port {{port}} {{flags}}"


class TrialFailed(Exception):
    """The trial could not produce measurements (start failure, out of memory, timeout, ...)."""


@dataclass
class TrialOutcome:
    metrics: dict
    command: str
    result_file: str
    scraped: dict = field(default_factory=dict)


def render_flags(flags: dict) -> str:
    """vLLM-style flags: --max-num-seqs 64, --enable-prefix-caching / --no-enable-prefix-caching."""
    parts = []
    for name, value in flags.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            parts.append(flag if value else "--no-" + name.replace("_", "-"))
        elif value is not None:
            parts.append(f"{flag} {shlex.quote(str(value))}")
    return " ".join(parts)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_trial(study: StudyFile, flags: dict, results_dir: Path, launch: str | None, label: str) -> TrialOutcome:
    if study.workload.type == "throughput":
        return _run_offline(study, flags, results_dir, label)
    port, host = free_port(), "127.0.0.1"
    command = (launch or DEFAULT_LAUNCH).format(model=study.study.model, port=port, host=host,
                                                flags=render_flags(flags))
    log = tempfile.NamedTemporaryFile("w+", prefix="trial-", suffix=".log", delete=False)
    proc = subprocess.Popen(shlex.split(command), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_healthy(f"http://{host}:{port}", proc, study.study.startup_timeout, log.name)
        result = _run_workload(study, f"http://{host}:{port}", label)
        scraped = scrape_metrics(f"http://{host}:{port}")
        if proc.poll() is not None:
            raise TrialFailed(f"the server died during the workload: {_tail(log.name)}")
    finally:
        _stop(proc)
        log.close()
    metrics = dict(result.metrics) | {f"server_{k}": v for k, v in scraped.items()}
    path = result.save(results_dir / f"{label}.json")
    if result.metrics.get("completed", 0) == 0:
        raise TrialFailed(f"no request succeeded: {result.extra.get('errors')}")
    return TrialOutcome(metrics=metrics, command=command, result_file=str(path), scraped=scraped)


def _wait_healthy(url: str, proc: subprocess.Popen, timeout: float, log_path: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise TrialFailed(f"the server exited with code {proc.returncode} at start: {_tail(log_path)}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TrialFailed(f"the server was not healthy within {timeout:.0f} s: {_tail(log_path)}")


def _tail(path: str, lines: int = 6) -> str:
    text = Path(path).read_text(errors="replace").strip().splitlines()
    interesting = [line for line in text if "error" in line.lower() or "memory" in line.lower()] or text
    return " | ".join(interesting[-lines:])[-800:]


def _stop(proc: subprocess.Popen, grace: float = 15.0) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


def _run_workload(study: StudyFile, base_url: str, label: str):
    from workbench.loadgen.config import ServeBenchConfig
    from workbench.loadgen.runner import ServerUnavailable, run_serve_benchmark

    w = study.workload.model_dump(exclude={"type"})
    w["request_rate"] = math.inf if w["request_rate"] == "inf" else w["request_rate"]
    config = ServeBenchConfig(base_url=base_url, model=study.study.model, label=label,
                              timeout=study.study.trial_timeout, **w)
    try:
        return run_serve_benchmark(config, progress=False)
    except ServerUnavailable as exc:
        raise TrialFailed(str(exc)) from None


def scrape_metrics(base_url: str) -> dict:
    """The engine-side numbers the client cannot see (any vLLM-compatible /metrics)."""
    try:
        response = httpx.get(base_url + "/metrics", timeout=5)
        families = list(text_string_to_metric_families(response.text)) if response.status_code == 200 else []
    except (httpx.HTTPError, ValueError):  # no /metrics, or not Prometheus text: nothing to add
        return {}
    values: dict[str, float] = {}
    for family in families:
        for s in family.samples:
            if s.name in ("vllm:num_preemptions_total", "vllm:prefix_cache_queries_total",
                          "vllm:prefix_cache_hits_total", "vllm:prompt_tokens_total", "vllm:generation_tokens_total"):
                values[s.name.split(":")[1]] = values.get(s.name.split(":")[1], 0.0) + s.value
    if values.get("prefix_cache_queries_total"):
        values["prefix_cache_hit_rate"] = values.get("prefix_cache_hits_total", 0.0) / values["prefix_cache_queries_total"]
    return values


def _run_offline(study: StudyFile, flags: dict, results_dir: Path, label: str) -> TrialOutcome:
    w = study.workload
    path = results_dir / f"{label}.json"
    cmd = [sys.executable, "-m", "workbench.cli", "bench", "throughput", "--model", study.study.model,
           "--num-prompts", str(w.num_prompts), "--input-len", str(w.input_len), "--output-len", str(w.output_len),
           "--dataset", w.dataset, "--range-ratio", str(w.range_ratio), "--prefix-len", str(w.prefix_len),
           "--num-prefixes", str(w.num_prefixes), "--output-json", str(path), *shlex.split(render_flags(flags))]
    if w.dataset_path:
        cmd += ["--dataset-path", w.dataset_path]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=study.study.trial_timeout)
    except subprocess.TimeoutExpired:
        raise TrialFailed(f"bench throughput did not finish within {study.study.trial_timeout:.0f} s") from None
    if done.returncode != 0:
        raise TrialFailed(f"bench throughput failed: {(done.stderr or done.stdout).strip()[-800:]}")
    metrics = json.loads(path.read_text())["metrics"]
    return TrialOutcome(metrics=metrics, command=shlex.join(cmd), result_file=str(path))
