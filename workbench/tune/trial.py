"""Measuring one configuration: start a server with its flags on a free port, wait for /health, run
the workload `repeats` times (or search its SLO capacity each time), scrape /metrics, stop the
server. Anything that goes wrong becomes a TrialFailed with its reason and kind."""
from __future__ import annotations

import json
import math
import os
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from workbench.tune.capacity import search
from workbench.tune.study_file import StudyFile

Status = Callable[[str], None]  # where a trial says what it is doing (starting the server, run 2/3, ...)
DEFAULT_LAUNCH = f"{shlex.quote(sys.executable)} -m engine.server {{model}} --host {{host}} --port {{port}} {{flags}}"
COUNTERS = ("num_preemptions_total", "prefix_cache_queries_total", "prefix_cache_hits_total", "prompt_tokens_total",
            "generation_tokens_total", "spec_decode_num_drafts_total", "spec_decode_num_draft_tokens_total",
            "spec_decode_num_accepted_tokens_total")
CAPACITY_METRIC = "slo_capacity"  # a [capacity] run's value: the highest load that met the SLO
# Set by `bench throughput` beside its _metrics (workbench/bench/throughput.py, run_throughput).
THROUGHPUT_ROOFLINE_METRICS = ("roofline_floor_s", "time_over_floor")


class TrialFailed(Exception):
    """The configuration could not produce measurements. kind: precheck, start, oom, timeout, died, error.
    detail: the whole story where the reason is a summary (the end of the server's log, the stderr)."""

    def __init__(self, reason: str, kind: str | None = None, detail: str = ""):
        super().__init__(reason)
        self.kind = kind or classify(reason)
        self.detail = detail


def classify(reason: str) -> str:
    text = reason.lower()
    if "out of memory" in text or "outofmemory" in text or "no memory left" in text:
        return "oom"
    if "within" in text and ("healthy" in text or "finish" in text) or "timed out" in text:
        return "timeout"
    if "at start" in text:
        return "start"
    if "died" in text:
        return "died"
    return "error"


@dataclass
class Measurement:
    metrics: dict  # the median over repeats of every numeric metric (the last run's value otherwise)
    samples: dict[str, list[float]]  # every repeat's value of each numeric metric
    command: str
    result_files: list[str] = field(default_factory=list)
    probes: list[list[dict]] = field(default_factory=list)  # per repeat, when searching SLO capacity


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


def measure(study: StudyFile, flags: dict, results_dir: Path, launch: str | None, label: str, seeds: list[int],
            after_repeat: Callable[[int, list[dict]], None] | None = None, status: Status | None = None) -> Measurement:
    """One run per seed (a repeat); after_repeat(i, runs so far) may raise to stop early (pruning)."""
    runs: list[dict] = []
    files: list[str] = []
    probes: list[list[dict]] = []
    say = status or (lambda text: None)
    of = f"/{len(seeds)}" if len(seeds) > 1 else ""
    if study.workload.type == "throughput":
        command = ""
        for i, seed in enumerate(seeds):
            say(f"bench throughput (offline, in a subprocess){f' run {i + 1}{of}' if of else ''}: "
                f"{study.workload.num_prompts} requests")
            metrics, command, path = _run_offline(study, flags, results_dir, f"{label}-r{i}", seed)
            runs.append(metrics)
            files.append(path)
            if after_repeat:
                after_repeat(i, runs)
        return Measurement(median_metrics(runs), samples_of(runs), command, files)
    with running_server(study, flags, launch, say) as (url, command, alive):
        before = scrape_metrics(url)
        for i, seed in enumerate(seeds):
            say(f"run {i + 1}{of}: {_run_size(study)}" if of else _run_size(study))
            metrics, paths, run_probes = _one_serve_run(study, url, results_dir, f"{label}-r{i}", seed,
                                                        progress=status is not None)
            alive()
            after = scrape_metrics(url)
            runs.append(with_server_counters(metrics, before, after))
            before = after
            files += paths
            probes.append(run_probes)
            if after_repeat:
                after_repeat(i, runs)
    return Measurement(median_metrics(runs), samples_of(runs), command, files, probes)


def median_metrics(runs: list[dict]) -> dict:
    out = dict(runs[-1])
    for key in runs[-1]:
        values = [r.get(key) for r in runs]
        if all(_number(v) for v in values):
            out[key] = statistics.median(values)
    return out


def samples_of(runs: list[dict]) -> dict[str, list[float]]:
    return {k: [r[k] for r in runs] for k in runs[-1] if all(_number(r.get(k)) for r in runs)}


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _run_size(study: StudyFile) -> str:
    w = study.workload
    if study.capacity is not None:
        return f"searching the SLO capacity ({study.capacity.knob}, at most {study.capacity.max_probes} probes)"
    multi = w.dataset == "multi-turn"
    what = f"{w.num_prompts} sessions x {w.num_turns} turns" if multi else f"{w.num_prompts} requests"
    return what + (f" after {w.warmup} warm-up requests" if w.warmup else "")


