"""Shared by the quantization tests: quantized `tiny` checkpoints written by our quantizer (cached in
the test preset cache), and the same weights dequantized to a plain float32 checkpoint."""
from __future__ import annotations

import json
import shutil
from functools import cache
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from engine.quantization import formats
from engine.quantization.config import from_hf_config
from tests.engine_helpers import model_dir
from workbench.quantize.writer import QuantizeSpec, quantize_model

# name -> spec; calibrated GPTQ on a small slice of the built-in text, to stay fast.
SPECS = {
    "awq4-g128": QuantizeSpec("awq", 4, 128, calibrate=False),
    "awq4-g32": QuantizeSpec("awq", 4, 32, calibrate=False),
    "gptq4-g32-act": QuantizeSpec("gptq", 4, 32, desc_act=True, sym=False, seq_len=64, max_samples=4),
    "gptq8-sym": QuantizeSpec("gptq", 8, 128, sym=True, calibrate=False),
}


@cache
def quantized_dir(name: str, base: str = "tiny") -> Path:
    out = model_dir(base).parent / f"test-quant-{base}-{name}"
    if not (out / "config.json").is_file():
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        quantize_model(model_dir(base), tmp, SPECS[name], log=lambda _m: None)
        tmp.rename(out)
    return out


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        return {n: f.get_tensor(n) for n in f.keys()}


def layer_codes(tensors: dict, base: str, qc) -> formats.QuantWeights:
    """One layer's codes as the file holds them, through the format's reader."""
    parts = {k: tensors[f"{base}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx") if f"{base}.{k}" in tensors}
    if qc.method == "awq":
        return formats.from_awq(parts, qc.group_size)
    return formats.from_gptq(parts, qc.bits, qc.group_size)


@cache
def dequantized_dir(name: str, base: str = "tiny") -> Path:
    """The quantized checkpoint's weights, dequantized to float32, as a plain dense checkpoint."""
    qdir = quantized_dir(name, base)
    out = qdir.with_name(qdir.name + "-dequantized")
    if (out / "config.json").is_file():
        return out
    config = json.loads((qdir / "config.json").read_text())

    class _HF:
        quantization_config = config.pop("quantization_config")

    qc = from_hf_config(_HF)
    tensors, dense = read_tensors(qdir), {}
    for tensor_name, t in tensors.items():
        stem, _, kind = tensor_name.rpartition(".")
        if kind in ("qzeros", "scales", "g_idx"):
            continue
        if kind == "qweight":
            dense[f"{stem}.weight"] = layer_codes(tensors, stem, qc).dequantize().t().contiguous()
        else:
            dense[tensor_name] = t.float()
    out.mkdir(parents=True, exist_ok=True)
    save_file(dense, str(out / "model.safetensors"))
    config["torch_dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for f in qdir.iterdir():
        if f.name not in ("config.json", "model.safetensors"):
            shutil.copy2(f, out / f.name)
    return out
