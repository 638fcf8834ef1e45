"""The import direction of the tree (README, "How it is built"): the engine and the kernels never
import the workbench; nothing in the workbench imports its command layer (workbench/cli/); the load
generator stays below the benchmarks, and the benchmarks below tuning, the gate and the report.
Every import counts, those inside functions too."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# package (a folder under the root) -> module prefixes it must not import
FORBIDDEN = {
    "engine": ["workbench"],
    "kernels": ["workbench"],
    "workbench/loadgen": ["workbench.cli", "workbench.bench", "workbench.tune", "workbench.gate", "workbench.report"],
    "workbench/bench": ["workbench.cli", "workbench.tune", "workbench.gate", "workbench.report"],
    "workbench/tune": ["workbench.cli", "workbench.gate", "workbench.report"],
    "workbench/gate": ["workbench.cli", "workbench.bench", "workbench.tune", "workbench.report"],
    "workbench/report": ["workbench.cli"],
}
SHARED = ["workbench/results.py", "workbench/datasets.py"]  # below everything in the workbench


def imported_modules(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return found


def violations(files: list[Path], forbidden: list[str]) -> list[str]:
    return [f"{f}:{line} imports {name}" for f in files for line, name in imported_modules(f)
            if any(name == p or name.startswith(p + ".") for p in forbidden)]


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_point_down(package):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"{package} has no modules: update FORBIDDEN"
    assert violations(files, FORBIDDEN[package]) == []


def test_shared_modules_import_no_workbench_part():
    parts = ["workbench.cli", "workbench.bench", "workbench.loadgen", "workbench.tune", "workbench.gate",
             "workbench.report"]
    assert violations([ROOT / f for f in SHARED], parts) == []


def test_the_check_finds_an_upward_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from workbench.cli.console import fail\n    import workbench.cli\n")
    assert len(violations([bad], ["workbench.cli"])) == 3  # the module, the name, the plain import
