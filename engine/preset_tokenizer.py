"""The byte-level BPE tokenizer of the synthetic presets, with Qwen- and Llama-3-style chat tokens.

The BPE itself was trained offline with `tokenizers` (see `train_bpe`, run by
`python -m engine.preset_tokenizer`) on English text and Python source that ship with CPython,
and is stored in engine/data/, so every machine builds byte-identical presets without a network.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

DATA_DIR = Path(__file__).parent / "data"
BPE_SIZES = (4000, 16000)  # stored vocabularies: the tiny presets use the small one

CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")

LLAMA3_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}")

# family -> (special tokens in id order, bos, eos for chat, pad, extra eos ids for generation, template)
FAMILIES = {
    "qwen": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None, "<|im_end|>", "<|endoftext|>",
             ["<|endoftext|>"], CHATML_TEMPLATE),
    "llama3": (["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
               "<|begin_of_text|>", "<|eot_id|>", "<|end_of_text|>", ["<|end_of_text|>"], LLAMA3_TEMPLATE),
}


def training_corpus() -> list[str]:
    """English prose (the pydoc topics) and Python source from the standard library."""
    import pydoc_data.topics

    texts = list(pydoc_data.topics.topics.values())
    stdlib = Path(pydoc_data.__file__).parent.parent
    for path in sorted(stdlib.glob("*.py"))[:400]:
        texts.append(path.read_text(encoding="utf-8", errors="ignore"))
    return texts


def train_bpe(texts: list[str], vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return tok


def bpe_path(vocab_size: int) -> Path:
    return DATA_DIR / f"bpe-{vocab_size}.json"


def build_tokenizer(family: str, bpe_vocab: int) -> tuple[Tokenizer, dict]:
    """The stored BPE plus the family's special tokens (appended after the BPE vocabulary).
    Returns the tokenizer and the token ids the model config needs."""
    if bpe_vocab not in BPE_SIZES:
        raise ValueError(f"no stored BPE of {bpe_vocab} tokens; stored: {BPE_SIZES}")
    specials, bos, eos, pad, extra_eos, _ = FAMILIES[family]
    tok = Tokenizer.from_file(str(bpe_path(bpe_vocab)))
    tok.add_special_tokens(specials)
    ids = {name: tok.token_to_id(name) for name in specials}
    if bos is not None:  # Llama 3 prepends <|begin_of_text|> when special tokens are added
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, ids[bos])])
    info = {"bos_token_id": ids[bos] if bos else None, "eos_token_id": ids[eos], "pad_token_id": ids[pad],
            "generation_eos_ids": [ids[eos]] + [ids[t] for t in extra_eos], "vocab_size": tok.get_vocab_size()}
    return tok, info


def save_tokenizer(family: str, bpe_vocab: int, out_dir: Path, model_max_length: int) -> dict:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json; return the ids."""
    tok, info = build_tokenizer(family, bpe_vocab)
    specials, bos, eos, pad, _, template = FAMILIES[family]
    tok.save(str(out_dir / "tokenizer.json"))
    added = {str(tok.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                       "single_word": False, "special": True} for t in specials}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "added_tokens_decoder": added, "bos_token": bos,
              "eos_token": eos, "pad_token": pad, "chat_template": template, "model_max_length": model_max_length,
              "clean_up_tokenization_spaces": False, "add_bos_token": bos is not None}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    special_map = {"eos_token": eos, "pad_token": pad, **({"bos_token": bos} if bos else {})}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2))
    return info


if __name__ == "__main__":  # retrain the stored vocabularies (deterministic for a given CPython)
    corpus = training_corpus()
    DATA_DIR.mkdir(exist_ok=True)
    for size in BPE_SIZES:
        train_bpe(corpus, size).save(str(bpe_path(size)))
        print(f"wrote {bpe_path(size)}", file=sys.stderr)
