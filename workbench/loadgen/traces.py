"""Timestamped production traces, replayed with their own send times and lengths.

Formats (public schemas; our fixtures under tests/fixtures/traces/ are a few rows written by us):
- mooncake: JSONL, `{"timestamp": ms, "input_length": n, "output_length": m, "hash_ids": [...]}`; each
  hash id names one block of `trace_block_size` prompt tokens (512 in Mooncake's release), so two
  requests that share leading ids share that prefix.
- burstgpt: CSV with `Timestamp` (s), `Request tokens`, `Response tokens` (other columns ignored).
- azure: CSV with `TIMESTAMP` (date and time), `ContextTokens`, `GeneratedTokens` (Azure LLM inference).
- jsonl: ours, `{"timestamp": s, "input_len": n, "output_len": m}` and an optional `"prompt"`.
Times are made relative to the first row and multiplied by `time_scale` (0.5 replays twice as fast)."""
from __future__ import annotations

import copy
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from workbench.datasets import PromptMaker, SampleRequest

TRACE_FORMATS = ("mooncake", "burstgpt", "azure", "jsonl")


@dataclass
class TraceRow:
    timestamp: float  # seconds, as recorded
    input_len: int
    output_len: int
    hash_ids: list[int] = field(default_factory=list)
    prompt: str | None = None


def read_trace(path: str | Path, fmt: str, limit: int | None = None) -> list[TraceRow]:
    """The first `limit` rows, sorted by time; a malformed file raises ValueError naming it."""
    path = Path(path)
    if fmt not in TRACE_FORMATS:
        raise ValueError(f"unknown trace format {fmt!r}; choose one of {', '.join(TRACE_FORMATS)}")
    if not path.is_file():
        raise ValueError(f"{path}: no such trace file")
    rows = _read_jsonl(path, fmt) if fmt in ("mooncake", "jsonl") else _read_csv(path, fmt)
    if not rows:
        raise ValueError(f"{path}: no requests in the trace")
    bad = next((r for r in rows if r.input_len < 1 or r.output_len < 1), None)
    if bad is not None:
        raise ValueError(f"{path}: lengths must be positive (row at timestamp {bad.timestamp})")
    rows.sort(key=lambda r: r.timestamp)
    return rows[:limit] if limit else rows


_JSON_KEYS = {"mooncake": ("timestamp", "input_length", "output_length", 1e-3),  # ms
              "jsonl": ("timestamp", "input_len", "output_len", 1.0)}


def _read_jsonl(path: Path, fmt: str) -> list[TraceRow]:
    t_key, in_key, out_key, to_s = _JSON_KEYS[fmt]
    rows = []
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            rows.append(TraceRow(float(row[t_key]) * to_s, int(row[in_key]), int(row[out_key]),
                                 [int(h) for h in row.get("hash_ids", [])], row.get("prompt")))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
        except (KeyError, TypeError, ValueError, AttributeError):
            raise ValueError(f"{path}:{lineno}: a {fmt} row needs numbers {t_key}, {in_key}, {out_key}") from None
    return rows


_CSV_KEYS = {"burstgpt": ("Timestamp", "Request tokens", "Response tokens"),
             "azure": ("TIMESTAMP", "ContextTokens", "GeneratedTokens")}


def _read_csv(path: Path, fmt: str) -> list[TraceRow]:
    t_key, in_key, out_key = _CSV_KEYS[fmt]
    try:
        df = pd.read_csv(path, skipinitialspace=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not a CSV file ({exc})") from None
    missing = [k for k in (t_key, in_key, out_key) if k not in df.columns]
    if missing:
        raise ValueError(f"{path}: a {fmt} trace needs the columns {t_key}, {in_key}, {out_key}; missing {missing}")
    try:
        if fmt == "azure":
            stamps = pd.to_datetime(df[t_key])
            seconds = (stamps - stamps.min()).dt.total_seconds()
        else:
            seconds = df[t_key].astype(float)
        ins, outs = df[in_key].astype(int), df[out_key].astype(int)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{path}: a value in {t_key}, {in_key} or {out_key} is not understood ({exc})") from None
    return [TraceRow(float(t), int(i), int(o)) for t, i, o in zip(seconds, ins, outs)]


def trace_schedule(rows: list[TraceRow], time_scale: float = 1.0) -> list[float]:
    """Send times in seconds from the start: relative to the first row, scaled."""
    t0 = rows[0].timestamp
    return [(r.timestamp - t0) * time_scale for r in rows]


def trace_requests(rows: list[TraceRow], maker: PromptMaker, block_size: int, seed: int = 0) -> list[SampleRequest]:
    """Prompts of the recorded lengths. Rows with hash ids are built block by block from one text per id
    (the same id gives the same text, so shared ids become a shared prefix); the last block is cut to the
    recorded length. Recorded prompts are sent as they are."""
    blocks: dict[int, str] = {}

    def block(h: int, n: int) -> str:
        if n != block_size:  # a partial last block: its own text, still seeded by the id
            return _maker_for(maker, seed, h, n).text(n)
        if h not in blocks:
            blocks[h] = _maker_for(maker, seed, h, n).text(n)
        return blocks[h]

    out = []
    for i, r in enumerate(rows):
        if r.prompt is not None:
            out.append(SampleRequest(r.prompt, maker.count(r.prompt), r.output_len))
            continue
        if r.hash_ids:
            parts, left = [], r.input_len
            for h in r.hash_ids:
                if left <= 0:
                    break
                parts.append(block(h, min(block_size, left)))
                left -= block_size
            if left > 0:  # more tokens recorded than the ids cover: a unique tail
                parts.append(_maker_for(maker, seed, ("tail", i), left).text(left))
            prompt = "".join(parts)
        else:
            prompt = _maker_for(maker, seed, ("row", i), r.input_len).text(r.input_len)
        out.append(SampleRequest(prompt, maker.count(prompt), r.output_len))
    return out


def _maker_for(maker: PromptMaker, seed: int, key, n: int) -> PromptMaker:
    """A prompt maker whose random text depends only on (seed, key, n): a block's text is the same
    wherever it appears."""
    twin = copy.copy(maker)
    twin.rng = random.Random(f"{seed}/{key}/{n}")
    return twin
