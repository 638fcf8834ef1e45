"""Benchmark prompts: random (exact token lengths), shared-prefix, ShareGPT and JSONL files, and the
length distributions (`uniform:a,b`, `normal:mean,std`, `lognormal:mu,sigma`, `empirical:FILE`).

Used by the load generator (over HTTP, where lengths come from the server's /tokenize or a local
tokenizer) and by the offline benchmarks (the engine's own tokenizer)."""
from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

DATASETS = ("random", "prefix-repeat", "sharegpt", "jsonl")
CHARS_PER_TOKEN = 4  # the approximation used when no tokenizer can be had
DISTRIBUTIONS = ("uniform", "normal", "lognormal", "empirical")


@dataclass(frozen=True)
class LengthSpec:
    """A token length: a fixed mean (spread by range_ratio, as vLLM's random dataset) or a distribution."""
    kind: str  # "fixed" or one of DISTRIBUTIONS
    params: tuple[float, ...] = ()
    values: tuple[int, ...] = ()  # empirical: the observed lengths, drawn with replacement

    def draw(self, rng: random.Random, ratio: float = 0.0) -> int:
        if self.kind == "fixed":
            return _length(rng, int(self.params[0]), ratio)
        if self.kind == "uniform":
            return rng.randint(int(self.params[0]), int(self.params[1]))
        if self.kind == "normal":
            value = rng.gauss(*self.params)
        elif self.kind == "lognormal":
            value = rng.lognormvariate(*self.params)
        else:
            value = rng.choice(self.values)
        return max(1, round(value))  # a length is a positive whole number of tokens


def parse_length(spec: int | str) -> LengthSpec:
    """`256`, `uniform:100,300`, `normal:256,64`, `lognormal:5.5,0.6` or `empirical:FILE` (one length a
    line, or a JSON list). Raises ValueError naming the problem."""
    if isinstance(spec, int) or str(spec).strip().isdigit():
        n = int(spec)
        if n < 1:
            raise ValueError(f"lengths must be at least 1, got {n}")
        return LengthSpec("fixed", (n,))
    kind, sep, args = str(spec).partition(":")
    kind = kind.strip().lower()
    if not sep or kind not in DISTRIBUTIONS:
        raise ValueError(f"length {spec!r}: use a number or one of "
                         "uniform:a,b normal:mean,std lognormal:mu,sigma empirical:FILE")
    if kind == "empirical":
        return LengthSpec(kind, values=tuple(_read_lengths(Path(args.strip()))))
    try:
        params = tuple(float(x) for x in args.split(","))
    except ValueError:
        raise ValueError(f"length {spec!r}: {kind} takes two numbers, e.g. {kind}:{_EXAMPLES[kind]}") from None
    if len(params) != 2:
        raise ValueError(f"length {spec!r}: {kind} takes two numbers, e.g. {kind}:{_EXAMPLES[kind]}")
    a, b = params
    if kind == "uniform" and not 1 <= a <= b:
        raise ValueError(f"length {spec!r}: uniform:a,b needs 1 <= a <= b")
    if kind in ("normal", "lognormal") and b < 0:
        raise ValueError(f"length {spec!r}: the spread must not be negative")
    if kind == "normal" and a < 1:
        raise ValueError(f"length {spec!r}: the mean must be at least 1")
    return LengthSpec(kind, params)


_EXAMPLES = {"uniform": "100,300", "normal": "256,64", "lognormal": "5.5,0.6"}


def _read_lengths(path: Path) -> list[int]:
    if not path.is_file():
        raise ValueError(f"empirical lengths: {path}: no such file")
    text = path.read_text().strip()
    try:
        values = json.loads(text) if text.startswith("[") else [int(x) for x in text.split()]
    except ValueError:
        raise ValueError(f"empirical lengths: {path}: expected whole numbers, one a line (or a JSON list)") from None
    if not values or not all(isinstance(v, int) and v >= 1 for v in values):
        raise ValueError(f"empirical lengths: {path}: needs positive whole numbers")
    return values


@dataclass
class SampleRequest:
    prompt: str
    prompt_len: int
    output_len: int
    messages: list[dict] | None = None  # the chat endpoint's conversation, where there is one (multi-turn)


