"""Shared by the engine tests: model directories and a transformers reference."""
from __future__ import annotations

import dataclasses
import random
from functools import cache
from pathlib import Path

import torch

from engine.presets import PRESETS, resolve_model, write_checkpoint


@cache
def model_dir(name: str) -> Path:
    """A preset, or one of two extra random configs: 'random-qwen2' and 'random-llama'."""
    if name in PRESETS:
        return resolve_model(name)
    base = {"random-qwen2": "tiny", "random-llama": "tiny-llama"}[name]
    spec = dataclasses.replace(PRESETS[base], name=name, hidden_size=96, intermediate_size=160,
                               num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=1,
                               tie_word_embeddings=not PRESETS[base].tie_word_embeddings)
    out = Path(resolve_model("tiny")).parent / f"test-{name}"
    if not (out / "config.json").exists():
        write_checkpoint(spec, out, seed=7)
    return out


@cache
def hf_model(name: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir(name)), dtype=torch.float32).eval()


def random_prompts(count: int, vocab: int, seed: int = 0, lo: int = 3, hi: int = 90) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(10, vocab) for _ in range(rng.randint(lo, hi))] for _ in range(count)]


def shared_prefix_prompts(count: int, vocab: int, prefix_len: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    prefix = [rng.randrange(10, vocab) for _ in range(prefix_len)]
    return [prefix + [rng.randrange(10, vocab) for _ in range(rng.randint(1, 20))] for _ in range(count)]


def hf_greedy(name: str, prompt: list[int], max_new_tokens: int) -> list[int]:
    model = hf_model(name)
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()
