"""Which quantized format a checkpoint holds, read from config.json's `quantization_config` as vLLM
reads it (vllm/model_executor/layers/quantization/awq.py and gptq.py `from_config`, vllm-project/vllm),
and checked against the `quantization=` option.

Accepted, as written by AutoAWQ (casper-hansen/AutoAWQ awq/models/_config.py `to_transformers_dict`:
quant_method "awq", bits, group_size, zero_point, version "gemm") and by AutoGPTQ/GPTQModel
(quant_method "gptq", bits, group_size, desc_act, sym, checkpoint_format/format "gptq" = v1):
- AWQ GEMM: 4-bit with zero points, any group size (or -1, one group per column).
- GPTQ v1: 4- or 8-bit, symmetric or not, any group size or -1, desc_act (g_idx).
Everything else is refused by name: other bit widths (3-bit GPTQ packs across words), AWQ GEMV /
GEMV-fast / Marlin packings, GPTQ's v2 zero points and Marlin / BitBLAS checkpoint formats, AWQ
without zero points, GPTQModel's per-module `dynamic` overrides and a quantized lm_head.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from engine.config import ConfigError

METHODS = ("awq", "gptq")
# vLLM's names for the faster kernels of the same checkpoint formats: same weights, our kernels.
ALIASES = {"awq": "awq", "awq_marlin": "awq", "gptq": "gptq", "gptq_marlin": "gptq"}


@dataclass(frozen=True)
class QuantConfig:
    method: str  # "awq" | "gptq": the on-disk format of the checkpoint's tensors
    bits: int
    group_size: int  # -1: one group over the whole input dimension
    desc_act: bool = False  # GPTQ act-order: g_idx maps each input row to its group
    sym: bool = True  # GPTQ symmetric (zero point 2**(bits-1)); AWQ always has zero points
    modules_to_not_convert: tuple[str, ...] = field(default=())  # AWQ: layers left in 16-bit

    def group_size_for(self, in_features: int) -> int:
        return in_features if self.group_size == -1 else self.group_size

    def skips(self, module_name: str) -> bool:
        """A layer the checkpoint keeps dense (AWQ's modules_to_not_convert: name pieces, as vLLM)."""
        return any(piece in module_name for piece in self.modules_to_not_convert)


def _get(qc: dict, *keys, default=None):
    for key in keys:
        if key in qc:
            return qc[key]
    return default


def _check_group(method: str, group_size) -> int:
    if not isinstance(group_size, int) or (group_size != -1 and group_size < 1):
        raise ConfigError(f"quantization_config: {method} group_size must be -1 or a positive integer, "
                          f"got {group_size!r}")
    return group_size


def parse_awq(qc: dict) -> QuantConfig:
    bits = _get(qc, "bits", "w_bit")
    version = str(_get(qc, "version", default="gemm")).lower()
    if version != "gemm":
        raise ConfigError(f"quantization_config: AWQ version {version!r} is not supported; only AutoAWQ's "
                          "'gemm' packing is (GEMV, GEMV-fast and Marlin interleave differently)")
    if bits != 4:
        raise ConfigError(f"quantization_config: AWQ with bits={bits!r} is not supported; AWQ GEMM is 4-bit")
    if _get(qc, "zero_point", default=True) is not True:
        raise ConfigError("quantization_config: AWQ with zero_point=false is not supported (the GEMM format "
                          "stores zero points)")
    group = _check_group("awq", _get(qc, "group_size", "q_group_size", default=128))
    skip = tuple(_get(qc, "modules_to_not_convert", default=None) or ())
    return QuantConfig("awq", 4, group, modules_to_not_convert=skip)


def parse_gptq(qc: dict) -> QuantConfig:
    bits = qc.get("bits")
    if bits not in (4, 8):
        raise ConfigError(f"quantization_config: GPTQ with bits={bits!r} is not supported; 4 and 8 are "
                          "(3-bit codes straddle int32 words, 2-bit is not built)")
    fmt = str(_get(qc, "checkpoint_format", "format", default="gptq")).lower()
    if qc.get("is_marlin_format"):
        fmt = "marlin"
    if fmt != "gptq":
        raise ConfigError(f"quantization_config: GPTQ checkpoint_format {fmt!r} is not supported; only "
                          "'gptq' (v1: zero points stored minus one) is (v2 zero points, Marlin and BitBLAS "
                          "repack the tensors)")
    if qc.get("dynamic"):
        raise ConfigError("quantization_config: GPTQModel's per-module 'dynamic' overrides are not supported")
    if qc.get("lm_head"):
        raise ConfigError("quantization_config: a quantized lm_head (lm_head=true) is not supported")
    group = _check_group("gptq", qc.get("group_size", 128))
    return QuantConfig("gptq", bits, group, desc_act=bool(qc.get("desc_act", False)),
                       sym=bool(qc.get("sym", True)))


def from_hf_config(hf_config) -> QuantConfig | None:
    """The checkpoint's quantization, or None for a dense checkpoint."""
    qc = getattr(hf_config, "quantization_config", None)
    if qc is None:
        return None
    if not isinstance(qc, dict):
        qc = qc.to_dict() if hasattr(qc, "to_dict") else vars(qc)
    method = str(qc.get("quant_method", "")).lower()
    if method == "awq":
        return parse_awq(qc)
    if method == "gptq":
        return parse_gptq(qc)
    raise ConfigError(f"quantization_config: quant_method {method or '(none)'!r} is not supported; "
                      f"supported: {', '.join(METHODS)}")


def normalize_option(option: str | None) -> str | None:
    """The `quantization=` option as a method name (vLLM's marlin aliases accepted), checked early."""
    if option is None:
        return None
    method = ALIASES.get(str(option).lower())
    if method is None:
        raise ConfigError(f"quantization={option!r} is not supported; choose from {', '.join(ALIASES)} "
                          "(or leave it unset: the checkpoint's config.json says)")
    return method


def resolve(option: str | None, hf_config) -> QuantConfig | None:
    """The checkpoint's quantization, which `quantization=` (when given) must name."""
    method = normalize_option(option)
    found = from_hf_config(hf_config)
    if method is not None and found is None:
        raise ConfigError(f"quantization={option!r} was asked for, but the checkpoint's config.json has no "
                          "quantization_config: it is not quantized")
    if method is not None and found.method != method:
        raise ConfigError(f"quantization={option!r} does not match the checkpoint, which is quantized with "
                          f"{found.method!r} (config.json quantization_config)")
    return found
