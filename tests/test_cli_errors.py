"""Every `workbench` command answers a bad command line with one line and exit 2, never a usage box."""
import subprocess
import sys

import pytest


def workbench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "workbench.cli", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args,says", [
    (["tune", "--bogus"], "workbench tune: error: No such option: --bogus"),
    (["models", "nope"], "workbench models: error: No such command 'nope'"),
    (["gate", "--repeats", "x"], "workbench gate: error: Invalid value for '--repeats'"),
    (["bench", "throughput", "--model", "tiny", "--bogus", "1"], "workbench bench throughput: error: unrecognized"),
    (["serve", "tiny", "--max-num-seq", "4"], "error: unrecognized arguments: --max-num-seq"),  # no abbreviations
])
def test_a_bad_command_line_is_one_line_and_exit_2(args, says):
    done = workbench(*args)
    assert done.returncode == 2, done
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and says in lines[0], done.stderr


def test_help_and_version_still_work():
    assert workbench("tune", "--help").returncode == 0
    version = workbench("--version")
    assert version.returncode == 0 and version.stdout.startswith("workbench (pagedbench) ")
