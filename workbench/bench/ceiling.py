"""`workbench bench ceiling`: the load generator's own limit, against a server that does no compute
(workbench/loadgen/null_server.py); and the small helpers for benchmarks that start a server child."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import httpx
from rich.console import Console

console = Console(stderr=True)
PROFILES = {"requests": 8, "tokens": 64}  # reply tokens: request-bound and stream-bound runs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 30, what: str = "the null server") -> None:
    """Until `url`/health answers 200; RuntimeError when the child exits or the time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited at start with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{what} did not become healthy within {timeout:.0f} s")


def measure_ceiling(num_prompts: int, max_concurrency: int, repeats: int, workers: int) -> dict:
    """Requests/s with 8-token replies and streamed tokens/s with 64-token replies; medians over repeats."""
    from workbench.loadgen.config import ServeBenchConfig
    from workbench.loadgen.runner import run_serve_benchmark
    from workbench.results import collect_environment

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "workbench.loadgen.null_server", "--port", str(port)])
    runs: dict[str, list[dict]] = {name: [] for name in PROFILES}
    try:
        wait_healthy(f"http://127.0.0.1:{port}", server)
        for i in range(repeats):
            for name, output_len in PROFILES.items():
                config = ServeBenchConfig(base_url=f"http://127.0.0.1:{port}", model="null", num_prompts=num_prompts,
                                          input_len=8, output_len=output_len, max_concurrency=max_concurrency,
                                          workers=workers, label=f"ceiling-{name}-{i}")
                r = run_serve_benchmark(config, progress=False)
                runs[name].append({k: r.metrics[k] for k in ("request_throughput", "output_throughput", "failed",
                                                            "median_itl_ms", "p99_itl_ms")})
                console.print(f"{name} run {i}: {r.metrics['request_throughput']:,.0f} req/s, "
                              f"{r.metrics['output_throughput']:,.0f} streamed tok/s")
    finally:
        server.terminate()
        server.wait(10)

    def median(name: str, key: str) -> float:
        values = sorted(run[key] for run in runs[name])
        return values[len(values) // 2]

    return {"commit": collect_environment().commit, "device": "cpu (the load generator's host)",
            "command": " ".join(sys.argv), "cpu_cores": os.cpu_count() or 0, "max_concurrency": max_concurrency,
            "workers": workers,
            "runs": runs, "median_request_throughput": median("requests", "request_throughput"),
            "median_streamed_tokens_per_s": median("tokens", "output_throughput"),
            "note": "the null server shares the same cores as the client"}
