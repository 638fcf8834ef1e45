"""The quantized linear method: a `Linear`'s weights in the internal layout, loaded shard by shard
from AWQ or GPTQ checkpoint tensors, multiplied through `quant_matmul`.

A merged layer (q/k/v, gate/up) holds its shards side by side along N, so each shard's packed
tensors go into a column slice: qweight [K/P, N] and scales [G, N] at [start, start + size), qzeros
[G, N/P] at [start/P, (start + size)/P) -- which is why every shard's size must be a multiple of P
(8 for 4-bit). GPTQ's act-order g_idx is per input row; the shards of a merged layer share their
input, hence their Hessian and act-order, so their g_idx must agree (checked).
"""
from __future__ import annotations

import torch
from torch import nn

from engine.config import ConfigError
from engine.quantization import formats
from engine.quantization.config import QuantConfig
from engine.quantization.matmul import quant_matmul
from engine.quantization.packing import fields_per_word


class QuantizedLinearMethod:
    def __init__(self, config: QuantConfig, layer_name: str = ""):
        self.config = config
        self.layer_name = layer_name

    # ---------------------------------------------------------------- weights
    def create_weights(self, layer: nn.Module, in_features: int, out_features: int, bias: bool) -> None:
        cfg, p = self.config, fields_per_word(self.config.bits)
        name = self.layer_name or "a layer"
        if in_features % p:
            raise ConfigError(f"{name}: in_features {in_features} is not a multiple of {p}, as {cfg.bits}-bit "
                              "qweight packing along the input needs")
        for size in layer.out_sizes:
            if size % p:
                raise ConfigError(f"{name}: an output size of {size} is not a multiple of {p}, as {cfg.bits}-bit "
                                  "packing along the output needs (out sizes {layer.out_sizes})")
        self.group_size = cfg.group_size_for(in_features)
        groups = formats.num_groups(in_features, self.group_size)
        dtype = torch.get_default_dtype()
        # Scales as the checkpoint has them (fp16) unless the model computes in float32 (exact either way).
        scale_dtype = torch.float32 if dtype == torch.float32 else torch.float16
        i32 = {"dtype": torch.int32}
        layer.qweight = nn.Parameter(torch.empty(in_features // p, out_features, **i32), requires_grad=False)
        layer.qzeros = nn.Parameter(torch.empty(groups, out_features // p, **i32), requires_grad=False)
        layer.scales = nn.Parameter(torch.empty(groups, out_features, dtype=scale_dtype), requires_grad=False)
        layer.g_idx = (nn.Parameter(torch.empty(in_features, **i32), requires_grad=False)
                       if cfg.method == "gptq" and cfg.desc_act else None)
        layer.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        self._g_idx_loaded = False

    def apply(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        out = quant_matmul(x, layer.qweight, layer.scales, layer.qzeros, self.config.bits, self.group_size,
                           layer.g_idx)
        return out + layer.bias if layer.bias is not None else out

    # ---------------------------------------------------------------- loading
    def load_shard(self, layer: nn.Module, param_name: str, shard: int, tensor: torch.Tensor) -> None:
        """One checkpoint tensor (`param_name` as the format names it) into its shard's slice."""
        start, size = sum(layer.out_sizes[:shard]), layer.out_sizes[shard]
        p = fields_per_word(self.config.bits)
        if param_name == "bias":
            self._copy(layer.bias, tensor, (start, size), param_name)
        elif param_name == "qweight":
            internal = self._qweight(tensor)
            self._copy(layer.qweight, internal, (start, size), param_name)
        elif param_name == "qzeros":
            internal = self._qzeros(tensor)
            self._copy(layer.qzeros, internal, (start // p, size // p), param_name)
        elif param_name == "scales":
            self._copy(layer.scales, tensor, (start, size), param_name)
        elif param_name == "g_idx":
            self._load_g_idx(layer, tensor)
        else:
            raise ConfigError(f"{self.layer_name}: checkpoint tensor {param_name!r} is not part of a "
                              f"{self.config.method.upper()} layer (qweight, qzeros, scales, g_idx, bias)")

    def _qweight(self, t: torch.Tensor) -> torch.Tensor:
        self._check_int32(t, "qweight")
        return formats.awq_qweight_to_internal(t) if self.config.method == "awq" else t

    def _qzeros(self, t: torch.Tensor) -> torch.Tensor:
        self._check_int32(t, "qzeros")
        if self.config.method == "awq":
            return formats.awq_qzeros_to_internal(t)
        return formats.gptq_qzeros_to_internal(t, self.config.bits)

    def _check_int32(self, t: torch.Tensor, name: str) -> None:
        if t.dtype != torch.int32:
            raise ConfigError(f"{self.layer_name}: {name} must be int32, the checkpoint has {t.dtype}")

    def _copy(self, param, tensor, cols: tuple[int, int], name: str) -> None:
        start, size = cols
        want_rows = param.shape[0] if param.dim() == 2 else None
        shape_ok = (tensor.shape[-1] == size and tensor.dim() == param.dim()
                    and (param.dim() == 1 or tensor.shape[0] == want_rows))
        if not shape_ok:
            expected = (size,) if param.dim() == 1 else (want_rows, size)
            raise ConfigError(f"{self.layer_name}: checkpoint {name} has shape {tuple(tensor.shape)}, the "
                              f"{self.config.method.upper()} layout of this shard needs {expected} (after "
                              "conversion; check bits and group_size in quantization_config)")
        param.data[..., start:start + size].copy_(tensor)

    def _load_g_idx(self, layer: nn.Module, tensor: torch.Tensor) -> None:
        g_idx = tensor.to(torch.int32)
        if g_idx.shape != (layer.in_features,):
            raise ConfigError(f"{self.layer_name}: g_idx has shape {tuple(g_idx.shape)}, expected "
                              f"({layer.in_features},)")
        if layer.g_idx is None:
            trivial = formats.trivial_g_idx(layer.in_features, self.group_size)
            if not torch.equal(g_idx.cpu(), trivial):
                raise ConfigError(f"{self.layer_name}: g_idx reorders the groups, but quantization_config "
                                  "says desc_act=false")
            return
        groups = layer.scales.shape[0]
        if int(g_idx.min()) < 0 or int(g_idx.max()) >= groups:
            raise ConfigError(f"{self.layer_name}: g_idx values must lie in [0, {groups}), got "
                              f"[{int(g_idx.min())}, {int(g_idx.max())}]")
        if self._g_idx_loaded and not torch.equal(layer.g_idx.data.cpu(), g_idx.cpu()):
            raise ConfigError(f"{self.layer_name}: the merged projections' g_idx differ; shards that share "
                              "an input must share their act-order")
        layer.g_idx.data.copy_(g_idx)
        self._g_idx_loaded = True

    def init_dummy(self, layer: nn.Module, generator: torch.Generator) -> None:
        """load_format='dummy': uniform random codes around the middle zero point, scales giving weights
        of standard deviation about 0.02 (as the dense dummy weights)."""
        bits = self.config.bits
        k, n = layer.in_features, sum(layer.out_sizes)
        dev = layer.qweight.device
        q = torch.randint(0, 2 ** bits, (k, n), generator=generator, device=dev, dtype=torch.int32)
        z = torch.full((layer.scales.shape[0], n), 2 ** (bits - 1), dtype=torch.int32, device=dev)
        layer.qweight.data.copy_(formats.pack_rows(q, bits))
        layer.qzeros.data.copy_(formats.pack_cols(z, bits))
        layer.scales.data.fill_(0.02 / (2 ** bits / 12 ** 0.5))  # uniform codes: std 2**bits / sqrt(12)
        if layer.g_idx is not None:
            layer.g_idx.data.copy_(formats.trivial_g_idx(k, self.group_size, dev))
        if layer.bias is not None:
            layer.bias.data.zero_()

    def weight_bytes(self, layer: nn.Module) -> int:
        return sum(t.numel() * t.element_size() for t in (layer.qweight, layer.qzeros, layer.scales, layer.g_idx)
                   if t is not None)
