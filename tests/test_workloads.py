"""Realistic workloads: length distributions, ramp-up schedules, trace readers, multi-turn sessions, the
per-window / per-turn / scheduled-time figures, /metrics parsing -- known answers first, then runs against
the null server and a real tiny server (a trace replay, a multi-turn run, a sweep with cache resets)."""
import math
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from tests.server_process import ServerProcess, free_port
from workbench.cli import app
from workbench.datasets import PromptMaker, parse_length
from workbench.loadgen.arrivals import expected_count, ramp_arrival_times, ramp_period
from workbench.loadgen.config import ServeBenchConfig
from workbench.loadgen.metrics import aggregate, meets_slos, per_turn, session_metrics, windows
from workbench.loadgen.runner import run_serve_benchmark
from workbench.loadgen.server_side import counter_deltas, parse_metrics, reset_prefix_cache
from workbench.loadgen.sessions import history_messages, history_prompt, sharegpt_sessions, synthetic_sessions
from workbench.loadgen.sweep import run_rates
from workbench.loadgen.traces import read_trace, trace_requests, trace_schedule
from workbench.results import RequestRecord

FIXTURES = Path(__file__).parent / "fixtures"
TRACES = FIXTURES / "traces"


# ---------------------------------------------------------------- lengths
def test_length_distributions_known_moments():
    rng = random.Random(0)
    draw = lambda spec, n=20000: np.array([parse_length(spec).draw(rng) for _ in range(n)])  # noqa: E731
    u = draw("uniform:10,20")
    assert u.min() == 10 and u.max() == 20 and u.mean() == pytest.approx(15, abs=0.1)
    n = draw("normal:200,30")
    assert n.mean() == pytest.approx(200, abs=1) and n.std() == pytest.approx(30, rel=0.03)
    ln = draw("lognormal:5,0.5")
    assert np.median(ln) == pytest.approx(math.exp(5), rel=0.03)
    assert draw("normal:2,50").min() == 1  # clipped to a whole positive token count
    e = draw(f"empirical:{FIXTURES / 'lengths.txt'}")
    assert set(e) == {8, 12, 30} and (e == 12).mean() == pytest.approx(0.5, abs=0.02)
    assert parse_length("64").kind == "fixed" and parse_length(64).draw(rng) == 64


@pytest.mark.parametrize("spec,message", [("uniform:9,3", "1 <= a <= b"), ("normal:5", "two numbers"),
                                          ("gamma:1,2", "use a number or one of"), ("lognormal:1,-1", "spread"),
                                          ("empirical:/no/such", "no such file"), ("0", "at least 1")])
