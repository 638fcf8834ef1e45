"""Load a Hugging Face model directory: config, tokenizer, and safetensors weights (one file or
sharded with an index), or seeded dummy weights for load_format="dummy".

Under tensor or pipeline parallelism each rank builds its part of the model (engine/models/llama.py)
and reads only what it holds: tensors of another stage's layers are skipped by name, and a sharded
layer (engine/layers/parallel.py) reads its slice of a tensor through safetensors' lazy slices."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from engine.config import ConfigError
from engine.distributed.state import SINGLE, ParallelRank
from engine.layers.linear import Linear
from engine.layers.parallel import LazyTensor
from engine.models.llama import ARCHITECTURES


def load_hf_config(model_dir: Path):
    from transformers import AutoConfig

    config_file = model_dir / "config.json"
    if not config_file.is_file():
        raise ConfigError(f"model directory {model_dir} has no config.json")
    try:
        raw = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{config_file} is not valid JSON: {exc.msg} at line {exc.lineno}") from None
    archs = raw.get("architectures") or []
    supported = [a for a in archs if a in ARCHITECTURES]
    if not supported:
        raise ConfigError(f"{config_file}: architecture {archs or '(none given)'} is not supported; "
                          f"supported: {', '.join(ARCHITECTURES)}")
    missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
                           "intermediate_size") if k not in raw]
    if missing:
        raise ConfigError(f"{config_file} lacks required field(s): {', '.join(missing)}")
    try:
        config = AutoConfig.from_pretrained(str(model_dir))
    except Exception as exc:
        raise ConfigError(f"{config_file}: transformers cannot read it: {exc}") from None
    config.architectures = supported
    return config


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    if not (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
        raise ConfigError(f"model directory {path} has no tokenizer.json / tokenizer_config.json")
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as exc:
        raise ConfigError(f"cannot load the tokenizer in {path}: {exc}") from None


def build_model(hf_config, dtype: torch.dtype, device: torch.device, model_dir: Path, load_format: str,
                seed: int, quant_config=None, par: ParallelRank = SINGLE) -> nn.Module:
    """`quant_config`: the checkpoint's QuantConfig (engine/quantization/config.py), None when dense;
    `par`: this worker's place in the tensor/pipeline grid (it builds and loads only its shard)."""
    model_cls = ARCHITECTURES[hf_config.architectures[0]]
    with torch.device(device):
        default_dtype = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            model = model_cls(hf_config, par, quant_config)
        finally:
            torch.set_default_dtype(default_dtype)
    if load_format == "dummy":
        init_dummy_weights(model, seed)
    else:
        load_weights(model, model_dir)
    return model.eval()


def init_dummy_weights(model: nn.Module, seed: int) -> None:
    """vLLM's --load-format dummy: random weights of the right shapes; speed depends on shapes only."""
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    quantized = set()
    for name, module in model.named_modules():
        if isinstance(module, Linear) and hasattr(module.method, "init_dummy"):
            module.method.init_dummy(module, generator)
            quantized |= {f"{name}.{p}" for p, _ in module.named_parameters()}
    for name, param in model.named_parameters():
        if name in quantized:
            continue
        if name.endswith("norm.weight") or "layernorm" in name:
            param.data.fill_(1.0)
        else:
            param.data.normal_(0.0, 0.02, generator=generator)


def checkpoint_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = sorted({model_dir / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ConfigError(f"{index} names shard(s) that are missing: {', '.join(missing)}")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"model directory {model_dir} has no *.safetensors weights "
                          "(use load_format='dummy' for random weights)")
    return files


def load_weights(model: nn.Module, model_dir: Path) -> None:
    params = dict(model.named_parameters(remove_duplicate=False))
    shards_seen: dict[str, set[int]] = {}  # parameter name -> shard indices loaded (plain ones: {0})
    for file in checkpoint_files(model_dir):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                local = model.checkpoint_name(name)
                if local is None or "rotary_emb.inv_freq" in name:
                    continue  # another pipeline stage's tensor, or a buffer we compute
                lazy = f.get_slice(name)
                target, shard = _load_one(model, params, local, LazyTensor(lazy, lazy.get_shape()))
                shards_seen.setdefault(target, set()).add(shard)
    if getattr(model, "tie_word_embeddings", False) and "model.embed_tokens.weight" in shards_seen:
        shards_seen["lm_head.weight"] = {0}
    missing = []
    for name, _ in model.named_parameters():
        module = model.get_submodule(name.rsplit(".", 1)[0])
        num_shards = len(module.out_sizes) if isinstance(module, Linear) else 1
        if len(shards_seen.get(name, ())) < num_shards:
            missing.append(name)
    if missing:
        raise ConfigError(f"checkpoint in {model_dir} lacks tensors for {len(missing)} parameter(s), "
                          f"e.g. {missing[:3]}")


def _load_one(model: nn.Module, params: dict, name: str, lazy: LazyTensor) -> tuple[str, int]:
    """Copy one checkpoint tensor into its parameter, or into its shard of a merged one (a sharded
    layer reads its slice only). Returns (parameter name, shard index)."""
    target, shard = name, 0
    for piece, (merged, index) in model.packed_shards.items():
        if f".{piece}." in name:
            target, shard = name.replace(f".{piece}.", f".{merged}."), index
            break
    module_name, param_name = target.rsplit(".", 1) if "." in target else ("", target)
    module = _submodule(model, module_name)
    if hasattr(module, "load_checkpoint") and param_name in ("weight", "bias"):
        module.load_checkpoint(param_name, shard, lazy)  # a row-parallel bias: only tensor rank 0 holds one
        return target, shard
    if isinstance(module, Linear):  # dense or quantized: the layer's method knows its layout
        module.load_shard(param_name, shard, lazy.read())
        return target, shard
    tensor = lazy.read()
    if name not in params:
        raise ConfigError(f"checkpoint tensor {name!r} matches no parameter of {type(model).__name__}")
    param = params[name]
    if param.shape != tensor.shape:
        raise ConfigError(f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, "
                          f"the model expects {tuple(param.shape)}")
    param.data.copy_(tensor)
    return name, 0


def _submodule(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None
