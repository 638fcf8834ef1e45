"""`workbench bench compare`: the same workload offline and served, in one run, with their ratio.

Offline: `workbench bench throughput` in a child process (so its device memory is gone after).
Served: `workbench serve` with the same engine flags in a child process, measured with the load
generator (streaming completions, EOS ignored), then stopped. One JSON holds both results, the
served/offline ratio of output tokens per second, and the load generator's warnings.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

from engine.server.args import OneLineParser, add_engine_args
from workbench.bench.ceiling import free_port, wait_healthy
from workbench.bench.throughput import FIXED_LENGTHS
from workbench.loadgen.config import ServeBenchConfig
from workbench.loadgen.flags import add_model_flags
from workbench.results import collect_environment


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="workbench bench compare",
                      description="One workload offline and served, side by side (output tok/s and their ratio). "
                                  "Engine flags after the options below go to both, e.g. --max-num-seqs 512.")
    p.add_argument("--model", required=True)
    add_model_flags(p, ServeBenchConfig, ["num_prompts", "input_len", "output_len", "max_concurrency", "workers"],
                    custom=FIXED_LENGTHS | {"num_prompts": {"type": int, "help": "requests"}})
    p.add_argument("--api-server-count", type=int, default=1)
    p.add_argument("--warmup", type=int, default=None, help="served requests sent first, not measured "
                   "(default: max-concurrency, or 64)")
    p.add_argument("--skip-offline", action="store_true", help="served run only")
    p.add_argument("--output-json", required=True)
    return p


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    """(compare's own flags, the engine flags for both runs); a bad flag of either kind ends here,
    in one line, before anything starts."""
    args, engine_flags = build_parser().parse_known_args(argv)
    engine = OneLineParser(prog="workbench bench compare", add_help=False)
    add_engine_args(engine)
    engine.parse_args(engine_flags)
    return args, engine_flags


def main(argv: list[str] | None = None) -> int:
    args, engine_flags = parse_args(argv)
    out = Path(args.output_json)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = out.with_suffix("")
    work.mkdir(parents=True, exist_ok=True)
    shape = ["--input-len", str(args.input_len), "--output-len", str(args.output_len)]
    offline = None
    if not args.skip_offline:
        offline_json = work / "offline.json"
        _run([sys.executable, "-m", "workbench.cli", "bench", "throughput", "--model", args.model,
              "--num-prompts", str(args.num_prompts), *shape, "--output-json", str(offline_json), *engine_flags])
        offline = json.loads(offline_json.read_text())
    served = _served(args, engine_flags, work)
    result = {"kind": "compare", "schema_version": 1, "command": "workbench bench compare " + " ".join(
        argv if argv is not None else sys.argv[1:]), "environment": collect_environment().model_dump(),
              "offline": offline["metrics"] if offline else None, "served": served["metrics"],
              "served_warnings": served["extra"].get("warnings", []), "served_server": served.get("server")}
    if offline:
        result["served_over_offline"] = served["metrics"]["output_throughput"] / offline["metrics"]["output_throughput"]
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: result[k] for k in ("served_over_offline",) if k in result}))
    print(f"offline {offline['metrics']['output_throughput']:,.0f} out tok/s" if offline else "offline skipped")
    m = served["metrics"]
    print(f"served  {m['output_throughput']:,.0f} out tok/s, median TTFT {m.get('median_ttft_ms', math.nan):.1f} ms, "
          f"median TPOT {m.get('median_tpot_ms', math.nan):.2f} ms, warnings: {len(result['served_warnings'])}")
    print(f"wrote {out}")
    return 0


def _served(args, engine_flags: list[str], work: Path) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(work / "server.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "engine.server", args.model, "--host", "127.0.0.1", "--port",
                               str(port), "--api-server-count", str(args.api_server_count), "--log-level", "warning",
                               *engine_flags], stdout=log, stderr=subprocess.STDOUT, env={**os.environ})
    try:
        try:
            wait_healthy(url, server, timeout=600, what="the server")
        except RuntimeError as exc:
            raise SystemExit(f"error: {exc}") from None
        from workbench.loadgen.config import ServeBenchConfig
        from workbench.loadgen.runner import run_serve_benchmark

        warmup = args.warmup if args.warmup is not None else (args.max_concurrency or 64)
        config = ServeBenchConfig(base_url=url, model=args.model, dataset="random", num_prompts=args.num_prompts,
                                  input_len=args.input_len, output_len=args.output_len, request_rate=math.inf,
                                  max_concurrency=args.max_concurrency, ignore_eos=True, warmup=warmup,
                                  workers=args.workers, label="served")
        result = run_serve_benchmark(config).model_dump(mode="json")
        (work / "served.json").write_text(json.dumps(result))
        return result
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


def _run(cmd: list[str]) -> None:
    r = subprocess.run(cmd)
    if r.returncode != 0:
        raise SystemExit(f"error: {' '.join(cmd[:6])} ... exited with {r.returncode}")


if __name__ == "__main__":
    sys.exit(main())
