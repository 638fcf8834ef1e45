"""The server's command line: vLLM's flag names and meanings, one parser for `workbench serve` and
`python -m engine.server`."""
from __future__ import annotations

import argparse
import os
import re
from dataclasses import MISSING, fields

from engine.config import EngineConfig
from engine.server.vllm_flags import ENGINE, SERVER, add_unsupported

_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "kib": 1024, "m": 1e6, "mb": 1e6, "mib": 1 << 20, "g": 1e9,
          "gb": 1e9, "gib": 1 << 30}


def byte_size(text: str) -> int:
    """'2GiB', '512MiB', '1e9' or plain bytes."""
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 2GiB, 512MiB, 1000000000)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


class OneLineParser(argparse.ArgumentParser):
    """Bad flags end in one line (prog: error: ...) and exit status 2, not a usage dump; a flag is
    taken only as spelled (no abbreviations: a prefix that works today breaks when a flag is added)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{"allow_abbrev": False} | kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser(prog: str = "workbench serve") -> argparse.ArgumentParser:
    p = OneLineParser(prog=prog, description="OpenAI-compatible server over the PagedBench engine "
                      "(vLLM's flags and meanings).")
    model_help = ("model directory (Hugging Face format), a preset name such as tiny, or a Hugging Face id "
                  "(from the local Hugging Face cache; with --load-format dummy, the preset of its shape)")
    p.add_argument("model", nargs="?", default=None, metavar="MODEL", help=model_help)
    p.add_argument("--model", dest="model_flag", default=None, metavar="MODEL", help="the same, as vLLM's flag")
    s = p.add_argument_group("server")
    s.add_argument("--host", default="0.0.0.0")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", default=os.environ.get("VLLM_API_KEY") or os.environ.get("PAGEDBENCH_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 routes (env: VLLM_API_KEY)")
    s.add_argument("--served-model-name", default=None)
    s.add_argument("--max-n", type=int, default=None, help="largest n a request may ask for (default max-num-seqs)")
    s.add_argument("--api-server-count", type=_positive_int, default=1,
                   help="API server processes on the one port, all feeding the one engine core")
    s.add_argument("--max-waiting-requests", type=_non_negative_int, default=0,
                   help="answer 429 while this many requests wait for their first token (0 = unlimited)")
    s.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    s.add_argument("--disable-log-stats", action="store_true",
                   help="no periodic engine stats line (every VLLM_LOG_STATS_INTERVAL s, default 10, while busy)")
    s.add_argument("--disable-log-requests", dest="log_requests", action="store_false", default=True,
                   help="no 'Received request' / 'Finished request' log lines")
    s.add_argument("--enable-log-requests", dest="log_requests", action="store_true", default=True,
                   help="log each request (the default; vLLM's newer spelling)")
    s.add_argument("--max-log-len", type=_non_negative_int, default=None,
                   help="characters of each prompt shown in the request log (default: all)")
    s.add_argument("--disable-uvicorn-access-log", action="store_true", help="no HTTP access log lines")
    s.add_argument("--uvicorn-log-level", default=None,
                   choices=["critical", "error", "warning", "info", "debug", "trace"],
                   help="uvicorn's own log level (default: --log-level)")
    s.add_argument("--lora-modules", nargs="+", type=lora_module, default=None, metavar="NAME=PATH",
                   help='LoRA adapters served by name: NAME=PATH or JSON {"name": ..., "path": ..., '
                        '"base_model_name": ...}; needs --enable-lora')
    add_engine_args(p)
    add_unsupported(p, SERVER)
    return p


class ArgsError(ValueError):
    """A command line that parsed but cannot be used; the message is one line."""


def parse_server_args(argv: list[str] | None, prog: str = "workbench serve") -> argparse.Namespace:
    """The server's flags, with MODEL taken from the positional argument or --model (vLLM accepts both)."""
    args = build_parser(prog).parse_args(argv)
    positional, flag = args.model, args.model_flag
    del args.model_flag
    if positional and flag and positional != flag:
        raise ArgsError(f"the model is given twice, as {positional!r} and as --model {flag!r}; give it once")
    args.model = positional or flag
    if not args.model:
        raise ArgsError("no model given: pass MODEL (a directory, a preset such as tiny, or a Hugging Face id) "
                        "or --model MODEL")
    return args


