"""The served path's process tree: the engine core process, and one or several API server
processes (`--api-server-count`) on one listening socket.

    main process ── binds the port, starts the core, waits until it is ready
      ├─ EngineCore process (engine/core_process.py)
      └─ API server(s): in the main process when there is one; else N spawned processes sharing
         the socket (the kernel spreads connections over them) while the main process supervises.

Exit codes: 0 after a drained shutdown (SIGTERM/SIGINT let in-flight streams finish); 1 when the
core or an API process died, so that a supervisor restarts the server; 2 for a bad setting.
"""
from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
from dataclasses import dataclass
from multiprocessing.connection import wait
from pathlib import Path

from engine.core_process import CoreAddresses, CoreProcess
from engine.messages import CoreInfo

log = logging.getLogger("engine.server")


@dataclass
class ApiSettings:
    """What an API server process needs besides the core's address and info."""
    model_name: str
    api_key: str | None
    max_n: int
    max_waiting_requests: int
    log_level: str
    access_log: bool  # uvicorn's line per HTTP request (--disable-uvicorn-access-log turns it off)
    multiprocess_metrics: bool
    log_requests: bool = True  # "Received request" / "Finished request" lines (--disable-log-requests)
    max_log_len: int | None = None  # prompt characters shown in them (None: all)
    uvicorn_log_level: str | None = None  # uvicorn's own loggers (None: log_level)
    allow_runtime_lora: bool = False  # VLLM_ALLOW_RUNTIME_LORA_UPDATING: the load/unload endpoints


def bind_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def serve(config, settings: ApiSettings, host: str, port: int, api_server_count: int, lora_modules: list = ()) -> int:
    """Run the server until it is stopped; returns the process exit code. `lora_modules`: --lora-modules."""
    sock = bind_socket(host, port)  # first, so that a busy port fails before the model loads
    metrics_dir = None
    if api_server_count > 1:
        # Request metrics from every API process, summed at scrape time (set before any child starts).
        metrics_dir = tempfile.mkdtemp(prefix="pagedbench-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    core = CoreProcess(config, api_server_count, settings.log_level, lora_modules)
    try:
        log.info("serving %s on http://%s:%d with %d API server process(es) (API key %s)", settings.model_name,
                 host, port, api_server_count, "required" if settings.api_key else "not required")
        if api_server_count == 1:
            return run_api_server(settings, sock, core.info, core.addresses, 0)
        return supervise(settings, sock, core, api_server_count)
    finally:
        core.shutdown()
        sock.close()
        if metrics_dir:
            shutil.rmtree(metrics_dir, ignore_errors=True)


def supervise(settings: ApiSettings, sock: socket.socket, core: CoreProcess, count: int) -> int:
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_api_server_process, name=f"ApiServer_{i}",
                         args=(settings, sock, core.info, core.addresses, i)) for i in range(count)]
    for p in procs:
        p.start()
    stopping = False

    def forward(signum, _frame):
        nonlocal stopping
        stopping = True
        for p in procs:
            if p.is_alive():
                os.kill(p.pid, signal.SIGTERM)  # each drains its own streams

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while any(p.is_alive() for p in procs):
            wait([core.sentinel, *(p.sentinel for p in procs if p.is_alive())], timeout=1.0)
            crashed = [p for p in procs if p.exitcode not in (None, 0)]
            if (crashed or not core.process.is_alive()) and not stopping:
                log.error("%s; stopping the server", "the engine core process exited" if not crashed
                          else f"API server {crashed[0].name} exited with {crashed[0].exitcode}")
                stopping = True
                for p in procs:  # an API process whose core died exits by itself; make sure
                    p.join(5)
                    if p.is_alive():
                        p.terminate()
        failed = any(p.exitcode != 0 for p in procs) or not core.process.is_alive()
        return 1 if failed else 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()


def _api_server_process(settings: ApiSettings, sock: socket.socket, info: CoreInfo, addresses: CoreAddresses,
                        index: int) -> None:
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    raise SystemExit(run_api_server(settings, sock, info, addresses, index))


def run_api_server(settings: ApiSettings, sock: socket.socket, info: CoreInfo, addresses: CoreAddresses,
                   index: int) -> int:
    import uvicorn

    from engine.model_loader import load_tokenizer
    from engine.server.app import build_app
    from engine.server.core_client import CoreClient
    from engine.server.metrics import ServerMetrics
    from engine.server.serving_common import OpenAIServing, ServerLimits

    tokenizer = load_tokenizer(Path(info.tokenizer_dir))
    exit_code = 0
    server: uvicorn.Server | None = None

    def on_dead() -> None:
        nonlocal exit_code
        exit_code = 1
        if server is not None:
            server.should_exit = True  # in-flight requests have their errors already

    client = CoreClient(info, addresses, index, tokenizer, on_dead=on_dead, log_requests=settings.log_requests,
                        max_log_len=settings.max_log_len)
    metrics = ServerMetrics(settings.model_name, lambda: client.stats, settings.multiprocess_metrics)
    client.on_step = metrics.observe
    limits = ServerLimits(info.max_model_len, info.vocab_size, info.max_logprobs, settings.max_n,
                          settings.max_waiting_requests)
    serving = OpenAIServing(client, metrics, tokenizer, settings.model_name, info.model_dir, settings.api_key,
                            limits, index)
    app = build_app(serving, settings.allow_runtime_lora)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        client.start()
        yield
        await client.close()  # before the core stops, so that its exit is not taken for a crash

    app.router.lifespan_context = lifespan
    config = uvicorn.Config(app, log_level=settings.uvicorn_log_level or settings.log_level,
                            timeout_graceful_shutdown=10, access_log=settings.access_log)
    server = _graceful_server_class()(config)
    server.run(sockets=[sock])
    return exit_code


def _graceful_server_class():
    import uvicorn

    class GracefulServer(uvicorn.Server):
        """uvicorn re-raises a captured SIGINT/SIGTERM after shutting down, so the process would end
        'killed by signal'. A handled shutdown is a clean exit: handle both signals ourselves."""

        @contextlib.contextmanager
        def capture_signals(self):
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    return GracefulServer