def test_bad_length_specs_are_named(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_length(spec)


# ---------------------------------------------------------------- ramp-up
@pytest.mark.parametrize("kind", ["linear", "exponential"])
def test_ramp_schedule_follows_the_rate_curve(kind):
    # burstiness -> infinity makes the unit process regular: request i is sent exactly when Λ(t) = i.
    times = ramp_arrival_times(400, kind, 2.0, 50.0, burstiness=1e9)
    period = ramp_period(400, kind, 2.0, 50.0)
    for i in (1, 57, 200, 399):
        assert expected_count(times[i], kind, 2.0, 50.0, period) == pytest.approx(i, abs=1e-3)
    assert times[-1] == pytest.approx(period, rel=0.01)  # the ramp carries the requests it was sized for
    rate = (lambda t: 2 + 48 * t / period) if kind == "linear" else (lambda t: 2 * 25 ** (t / period))
    for i in (0, 100, 398):  # one over a gap is the rate at the gap's middle
        mid = (times[i] + times[i + 1]) / 2
        assert 1 / (times[i + 1] - times[i]) == pytest.approx(rate(mid), rel=0.02)


def test_ramp_known_answers_and_poisson_counts():
    # linear 1 -> 9 req/s carrying 100 requests lasts 2*100/(1+9) = 20 s
    assert ramp_period(100, "linear", 1, 9) == pytest.approx(20.0)
    assert ramp_period(100, "exponential", 1, math.e) == pytest.approx(100 / (math.e - 1))
    times = np.array(ramp_arrival_times(20000, "linear", 10.0, 90.0, seed=3))  # Poisson along the ramp
    period = ramp_period(20000, "linear", 10.0, 90.0)
    first, last = (times < period / 10).sum(), (times > period * 0.9).sum()
    assert first / (period / 10) == pytest.approx(14.0, rel=0.05)  # mean rate over the first tenth
    assert last / (period / 10) == pytest.approx(86.0, rel=0.05)
    with pytest.raises(ValueError, match="linear or exponential"):
        ramp_arrival_times(3, "step", 1, 2)


# ---------------------------------------------------------------- traces
@pytest.mark.parametrize("fmt,file,times,lengths", [
    ("mooncake", "mooncake.jsonl", [0, 0.15, 0.3, 0.42, 0.6], [(40, 6), (36, 4), (20, 5), (48, 3), (16, 8)]),
    ("burstgpt", "burstgpt.csv", [0, 0.2, 0.25, 0.9], [(30, 6), (12, 4), (25, 7), (18, 3)]),
    ("azure", "azure.csv", [0, 0.22941, 0.5, 0.71941], [(22, 5), (35, 4), (14, 6), (28, 2)]),
    ("jsonl", "requests.jsonl", [0, 0.1, 0.35], [(20, 4), (30, 5), (12, 3)])])
def test_trace_readers_known_answers(fmt, file, times, lengths):
    rows = read_trace(TRACES / file, fmt)
    assert trace_schedule(rows) == pytest.approx(times)
    assert trace_schedule(rows, time_scale=0.5) == pytest.approx([t / 2 for t in times])
    assert [(r.input_len, r.output_len) for r in rows] == lengths
    assert len(read_trace(TRACES / file, fmt, limit=2)) == 2


def test_mooncake_hash_ids_become_shared_prefixes():
    words_per_token = lambda text: len(text.split())  # noqa: E731 -- a counter where a word is a token
    maker = PromptMaker(random.Random(0), count_tokens=words_per_token)
    rows = read_trace(TRACES / "mooncake.jsonl", "mooncake")
    reqs = trace_requests(rows, maker, block_size=16)
    assert [r.prompt_len for r in reqs] == [40, 36, 20, 48, 16]  # the recorded lengths, exactly
    words = [r.prompt.split() for r in reqs]
    assert words[0][:32] == words[1][:32] and words[0][32] != words[1][32]  # ids 0, 1 shared; 2 vs 3 not
    assert words[3][:32] == words[0][:32]  # row 3 repeats ids 0, 1 (and 2, full here: row 0 had it partial)
    assert words[2][:16] != words[0][:16]
    again = trace_requests(rows, PromptMaker(random.Random(0), count_tokens=words_per_token), block_size=16)
    assert [r.prompt for r in again] == [r.prompt for r in reqs]  # seeded: the same trace gives the same prompts


@pytest.mark.parametrize("content,fmt,message", [
    ('{"timestamp": 1}\n', "mooncake", "needs numbers timestamp, input_length"),
    ("Timestamp,Model\n1,x\n", "burstgpt", "missing"),
    ('{"timestamp": 0, "input_len": 0, "output_len": 3}\n', "jsonl", "positive"),
    ("", "azure", "not a CSV")])
def test_malformed_traces_are_named(tmp_path, content, fmt, message):
    f = tmp_path / "t.txt"
    f.write_text(content)
    with pytest.raises(ValueError, match=message):
        read_trace(f, fmt)


# ---------------------------------------------------------------- sessions
def test_sessions_known_answers():
    maker = PromptMaker(random.Random(0), count_tokens=lambda t: len(t.split()))
    sessions = synthetic_sessions(3, 4, 10, "uniform:2,5", maker, random.Random(1))
    assert [len(s.turns) for s in sessions] == [4, 4, 4]
    assert all(t.message_len == 10 and 2 <= t.output_len <= 5 for s in sessions for t in s.turns)
    count = lambda t: len(t.split())  # noqa: E731
    convs = sharegpt_sessions(FIXTURES / "conversations.json", 3, 2, count, random.Random(0))
    assert sorted(len(s.turns) for s in convs) == [2, 2, 2]  # capped at 2 turns; "c" has no human turn
    by_first = {s.turns[0].message: s for s in convs}
    a = by_first["What does a prefix cache keep?"]
    assert a.turns[1].message == "And when is it emptied?"
    assert a.turns[0].output_len == len("The key and value blocks of prompts it has already seen.".split())
    history = [("Hi.", " Hello!")]
    assert history_prompt(history, " More?") == "Hi. Hello! More?"
    assert history_messages(history, "More?") == [{"role": "user", "content": "Hi."},
                                                  {"role": "assistant", "content": " Hello!"},
                                                  {"role": "user", "content": "More?"}]


# ---------------------------------------------------------------- figures
def rec(i, start, scheduled, ttft, e2el, out=5, ok=True, session=None, turn=None, cached=None, prompt=100):
    return RequestRecord(index=i, start_time=start, scheduled_time=scheduled, success=ok, ttft=ttft, e2el=e2el,
                         output_tokens=out, prompt_tokens=prompt, session=session, turn=turn, cached_tokens=cached,
                         error=None if ok else "X")


def test_queueing_and_scheduled_latencies():
    r = rec(0, start=1.3, scheduled=1.0, ttft=0.2, e2el=0.6)
    assert r.queue_delay == pytest.approx(0.3)
    assert r.sched_ttft == pytest.approx(0.5) and r.sched_e2el == pytest.approx(0.9)
    assert meets_slos(r, {"ttft": 300}) and not meets_slos(r, {"ttft": 300}, from_schedule=True)
    records = [r, rec(1, start=2.0, scheduled=2.0, ttft=0.1, e2el=0.5)]
    m, _ = aggregate(records, 4.0, {"ttft": 300}, 1)
    assert m["request_goodput"] == pytest.approx(0.5) and m["request_goodput_sched"] == pytest.approx(0.25)
    assert m["mean_queue_delay_ms"] == pytest.approx(150) and m["p99_sched_ttft_ms"] == pytest.approx(496, abs=1)


def test_windows_per_turn_and_sessions():
    records = [rec(0, 0.1, 0.1, 0.1, 0.5), rec(1, 0.2, 0.2, 0.3, 0.4), rec(2, 1.5, 1.5, 0.2, 0.3, ok=False),
               rec(3, 1.6, 1.6, 0.4, 0.3)]
    w = windows(records, 2.0, count=2)
    assert [x["sent"] for x in w] == [2, 2] and [x["failed"] for x in w] == [0, 1]
    assert w[0]["offered_rate"] == pytest.approx(2.0) and w[0]["median_ttft_ms"] == pytest.approx(200)
    assert w[0]["request_throughput"] == pytest.approx(2.0)  # both finished inside the first second
    assert w[1]["median_ttft_ms"] == pytest.approx(400)
    turns = [rec(0, 0, 0, 0.1, 1, session=0, turn=0, cached=0, prompt=50),
             rec(1, 1, 1, 0.1, 1, session=0, turn=1, cached=48, prompt=100),
             rec(2, 0, 0, 0.3, 2, session=1, turn=0, cached=16, prompt=50),
             rec(3, 2, 2, 0.1, 1, session=1, turn=1, cached=112, prompt=140)]
    t = per_turn(turns)
    assert [x["turn"] for x in t] == [0, 1]
    assert t[0]["prefix_cache_hit_rate"] == pytest.approx(16 / 100)
    assert t[1]["prefix_cache_hit_rate"] == pytest.approx(160 / 240)
    assert t[0]["median_ttft_ms"] == pytest.approx(200) and t[1]["mean_prompt_tokens"] == pytest.approx(120)
    s = session_metrics(turns)
    assert s["sessions"] == 2 and s["mean_session_duration_s"] == pytest.approx(2.5)  # 2 s and 3 s
    assert s["mean_turns_per_session"] == 2 and s["sessions_completed"] == 2
    assert session_metrics(records) == {}


METRICS_TEXT = """# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="m"} 3.0
vllm:num_requests_waiting{model_name="m"} 1.0
vllm:gpu_cache_usage_perc{model_name="m"} 0.25
# TYPE vllm:prefix_cache_queries counter
vllm:prefix_cache_queries_total{model_name="m"} 400.0
vllm:prefix_cache_hits_total{model_name="m"} 100.0
vllm:num_preemptions_total{model_name="m"} 2.0
"""


def test_metrics_parsing_and_deltas():
    before = parse_metrics(METRICS_TEXT)
    assert before["running"] == 3 and before["waiting"] == 1 and before["kv_cache_usage"] == 0.25  # older name
    after = dict(before, prefix_cache_queries=1400.0, prefix_cache_hits=850.0, preemptions=5.0)
    d = counter_deltas(before, after)
    assert d["prefix_cache_hit_rate"] == pytest.approx(0.75) and d["server_preemptions"] == 3
    assert counter_deltas(None, after) == {}


# ---------------------------------------------------------------- options
@pytest.mark.parametrize("update,message", [
    ({"dataset": "trace"}, "needs dataset_path"),
    ({"trace_format": "azure"}, "for dataset 'trace'"),
    ({"ramp_up": "linear", "ramp_up_start": 1.0}, "ramp_up_end"),
    ({"ramp_up_end": 3.0}, "need ramp_up"),
    ({"dataset": "multi-turn", "workers": 2}, "workers > 1 is not supported"),
    ({"input_len": "normal:1"}, "two numbers")])
def test_inconsistent_options_are_refused(update, message):
    with pytest.raises(ValueError, match=message):
        ServeBenchConfig(base_url="http://x", model="m", **update)


def test_cli_refuses_bad_workload_options():
    r = CliRunner().invoke(app, ["bench", "serve", "--model", "m", "--input-len", "uniform:5"])
    assert r.exit_code == 2 and "two numbers" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(app, ["bench", "serve", "--model", "m", "--dataset", "trace", "--dataset-path", "x"])
    assert r.exit_code == 2 and "trace_format" in r.output


# ---------------------------------------------------------------- runs
@pytest.fixture(scope="module")
def null_url():
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "workbench.loadgen.null_server", "--port", str(port),
                             "--delay-ms", "2"])
    from workbench.bench.ceiling import wait_healthy as _wait_healthy
    _wait_healthy(f"http://127.0.0.1:{port}", proc)
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(10)


