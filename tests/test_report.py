"""Every report page through Streamlit's AppTest, the static export, and a real headless Chromium."""
import os
import shutil
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

APP = str(Path(__file__).resolve().parents[1] / "reports" / "app.py")


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
    md = (out / "report.md").read_text()
    assert "## Study fixture" in md and "prefix-on" in md and "Pareto front" in md


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
    finally:
        proc.terminate()
        proc.wait(10)
    shot = tmp_path / "report.png"
    shot.write_bytes(png)
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert pixels.std() > 10, "the screenshot is blank"
    assert "PagedBench report" in text and "Trials" in text and "One trial" in text
    # The charts' titles, as the same browser shows the static export.
    out = tmp_path / "export"
    CliRunner().invoke(cli, ["report", "--storage", storage, "--results", str(results), "--export", str(out)])
    text, _ = capture(f"file://{out / 'report.html'}", "Gate history", free_port())
    for title in ("Pareto front (fixture)", "Optimization history (fixture)", "ttft distribution", "Gate history"):
        assert title in text
