"""Every report page through Streamlit's AppTest, the static export, and a real headless Chromium."""
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from streamlit.testing.v1 import AppTest
from typer.testing import CliRunner

from tests.report_fixtures import make_fixtures
from tests.server_process import free_port
from workbench.cli import app as cli

APP = str(Path(__file__).resolve().parents[1] / "workbench" / "report" / "app.py")


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    return make_fixtures(tmp_path_factory.mktemp("report"))


def page(fixtures, name, monkeypatch):
    storage, results = fixtures
    monkeypatch.setenv("PAGEDBENCH_STORAGE", storage)
    monkeypatch.setenv("PAGEDBENCH_RESULTS", str(results))
    at = AppTest.from_file(APP, default_timeout=60)
    at.run()
    at.sidebar.radio[0].set_value(name).run()
    assert not at.exception, at.exception
    return at


def test_study_page(fixtures, monkeypatch):
    at = page(fixtures, "Study", monkeypatch)
    assert [h.value for h in at.header] == ["Study"]
    assert len(at.dataframe) == 1 and len(at.dataframe[0].value) == 6  # 5 trials + 1 failed
    df = at.dataframe[0].value
    assert df["feasible"].sum() == 3 and "fail_reason" in df
    assert any("bad flag" in str(v) for v in df["fail_reason"])
    assert len(at.get("image")) == 4  # Pareto front, history, importances, parallel coordinates
    assert at.json and "serve_command" in at.json[0].value


def test_runs_page_with_sweep_and_comparison(fixtures, monkeypatch):
    at = page(fixtures, "Benchmark runs", monkeypatch)
    assert "Sweeps" in [s.value for s in at.subheader]
    assert at.multiselect[0].value == ["prefix-on", "prefix-off"]
    table = at.dataframe[0].value
    assert list(table["run"]) == ["prefix-on", "prefix-off"] and "p99_ttft_ms" in table


def test_gate_page(fixtures, monkeypatch):
    at = page(fixtures, "Gate history", monkeypatch)
    assert any("FAIL" in s.value for s in at.subheader)
    assert len(at.get("image")) == 2  # the history file's trend and the gate runs' changes


def test_empty_inputs_say_what_to_run(tmp_path, monkeypatch):
    monkeypatch.setenv("PAGEDBENCH_RESULTS", str(tmp_path))
    monkeypatch.delenv("PAGEDBENCH_STORAGE", raising=False)
    at = AppTest.from_file(APP, default_timeout=60)
    at.run()
    assert not at.exception and "workbench tune" in at.info[0].value
    at.sidebar.radio[0].set_value("Benchmark runs").run()
    assert "workbench bench serve" in at.info[0].value


def test_export_writes_pngs_and_summary(fixtures, tmp_path):
    storage, results = fixtures
    out = tmp_path / "export"
    r = CliRunner().invoke(cli, ["report", "--storage", storage, "--results", str(results), "--export", str(out)])
    assert r.exit_code == 0, r.output
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert {"study-fixture-pareto.png", "study-fixture-history.png", "runs-ttft.png", "gate-history.png"} <= set(pngs)
    assert "sweep-1-ttft.png" in pngs
    # Two throughput runs of one model: compared across labels, devices and commits.
    assert {"offline-throughput.png", "offline-throughput-compare.png", "latency-tiny.png", "runs-compare.png",
            "gate-trend.png"} <= set(pngs)
    md = (out / "report.md").read_text()
    assert "## Study fixture" in md and "prefix-on" in md and "Pareto front" in md
    assert "ours · H100 80GB · aaaaaaa" in md and "vllm · H200 · bbbbbbb" in md
    page = (out / "report.html").read_text()
    assert page.count("<figcaption>") == page.count("<img ") == len(pngs)  # a caption under every figure
    assert page.count("<table") >= 5  # throughput, latency, trials, percentiles, gate


def test_export_over_the_committed_results(tmp_path):
    """Every offline result the README quotes gets a figure and a table."""
    results = Path(__file__).resolve().parents[1] / "reports" / "benchmarks"
    out = tmp_path / "export"
    r = CliRunner().invoke(cli, ["report", "--results", str(results), "--export", str(out)])
    assert r.exit_code == 0, r.output
    from PIL import Image

    expected = {"offline-throughput.png", "latency-qwen2.5-7b-h100.png", "kernels-h100.png", "loadgen-ceiling.png"}
    assert expected <= {p.name for p in out.glob("*.png")}
    for name in expected:
        assert np.asarray(Image.open(out / name).convert("L"), dtype=float).std() > 10, f"{name} is blank"
    page = (out / "report.html").read_text()
    for quoted in ("49,326", "817.1", "60.36", "10,563", "5.962", "2,716", "867.3", "4.814"):
        assert quoted in page, quoted  # the README's headline figures, in the tables
    assert page.count("<figcaption>") == page.count("<img ") >= len(expected)  # a caption under every figure


def test_offline_page(fixtures, monkeypatch):
    at = page(fixtures, "Offline runs", monkeypatch)
    titles = [s.value for s in at.subheader]
    assert titles[0].startswith("Offline throughput") and any(t.startswith("Latency vs batch size") for t in titles)
    assert len(at.get("image")) == 3  # throughput, comparison, latency
    assert list(at.dataframe[0].value["run"]) == ["ours · H100 80GB · aaaaaaa", "vllm · H200 · bbbbbbb"]


