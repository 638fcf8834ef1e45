"""The package's version, as `engine.__version__` and the server's /version.

From the installed distribution's metadata; a source tree that was never installed (PYTHONPATH
pointing at a checkout) reads pyproject.toml beside it instead, marked `+source`."""
from __future__ import annotations

import tomllib
from importlib import metadata
from pathlib import Path

DISTRIBUTION = "pagedbench"


def package_version() -> str:
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return source_tree_version(Path(__file__).resolve().parents[1] / "pyproject.toml")


def source_tree_version(pyproject: Path) -> str:
    try:
        version = tomllib.loads(pyproject.read_text())["project"]["version"]
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        return "0+unknown"
    return f"{version}+source"


__version__ = package_version()
