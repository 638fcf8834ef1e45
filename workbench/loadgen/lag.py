"""Why the client's event loop fell behind, for the warning that says so. A lagging client distorts
what it measures; the cure depends on where the time went: a server on the same few cores (nothing
the client can do), or one event loop at its limit (more --workers, where `bench serve` has them)."""
from __future__ import annotations

import os
from urllib.parse import urlparse

LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1", "0.0.0.0"}


def server_is_local(base_url: str) -> bool:
    return (urlparse(base_url).hostname or "") in LOCAL_HOSTS


def lag_cause(config, server_here: bool | None = None, suggest_workers: bool = True,
              cores: int | None = None) -> str:
    """The likely cause, in words. server_here: the server runs on this machine (default: judged from
    base_url); suggest_workers: the command has a --workers flag to suggest."""
    cores = cores or os.cpu_count() or 1
    here = server_is_local(config.base_url) if server_here is None else server_here
    workers = getattr(config, "workers", 1)
    # Spare cores: beyond one per client process and (a guess) two for a server on this machine.
    spare = cores > workers + (2 if here else 0)
    if here and not (spare and suggest_workers):
        return (f"the load generator shares this machine's {cores} CPU cores with the server, so client-side "
                "timings include waiting for a core (more cores, or fewer concurrent requests, lessen it)")
    if spare and suggest_workers:
        return f"one client event loop is near its limit: more --workers spread it over this machine's {cores} cores"
    return f"the load generator is CPU-bound on this machine's {cores} cores"
