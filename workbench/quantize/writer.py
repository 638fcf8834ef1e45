"""A quantized checkpoint from a dense Hugging Face directory: the linear layers of every decoder
layer in AWQ GEMM or GPTQ v1 tensors (engine/quantization/formats.py), everything else as it was,
config.json with its `quantization_config`, the tokenizer and generation config copied."""
from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from engine.model_loader import checkpoint_files
from engine.quantization.formats import QuantWeights, to_awq, to_gptq
from workbench.quantize.rtn import grid_for, rtn

LINEAR = re.compile(r"^model\.layers\.(\d+)\.(self_attn|mlp)\.(q|k|v|o|gate|up|down)_proj\.weight$")
COPIED = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
          "vocab.json", "merges.txt", "chat_template.jinja")


@dataclass(frozen=True)
class QuantizeSpec:
    method: str  # awq | gptq
    bits: int = 4
    group_size: int = 128
    desc_act: bool = False
    sym: bool = True  # GPTQ only; AWQ always has zero points
    calibrate: bool = True  # False: round to nearest
    seq_len: int = 512
    max_samples: int = 128

    def check(self) -> None:
        if self.method not in ("awq", "gptq"):
            raise ValueError(f"--method must be awq or gptq, got {self.method!r}")
        if self.method == "awq" and self.bits != 4:
            raise ValueError(f"AWQ GEMM is 4-bit; --bits {self.bits} needs --method gptq")
        if self.bits not in (4, 8):
            raise ValueError(f"--bits must be 4 or 8, got {self.bits}")
        if self.method == "awq" and self.desc_act:
            raise ValueError("--desc-act is GPTQ's act-order; AWQ has no g_idx")
        if self.desc_act and not self.calibrate:
            raise ValueError("--desc-act orders columns by the Hessian: it needs calibration (drop --rtn)")
        if self.group_size != -1 and self.group_size < 1:
            raise ValueError(f"--group-size must be -1 or positive, got {self.group_size}")

    def quantization_config(self) -> dict:
        if self.method == "awq":
            return {"quant_method": "awq", "bits": 4, "group_size": self.group_size, "zero_point": True,
                    "version": "gemm", "modules_to_not_convert": None}
        return {"quant_method": "gptq", "bits": self.bits, "group_size": self.group_size,
                "desc_act": self.desc_act, "sym": self.sym, "damp_percent": 0.01, "true_sequential": True,
                "static_groups": False, "lm_head": False, "checkpoint_format": "gptq",
                "meta": {"quantizer": ["pagedbench"], "calibrated": self.calibrate}}


def read_dense(model_dir: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in checkpoint_files(model_dir):
        with safe_open(str(file), framework="pt") as f:
            tensors |= {name: f.get_tensor(name) for name in f.keys()}
    return tensors


def quantize_model(src: Path, out: Path, spec: QuantizeSpec, calib_text: str | None = None, log=print) -> Path:
    spec.check()
    config = json.loads((src / "config.json").read_text())
    if config.get("quantization_config"):
        raise ValueError(f"{src} is already quantized ({config['quantization_config'].get('quant_method')})")
    dense = read_dense(src)
    targets = sorted((n for n in dense if LINEAR.match(n)), key=_layer_order)
    if not targets:
        raise ValueError(f"{src}: no decoder linear layers (model.layers.N.*_proj.weight) to quantize")
    if spec.calibrate:
        from workbench.quantize.calibrated import calibrated_weights

        codes, updated = calibrated_weights(src, spec, calib_text, log)
        dense |= {name: t.to(dense[name].dtype) for name, t in updated.items() if name in dense}
    else:
        grid = grid_for(spec.method, spec.bits, spec.sym)
        codes = {}
        for name in targets:
            w = dense[name].float().t()
            codes[name] = rtn(w, grid, w.shape[0] if spec.group_size == -1 else spec.group_size)
    write_checkpoint(src, out, spec, dense, codes, config)
    return out


def write_checkpoint(src: Path, out: Path, spec: QuantizeSpec, dense: dict, codes: dict[str, QuantWeights],
                     config: dict) -> None:
    tensors = {}
    for name, t in dense.items():
        if name not in codes:
            tensors[name] = t.contiguous()
            continue
        base = name.removesuffix(".weight")
        packed = to_awq(codes[name]) if spec.method == "awq" else to_gptq(codes[name])
        tensors |= {f"{base}.{k}": v.contiguous() for k, v in packed.items()}
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config["quantization_config"] = spec.quantization_config()
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for name in COPIED:
        if (src / name).is_file():
            shutil.copy2(src / name, out / name)


def _layer_order(name: str) -> tuple[int, str]:
    m = LINEAR.match(name)
    return int(m.group(1)), name