def test_client_queueing_is_reported(null_url):
    r = run_serve_benchmark(ServeBenchConfig(base_url=null_url, model="null", num_prompts=6, input_len=4,
                                             output_len=8, max_concurrency=1), progress=False)
    delays = [x.queue_delay for x in sorted(r.requests, key=lambda x: x.index)]
    assert delays == sorted(delays) and delays[-1] - delays[0] > 0.06  # each waits for those before (>= 16 ms each)
    assert r.metrics["p99_sched_ttft_ms"] > r.metrics["p99_ttft_ms"]
    assert r.telemetry == [] and "prefix_cache_hit_rate" not in r.metrics  # the null server has no /metrics


def test_sweep_points_get_fresh_seeds_and_a_note_without_reset(null_url, capsys):
    assert reset_prefix_cache(null_url) is False  # 404: not supported
    cfg = ServeBenchConfig(base_url=null_url, model="null", num_prompts=3, input_len=4, output_len=2, seed=7)
    results = run_rates(cfg, [math.inf, 100.0, 200.0], progress=False)
    assert [x.config["seed"] for x in results] == [7, 8, 9]
    assert all(x.extra["prefix_cache_reset"] == "not supported by the server" for x in results)
    assert capsys.readouterr().err.count("no /reset_prefix_cache") == 1  # said once


