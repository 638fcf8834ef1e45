"""The load generator: arithmetic with known answers, arrival statistics, the concurrency cap, failures,
and whole runs against the null server and our real server."""
import math
import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from tests.server_process import ServerProcess, free_port
from workbench.cli import app
from workbench.loadgen.arrivals import arrival_times
from workbench.loadgen.config import ServeBenchConfig
from workbench.loadgen.metrics import aggregate, meets_slos
from workbench.loadgen.runner import run_serve_benchmark
from workbench.loadgen.workers import peak_concurrency, shares
from workbench.results import BenchResult, RequestRecord


def rec(i, ttft, e2el, out, itl=(), ok=True):
    return RequestRecord(index=i, start_time=0, success=ok, ttft=ttft, e2el=e2el, output_tokens=out,
                         prompt_tokens=10, itl=list(itl), error=None if ok else "APIStatusError:500")


def test_aggregates_with_known_answers():
    records = [rec(i, ttft=0.1 * (i + 1), e2el=1.0 + 0.1 * i, out=11, itl=[0.09] * 10) for i in range(10)]
    records.append(rec(10, None, 0.5, 0, ok=False))
    m, errors = aggregate(records, duration_s=2.0, slos_ms={"ttft": 500}, peak_concurrency=7)
    assert m["completed"] == 10 and m["failed"] == 1 and errors == {"APIStatusError:500": 1}
    assert m["request_throughput"] == pytest.approx(5.0)
    assert m["output_throughput"] == pytest.approx(55.0)
    assert m["total_token_throughput"] == pytest.approx((110 + 100) / 2)
    assert m["mean_ttft_ms"] == pytest.approx(550.0)
    assert m["median_ttft_ms"] == pytest.approx(550.0)
    assert m["p99_ttft_ms"] == pytest.approx(np.percentile([100 * (i + 1) for i in range(10)], 99))
    # TPOT = (e2el - ttft) / (out - 1): request 0 -> (1.0 - 0.1) / 10
    assert records[0].tpot == pytest.approx(0.09)
    assert m["median_itl_ms"] == pytest.approx(90.0)
    assert m["request_goodput"] == pytest.approx(5 / 2.0)  # ttft <= 500 ms: requests 0..4
    assert m["peak_concurrency"] == 7 and m["error_rate"] == pytest.approx(1 / 11)


def test_goodput_needs_every_slo():
    r = rec(0, ttft=0.2, e2el=1.2, out=11)  # tpot 100 ms
    assert meets_slos(r, {"ttft": 250, "tpot": 100})
    assert not meets_slos(r, {"ttft": 250, "tpot": 99})
    assert not meets_slos(rec(1, None, 1, 0, ok=False), {"ttft": 1e9})


@pytest.mark.parametrize("burstiness,cv", [(1.0, 1.0), (0.5, math.sqrt(2)), (4.0, 0.5)])
def test_arrival_statistics(burstiness, cv):
    times = arrival_times(20000, rate=50.0, burstiness=burstiness, seed=1)
    gaps = np.diff(times)
    assert gaps.mean() == pytest.approx(1 / 50, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.05)
    assert arrival_times(3, math.inf) == [0.0, 0.0, 0.0]


@pytest.fixture(scope="module")
def null_server():
    def start(*flags):
        port = free_port()
        proc = subprocess.Popen([sys.executable, "-m", "workbench.loadgen.null_server", "--port", str(port), *flags])
        from workbench.bench.ceiling import wait_healthy as _wait_healthy
        _wait_healthy(f"http://127.0.0.1:{port}", proc)
        procs.append(proc)
        return f"http://127.0.0.1:{port}"
    procs = []
    yield start
    for p in procs:
        p.terminate()
        p.wait(10)


def test_concurrency_cap_respected(null_server):
    url = null_server("--delay-ms", "3")
    r = run_serve_benchmark(ServeBenchConfig(base_url=url, model="null", num_prompts=24, input_len=4, output_len=8,
                                             max_concurrency=4), progress=False)
    assert r.metrics["completed"] == 24
    assert r.metrics["peak_concurrency"] == 4


def test_failed_requests_are_counted_and_the_run_goes_on(null_server):
    url = null_server("--fail-every", "3")
    r = run_serve_benchmark(ServeBenchConfig(base_url=url, model="null", num_prompts=30, input_len=4, output_len=5),
                            progress=False)
    assert r.metrics["failed"] == 10 and r.metrics["completed"] == 20
    assert r.extra["errors"] == {"InternalServerError:500": 10}
    assert len(r.requests) == 30


@pytest.mark.parametrize("cap,workers", [(6, 2), (5, 3)])
def test_workers_share_one_run(null_server, cap, workers):
    url = null_server("--delay-ms", "3")
    r = run_serve_benchmark(ServeBenchConfig(base_url=url, model="null", num_prompts=40, input_len=4, output_len=6,
                                             max_concurrency=cap, workers=workers), progress=False)
    assert sorted(x.index for x in r.requests) == list(range(40)), "each request sent once, by one worker"
    assert r.metrics["completed"] == 40 and r.metrics["total_output_tokens"] == 240
    assert r.metrics["peak_concurrency"] == cap  # the cap is split, never exceeded