def lora_module(text: str):
    from engine.lora.request import parse_lora_module

    try:
        return parse_lora_module(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


ENGINE_DEFAULTS = {f.name: f.default for f in fields(EngineConfig) if f.default is not MISSING}


def _engine_group(parser: argparse.ArgumentParser):
    """The "engine" argument group. A flag whose dest is an EngineConfig field takes its default from
    the field, so that each default is written once (the dataclass) for the server and the benchmarks."""
    group = parser.add_argument_group("engine")
    add = group.add_argument

    def add_argument(*names, **kwargs):
        action = add(*names, **kwargs)
        if action.dest in ENGINE_DEFAULTS:
            action.default = ENGINE_DEFAULTS[action.dest]
        return action

    group.add_argument = add_argument
    return group


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """The engine's flags (everything in EngineConfig but the model), shared by the server and the
    offline benchmarks."""
    e = _engine_group(parser)
    e.add_argument("--tokenizer", default=None)
    e.add_argument("--dtype", choices=["auto", "float16", "half", "bfloat16", "float32", "float"])
    e.add_argument("--device", choices=["auto", "cuda", "cpu"])
    e.add_argument("--seed", type=int)
    e.add_argument("--load-format", choices=["auto", "safetensors", "dummy"])
    e.add_argument("--max-model-len", type=int, default=None)
    e.add_argument("--gpu-memory-utilization", type=float)
    e.add_argument("--kv-cache-memory", type=byte_size, default=None,
                   help="KV cache size, e.g. 2GiB (CPU default 1GiB)")
    e.add_argument("--num-gpu-blocks-override", type=int, default=None)
    e.add_argument("--block-size", type=int)
    e.add_argument("--max-num-seqs", type=int)
    e.add_argument("--max-num-batched-tokens", type=int, default=None)
    e.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction)
    e.add_argument("--enable-chunked-prefill", action=argparse.BooleanOptionalAction)
    e.add_argument("--enforce-eager", action="store_true")
    e.add_argument("--max-logprobs", type=int)
    e.add_argument("--enable-lora", action="store_true", help="serve LoRA adapters (PEFT format)")
    e.add_argument("--max-loras", type=int, help="GPU slots: distinct adapters in one step")
    e.add_argument("--max-lora-rank", type=int, help="the largest adapter rank")
    e.add_argument("--max-cpu-loras", type=int, default=None, help="adapters kept in CPU memory (default max-loras)")
    e.add_argument("--trust-remote-code", action="store_true",
                   help="accepted for vLLM command lines; no effect: every supported architecture is built in")
    e.add_argument("--speculative-config", type=speculative_json, default=None,
                   help='speculative decoding, as vLLM: JSON {"method": "ngram" | "draft_model", "model": ..., '
                        '"num_speculative_tokens": k, "prompt_lookup_max": 4, "prompt_lookup_min": 2}')
    e.add_argument("--speculative-model", default=None,
                   help='older form: "[ngram]" for prompt lookup, else a draft model (preset or directory)')
    e.add_argument("--num-speculative-tokens", type=int, default=None, help="draft tokens per step (0: off)")
    e.add_argument("--ngram-prompt-lookup-max", type=int, default=None)
    e.add_argument("--ngram-prompt-lookup-min", type=int, default=None)
    e.add_argument("--tensor-parallel-size", "-tp", type=int,
                   help="ranks each layer is split over (heads, MLP, vocabulary); one worker process each")
    e.add_argument("--pipeline-parallel-size", "-pp", type=int,
                   help="stages the layers are split into; the world size is tp x pp worker processes")
    e.add_argument("--distributed-executor-backend", default=None, choices=["uni", "mp", "ray"],
                   help="uni: the worker in the engine's process (one rank); mp: one worker process per rank "
                        "(the default for more than one); ray is not available")
    e.add_argument("--quantization", "-q", default=None,
                   help="awq | gptq (or vLLM's awq_marlin, gptq_marlin); default: from the checkpoint's config.json")
    add_unsupported(e, ENGINE)


SERVER_ONLY = {"host", "port", "api_key", "max_n", "log_level", "api_server_count", "max_waiting_requests",
               "lora_modules", "log_requests", "max_log_len", "disable_uvicorn_access_log", "uvicorn_log_level",
               "model_flag"}  # model_flag: --model, folded into the positional by parse_server_args


def speculative_json(text: str) -> dict:
    from engine.spec_decode.config import SpecConfigError, parse_json

    try:
        return parse_json(text)
    except SpecConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def engine_config(args: argparse.Namespace, skip: set[str] = SERVER_ONLY) -> EngineConfig:
    """EngineConfig from parsed flags; `skip` names the flags that are not engine settings."""
    kwargs = {k: v for k, v in vars(args).items() if k not in skip}
    unknown = set(kwargs) - EngineConfig.field_names()
    assert not unknown, f"parser flags without an EngineConfig field: {unknown}"
    return EngineConfig(**kwargs)
