"""Reading a PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors) into the
engine's layout, with every way it can fail named.

PEFT's tensors are `base_model.model.<module>.lora_A.weight` [r, in] and `.lora_B.weight` [out, r];
PEFT computes base(x) + scaling * B(A(x)) with scaling = lora_alpha / r (lora_alpha / sqrt(r) with
rsLoRA). B is scaled here, once, so the kernels never see the scaling.

What is refused, by name, rather than silently run differently: DoRA, LoRA biases, modules_to_save,
fan_in_fan_out, per-module rank/alpha patterns, targets outside the decoder's projections
(embeddings, lm_head), ranks above max_lora_rank and tensors whose shapes do not fit the base model.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from engine.lora.layers import SUPPORTED_MODULES, LoRATarget
from engine.lora.request import LoRAError, LoRARequest

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."


@dataclass
class LoRAModel:
    """One adapter, read and checked, in the engine's layout: per our Linear, per slice, (A, scaled B)."""
    request: LoRARequest
    rank: int
    scaling: float
    weights: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)

    @property
    def lora_int_id(self) -> int:
        return self.request.lora_int_id

    @property
    def nbytes(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size()
                   for shards in self.weights.values() for a, b in shards.values())


def read_adapter_config(path: Path, name: str) -> dict:
    config_file = path / CONFIG_FILE
    if not path.is_dir():
        raise LoRAError(f"LoRA adapter {name!r}: {path} is not a directory")
    if not config_file.is_file():
        raise LoRAError(f"LoRA adapter {name!r}: no {CONFIG_FILE} in {path}")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LoRAError(f"LoRA adapter {name!r}: {config_file} is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise LoRAError(f"LoRA adapter {name!r}: {config_file} must hold a JSON object")
    return config


def check_config(config: dict, name: str, max_rank: int) -> tuple[int, float]:
    """(rank, scaling) of a PEFT LoRA config; raises LoRAError naming the first unsupported field."""
    def refuse(what: str) -> LoRAError:
        return LoRAError(f"LoRA adapter {name!r}: {what}")

    if config.get("peft_type", "LORA") != "LORA":
        raise refuse(f"peft_type {config.get('peft_type')!r} is not LORA")
    rank = config.get("r")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise refuse(f"r must be a positive integer, got {rank!r}")
    if rank > max_rank:
        raise refuse(f"rank r={rank} exceeds max_lora_rank ({max_rank}); raise --max-lora-rank")
    alpha = config.get("lora_alpha", 8)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        raise refuse(f"lora_alpha must be a number, got {alpha!r}")
    unsupported = [("use_dora", "DoRA (use_dora)"), ("lora_bias", "LoRA biases (lora_bias)"),
                   ("fan_in_fan_out", "fan_in_fan_out"), ("modules_to_save", "modules_to_save (full extra modules)"),
                   ("rank_pattern", "per-module ranks (rank_pattern)"),
                   ("alpha_pattern", "per-module alphas (alpha_pattern)"),
                   ("layer_replication", "layer_replication"), ("use_qalora", "QA-LoRA (use_qalora)"),
                   ("alora_invocation_tokens", "activated LoRA (alora_invocation_tokens)"),
                   ("trainable_token_indices", "trainable tokens (trainable_token_indices)"),
                   ("target_parameters", "target_parameters"), ("use_bdlora", "use_bdlora"),
                   ("arrow_config", "Arrow routing (arrow_config)"), ("kasa_config", "kasa_config")]
    for key, what in unsupported:
        if config.get(key):
            raise refuse(f"{what} is not supported")
    if config.get("bias", "none") != "none":
        raise refuse(f"bias={config.get('bias')!r} is not supported (only 'none')")
    targets = config.get("target_modules")
    if isinstance(targets, list):
        bad = sorted({t.rsplit(".", 1)[-1] for t in targets} - set(SUPPORTED_MODULES))
        if bad:
            raise refuse(f"target module(s) {', '.join(bad)} not supported; LoRA applies to "
                         f"{', '.join(SUPPORTED_MODULES)}")
    scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    return rank, float(scaling)


def load_adapter(request: LoRARequest, targets: dict[str, LoRATarget], max_rank: int, dtype: torch.dtype,
                 pin: bool = False) -> LoRAModel:
    """Read and check an adapter. `targets`: the model's adaptable projections (layers.lora_targets)."""
    name, path = request.lora_name, Path(request.lora_path).expanduser()
    rank, scaling = check_config(read_adapter_config(path, name), name, max_rank)
    raw = read_tensors(path, name)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in raw.items():
        module, kind = split_key(key, name)
        if module not in targets:
            piece = module.rsplit(".", 1)[-1]
            if piece in SUPPORTED_MODULES:
                raise LoRAError(f"LoRA adapter {name!r}: module {module!r} does not exist in the base model "
                                "(an adapter for another model?)")
            raise LoRAError(f"LoRA adapter {name!r}: target module {piece!r} ({module}) is not supported; LoRA "
                            f"applies to {', '.join(SUPPORTED_MODULES)}")
        pairs.setdefault(module, {})[kind] = tensor
    if not pairs:
        raise LoRAError(f"LoRA adapter {name!r}: {path / WEIGHTS_FILE} holds no LoRA weights")
    model = LoRAModel(request, rank, scaling)
    for module, pair in sorted(pairs.items()):
        a, b = _checked_pair(module, pair, targets[module], rank, name)
        a = a.to(dtype)
        b = (b.float() * scaling).to(dtype)
        if pin:
            a, b = a.pin_memory(), b.pin_memory()
        target = targets[module]
        model.weights.setdefault(target.layer, {})[target.shard] = (a, b)
    return model


def read_tensors(path: Path, name: str) -> dict[str, torch.Tensor]:
    weights_file = path / WEIGHTS_FILE
    if not weights_file.is_file():
        found = "; found adapter_model.bin, convert it to safetensors" if (path / "adapter_model.bin").is_file() else ""
        raise LoRAError(f"LoRA adapter {name!r}: no {WEIGHTS_FILE} in {path}{found}")
    try:
        with safe_open(str(weights_file), framework="pt") as f:
            return {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise LoRAError(f"LoRA adapter {name!r}: cannot read {weights_file}: {exc}") from None


def split_key(key: str, name: str) -> tuple[str, str]:
    """'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight' -> ('model.layers.0.self_attn.q_proj', 'A')."""
    for suffix, kind in ((".lora_A.weight", "A"), (".lora_B.weight", "B")):
        if key.startswith(PREFIX) and key.endswith(suffix):
            return key[len(PREFIX):-len(suffix)], kind
    if "lora_magnitude_vector" in key:
        raise LoRAError(f"LoRA adapter {name!r}: DoRA (tensor {key}) is not supported")
    if ".lora_B.bias" in key or ".lora_A.bias" in key:
        raise LoRAError(f"LoRA adapter {name!r}: LoRA biases (tensor {key}) are not supported")
    if "lora_embedding" in key:
        raise LoRAError(f"LoRA adapter {name!r}: embedding adapters (tensor {key}) are not supported")
    raise LoRAError(f"LoRA adapter {name!r}: tensor {key!r} is not a LoRA A/B weight of the form "
                    f"{PREFIX}<module>.lora_A.weight (full weights and modules_to_save are not supported)")


def _checked_pair(module: str, pair: dict[str, torch.Tensor], target: LoRATarget, rank: int,
                  name: str) -> tuple[torch.Tensor, torch.Tensor]:
    if set(pair) != {"A", "B"}:
        missing = ({"A", "B"} - set(pair)).pop()
        raise LoRAError(f"LoRA adapter {name!r}: {module} has no lora_{missing}.weight")
    a, b = pair["A"], pair["B"]
    if not (a.is_floating_point() and b.is_floating_point()):
        raise LoRAError(f"LoRA adapter {name!r}: {module} weights must be floating point, got {a.dtype}/{b.dtype}")
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != rank or b.shape[1] != rank:
        raise LoRAError(f"LoRA adapter {name!r}: {module} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}, "
                        f"not of the rank r={rank} that {CONFIG_FILE} gives")
    want_a, want_b = (rank, target.in_features), (target.out_features, rank)
    if tuple(a.shape) != want_a or tuple(b.shape) != want_b:
        raise LoRAError(f"LoRA adapter {name!r}: {module} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}; "
                        f"the base model (r={rank}) needs {want_a} and {want_b}")
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        raise LoRAError(f"LoRA adapter {name!r}: {module} holds NaN or infinite values")
    return a, b
