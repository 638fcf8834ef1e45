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

NULL_LAUNCH = f"{sys.executable} -m workbench.loadgen.null_server --port {{port}} --model {{model}}"
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
    for t in trials:
        assert t.user_attrs["metrics"]["completed"] == 8
        assert Path(t.user_attrs["result_file"]).is_file()
        assert t.user_attrs["serve_command"].startswith(sys.executable)
        assert t.user_attrs["flags"]["max_model_len"] == 256
    best = __import__("json").loads((tmp_path / "res" / "short-best.json").read_text())["best"][0]
    assert best["metrics"]["error_rate"] == 0 and best["metrics"]["p99_ttft_ms"] <= 20000
    assert best["serve_command"].startswith("workbench serve tiny --max-model-len 256")
    assert best["values"][0] == max(t.values[0] for t in trials)


def test_failed_start_is_recorded_and_the_study_goes_on(tmp_path):
    path = study_file(tmp_path, f"""
        [study]
        name = "fails"
        model = "tiny"
        n_trials = 2
        sampler = "grid"
        {TINY_SERVER}
        [search_space]
        block_size = {{ type = "categorical", choices = [7, 16] }}
        """ + WORKLOAD)
    r = CliRunner().invoke(app, ["tune", str(path), "--results-dir", str(tmp_path)])
    assert r.exit_code == 0, r.output
    study = optuna.load_study(study_name="fails", storage=f"sqlite:///{tmp_path / 'tune.db'}")
    states = {t.params["block_size"]: t for t in study.get_trials()}
    assert states[7].state.name == "FAIL" and "block_size" in states[7].user_attrs["fail_reason"]
    assert states[16].state.name == "COMPLETE"


CHEAP = """
[study]
name = "cheap"
model = "null"
n_trials = 2
sampler = "random"
[search_space]
max_num_seqs = { type = "int", low = 1, high = 64 }
""" + WORKLOAD


def test_resume_runs_only_the_missing_trials(tmp_path):
    path = study_file(tmp_path, CHEAP)
    args = ["tune", str(path), "--results-dir", str(tmp_path), "--launch", NULL_LAUNCH]
    assert CliRunner().invoke(app, args).exit_code == 0
    r = CliRunner().invoke(app, args + ["--n-trials", "3"])
    assert r.exit_code == 0, r.output
    study = optuna.load_study(study_name="cheap", storage=f"sqlite:///{tmp_path / 'tune.db'}")
    assert [t.number for t in study.get_trials()] == [0, 1, 2]
    r = CliRunner().invoke(app, args + ["--n-trials", "3"])
    assert "nothing to run" in r.output


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
           "--n-trials", "8", "--results-dir", str(tmp_path), "--launch", NULL_LAUNCH]
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