def test_offline_page_over_the_committed_results(monkeypatch):
    monkeypatch.setenv("PAGEDBENCH_RESULTS", str(Path(__file__).resolve().parents[1] / "reports" / "benchmarks"))
    monkeypatch.delenv("PAGEDBENCH_STORAGE", raising=False)
    at = AppTest.from_file(APP, default_timeout=60)
    at.run()
    at.sidebar.radio[0].set_value("Offline runs").run()
    assert not at.exception, at.exception
    titles = " | ".join(s.value for s in at.subheader)
    assert "Kernels" in titles and "Load generator ceiling" in titles and "Latency vs batch size" in titles


def test_many_runs_get_distinct_colours_and_small_multiples():
    from tests.report_fixtures import serve_result
    from workbench.report import plots
    from workbench.report.data import RunFile

    assert len(set(plots.colours(12))) == 12 and len(set(plots.colours(30))) == 30
    runs = [RunFile(Path(f"r{i}.json"), serve_result(f"run{i}", 1 + i / 10, i)) for i in range(6)]
    fig = plots.latency_distributions(runs, "ttft")
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert len(visible) == 6  # one panel per run
    fig = plots.latency_distributions(runs[:3], "ttft")
    patches = [p for p in fig.axes[0].patches]
    assert len(fig.axes) == 1 and len({tuple(p.get_facecolor()[:3]) for p in patches}) == 3


@pytest.mark.slow
def test_real_browser_renders_the_report(fixtures, tmp_path):
    from tests.browser import capture, chromium

    if chromium() is None:
        pytest.skip("Chromium is not installed; .ci/install-test-deps installs it")
    storage, results = fixtures
    port = free_port()
    env = {**os.environ, "PAGEDBENCH_STORAGE": storage, "PAGEDBENCH_RESULTS": str(results)}
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", APP, "--server.headless", "true",
                             "--server.port", str(port), "--browser.gatherUsageStats", "false"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/_stcore/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        text, png = capture(f"http://127.0.0.1:{port}", "One trial", free_port())
        offline, _ = capture(f"http://127.0.0.1:{port}/?page=Offline+runs", "Latency vs batch size", free_port())
    finally:
        proc.terminate()
        proc.wait(10)
    shot = tmp_path / "report.png"
    shot.write_bytes(png)
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert pixels.std() > 10, "the screenshot is blank"
    assert "PagedBench report" in text and "Trials" in text and "One trial" in text
    assert "Offline throughput" in offline and "Latency vs batch size" in offline
    # The charts' titles, as the same browser shows the static export.
    out = tmp_path / "export"
    CliRunner().invoke(cli, ["report", "--storage", storage, "--results", str(results), "--export", str(out)])
    text, _ = capture(f"file://{out / 'report.html'}", "Gate history", free_port())
    for title in ("Pareto front (fixture)", "Optimization history (fixture)", "ttft distribution", "Gate history",
                  "Throughput vs transformers and the roofline ceiling", "Latency vs batch size"):
        assert title in text


@pytest.mark.parametrize("storage,expected", [
    ("not-a-url", "not a storage URL; give sqlite:///FILE.db"),
    ("sqlite:///{tmp}/missing.db", "no such file"),
    ("sqlite:///{readme}", "file is not a database"),
    ("journal:{tmp}/missing.log", "no such file"),
])
def test_a_bad_storage_is_one_line(tmp_path, storage, expected):
    storage = storage.format(tmp=tmp_path, readme=Path(__file__).resolve().parents[1] / "README.md")
    for extra in (["--export", str(tmp_path / "out")], ["--port", str(free_port())]):  # before Streamlit starts
        r = CliRunner().invoke(cli, ["report", "--storage", storage, "--results", str(tmp_path), *extra])
        assert r.exit_code == 1 and "Traceback" not in r.output
        assert r.output.strip().splitlines() == [f"error: storage {storage}: " + r.output.split(": ", 2)[-1].strip()]
        assert expected in r.output, r.output
    assert not (tmp_path / "missing.db").exists(), "a reader creates no database"


def test_a_missing_postgres_driver_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "psycopg2", None)  # as if psycopg2 were not installed
    monkeypatch.setitem(sys.modules, "psycopg", None)
    for url in ("postgresql+psycopg2://u@127.0.0.1:1/tune", "postgresql://u@127.0.0.1:1/tune"):
        r = CliRunner().invoke(cli, ["report", "--storage", url, "--results", str(tmp_path), "--export",
                                     str(tmp_path / "out")])
        assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1, r.output
        assert "the PostgreSQL driver" in r.output and 'pip install -e ".[postgres]"' in r.output


def test_sigterm_stops_the_streamlit_child(tmp_path):
    """A stand-in `streamlit` (first on the path) that starts a grandchild and waits: SIGTERM to
    `workbench report` must end both, and the command exits 128 + 15."""
    import signal

    fake = tmp_path / "fake" / "streamlit"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    pids = tmp_path / "pids"
    (fake / "__main__.py").write_text(
        "import os, subprocess, sys, time\n"
        "child = subprocess.Popen(['sleep', '300'])\n"
        f"open({str(pids)!r}, 'w').write(f'{{os.getpid()}} {{child.pid}}')\n"
        "time.sleep(300)\n")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "fake"), str(root)])}
    proc = subprocess.Popen([sys.executable, "-m", "workbench.cli", "report", "--results", str(tmp_path), "--port",
                             str(free_port())], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not (pids.is_file() and len(pids.read_text().split()) == 2):
            assert time.monotonic() < deadline and proc.poll() is None, "the stand-in never started"
            time.sleep(0.1)
        children = [int(p) for p in pids.read_text().split()]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 128 + signal.SIGTERM
        deadline = time.monotonic() + 10
        while any(_running(p) for p in children) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_running(p) for p in children), "the Streamlit child or its child outlived the report"
    finally:
        if proc.poll() is None:
            proc.kill()


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's zombie waits for init to reap it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False
