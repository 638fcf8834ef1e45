"""Shared by the LoRA tests: seeded adapters for the test models, a transformers + PEFT reference, and
a direct prefill through our model with a LoRA mapping (no scheduler, no runner)."""
from __future__ import annotations

import zlib
from functools import cache
from pathlib import Path

import torch

from engine.layers.attention import AttentionMetadata
from engine.lora.layers import LoRAMapping
from engine.lora.synthetic import write_adapter
from tests.engine_helpers import model_dir

# name -> (rank, targets, use_rslora): ranks 8 and 16, some projections only, rsLoRA, rank 1.
ADAPTERS = {"qv8": (8, ["q_proj", "v_proj"], False), "all16": (16, None, False),
            "mlp4rs": (4, ["gate_proj", "up_proj", "down_proj"], True),
            "k1": (1, ["k_proj", "o_proj"], False)}


@cache
def adapter_dir(model: str, name: str, seed: int = 0) -> Path:
    rank, targets, rslora = ADAPTERS[name]
    out = model_dir(model).parent / f"test-lora-{model}-{name}-{seed}"
    if not (out / "adapter_config.json").is_file():
        write_adapter(model_dir(model), out, rank, targets, seed=seed + zlib.crc32(name.encode()) % 1000,
                      use_rslora=rslora)
    return out


@cache
def peft_model(model: str, name: str):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(model_dir(model)), dtype=torch.float32)
    return PeftModel.from_pretrained(base, str(adapter_dir(model, name))).eval()


def peft_greedy(model: str, name: str | None, prompt: list[int], max_new_tokens: int) -> list[int]:
    from tests.engine_helpers import hf_model

    m = hf_model(model) if name is None else peft_model(model, name)
    with torch.no_grad():
        out = m.generate(input_ids=torch.tensor([prompt]), max_new_tokens=max_new_tokens,
                         min_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def prefill_logits(model: torch.nn.Module, prompts: list[list[int]], slots: list[int], num_slots: int,
                   block_size: int = 16) -> list[torch.Tensor]:
    """Every position's logits of each prompt, all prompts in one forward pass, prompt i under GPU
    slot slots[i] (-1: the base model)."""
    blocks = [-(-len(p) // block_size) for p in prompts]
    layers = model.attention_layers()
    kv_heads, head_dim = layers[0].num_kv_heads, layers[0].head_dim
    for attn in layers:
        attn.k_cache = torch.zeros(sum(blocks), block_size, kv_heads, head_dim)
        attn.v_cache = torch.zeros_like(attn.k_cache)
    tables, slot_mapping, first = [], [], 0
    for p, b in zip(prompts, blocks):
        tables.append(list(range(first, first + b)) + [0] * (max(blocks) - b))
        slot_mapping += [first * block_size + i for i in range(len(p))]
        first += b
    cu = [0]
    for p in prompts:
        cu.append(cu[-1] + len(p))
    meta = AttentionMetadata(slot_mapping=torch.tensor(slot_mapping),
                             block_tables=torch.tensor(tables, dtype=torch.int32),
                             context_lens=torch.tensor([len(p) for p in prompts], dtype=torch.int32),
                             cu_seqlens_q=torch.tensor(cu, dtype=torch.int32), num_decode_seqs=0,
                             max_query_len=max(map(len, prompts)), max_context_len=max(map(len, prompts)))
    token_slots = torch.tensor([s for p, s in zip(prompts, slots) for _ in p], dtype=torch.int32)
    ids = torch.tensor([t for p in prompts for t in p])
    positions = torch.cat([torch.arange(len(p)) for p in prompts])
    with torch.inference_mode():
        hidden = model(ids, positions, meta, LoRAMapping.build(token_slots, num_slots))
        logits = model.compute_logits(hidden)
    return [logits[cu[i]:cu[i + 1]] for i in range(len(prompts))]
