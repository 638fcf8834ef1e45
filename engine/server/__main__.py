"""`python -m engine.server MODEL [flags]`: start the OpenAI-compatible server."""
from __future__ import annotations

import logging
import sys

from engine.server.args import ArgsError, engine_config, parse_server_args


def main(argv: list[str] | None = None, prog: str = "python -m engine.server") -> int:
    try:
        args = parse_server_args(argv, prog)
    except ArgsError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Heavy imports after argument parsing, so that --help and flag errors are instant.
    from engine.config import ConfigError
    from engine.core_process import CoreStartError
    from engine.server.launcher import serve

    try:
        config = engine_config(args)
        if args.lora_modules and not config.enable_lora:
            raise ConfigError("--lora-modules needs --enable-lora")
        return serve(config, api_settings(args, config), args.host, args.port, args.api_server_count,
                     args.lora_modules or [])
    except (ConfigError, CoreStartError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the port is taken, say
        print(f"error: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}", file=sys.stderr)
        return 2


def api_settings(args, config):
    """What the API server processes need from the flags."""
    from engine.server.launcher import ApiSettings
    from engine.server.serving_lora import runtime_updates_allowed

    return ApiSettings(model_name=config.served_model_name or args.model, api_key=args.api_key,
                       max_n=args.max_n or config.max_num_seqs, max_waiting_requests=args.max_waiting_requests,
                       log_level=args.log_level, access_log=not args.disable_uvicorn_access_log,
                       log_requests=args.log_requests, max_log_len=args.max_log_len,
                       uvicorn_log_level=args.uvicorn_log_level, multiprocess_metrics=args.api_server_count > 1,
                       allow_runtime_lora=runtime_updates_allowed())


if __name__ == "__main__":
    sys.exit(main())
