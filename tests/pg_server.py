"""A throwaway PostgreSQL cluster for tests (PAGEDBENCH_PG_URL, when set, is used instead)."""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from tests.server_process import free_port


def pg_bindir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    if found:
        return Path(found[-1]).parent
    which = shutil.which("pg_ctl")
    return Path(which).parent if which else None


class TempPostgres:
    def __init__(self):
        # Directly under /tmp: pytest's own temp folders are private to root, and initdb runs as postgres.
        root = Path(tempfile.mkdtemp(prefix="pagedbench-pg-"))
        bindir = pg_bindir()
        if bindir is None:
            raise RuntimeError("PostgreSQL is not installed (.ci/install-test-deps installs it)")
        self.bindir, self.data = bindir, root / "pgdata"
        self.root = root
        as_user = []
        if os.geteuid() == 0:  # initdb refuses to run as root
            shutil.chown(root, "postgres")
            as_user = ["runuser", "-u", "postgres", "--"]
        self.as_user = as_user
        self.port = free_port()
        self._run([str(bindir / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres"])
        opts = f"-p {self.port} -k {root} -c listen_addresses=127.0.0.1"
        self._run([str(bindir / "pg_ctl"), "-D", str(self.data), "-o", opts, "-w", "-l", str(root / "log"), "start"])
        import psycopg2

        conn = psycopg2.connect(host="127.0.0.1", port=self.port, user="postgres", dbname="postgres")
        conn.autocommit = True
        conn.cursor().execute("CREATE DATABASE tune")
        conn.close()
        self.url = f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/tune"

    def _run(self, cmd: list[str]) -> None:
        subprocess.run(self.as_user + cmd, check=True, capture_output=True, text=True, timeout=120)

    def stop(self) -> None:
        subprocess.run(self.as_user + [str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "fast", "stop"],
                       capture_output=True, timeout=60)
        shutil.rmtree(self.root, ignore_errors=True)
