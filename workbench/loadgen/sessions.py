"""Multi-turn sessions: each turn's prompt is the whole conversation so far (the replies the server
actually gave) plus a new user message -- the traffic prefix caching exists for.

Synthetic: `num_prompts` sessions of `num_turns` turns, user messages and replies of the requested
lengths. ShareGPT: each conversation replayed turn by turn (its human turns as the user messages, its
recorded replies' lengths as the output lengths), up to `num_turns` turns."""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from workbench.datasets import PromptMaker, load_sharegpt, parse_length


@dataclass
class Turn:
    message: str  # the new user message
    message_len: int  # its tokens
    output_len: int


@dataclass
class Session:
    index: int
    turns: list[Turn]


def synthetic_sessions(num: int, num_turns: int, input_len, output_len, maker: PromptMaker, rng: random.Random,
                       range_ratio: float = 0.0) -> list[Session]:
    in_spec, out_spec = parse_length(input_len), parse_length(output_len)
    sessions = []
    for s in range(num):
        turns = []
        for _ in range(num_turns):
            n_in, n_out = in_spec.draw(rng, range_ratio), out_spec.draw(rng, range_ratio)
            text = maker.text(n_in)
            turns.append(Turn(text, maker.count(text), n_out))
        sessions.append(Session(s, turns))
    return sessions


def sharegpt_sessions(path: str | Path, num: int, num_turns: int, count, rng: random.Random) -> list[Session]:
    """Conversations with at least one human turn followed by a reply; shuffled, cycled if too few."""
    conversations = _read_conversations(Path(path))
    rng.shuffle(conversations)
    out = []
    for s in range(num):
        pairs = conversations[s % len(conversations)][:num_turns]
        out.append(Session(s, [Turn(h, count(h), max(1, count(g))) for h, g in pairs]))
    return out


def _read_conversations(path: Path) -> list[list[tuple[str, str]]]:
    data = load_sharegpt(path)
    conversations = []
    for item in data:
        turns = item.get("conversations") if isinstance(item, dict) else None
        pairs = []
        for human, reply in zip((turns or [])[0::2], (turns or [])[1::2]):
            if not (isinstance(human, dict) and isinstance(reply, dict)) or \
                    human.get("from") not in ("human", "user") or not human.get("value") or not reply.get("value"):
                break  # a conversation is used up to its first malformed pair
            pairs.append((human["value"], reply["value"]))
        if pairs:
            conversations.append(pairs)
    if not conversations:
        raise ValueError(f"{path}: no usable conversations (need human turns each followed by a reply)")
    return conversations


def history_messages(history: list[tuple[str, str]], message: str) -> list[dict]:
    """The chat endpoint's messages: every past (user, assistant) pair, then the new user message."""
    out = []
    for user, reply in history:
        out += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
    return out + [{"role": "user", "content": message}]


def history_prompt(history: list[tuple[str, str]], message: str) -> str:
    """The completions endpoint's prompt: the same conversation as plain text, so the earlier turns are
    a byte-identical prefix of the next prompt."""
    return "".join(user + reply for user, reply in history) + message