def test_ramp_run_keeps_per_window_figures(null_url):
    r = run_serve_benchmark(ServeBenchConfig(base_url=null_url, model="null", num_prompts=60, input_len=4,
                                             output_len=2, ramp_up="linear", ramp_up_start=5.0, ramp_up_end=40.0,
                                             burstiness=100.0, seed=1), progress=False)
    assert r.metrics["completed"] == 60 and len(r.windows) == 10
    sent = [w["sent"] for w in r.windows]
    assert sum(sent) == 60 and sum(sent[6:9]) > 2 * sum(sent[:3])  # the offered load grows along the ramp


@pytest.fixture(scope="module")
def tiny_server():
    srv = ServerProcess("tiny", "--max-model-len", "512", "--kv-cache-memory", "32MiB", "--enable-prefix-caching")
    yield srv
    srv.stop()


@pytest.mark.slow
def test_trace_replay_against_a_real_server(tiny_server, tmp_path):
    result = CliRunner().invoke(app, [
        "bench", "serve", "--base-url", tiny_server.url, "--model", "tiny", "--dataset", "trace",
        "--dataset-path", str(TRACES / "mooncake.jsonl"), "--trace-format", "mooncake", "--trace-block-size", "16",
        "--time-scale", "2", "--ignore-eos", "--result-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    from workbench.results import BenchResult
    res = BenchResult.load(next(tmp_path.glob("serve-*.json")))
    reqs = sorted(res.requests, key=lambda r: r.index)
    assert [r.scheduled_time for r in reqs] == pytest.approx([0, 0.3, 0.6, 0.84, 1.2])
    assert all(abs(r.start_time - r.scheduled_time) < 0.2 for r in reqs)  # sent on the recorded schedule
    assert [r.prompt_tokens for r in reqs] == [40, 36, 20, 48, 16]  # exact through /tokenize
    assert [r.output_tokens for r in reqs] == [6, 4, 5, 3, 8]
    # rows 1 and 3 reuse hash ids 0 and 1 (two 16-token blocks each): the server's cache must have hit
    assert res.metrics["server_prefix_cache_hits"] >= 32 and 0 < res.metrics["prefix_cache_hit_rate"] < 1
    assert res.telemetry and {"t", "running", "waiting", "kv_cache_usage"} <= set(res.telemetry[0])
    assert len(res.windows) == 10


@pytest.mark.slow
@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_multi_turn_hit_rate_rises_with_the_turn(tiny_server, endpoint):
    r = run_serve_benchmark(ServeBenchConfig(
        base_url=tiny_server.url, model="tiny", dataset="multi-turn", num_prompts=2, num_turns=4, input_len=24,
        output_len=8, ignore_eos=True, max_concurrency=1, endpoint=endpoint, seed=5), progress=False)
    assert r.metrics["completed"] == 8 and r.metrics["sessions"] == 2 and r.metrics["sessions_completed"] == 2
    rates = [t["prefix_cache_hit_rate"] for t in r.turns]
    assert len(rates) == 4 and all(b > a for a, b in zip(rates, rates[1:])), rates
    assert rates[-1] > 0.5
    prompts = [t["mean_prompt_tokens"] for t in r.turns]
    assert all(b > a + 24 for a, b in zip(prompts, prompts[1:]))  # history + reply + the new message
    assert 0 < r.metrics["prefix_cache_hit_rate"] < 1


@pytest.mark.slow
def test_sharegpt_conversations_replay_turn_by_turn(tiny_server):
    r = run_serve_benchmark(ServeBenchConfig(
        base_url=tiny_server.url, model="tiny", dataset="multi-turn", dataset_path=str(FIXTURES / "conversations.json"),
        num_prompts=2, num_turns=4, think_time=0.2, ignore_eos=True, endpoint="chat"), progress=False)
    assert r.metrics["completed"] == 5 and sorted(t["requests"] for t in r.turns) == [1, 2, 2]  # 3 + 2 turns
    for session in (0, 1):
        turns = sorted((x for x in r.requests if x.session == session), key=lambda x: x.turn)
        assert [x.turn for x in turns] in ([0, 1, 2], [0, 1])
        for before, after in zip(turns, turns[1:]):
            # the next turn is due when the reply is in plus the think time, with the history in its prompt
            assert after.scheduled_time == pytest.approx(before.start_time + before.e2el + 0.2, abs=0.02)
            assert after.prompt_tokens > before.prompt_tokens + before.output_tokens


@pytest.mark.slow
def test_sweep_resets_the_prefix_cache_between_points(tiny_server):
    cfg = ServeBenchConfig(base_url=tiny_server.url, model="tiny", dataset="prefix-repeat", prefix_len=64,
                           num_prompts=4, input_len=8, output_len=2, max_concurrency=1)
    no_reset = cfg.model_copy(update={"reset_prefix_cache": False})
    run_rates(no_reset, [math.inf], progress=False)
    warm = run_rates(no_reset, [math.inf], progress=False)[0]  # the same prompts again: all cached
    results = run_rates(cfg, [math.inf, math.inf], progress=False)
    assert all(x.extra["prefix_cache_reset"] == "reset before this point" for x in results)
    # The first point sent the same prompts as the warm run, but started cold: its first prompt missed.
    assert results[0].metrics["server_prefix_cache_hits"] < warm.metrics["server_prefix_cache_hits"]
    assert results[1].config["seed"] == 1


@pytest.mark.parametrize("workload", [
    'dataset = "multi-turn"\nnum_turns = 3\nthink_time = 0.5\ninput_len = "lognormal:4,0.5"',
    f'dataset = "trace"\ndataset_path = "{TRACES / "burstgpt.csv"}"\ntrace_format = "burstgpt"\ntime_scale = 0.5',
    'ramp_up = "exponential"\nramp_up_start = 1.0\nramp_up_end = 16.0\noutput_len = "uniform:8,32"',
    f'input_len = "empirical:{FIXTURES / "lengths.txt"}"\noutput_len = "normal:64,8"'])
def test_studies_take_every_workload(tmp_path, workload):
    from workbench.tune.study_file import load_study
    f = tmp_path / "s.toml"
    f.write_text('[study]\nname = "w"\nmodel = "tiny"\nn_trials = 1\n[search_space]\n'
                 'max_num_seqs = { type = "int", low = 2, high = 4 }\n'
                 f'[workload]\ntype = "serve"\n{workload}\n'
                 '[[objectives]]\nmetric = "output_throughput"\ndirection = "maximize"\n')
    study = load_study(f)[0]
    fields = study.workload.model_dump(exclude={"type"}) | {"request_rate": math.inf}
    config = ServeBenchConfig(base_url="http://x", model="tiny", **fields)  # as a trial builds it
    assert config.model_dump(exclude={"base_url", "model", "request_rate"}).items() >= \
        {k: v for k, v in fields.items() if k != "request_rate"}.items()


def test_report_plots_for_workloads(tmp_path):
    from workbench.report import plots
    from workbench.report.data import RunFile
    from workbench.results import BenchResult
    records = [rec(0, 0, 0, 0.1, 1, session=0, turn=0, cached=0), rec(1, 1, 1, 0.1, 1, session=0, turn=1, cached=50)]
    result = BenchResult(requests=records, turns=per_turn(records), windows=windows(records, 2.0),
                         telemetry=[{"t": 0.0, "running": 1, "waiting": 0, "kv_cache_usage": 0.1},
                                    {"t": 1.0, "running": 2, "waiting": 1, "kv_cache_usage": 0.3}])
    run = RunFile(tmp_path / "r.json", result)
    assert all(f is not None for f in (plots.per_turn_ttft([run]), plots.latency_over_time(run),
                                       plots.server_telemetry(run)))
    empty = RunFile(tmp_path / "e.json", BenchResult())
    assert plots.per_turn_ttft([empty]) is None and plots.server_telemetry(empty) is None
    assert plots.latency_over_time(empty) is None


def test_exported_report_draws_the_workload_figures(tmp_path):
    """`workbench report --export` includes per-turn TTFT and, for a trace replay, latency over time
    and the server's telemetry."""
    from workbench.report.export import export
    from workbench.results import BenchResult
    records = [rec(0, 0, 0, 0.1, 1, session=0, turn=0, cached=0), rec(1, 1, 1, 0.1, 1, session=0, turn=1, cached=50)]
    result = BenchResult(label="trace run", config={"dataset": "trace"}, requests=records, turns=per_turn(records),
                         windows=windows(records, 2.0),
                         telemetry=[{"t": 0.0, "running": 1, "waiting": 0, "kv_cache_usage": 0.1},
                                    {"t": 1.0, "running": 2, "waiting": 1, "kv_cache_usage": 0.3}])
    runs = tmp_path / "results"
    runs.mkdir()
    result.save(runs / "trace.json")
    written = {p.name for p in export(None, str(runs), tmp_path / "out")}
    assert {"runs-per-turn-ttft.png", "run-trace-run-latency-over-time.png", "run-trace-run-telemetry.png"} <= written
