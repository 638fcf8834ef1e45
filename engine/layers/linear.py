"""Linear layers. Each takes a quantization method object that owns its weight layout, its loader
and its matmul, so AWQ/GPTQ can slot in beside the unquantized one."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from engine.config import ConfigError


class UnquantizedMethod:
    """Plain dense weights [out_features, in_features], as in Hugging Face checkpoints."""

    def create_weights(self, layer: nn.Module, in_features: int, out_features: int, bias: bool) -> None:
        layer.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        layer.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    def apply(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, layer.weight, layer.bias)

    def load_shard(self, layer: nn.Module, param_name: str, shard: int, tensor: torch.Tensor) -> None:
        param = getattr(layer, param_name, None)
        if not isinstance(param, nn.Parameter):
            raise ConfigError(f"checkpoint tensor {param_name!r} is not a parameter of a dense linear layer "
                             "(a quantized checkpoint without quantization_config in config.json?)")
        start = sum(layer.out_sizes[:shard])
        size = layer.out_sizes[shard]
        if (tensor.shape[0] != size or tensor.dim() != param.dim()
                or (param.dim() == 2 and tensor.shape[1] != param.shape[1])):
            raise ConfigError(f"checkpoint tensor of shape {tuple(tensor.shape)} does not fit shard {shard} "
                             f"({size} rows) of {param_name} {tuple(param.shape)}")
        param.data[start:start + size].copy_(tensor)

    def weight_bytes(self, layer: nn.Module) -> int:
        return sum(t.numel() * t.element_size() for t in (layer.weight, layer.bias) if t is not None)


def linear_method(quant_config, name: str, pieces: tuple[str, ...] = ()):
    """The method for the layer `name` (our merged name; `pieces`: the checkpoint's projections it
    merges): None (dense) without quantization or where the checkpoint keeps the layer dense."""
    if quant_config is None:
        return None
    parent = name.rpartition(".")[0]
    names = [f"{parent}.{p}" for p in pieces] or [name]
    skipped = [quant_config.skips(n) for n in names]
    if any(skipped) and not all(skipped):
        raise ConfigError(f"{name}: modules_to_not_convert keeps some of {', '.join(pieces)} dense but not all; "
                          "a merged layer is quantized as a whole")
    if all(skipped):
        return None
    from engine.quantization.method import QuantizedLinearMethod

    return QuantizedLinearMethod(quant_config, name)


class Linear(nn.Module):
    """A linear layer whose output is the concatenation of `out_sizes` (one entry for a plain
    layer; q/k/v or gate/up for merged ones, loaded shard by shard from separate checkpoint
    tensors, so that one matmul serves all of them)."""

    def __init__(self, in_features: int, out_sizes: list[int], bias: bool = False, method=None):
        super().__init__()
        self.in_features = in_features
        self.out_sizes = list(out_sizes)
        self.method = method or UnquantizedMethod()
        self.method.create_weights(self, in_features, sum(out_sizes), bias)
        self.lora_weights = None  # the adapters' stacked slots, when LoRA is on (engine/lora/layers.py)

    def forward(self, x: torch.Tensor, lora=None) -> torch.Tensor:
        """`lora`: the step's LoRAMapping (each token's adapter slot), or None. The adapters' delta is
        added on top of the method's output, whatever the method (dense or quantized)."""
        out = self.method.apply(self, x)
        if lora is not None and self.lora_weights is not None:
            lora.add(self.lora_weights, x, out)
        return out

    def load_shard(self, param_name: str, shard: int, tensor: torch.Tensor) -> None:
        """One checkpoint tensor into its shard of this layer; the method knows its own layout."""
        self.method.load_shard(self, param_name, shard, tensor)