def sample_requests(dataset: str, *, num_prompts: int, input_len: int | str, output_len: int | str,
                    range_ratio: float = 0.0,
                    seed: int = 0, path: str | None = None, tokenizer=None,
                    count_tokens: Callable[[str], int] | None = None, prefix_len: int = 0,
                    num_prefixes: int = 1) -> list[SampleRequest]:
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    if num_prompts < 1:
        raise ValueError(f"num_prompts must be at least 1, got {num_prompts}")
    if not 0.0 <= range_ratio < 1.0:
        raise ValueError(f"range_ratio must be in [0, 1), got {range_ratio}")
    rng = random.Random(seed)
    in_spec, out_spec = parse_length(input_len), parse_length(output_len) if output_len else None
    if dataset in ("sharegpt", "jsonl"):
        if in_spec.kind != "fixed" or (out_spec and out_spec.kind != "fixed"):
            raise ValueError(f"the {dataset} dataset takes its lengths from the file: length distributions are "
                             "for random, prefix-repeat and multi-turn prompts")
        output_len = int(out_spec.params[0]) if out_spec else 0
        if not path:
            raise ValueError(f"the {dataset} dataset needs a file (--dataset-path)")
        reader = read_sharegpt if dataset == "sharegpt" else read_jsonl
        rows = reader(Path(path))
        counter = _counter(tokenizer, count_tokens)
        out = []
        for prompt, expected in rows:
            if dataset == "sharegpt":  # expected: the recorded reply, whose length sets the output
                n_out = output_len or counter(expected)
            else:  # expected: an optional output_len field
                n_out = expected or output_len
            out.append(SampleRequest(prompt, counter(prompt), max(1, n_out)))
        rng.shuffle(out)
        if len(out) < num_prompts:  # cycle, as vLLM does for small files
            out = (out * (num_prompts // max(1, len(out)) + 1))
        return out[:num_prompts]
    if out_spec is None:
        raise ValueError("output_len must be at least 1")
    lengths = [in_spec.draw(rng, range_ratio) for _ in range(num_prompts)]
    outputs = [out_spec.draw(rng, range_ratio) for _ in range(num_prompts)]
    maker = PromptMaker(rng, tokenizer, count_tokens)
    prefixes = [maker.text(prefix_len) for _ in range(num_prefixes)] if dataset == "prefix-repeat" else [""]
    requests = []
    for i, (n_in, n_out) in enumerate(zip(lengths, outputs)):
        prefix = prefixes[i % len(prefixes)]
        body = maker.text(n_in, prefix=prefix)
        requests.append(SampleRequest(prefix + body, maker.count(prefix + body), n_out))
    return requests


def _length(rng: random.Random, mean: int, ratio: float) -> int:
    if mean < 1:
        raise ValueError(f"lengths must be at least 1, got {mean}")
    lo, hi = max(1, int(mean * (1 - ratio))), max(1, int(mean * (1 + ratio)))
    return rng.randint(lo, hi)


def _counter(tokenizer, count_tokens):
    if count_tokens is not None:
        return count_tokens
    if tokenizer is not None:
        return lambda text: len(tokenizer.encode(text, add_special_tokens=False))
    return lambda text: max(1, len(text) // CHARS_PER_TOKEN)


class PromptMaker:
    """Random text of an exact token length: random token ids, decoded, re-encoded and trimmed or
    padded until the text tokenizes to the wanted length (BPE merges make this a fixed point search)."""
    WORDS = ("time person year way day thing man world life hand part child eye woman place work week case "
             "point number group problem fact data model token cache batch server").split()

    def __init__(self, rng: random.Random, tokenizer=None, count_tokens=None):
        self.rng = rng
        self.tokenizer = tokenizer
        self.count = _counter(tokenizer, count_tokens)
        self.approximate = tokenizer is None and count_tokens is None
        if tokenizer is not None:
            special = set(getattr(tokenizer, "all_special_ids", []) or [])
            self.vocab = [i for i in range(len(tokenizer)) if i not in special]

    def text(self, n: int, prefix: str = "") -> str:
        if n <= 0:
            return ""
        if self.tokenizer is None:
            return self._words(n, prefix)
        ids = [self.rng.choice(self.vocab) for _ in range(n)]
        text = self.tokenizer.decode(ids)
        for _ in range(8):
            got = self.tokenizer.encode(prefix + text, add_special_tokens=False)
            have = len(got) - (len(self.tokenizer.encode(prefix, add_special_tokens=False)) if prefix else 0)
            if have == n:
                return text
            if have > n:
                text = self.tokenizer.decode(got[len(got) - have:][:n])
            else:
                text += self.tokenizer.decode([self.rng.choice(self.vocab) for _ in range(n - have)])
        return text  # rare: BPE kept merging across the boundary; the recorded length is re-counted

    def _words(self, n: int, prefix: str) -> str:
        """Without a tokenizer: words, grown until the counter (a server's /tokenize, or ~4 chars per
        token) says n tokens."""
        words = [self.rng.choice(self.WORDS) for _ in range(2 * n)]
        if self.approximate:
            return (" " + " ".join(words))[:n * CHARS_PER_TOKEN]
        base = self.count(prefix) if prefix else 0

        def tokens(text: str) -> int:
            return self.count(prefix + text) - base

        # The most words that stay within n tokens (bisection: ~log2(2n) counts), then one-token
        # words until exactly n.
        lo, hi = 0, len(words)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if tokens(" " + " ".join(words[:mid])) <= n:
                lo = mid
            else:
                hi = mid - 1
        text = " " + " ".join(words[:lo])
        for _ in range(8):
            if tokens(text) >= n:
                break
            text += " a"
        return text


def read_jsonl(path: Path) -> list[tuple[str, int | None]]:
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    rows = []
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise ValueError(f"{path}:{lineno}: each line needs a string field 'prompt'")
        out = row.get("output_len")
        if out is not None and (not isinstance(out, int) or out < 1):
            raise ValueError(f"{path}:{lineno}: output_len must be a positive integer")
        rows.append((row["prompt"], out))
    if not rows:
        raise ValueError(f"{path}: no prompts")
    return rows


def load_sharegpt(path: Path) -> list:
    """A ShareGPT file's list of conversations (each {"conversations": [{"from", "value"}, ...]})."""
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: a ShareGPT file is a JSON list of conversations")
    return data


def read_sharegpt(path: Path) -> list[tuple[str, str | None]]:
    """First human turn as the prompt, the reply as the expected output (its length in tokens)."""
    data = load_sharegpt(path)
    rows = []
    for item in data:
        turns = item.get("conversations") if isinstance(item, dict) else None
        if not turns or len(turns) < 2 or not all(isinstance(t, dict) and "value" in t for t in turns[:2]):
            continue  # vLLM skips conversations without a prompt and a reply
        prompt, reply = turns[0]["value"], turns[1]["value"]
        if len(prompt) < 4 or len(reply) < 4:
            continue
        rows.append((prompt, reply))
    if not rows:
        raise ValueError(f"{path}: no usable conversations (need a prompt and a reply each)")
    return rows
