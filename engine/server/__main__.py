"""`python -m engine.server MODEL [flags]`: start the OpenAI-compatible server."""
from __future__ import annotations

import contextlib
import logging
import sys

from engine.server.args import build_parser, engine_config


def main(argv: list[str] | None = None, prog: str = "python -m engine.server") -> int:
    args = build_parser(prog).parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("engine.server")
    # Heavy imports after argument parsing, so that --help and flag errors are instant.
    import uvicorn

    from engine.config import ConfigError
    from engine.llm_engine import LLMEngine
    from engine.server.api_server import OpenAIServer, build_app
    from engine.server.async_engine import AsyncEngine
    from engine.server.metrics import ServerMetrics

    GracefulServer = _graceful_server_class()

    try:
        config = engine_config(args)
        engine = LLMEngine(config)
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    name = config.served_model_name or args.model
    metrics_holder: dict = {}
    async_engine = AsyncEngine(engine, on_output=lambda out: metrics_holder["m"].observe(out))
    metrics = metrics_holder["m"] = ServerMetrics(name, lambda: async_engine.stats)
    server = OpenAIServer(async_engine, metrics, name, args.api_key, args.max_n or config.max_num_seqs)
    app = build_app(server)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        log.info("shutting down: stopping the engine loop")
        async_engine.shutdown()

    app.router.lifespan_context = lifespan
    log.info("serving %s on http://%s:%d (API key %s)", name, args.host, args.port,
             "required" if args.api_key else "not required")
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=10, access_log=args.log_level == "debug")
    GracefulServer(config).run()
    return 0


def _graceful_server_class():
    import signal

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


if __name__ == "__main__":
    sys.exit(main())
