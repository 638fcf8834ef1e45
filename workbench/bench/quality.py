"""`workbench bench quality`: the perplexity of a model on a fixed text, through the engine's prompt
logprobs, so that quantization, speculative decoding and LoRA can show what they do to quality.

The recipe is the usual one for fixed-length models (Hugging Face's "Perplexity of fixed-length
models"): the text is tokenized once; windows of --max-length tokens start every --stride tokens;
each window scores only the tokens that no earlier window scored, with the rest of the window as
context (the first window scores all but its first token). Every token after the first is scored
exactly once, and perplexity = exp(mean negative log-likelihood). Each window is one request with
`prompt_logprobs=0` and `max_tokens=1`; all windows are submitted together, like any batch.

`--baseline transformers` computes the same sum with transformers' forward on the same token ids and
windows, in the same run and dtype, so the agreement (`perplexity_ratio`) is in the result file.

The built-in text (workbench/data/quality-corpus.txt): the Declaration of Independence, the
Gettysburg Address and Lincoln's Second Inaugural Address, about 2,300 words of 18th- and 19th-century
English. Public domain (United States government works of 1776-1865), so it ships in the package and
needs no download; fixed, and identified in each result by its SHA-256. A famous text is likely in
any model's training data, so its perplexity is low: it measures differences between versions of a
model (quantized or not, with or without an adapter), not absolute quality. `--text FILE` scores
another text.
"""
from __future__ import annotations

import argparse
import hashlib
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from engine.server.args import OneLineParser
from workbench.bench.throughput import config_record, console, engine_settings, llm_kwargs, synchronize
from workbench.results import BenchResult, collect_environment

BUILTIN_TEXT = Path(__file__).parents[1] / "data" / "quality-corpus.txt"
DEFAULT_MAX_LENGTH = 1024
DEFAULT_STRIDE = 512


def build_parser(prog: str = "workbench bench quality") -> argparse.ArgumentParser:
    from engine.server.args import add_engine_args

    p = OneLineParser(prog=prog, description="Perplexity of a model on a fixed text through the engine's prompt "
                                             "logprobs; engine flags as `workbench serve`.")
    p.add_argument("--model", required=True, help="model directory (Hugging Face format) or a preset name")
    p.add_argument("--text", default=None, help="a UTF-8 text file to score (default: the built-in public-domain "
                                                "text, see `bench quality --help`'s module doc)")
    p.add_argument("--max-length", type=int, default=DEFAULT_MAX_LENGTH, help="tokens per window")
    p.add_argument("--stride", type=int, default=DEFAULT_STRIDE, help="tokens between window starts")
    p.add_argument("--max-tokens", type=int, default=None, help="score only the first N tokens of the text")
    p.add_argument("--baseline", choices=["transformers"], default=None,
                   help="also compute the perplexity with transformers on the same token ids and windows")
    p.add_argument("--output-json", default=None, help="result file (default results/quality-<time>.json)")
    p.add_argument("--label", default="", help="short name for plots and tables")
    add_engine_args(p)
    return p


@dataclass(frozen=True)
class Window:
    begin: int  # first token of the window (context starts here)
    end: int  # one past its last token
    first_scored: int  # the tokens [first_scored, end) are scored in this window

    @property
    def num_scored(self) -> int:
        return self.end - self.first_scored


def make_windows(num_tokens: int, max_length: int, stride: int) -> list[Window]:
    """Windows of max_length every stride tokens; each scores what no earlier one did."""
    if num_tokens < 2:
        raise ValueError(f"the text has {num_tokens} token(s); perplexity needs at least 2")
    if max_length < 2:
        raise ValueError(f"--max-length must be at least 2, got {max_length}")
    if not 1 <= stride <= max_length:
        raise ValueError(f"--stride must be in [1, --max-length ({max_length})], got {stride}")
    windows, scored_until = [], 1  # token 0 has no context: never scored
    for begin in range(0, num_tokens, stride):
        end = min(begin + max_length, num_tokens)
        windows.append(Window(begin, end, max(scored_until, begin + 1)))
        scored_until = end
        if end == num_tokens:
            break
    return windows


@dataclass
class NLL:
    """Summed negative log-likelihood over the scored tokens."""
    total: float
    count: int
    elapsed_s: float

    @property
    def perplexity(self) -> float:
        return math.exp(self.total / self.count)


def load_text(path: str | None) -> tuple[str, str]:
    """(text, its name for the result)."""
    file = Path(path) if path else BUILTIN_TEXT
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"--text {file}: no such file") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"--text {file}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if not text.strip():
        raise ValueError(f"--text {file}: the file is empty")
    return text, str(file) if path else f"built-in ({BUILTIN_TEXT.name})"