def test_worker_helpers():
    assert shares(5, 3) == [2, 2, 1] and sum(shares(64, 2)) == 64
    records = [RequestRecord(index=i, start_time=s, e2el=d, success=True) for i, (s, d) in
               enumerate([(0.0, 1.0), (0.5, 1.0), (1.0, 0.2), (3.0, 0.1)])]
    assert peak_concurrency(records) == 2  # the first ends as the third starts


def test_rate_limited_run_takes_its_time(null_server):
    url = null_server()
    r = run_serve_benchmark(ServeBenchConfig(base_url=url, model="null", num_prompts=20, input_len=4, output_len=4,
                                             request_rate=40.0, seed=3), progress=False)
    starts = sorted(x.start_time for x in r.requests)
    assert 0.2 < starts[-1] < 1.5  # ~19 gaps of 25 ms on average


def test_real_server_run_writes_a_complete_result(tmp_path):
    srv = ServerProcess("tiny", "--max-model-len", "512", "--kv-cache-memory", "32MiB")
    try:
        result = CliRunner().invoke(app, ["bench", "serve", "--base-url", srv.url, "--model", "tiny",
                                          "--num-prompts", "12", "--input-len", "40", "--output-len", "12",
                                          "--ignore-eos", "--request-rate", "50", "--goodput", "ttft:5000",
                                          "--result-dir", str(tmp_path), "--label", "tiny-run", "--endpoint", "chat"])
    finally:
        srv.stop()
    assert result.exit_code == 0, result.output
    files = sorted(tmp_path.glob("serve-*.json"))
    assert len(files) == 1 and files[0].with_suffix(".csv").exists()
    res = BenchResult.load(files[0])
    assert res.metrics["completed"] == 12 and res.metrics["failed"] == 0
    assert all(r.output_tokens == 12 and r.ttft is not None and len(r.itl) >= 1 for r in res.requests)
    assert res.server["models"]["data"][0]["id"] == "tiny" and res.server["version"]["version"]
    assert "exact" in res.extra["lengths"]
    assert res.metrics["request_goodput"] > 0


def test_unreachable_server_and_wrong_key_exit_with_one_line(tmp_path):
    port = free_port()
    r = CliRunner().invoke(app, ["bench", "serve", "--base-url", f"http://127.0.0.1:{port}", "--model", "m",
                                 "--result-dir", str(tmp_path)])
    assert r.exit_code == 1 and "cannot reach" in r.output and "Traceback" not in r.output
    srv = ServerProcess("tiny", "--api-key", "right", "--max-model-len", "256", "--kv-cache-memory", "16MiB")
    try:
        r = CliRunner().invoke(app, ["bench", "serve", "--base-url", srv.url, "--model", "tiny", "--api-key", "wrong",
                                     "--result-dir", str(tmp_path)])
    finally:
        srv.stop()
    assert r.exit_code == 1 and "API key" in r.output


def test_bad_options_exit_2(tmp_path):
    r = CliRunner().invoke(app, ["bench", "serve", "--model", "m", "--request-rate", "fast"])
    assert r.exit_code == 2 and "request-rate" in r.output
    r = CliRunner().invoke(app, ["bench", "serve", "--model", "m", "--goodput", "latency:5"])
    assert r.exit_code == 2 and "unknown SLO" in r.output
    r = CliRunner().invoke(app, ["bench", "serve", "--model", "m", "--workers", "0"])
    assert r.exit_code == 2 and "workers" in r.output
    r = CliRunner().invoke(app, ["bench", "ceiling", "--workers", "0"])
    assert r.exit_code == 2 and "workers" in r.output and "Traceback" not in r.output


def test_the_lag_warning_names_its_cause_for_the_command_and_the_machine():
    """A blocked event loop is reported with why: `tune` (its own server here, no --workers flag) never
    suggests --workers; `bench serve` does only where spare cores exist."""
    import asyncio
    import time

    from workbench.loadgen.lag import lag_cause
    from workbench.loadgen.workers import lag_monitor

    local = ServeBenchConfig(base_url="http://127.0.0.1:8000", model="m")
    remote = ServeBenchConfig(base_url="http://gpu-box:8000", model="m")
    for cores in (2, 64):
        tune = lag_cause(local, server_here=True, suggest_workers=False, cores=cores)
        assert "--workers" not in tune and f"shares this machine's {cores} CPU cores with the server" in tune
    assert "--workers" not in lag_cause(local, cores=2) and "shares" in lag_cause(local, cores=2)
    assert "more --workers" in lag_cause(local, cores=16) and "more --workers" in lag_cause(remote, cores=4)
    assert "--workers" not in lag_cause(remote, cores=1)

    async def blocked() -> list[str]:
        stop, warnings = asyncio.Event(), []
        monitor = asyncio.create_task(lag_monitor(stop, warnings, "THE CAUSE"))
        await asyncio.sleep(0.05)
        time.sleep(0.3)  # the loop is held: the monitor's 0.1 s sleep wakes late
        await asyncio.sleep(0.15)
        stop.set()
        await monitor
        return warnings

    warnings = asyncio.run(blocked())
    assert len(warnings) == 1 and warnings[0].startswith("client event loop lagged ") and \
        warnings[0].endswith("ms: THE CAUSE")
