"""workbench tune: study files, a real short study, failed trials, resume, and two workers on PostgreSQL."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import optuna
import pytest
from typer.testing import CliRunner

from workbench.cli import app
from workbench.tune.study_file import DEFAULT_STUDY, STUDIES_DIR, StudyError, load_study

NULL_LAUNCH = f"{sys.executable} -m workbench.loadgen.null_server --port {{port}} --model {{model}}"  # no settings
NULL_FLAGS = f"{sys.executable} -m workbench.loadgen.null_server --port {{port}} --model {{model}} {{flags}}"
TINY_SERVER = '[server]\nmax_model_len = 256\nkv_cache_memory = "16MiB"\n'


def study_file(tmp_path: Path, body: str, name: str = "t") -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(textwrap.dedent(body))
    return path


WORKLOAD = """
[workload]
num_prompts = 8
input_len = 16
output_len = 6
max_concurrency = 4

[[objectives]]
metric = "output_throughput"
direction = "maximize"

[[constraints]]
metric = "error_rate"
op = "<="
value = 0
"""


def test_embedded_default_equals_studies_default():
    assert DEFAULT_STUDY.read_text() == (STUDIES_DIR / "default.toml").read_text()


def test_shipped_studies_validate():
    names = sorted(p.stem for p in STUDIES_DIR.glob("*.toml"))
    assert {"default", "throughput", "slo", "prefix"} <= set(names)
    for p in STUDIES_DIR.glob("*.toml"):
        load_study(p)


@pytest.mark.parametrize("body,field", [
    ('[study]\nname="x"\nmodel="tiny"\nn_trials=2\n[search_space]\nmax_num_seqs={type="int",low=9,high=2}\n'
     '[[objectives]]\nmetric="a"\ndirection="maximize"\n', "search_space.max_num_seqs"),
    ('[study]\nname="x"\nmodel="tiny"\nn_trials=2\n[search_space]\n[[objectives]]\nmetric="a"\ndirection="up"\n',
     "objectives.0.direction"),
    ('[study]\nname="x"\nmodel="tiny"\n[search_space]\n[[objectives]]\nmetric="a"\ndirection="maximize"\n',
     "n_trials or timeout"),
    ('[study]\nname="x"\nmodel="tiny"\nn_trials=1\nbogus=3\n[search_space]\n[[objectives]]\nmetric="a"\n'
     'direction="maximize"\n', "study.bogus"),
])
def test_malformed_study_names_the_field(tmp_path, body, field):
    path = study_file(tmp_path, body)
    with pytest.raises(StudyError, match=field.replace(".", r"\.")):
        load_study(path)
    r = CliRunner().invoke(app, ["tune", str(path), "--results-dir", str(tmp_path)])
    assert r.exit_code == 2 and "Traceback" not in r.output


# ---------------------------------------------------------------- checked before any trial runs
CHECKED = """
[study]
name = "checked"
model = "tiny"
n_trials = 2
[server]
{server}
[search_space]
{space}
[workload]
{workload}
[[objectives]]
metric = "{objective}"
direction = "maximize"
[[constraints]]
metric = "{constraint}"
op = "<="
value = 0
"""
GOOD = {"server": 'max_model_len = 256\nkv_cache_memory = "16MiB"',
        "space": 'max_num_seqs = { type = "int", low = 1, high = 8 }\nenable_prefix_caching = { type = "bool" }',
        "workload": "num_prompts = 4", "objective": "output_throughput", "constraint": "error_rate"}


def checked(tmp_path, launch=None, **parts):
    from workbench.tune.checks import check_study

    path = study_file(tmp_path, CHECKED.format(**(GOOD | parts)))
    spec, _ = load_study(path)
    check_study(spec, path, launch)
    return path


@pytest.mark.parametrize("parts,expected", [
    ({"space": 'max_num_seq = { type = "int", low = 1, high = 8 }'},
     "search_space.max_num_seq: not a flag of the engine's server (workbench serve); closest: max_num_seqs"),
    ({"server": 'kv_cache_mem = "16MiB"'}, "server.kv_cache_mem: not a flag of the engine's server (workbench "
                                          "serve); closest: kv_cache_memory"),
    ({"server": 'dtype = "float64"'}, "server: argument --dtype: invalid choice: 'float64'"),
    ({"server": 'kv_cache_memory = "lots"'}, "server: argument --kv-cache-memory: not a size: 'lots'"),
    ({"server": "block_size = 7"}, "server: block_size must be one of 8, 16, 32, 64, 128, got 7"),
    ({"space": 'max_num_seqs = { type = "categorical", choices = [8, "many"] }'},
     "search_space.max_num_seqs = 'many': argument --max-num-seqs: invalid int value: 'many'"),
    ({"space": 'enforce_eager = { type = "bool" }'},
     "search_space.enforce_eager = False: unrecognized arguments: --no-enforce-eager"),
    ({"objective": "output_thruput"}, "objectives.0.metric: 'output_thruput' is not a metric that a serve trial "
                                      "reports; closest: output_throughput"),
    ({"constraint": "p99_ttft"}, "constraints.0.metric: 'p99_ttft' is not a metric that a serve trial reports; "
                                 "closest: p99_ttft_ms"),
    ({"objective": "request_goodput"}, "objectives.0.metric: 'request_goodput' is empty for this workload "
                                       "(request_goodput needs [workload] goodput SLOs)"),
    ({"workload": 'type = "throughput"', "constraint": "p99_ttft_ms"},
     "constraints.0.metric: 'p99_ttft_ms' is not a metric that an offline (throughput) trial reports; "
     "valid: elapsed_s, "),
])
def test_study_checked_against_the_engine_flags_and_the_trial_metrics(tmp_path, parts, expected):
    from workbench.tune.study_file import StudyError

    with pytest.raises(StudyError) as err:
        checked(tmp_path, **parts)
    assert str(err.value).startswith(f"{tmp_path / 't.toml'}: {expected}"), str(err.value)
    assert "\n" not in str(err.value)


def test_good_studies_pass_the_checks(tmp_path):
    from workbench.tune.checks import check_study

    checked(tmp_path)
    checked(tmp_path, objective="request_goodput", workload="goodput = { ttft = 100 }")
    checked(tmp_path, workload='dataset = "multi-turn"', objective="mean_turns_per_session")
    checked(tmp_path, workload='type = "throughput"', objective="tokens_per_step", constraint="time_over_floor")
    # Another server's flags are its own business: passed through, the template dry-run instead.
    checked(tmp_path, launch=NULL_FLAGS, space='delay_ms = { type = "float", low = 0, high = 5 }', server="")
    for p in STUDIES_DIR.glob("*.toml"):
        check_study(load_study(p)[0], p, None)


@pytest.mark.parametrize("launch,expected", [
    ("vllm serve {model} {flags}", "--launch must contain {port}"),
    (NULL_LAUNCH, "--launch has no {flags}: the study's settings (max_model_len, kv_cache_memory, max_num_seqs, "
                  "enable_prefix_caching, from "),
    ("serve {modle} --port {port} {flags}", "--launch: unknown placeholder {modle}; closest: model"),
    ("serve {model --port {port} {flags}", "--launch: not a valid template"),
    ("no-such-server-program {model} --port {port} {flags}", "--launch: no program 'no-such-server-program' found"),
    ("serve '{model} --port {port} {flags}", "--launch: cannot split"),
])
def test_launch_template_dry_run(tmp_path, launch, expected):
    from workbench.tune.study_file import StudyError

    with pytest.raises(StudyError, match="^" + __import__("re").escape(expected)):
        checked(tmp_path, launch=launch)
    with pytest.raises(StudyError, match="workload.type is 'throughput'"):
        checked(tmp_path, launch=NULL_FLAGS, workload='type = "throughput"')


def test_a_typo_stops_the_command_before_any_trial(tmp_path):
    path = study_file(tmp_path, CHECKED.format(**GOOD | {"space": 'max_num_seq = { type = "int", low = 1, high = 8 }'}))
    r = CliRunner().invoke(app, ["tune", str(path), "--results-dir", str(tmp_path)])
    assert r.exit_code == 2
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and "search_space.max_num_seq" in lines[0] and "closest: max_num_seqs" in lines[0], lines
    assert str(path) in lines[0] and not (tmp_path / "tune.db").exists(), "nothing ran, nothing was stored"


@pytest.mark.slow
def test_short_study_on_tiny_with_real_servers(tmp_path):
    path = study_file(tmp_path, f"""
        [study]
        name = "short"
        model = "tiny"
        n_trials = 3
        sampler = "random"
        {TINY_SERVER}
        [search_space]
        max_num_seqs = {{ type = "int", low = 1, high = 8 }}
        enable_prefix_caching = {{ type = "bool" }}
        """ + WORKLOAD + """
        [[constraints]]
        metric = "p99_ttft_ms"
        op = "<="
        value = 20000
        """)
    r = CliRunner().invoke(app, ["tune", str(path), "--results-dir", str(tmp_path / "res")])
    assert r.exit_code == 0, r.output
    study = optuna.load_study(study_name="short", storage=f"sqlite:///{tmp_path / 'res' / 'tune.db'}")
    trials = study.get_trials()
    assert len(trials) == 3 and all(t.state.name == "COMPLETE" for t in trials)
    assert trials[0].user_attrs["label"] == "defaults" and trials[0].params == {}
    assert trials[0].user_attrs["flags"] == {"max_model_len": 256, "kv_cache_memory": "16MiB"}
    assert trials[0].user_attrs["serve_command"].endswith("--max-model-len 256 --kv-cache-memory 16MiB")
    for t in trials:
        assert t.user_attrs["metrics"]["completed"] == 8
        assert Path(t.user_attrs["result_file"]).is_file()
        assert t.user_attrs["serve_command"].startswith(sys.executable)
        assert t.user_attrs["flags"]["max_model_len"] == 256
    best = __import__("json").loads((tmp_path / "res" / "short-best.json").read_text())["best"][0]
    assert best["metrics"]["error_rate"] == 0 and best["metrics"]["p99_ttft_ms"] <= 20000
    assert best["serve_command"].startswith("workbench serve tiny --max-model-len 256")
    assert best["values"][0] == max(t.values[0] for t in trials)
    assert "vs defaults" in best["vs_defaults"] or best["vs_defaults"] == "the defaults"


@pytest.mark.slow
def test_failed_configurations_are_infeasible_and_the_study_goes_on(tmp_path):
    """A server that cannot start, and a KV cache too small for one sequence (refused before any launch),
    are COMPLETE trials with a violated 'runs' constraint, so a constrained sampler learns the region."""
    path = study_file(tmp_path, """
        [study]
        name = "fails"
        model = "tiny"
        n_trials = 4
        sampler = "grid"
        baseline = false
        [server]
        max_model_len = 256
        [search_space]
        block_size = { type = "categorical", choices = [7, 16] }
        kv_cache_memory = { type = "categorical", choices = ["16KiB", "16MiB"] }
        """ + WORKLOAD)
    r = CliRunner().invoke(app, ["tune", str(path), "--results-dir", str(tmp_path)])
    assert r.exit_code == 0, r.output
    study = optuna.load_study(study_name="fails", storage=f"sqlite:///{tmp_path / 'tune.db'}")
    by = {(t.params["block_size"], t.params["kv_cache_memory"]): t for t in study.get_trials()}
    assert len(by) == 4 and all(t.state.name == "COMPLETE" for t in by.values())
    assert by[(16, "16MiB")].constraints["runs"] == 0 and "fail_kind" not in by[(16, "16MiB")].user_attrs
    refused = by[(16, "16KiB")]
    assert refused.user_attrs["fail_kind"] == "precheck" and "max_model_len" in refused.user_attrs["fail_reason"]
    assert "serve_command" not in refused.user_attrs, "refused before a server was launched"
    crashed = by[(7, "16MiB")]
    assert crashed.user_attrs["fail_kind"] == "start" and "block_size" in crashed.user_attrs["fail_reason"]
    for t in (refused, crashed):
        assert t.constraints["runs"] == 1 and t.values == [0.0]
    best = __import__("json").loads((tmp_path / "fails-best.json").read_text())["best"]
    assert [b["trial"] for b in best] == [by[(16, "16MiB")].number]


CHEAP = """
[study]
name = "cheap"
model = "null"
n_trials = 2
sampler = "random"
[search_space]
delay_ms = { type = "float", low = 0, high = 1 }
""" + WORKLOAD


def test_resume_runs_only_the_missing_trials(tmp_path):
    path = study_file(tmp_path, CHEAP)
    args = ["tune", str(path), "--results-dir", str(tmp_path), "--launch", NULL_FLAGS]
    assert CliRunner().invoke(app, args).exit_code == 0
    r = CliRunner().invoke(app, args + ["--n-trials", "3"])
    assert r.exit_code == 0, r.output
    study = optuna.load_study(study_name="cheap", storage=f"sqlite:///{tmp_path / 'tune.db'}")
    assert [t.number for t in study.get_trials()] == [0, 1, 2]
    # Progress inside the trial, and one numbering: Optuna's, in the lines as in the storage.
    assert "trial 2: starting the server: " in r.output and "trial 2: server healthy after" in r.output
    assert "trial 2: 8 requests" in r.output and "trial 2 ok " in r.output and "(3 of 3 trials done)" in r.output
    r = CliRunner().invoke(app, args + ["--n-trials", "3"])
    assert "nothing to run" in r.output and "--fresh" in r.output and r.exit_code == 0
    r = CliRunner().invoke(app, args + ["--fresh"])
    assert r.exit_code == 0 and "deleted study 'cheap' (3 trials)" in r.output, r.output
    study = optuna.load_study(study_name="cheap", storage=f"sqlite:///{tmp_path / 'tune.db'}")
    assert [t.number for t in study.get_trials()] == [0, 1], "a new study, numbered from 0"


def test_every_trial_failing_exits_non_zero_with_the_first_failure_in_full(tmp_path):
    script = tmp_path / "broken_server.py"
    script.write_text("import sys\nfor i in range(30):\n    print(f'log line {i}')\n"
                      "print('Traceback: ' + 'x' * 900 + ' END')\nsys.exit(3)\n")
    path = study_file(tmp_path, CHEAP)
    r = CliRunner().invoke(app, ["tune", str(path), "--results-dir", str(tmp_path), "--launch",
                                 f"{sys.executable} {script} --port {{port}} {{flags}}"])
    assert r.exit_code == 1, r.output
    first = r.output[r.output.index("every trial failed"):]
    assert "trial 0 (start): the server exited with code 3 at start" in first
    assert "log line 0\n" in first and "log line 29\n" in first and "x" * 900 + " END" in first, "not cut off"
    assert "relax the constraints" not in r.output


def test_a_missing_postgres_driver_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "psycopg2", None)  # as if the driver were not installed
    monkeypatch.setitem(sys.modules, "psycopg", None)
    path = study_file(tmp_path, CHEAP)
    for url in ("postgresql+psycopg2://u@127.0.0.1:1/tune", "postgresql://u@127.0.0.1:1/tune"):
        r = CliRunner().invoke(app, ["tune", str(path), "--storage", url, "--results-dir", str(tmp_path),
                                     "--launch", NULL_FLAGS])
        assert r.exit_code == 1 and "Traceback" not in r.output
        last = r.output.strip().splitlines()[-1]
        assert last.startswith(f"error: storage {url}: the PostgreSQL driver (psycopg") and \
            last.endswith('is not installed: pip install -e ".[postgres]"'), r.output


@pytest.fixture
def postgres():
    if os.environ.get("PAGEDBENCH_PG_URL"):
        yield os.environ["PAGEDBENCH_PG_URL"]
        return
    from tests.pg_server import TempPostgres, pg_bindir

    if pg_bindir() is None:
        pytest.skip("PostgreSQL is not installed; .ci/install-test-deps installs it")
    pg = TempPostgres()
    yield pg.url
    pg.stop()


@pytest.mark.postgres
def test_two_workers_share_one_postgres_study(tmp_path, postgres):
    path = study_file(tmp_path, CHEAP)
    cmd = [sys.executable, "-m", "workbench.cli", "tune", str(path), "--storage", postgres, "--study-name", "shared",
           "--n-trials", "8", "--results-dir", str(tmp_path), "--launch", NULL_FLAGS]
    workers = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [w.communicate(timeout=300)[0] for w in workers]
    assert all(w.returncode == 0 for w in workers), outputs
    study = optuna.load_study(study_name="shared", storage=postgres)
    trials = study.get_trials()
    numbers = [t.number for t in trials]
    assert numbers == list(range(len(trials))), "trial numbers must be unique and gap-free"
    finished = [t for t in trials if t.state.name in ("COMPLETE", "FAIL")]
    assert 8 <= len(finished) == len(trials) <= 9, "each worker may finish one trial past the target, no more"
    assert all(t.state.name == "COMPLETE" and Path(t.user_attrs["result_file"]).is_file() for t in trials)
    assert all(("trial" in o) for o in outputs), "both workers ran trials"


# ---------------------------------------------------------------- pure pieces: statistics, capacity, pre-check
def test_compare_finds_a_real_gain_and_refuses_noise():
    from workbench.tune.stats import compare

    gain = compare([110, 112, 109, 111, 113], [100, 101, 99, 102, 100])
    assert gain.significant and gain.median_ratio == pytest.approx(1.11) and gain.ci_low > 1.0
    assert gain.verdict().startswith("+11.0% over defaults [")
    same = compare([100, 102, 99, 101, 100], [101, 100, 102, 99, 100])
    assert not same.significant and same.verdict() == "no significant gain over defaults"
    worse = compare([90, 91, 89, 92], [100, 101, 99, 102])
    assert not worse.significant and worse.p_value > 0.5
    lower = compare([90, 91, 89, 92], [100, 101, 99, 102], maximize=False)
    assert lower.significant and lower.verdict().startswith("10.0% lower than defaults [8.0%, 11.9%]")
    with pytest.raises(ValueError, match="at least 2"):
        compare([1.0], [1.0, 2.0])


@pytest.mark.parametrize("true_capacity,expected", [(0.1, 0.0), (3.0, (2.5, 3.0)), (9.5, (8.0, 9.5)),
                                                     (1e6, 1024.0)])
def test_capacity_search_brackets_then_bisects(true_capacity, expected):
    from workbench.tune.capacity import CapacitySpec, search

    spec = CapacitySpec(slo={"ttft": 500, "tpot": 50}, max_probes=12)
    seen = []

    def probe(rate):
        seen.append(rate)
        return {"error_rate": 0.0, "p99_ttft_ms": 100 if rate <= true_capacity else 900, "p99_tpot_ms": 10}

    found = search(spec, probe)
    if isinstance(expected, tuple):
        assert expected[0] <= found.capacity <= expected[1]
        assert len(seen) <= 8, "a few probes, not a scan"
    else:
        assert found.capacity == expected
    assert [p["value"] for p in found.probes] == seen
    assert all(p["passed"] == (p["value"] <= true_capacity) for p in found.probes)


def test_capacity_counts_errors_and_missing_figures_as_misses():
    from workbench.tune.capacity import CapacitySpec

    spec = CapacitySpec(slo={"e2el": 1000})
    assert spec.misses({"error_rate": 0.0, "p99_e2el_ms": 999}) == []
    assert spec.misses({"error_rate": 0.1, "p99_e2el_ms": 10})
    assert spec.misses({"error_rate": 0.0, "p99_e2el_ms": None})
    with pytest.raises(ValueError, match="unknown SLO"):
        CapacitySpec(slo={"latency": 3})


def test_memory_precheck():
    from workbench.tune.precheck import refuse

    GiB = 1 << 30
    assert refuse("tiny", {"max_model_len": 512, "kv_cache_memory": "64MiB"}, None)[0] is None
    assert "max_model_len" in refuse("tiny", {"max_model_len": 512, "kv_cache_memory": "64KiB"}, None)[0]
    assert "max_num_seqs" in refuse("tiny", {"max_num_seqs": 64, "max_num_batched_tokens": 32}, None)[0]
    # The 7B shape in bf16 is ~15 GiB of weights: 20% of 80 GiB leaves room, 15% does not.
    why, est = refuse("qwen2.5-7b", {"max_model_len": 4096, "gpu_memory_utilization": 0.2}, 80 * GiB)
    assert why is None and 14 * GiB < est["weight_bytes"] < 16 * GiB and est["kv_bytes_per_token"] == 57344
    assert "gpu_memory_utilization" in refuse("qwen2.5-7b", {"gpu_memory_utilization": 0.15}, 80 * GiB)[0]
    assert "exceed" in refuse("qwen2.5-7b", {"kv_cache_memory": "70GiB"}, 80 * GiB)[0]
    assert refuse("some-org/unknown-model", {"max_model_len": 10}, 80 * GiB) == (None, {})


# ---------------------------------------------------------------- cheap end-to-end runs on the no-compute server
@pytest.mark.slow
def test_slo_capacity_is_the_trial_value(tmp_path):
    """delay 0: every probe meets TPOT <= 20 ms up to the top of the range; 50 ms a token: none does."""
    path = study_file(tmp_path, """
        [study]
        name = "cap"
        model = "null"
        n_trials = 3
        sampler = "grid"
        [search_space]
        delay_ms = { type = "categorical", choices = [0, 50] }
        [workload]
        num_prompts = 6
        input_len = 8
        output_len = 4
        [capacity]
        slo = { tpot = 20 }
        start = 2
        low = 1
        high = 8
        [[objectives]]
        metric = "slo_capacity"
        direction = "maximize"
        """)
    r = CliRunner().invoke(app, ["tune", str(path), "--results-dir", str(tmp_path), "--launch", NULL_FLAGS])
    assert r.exit_code == 0, r.output
    trials = optuna.load_study(study_name="cap", storage=f"sqlite:///{tmp_path / 'tune.db'}").get_trials()
    assert trials[0].user_attrs["label"] == "defaults" and trials[0].values == [8.0]
    by = {t.params["delay_ms"]: t for t in trials[1:]}
    assert by[0].values == [8.0] and [p["value"] for p in by[0].user_attrs["probes"][0]] == [2, 4, 8]
    assert by[50].values == [0.0] and [p["value"] for p in by[50].user_attrs["probes"][0]] == [2, 1]
    assert all(not p["passed"] and "tpot" in p["misses"][0] for p in by[50].user_attrs["probes"][0])


@pytest.mark.slow
def test_repeats_and_interleaved_validation_against_the_defaults(tmp_path):
    """A known answer: maximizing TPOT, a 5 ms delay a token beats the defaults (no delay) for sure."""
    path = study_file(tmp_path, """
        [study]
        name = "val"
        model = "null"
        n_trials = 2
        sampler = "grid"
        repeats = 2
        validate = 4
        validate_top = 1
        [search_space]
        delay_ms = { type = "categorical", choices = [5] }
        [workload]
        num_prompts = 4
        input_len = 8
        output_len = 5
        [[objectives]]
        metric = "median_tpot_ms"
        direction = "maximize"
        """)
    r = CliRunner().invoke(app, ["tune", str(path), "--results-dir", str(tmp_path), "--launch", NULL_FLAGS])
    assert r.exit_code == 0, r.output
    trials = optuna.load_study(study_name="val", storage=f"sqlite:///{tmp_path / 'tune.db'}").get_trials()
    assert all(len(t.user_attrs["samples"]["median_tpot_ms"]) == 2 for t in trials)
    assert all(len(t.user_attrs["result_files"]) == 2 for t in trials)
    best = __import__("json").loads((tmp_path / "val-best.json").read_text())
    v = best["validation"]
    assert v["order"] == ["defaults", "1"] and len(v["defaults"]["samples"]) == 4
    assert len(v["candidates"][0]["samples"]) == 4 and v["winner"] == 1
    assert v["verdict"].startswith("+") and "over defaults [" in v["verdict"] == best["verdict"] != ""
    assert best["best"][0]["vs_defaults"] == v["verdict"] and "--delay-ms 5" in best["recommended"]["serve_command"]
    assert "over defaults" in r.output