def engine_nll(llm, token_ids: list[int], windows: list[Window]) -> NLL:
    from engine import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
    device = llm.llm_engine.config.device
    synchronize(device)
    start = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": token_ids[w.begin:w.end]} for w in windows], params, use_tqdm=False)
    synchronize(device)
    elapsed = time.perf_counter() - start
    total = 0.0
    for w, out in zip(windows, outs):
        if out.error is not None:
            raise RuntimeError(f"the engine failed window [{w.begin}, {w.end}): {out.error}")
        for pos in range(w.first_scored, w.end):
            total -= out.prompt_logprobs[pos - w.begin][token_ids[pos]].logprob
    return NLL(total, sum(w.num_scored for w in windows), elapsed)


@torch.inference_mode()
def transformers_nll(model_dir: Path, token_ids: list[int], windows: list[Window], dtype: torch.dtype,
                     device: str) -> NLL:
    """The same sum, one window at a time through transformers' forward."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).to(device).eval()
    ids = torch.tensor(token_ids, device=device)
    synchronize(device)
    start = time.perf_counter()
    total = 0.0
    for w in windows:
        logprobs = torch.log_softmax(model(ids[w.begin:w.end].unsqueeze(0)).logits[0].float(), dim=-1)
        rows = torch.arange(w.first_scored - w.begin - 1, w.end - w.begin - 1, device=device)  # row q predicts q+1
        total -= logprobs[rows, ids[w.first_scored:w.end]].sum().item()
    synchronize(device)
    return NLL(total, sum(w.num_scored for w in windows), time.perf_counter() - start)


def check_args(args: argparse.Namespace) -> None:
    if args.max_tokens is not None and args.max_tokens < 2:
        raise ValueError(f"--max-tokens must be at least 2, got {args.max_tokens}")
    make_windows(max(args.max_length, 2), args.max_length, args.stride)  # the flags alone, before loading


def run_quality(args: argparse.Namespace) -> BenchResult:
    from engine import LLM

    check_args(args)
    settings = engine_settings(args)  # a bad engine flag fails before anything loads
    text, text_name = load_text(args.text)
    console.log(f"loading {args.model}")
    llm = LLM(args.model, **llm_kwargs(args))
    engine, config = llm.llm_engine, llm.llm_engine.config
    if args.max_length >= config.max_model_len:
        raise ValueError(f"--max-length {args.max_length} must be below max_model_len ({config.max_model_len}): a "
                         "window is a prompt, which leaves room for one generated token")
    token_ids = llm.get_tokenizer().encode(text)  # the tokenizer's own convention (a BOS where it adds one)
    if args.max_tokens:
        token_ids = token_ids[:args.max_tokens]
    windows = make_windows(len(token_ids), args.max_length, args.stride)
    console.log(f"scoring {len(token_ids):,} tokens in {len(windows)} windows of up to {args.max_length} "
                f"(stride {args.stride})")
    ours = engine_nll(llm, token_ids, windows)
    metrics = {"perplexity": ours.perplexity, "mean_nll": ours.total / ours.count, "num_scored_tokens": ours.count,
               "num_windows": len(windows), "elapsed_s": ours.elapsed_s,
               "scored_tokens_per_s": ours.count / ours.elapsed_s}
    record = config_record(config, args) | {
        "text_name": text_name, "text_sha256": hashlib.sha256(text.encode()).hexdigest(), "text_chars": len(text),
        "num_text_tokens": len(token_ids),
        # what was measured: the checkpoint's own quantization_config (AWQ/GPTQ), None when dense
        "quantization_config": _plain(getattr(config.hf_config, "quantization_config", None))}
    extra = {"windows": [asdict(w) for w in windows]}
    if args.baseline == "transformers":
        model_dir = engine.model_dir
        engine.shutdown()  # free the device before transformers loads
        del llm, engine
        extra["baseline"] = _baseline(model_dir, token_ids, windows, config)
        if "perplexity" in extra["baseline"]:
            metrics["baseline_perplexity"] = extra["baseline"]["perplexity"]
            metrics["perplexity_ratio"] = ours.perplexity / extra["baseline"]["perplexity"]
    return BenchResult(kind="quality", label=args.label, config=record, metrics=metrics, extra=extra,
                       environment=collect_environment(settings.device if settings.device != "cuda"
                                                       else torch.cuda.get_device_name()))


def _plain(qc):
    return qc if qc is None or isinstance(qc, dict) else qc.to_dict()


def _baseline(model_dir: Path, token_ids: list[int], windows: list[Window], config) -> dict:
    """The baseline's record; a failure (a directory transformers cannot load, say) is recorded with
    its reason rather than losing our result."""
    console.log(f"baseline: transformers forward on the same windows ({config.torch_dtype})")
    name = "transformers AutoModelForCausalLM forward"
    try:
        nll = transformers_nll(model_dir, token_ids, windows, config.torch_dtype, config.device)
    except Exception as exc:  # noqa: BLE001 -- any failure inside transformers is reported, not raised
        return {"name": name, "error": f"{type(exc).__name__}: {exc}"}
    import transformers

    return {"name": name, "perplexity": nll.perplexity, "mean_nll": nll.total / nll.count,
            "num_scored_tokens": nll.count, "elapsed_s": nll.elapsed_s,
            "dtype": str(config.torch_dtype).removeprefix("torch."), "transformers_version": transformers.__version__}
