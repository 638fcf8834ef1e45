"""A study checked before any trial runs, so that a typo costs one line rather than a study of failed
trials: its flags against the server that will get them (this engine's parser, dry-run on the flags a
trial would get; or a `--launch` template formatted as a trial would format it), and its objective and
constraint metrics against those a trial reports (trial.metric_names). Each problem is a StudyError
naming the file, the key and the closest valid names."""
from __future__ import annotations

import argparse
import difflib
import shlex
import shutil
from pathlib import Path

from workbench.tune.study_file import StudyError, StudyFile
from workbench.tune.trial import metric_names, render_flags

PLACEHOLDERS = ("model", "port", "host", "flags")
NOT_TRIAL_FLAGS = {"help", "model", "host", "port"}  # the trial sets host and port itself


def check_study(study: StudyFile, path: Path, launch: str | None) -> None:
    """Raise StudyError on the first problem found."""
    if launch is not None:
        if study.workload.type == "throughput":
            raise StudyError(f"{path}: --launch starts a server, but workload.type is 'throughput' (this engine, "
                             "offline, in-process): drop --launch or use a serve workload")
        check_launch(study, path, launch)
    else:
        check_engine_flags(study, path)
    check_metrics(study, path)


def closest(name: str, valid) -> str:
    """'; closest: a, b' (or the whole list when nothing is close), for an error line."""
    valid = sorted(valid)
    near = difflib.get_close_matches(name, valid, n=3, cutoff=0.6)
    return f"; closest: {', '.join(near)}" if near else f"; valid: {', '.join(valid)}"


# ---------------------------------------------------------------- flags
class _ParseError(Exception):
    pass


def _raise(message: str):
    raise _ParseError(message)


def trial_parser(study: StudyFile) -> tuple[argparse.ArgumentParser, str]:
    """The parser that will read a trial's flags, and its name for messages: the server's for a serve
    workload, the engine's flags (as `bench throughput` takes them) for an offline one."""
    from engine.server.args import add_engine_args, build_parser

    if study.workload.type == "throughput":
        parser = argparse.ArgumentParser(prog="workbench bench throughput", add_help=False)
        parser.add_argument("model")
        add_engine_args(parser)
        name = "the engine (bench throughput)"
    else:
        parser, name = build_parser(), "the engine's server (workbench serve)"
    parser.error = _raise  # a dry run: an error is ours to report in one line, not a usage dump and exit
    return parser, name


def flag_names(parser: argparse.ArgumentParser) -> set[str]:
    return {a.dest for a in parser._actions if a.dest not in NOT_TRIAL_FLAGS and a.dest != argparse.SUPPRESS}


def sample_values(param) -> list:
    """The values of a search-space parameter that reach the parser: its ends, its choices, both bools."""
    if param.type == "bool":
        return [False, True]
    if param.type == "categorical":
        return list(param.choices)
    if param.type == "int":
        return [int(param.low), int(param.high)]
    return [param.low, param.high]


def check_engine_flags(study: StudyFile, path: Path) -> None:
    from engine.config import ConfigError
    from engine.server.args import engine_config

    parser, server = trial_parser(study)
    valid = flag_names(parser)
    for section, keys in (("server", study.server), ("search_space", study.search_space)):
        for key in keys:
            if key not in valid:
                raise StudyError(f"{path}: {section}.{key}: not a flag of {server}{closest(key, valid)}")

    def parse(flags: dict, where: str):
        try:
            return parser.parse_args([study.study.model, *shlex.split(render_flags(flags))])
        except _ParseError as exc:
            raise StudyError(f"{path}: {where}: {exc}") from None

    # The defaults trial (the fixed flags, searched keys that need a value at their off value) must make a
    # valid configuration; searched values may fail (the sampler learns).
    args = parse(study.default_flags(), "server")
    try:
        engine_config(args)
    except ConfigError as exc:
        raise StudyError(f"{path}: server: {exc}") from None
    for name, param in study.search_space.items():
        for value in sample_values(param):
            parse({**study.server, name: value}, f"search_space.{name} = {value!r}")


def check_launch(study: StudyFile, path: Path, launch: str) -> None:
    """A dry run of the template as a trial formats it; the flags are passed through unchecked (the
    server is another program)."""
    if "{port}" not in launch:
        raise StudyError("--launch must contain {port} (and usually {model} and {flags})")
    settings = [*study.server, *study.search_space]
    if settings and "{flags}" not in launch:
        raise StudyError(f"--launch has no {{flags}}: the study's settings ({', '.join(settings)}, from {path}) "
                         "would never reach the server")
    first = {name: sample_values(p)[0] for name, p in study.search_space.items()}
    try:
        command = launch.format(model=study.study.model, port=8000, host="127.0.0.1",
                                flags=render_flags({**study.server, **first}))
    except KeyError as exc:
        name = str(exc).strip("'")
        raise StudyError(f"--launch: unknown placeholder {{{name}}}{closest(name, PLACEHOLDERS)}") from None
    except (IndexError, ValueError) as exc:
        raise StudyError(f"--launch: not a valid template ({exc}); placeholders are {{model}}, {{port}}, "
                         "{host}, {flags}; write a literal brace as {{ or }}") from None
    try:
        argv = shlex.split(command)
    except ValueError as exc:
        raise StudyError(f"--launch: cannot split {command!r} into arguments: {exc}") from None
    if not argv or shutil.which(argv[0]) is None:
        raise StudyError(f"--launch: no program {argv[0] if argv else ''!r} found (on PATH or as a path)")


# ---------------------------------------------------------------- metrics
def check_metrics(study: StudyFile, path: Path) -> None:
    produced = metric_names(study)
    filled = {k for k, v in produced.items() if v}
    named = [(f"objectives.{i}.metric", o.metric) for i, o in enumerate(study.objectives)]
    named += [(f"constraints.{i}.metric", c.metric) for i, c in enumerate(study.constraints)]
    for where, metric in named:
        if metric in filled:
            continue
        if metric in produced:
            raise StudyError(f"{path}: {where}: {metric!r} is empty for this workload (request_goodput needs "
                             "[workload] goodput SLOs)")
        kind = "an offline (throughput)" if study.workload.type == "throughput" else "a serve"
        raise StudyError(f"{path}: {where}: {metric!r} is not a metric that {kind} trial reports"
                         f"{closest(metric, filled)}")