@contextmanager
def running_server(study: StudyFile, flags: dict, launch: str | None, status: Status = lambda text: None):
    """Yields (base_url, command, alive): alive() raises TrialFailed if the server has died."""
    port, host = free_port(), "127.0.0.1"
    command = (launch or DEFAULT_LAUNCH).format(model=study.study.model, port=port, host=host,
                                                flags=render_flags(flags))
    log = tempfile.NamedTemporaryFile("w+", prefix="trial-", suffix=".log", delete=False)
    status(f"starting the server: {command}")
    started = time.monotonic()
    proc = subprocess.Popen(shlex.split(command), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def alive() -> None:
        if proc.poll() is not None:
            raise TrialFailed(f"the server died during the workload: {_tail(log.name)}", "died", _log_end(log.name))

    try:
        _wait_healthy(f"http://{host}:{port}", proc, study.study.startup_timeout, log.name)
        status(f"server healthy after {time.monotonic() - started:.1f} s")
        yield f"http://{host}:{port}", command, alive
    finally:
        _stop(proc)
        log.close()
        Path(log.name).unlink(missing_ok=True)


def _one_serve_run(study: StudyFile, url: str, results_dir: Path, label: str, seed: int,
                   progress: bool = False) -> tuple[dict, list[str], list[dict]]:
    if study.capacity is None:
        result = _run_workload(study, url, label, seed, progress=progress)
        return result.metrics, [str(result.save(results_dir / f"{label}.json"))], []
    spec, paths = study.capacity, []

    def probe(value: float) -> dict:
        knob = {"request_rate": value} if spec.knob == "request_rate" else {"max_concurrency": int(value)}
        n = study.workload.num_prompts
        if spec.knob == "request_rate" and spec.probe_seconds:
            n = max(n, math.ceil(value * spec.probe_seconds))
        elif spec.knob == "max_concurrency":
            n = max(n, 4 * int(value))  # every slot turns over a few times
        # A fresh seed per probe: fresh prompts, so no probe rides on the previous one's prefix cache.
        result = _run_workload(study, url, f"{label}-p{len(paths)}", seed * 1000 + len(paths), num_prompts=n,
                               progress=progress, **knob)
        paths.append(str(result.save(results_dir / f"{label}-p{len(paths)}.json")))
        return result.metrics

    found = search(spec, probe)
    return found.metrics | {CAPACITY_METRIC: found.capacity}, paths, found.probes


def with_server_counters(metrics: dict, before: dict, after: dict) -> dict:
    """A run's metrics and the server's counters over it (server_*)."""
    return metrics | {f"server_{k}": v for k, v in counter_deltas(before, after).items()}


def metric_names(study: StudyFile) -> dict[str, bool]:
    """Every metric a trial of this study reports, found by running the builders a trial uses on one
    synthetic request (so the list cannot drift from them): name -> whether this workload fills it
    (False: reported empty, e.g. request_goodput without [workload] goodput)."""
    if study.workload.type == "throughput":
        from engine.messages import EngineStats
        from workbench.bench.throughput import _metrics

        # Counters that moved, speculation's included (its metrics are valid names for any model).
        zero, one = (EngineStats(0, 0, 0.0, 1, v, v, v, v, v, v, v, v, v, v, [v]) for v in (0, 1))
        names = _metrics(1, 1, 1, 1.0, zero, one) | dict.fromkeys(THROUGHPUT_ROOFLINE_METRICS, 1.0)
        return {k: v is not None for k, v in names.items()}
    from workbench.loadgen import server_side
    from workbench.loadgen.metrics import aggregate
    from workbench.results import RequestRecord

    turns = {"session": 0, "turn": 0} if study.workload.dataset == "multi-turn" else {}
    record = RequestRecord(index=0, start_time=0.0, scheduled_time=0.0, success=True, prompt_tokens=4,
                           output_tokens=3, ttft=0.01, e2el=0.03, itl=[0.01, 0.01], **turns)
    metrics, _ = aggregate([record], 1.0, dict(study.workload.goodput), 1)
    metrics |= server_side.counter_deltas(dict.fromkeys(server_side.COUNTERS, 0.0),
                                          dict.fromkeys(server_side.COUNTERS, 1.0))
    metrics = with_server_counters(metrics, dict.fromkeys(COUNTERS, 0.0), dict.fromkeys(COUNTERS, 1.0))
    if study.capacity is not None:
        metrics[CAPACITY_METRIC] = 1.0
    return {k: v is not None for k, v in metrics.items()}


def _wait_healthy(url: str, proc: subprocess.Popen, timeout: float, log_path: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise TrialFailed(f"the server exited with code {proc.returncode} at start: {_tail(log_path)}",
                              detail=_log_end(log_path))
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TrialFailed(f"the server was not healthy within {timeout:.0f} s: {_tail(log_path)}", "timeout",
                      _log_end(log_path))


def _tail(path: str, lines: int = 6) -> str:
    text = Path(path).read_text(errors="replace").strip().splitlines()
    interesting = [line for line in text if "error" in line.lower() or "memory" in line.lower()] or text
    return " | ".join(interesting[-lines:])[-800:]


def _log_end(path: str, lines: int = 60) -> str:
    """The end of a log as it is, for the failure printed in full."""
    return "\n".join(Path(path).read_text(errors="replace").rstrip().splitlines()[-lines:])


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


def _run_workload(study: StudyFile, base_url: str, label: str, seed: int, progress: bool = False, **override):
    from workbench.loadgen.config import ServeBenchConfig
    from workbench.loadgen.lag import lag_cause
    from workbench.loadgen.runner import ServerUnavailable, run_serve_benchmark

    w = study.workload.model_dump(exclude={"type"}) | {"seed": seed} | override
    w["request_rate"] = math.inf if w["request_rate"] == "inf" else w["request_rate"]
    config = ServeBenchConfig(base_url=base_url, model=study.study.model, label=label,
                              timeout=study.study.trial_timeout, **w)
    try:
        # The trial launched the server here: a lagging client is sharing the CPU with it (and `tune`
        # has no --workers to suggest).
        result = run_serve_benchmark(config, progress=progress,
                                     lag_cause=lag_cause(config, server_here=True, suggest_workers=False))
    except ServerUnavailable as exc:
        raise TrialFailed(str(exc)) from None
    if result.metrics.get("completed", 0) == 0:
        raise TrialFailed(f"no request succeeded: {result.extra.get('errors')}")
    return result


def scrape_metrics(base_url: str) -> dict:
    """The engine-side counters the client cannot see (any vLLM-compatible /metrics)."""
    try:
        response = httpx.get(base_url + "/metrics", timeout=5)
        families = list(text_string_to_metric_families(response.text)) if response.status_code == 200 else []
    except (httpx.HTTPError, ValueError):  # no /metrics, or not Prometheus text: nothing to add
        return {}
    values: dict[str, float] = {}
    for family in families:
        for s in family.samples:
            name = s.name.split(":")[-1]
            if s.name.startswith("vllm:") and name in COUNTERS:
                values[name] = values.get(name, 0.0) + s.value
    return values


def counter_deltas(before: dict, after: dict) -> dict:
    """Counters over one run (the server lives across repeats), and the run's prefix-cache hit rate."""
    out = {k: v - before.get(k, 0.0) for k, v in after.items()}
    if out.get("prefix_cache_queries_total"):
        out["prefix_cache_hit_rate"] = out.get("prefix_cache_hits_total", 0.0) / out["prefix_cache_queries_total"]
    if out.get("spec_decode_num_draft_tokens_total") and out.get("spec_decode_num_drafts_total"):
        accepted = out.get("spec_decode_num_accepted_tokens_total", 0.0)
        out["spec_decode_acceptance_rate"] = accepted / out["spec_decode_num_draft_tokens_total"]
        out["spec_decode_mean_accepted_length"] = 1 + accepted / out["spec_decode_num_drafts_total"]
    return out


def _run_offline(study: StudyFile, flags: dict, results_dir: Path, label: str, seed: int) -> tuple[dict, str, str]:
    w = study.workload
    path = results_dir / f"{label}.json"
    cmd = [sys.executable, "-m", "workbench.cli", "bench", "throughput", "--model", study.study.model,
           "--num-prompts", str(w.num_prompts), "--input-len", str(w.input_len), "--output-len", str(w.output_len),
           "--dataset", w.dataset, "--range-ratio", str(w.range_ratio), "--prefix-len", str(w.prefix_len),
           "--num-prefixes", str(w.num_prefixes), "--output-json", str(path),
           *shlex.split(render_flags({"seed": seed} | flags))]
    if w.dataset_path:
        cmd += ["--dataset-path", w.dataset_path]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=study.study.trial_timeout)
    except subprocess.TimeoutExpired:
        raise TrialFailed(f"bench throughput did not finish within {study.study.trial_timeout:.0f} s",
                          "timeout") from None
    if done.returncode != 0:
        output = (done.stderr or done.stdout).strip()
        raise TrialFailed(f"bench throughput failed: {output[-800:]}",
                          detail="\n".join(output.splitlines()[-60:]))
    return json.loads(path.read_text())["metrics"], shlex.join(cmd), str(path)
