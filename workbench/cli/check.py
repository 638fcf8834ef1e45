"""Parse a `workbench` command line exactly as the command would, without running it: the README's
commands are checked with it (tests/test_readme_commands.py). The typer commands are parsed by
click with their bodies replaced by a no-op; the pass-through commands by their own argparse
parser, the same one the command builds."""
from __future__ import annotations

import argparse
from collections.abc import Callable

import typer

try:  # typer >= 0.2x runs on its own copy of click: its classes and exceptions are that copy's
    from typer import _click as click
except ImportError:  # pragma: no cover - older typer on the click package
    import click


class CommandLineError(ValueError):
    """The command line does not parse; the message is the parser's."""


def _argparse_parsers() -> dict[tuple[str, ...], Callable[[], argparse.ArgumentParser]]:
    """The pass-through commands (PASS_THROUGH in workbench/cli/__init__.py) and their parsers."""
    from engine.server.args import build_parser as serve_parser
    from workbench.bench import latency, quality, throughput
    from workbench.cli.bench_serve import build_parser as bench_serve_parser

    return {("serve",): serve_parser, ("bench", "throughput"): throughput.build_parser,
            ("bench", "latency"): latency.build_parser, ("bench", "quality"): quality.build_parser,
            ("bench", "serve"): bench_serve_parser, ("bench", "compare"): None}


def _raising(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    def error(message: str):
        raise CommandLineError(f"{parser.prog}: {message}")

    parser.error = error
    return parser


def _parse_pass_through(path: tuple[str, ...], args: list[str]) -> None:
    parsers = _argparse_parsers()
    if path not in parsers:
        raise CommandLineError(f"workbench {' '.join(path)} takes its flags through, but check.py knows no "
                               "parser for it: add it to _argparse_parsers")
    if path == ("bench", "compare"):
        from workbench.bench import compare

        own, engine_flags = _raising(compare.build_parser()).parse_known_args(args)
        engine = _raising(argparse.ArgumentParser(prog="workbench bench compare", allow_abbrev=False, add_help=False))
        from engine.server.args import add_engine_args

        add_engine_args(engine)
        engine.parse_args(engine_flags)
        return
    _raising(parsers[path]()).parse_args(args)


def _stub(group, prefix: tuple[str, ...] = ()) -> None:
    """Replace every command's body (in this freshly built click tree) by a parse of what it was given."""
    for name, command in group.commands.items():
        path = (*prefix, name)
        if hasattr(command, "commands"):  # a group
            _stub(command, path)
            continue
        passes_through = command.context_settings.get("ignore_unknown_options", False)

        def invoke(ctx, _path=path, _through=passes_through):  # click parsed the options before this
            if _through:
                _parse_pass_through(_path, list(ctx.args))

        command.invoke = invoke


def check_command_line(argv: list[str]) -> None:
    """Raise CommandLineError unless `workbench ARGV` parses. `--help` and `--version` print and pass."""
    from workbench.cli import app

    root = typer.main.get_command(app)
    _stub(root)
    try:
        root.main(list(argv), prog_name="workbench", standalone_mode=False)
    except click.ClickException as exc:
        raise CommandLineError(exc.format_message()) from None
    except SystemExit as exc:  # argparse --help
        if exc.code not in (0, None):
            raise CommandLineError(f"exit {exc.code}") from None
