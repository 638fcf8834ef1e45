"""The calibrated algorithms over a whole model: AWQ's scales then round-to-nearest, or GPTQ, decoder
layer by decoder layer (workbench/quantize/calibrate.py runs the layers)."""
from __future__ import annotations

from pathlib import Path

import torch

from engine.quantization.formats import QuantWeights
from workbench.quantize.awq import scale_layer
from workbench.quantize.calibrate import PROJECTIONS, LayerRunner, calibration_ids
from workbench.quantize.gptq import gptq, hessian, one_thread
from workbench.quantize.rtn import grid_for, rtn

# GPTQ's true-sequential order: projections that share an input are quantized together; each later
# step sees the outputs of the quantized earlier ones.
GPTQ_STEPS = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",))


def calibrated_weights(src: Path, spec, calib_text: str | None, log) -> tuple[dict[str, QuantWeights], dict]:
    """(codes by checkpoint weight name, every float tensor of the model afterwards: AWQ changes norms)."""
    from engine.model_loader import load_tokenizer
    from workbench.bench.quality import load_text

    text, text_name = load_text(calib_text)
    ids = calibration_ids(load_tokenizer(src), text, spec.seq_len, spec.max_samples)
    log(f"calibrating on {ids.numel():,} tokens of {text_name} ({ids.shape[0]} windows of {ids.shape[1]})")
    runner = LayerRunner(src, ids)
    grid = grid_for(spec.method, spec.bits, spec.sym)
    codes = {}
    with one_thread():  # small and medium ops throughout: see gptq.one_thread
        for i in range(len(runner.layers)):
            codes |= _quantize_layer(runner, i, spec, grid)
            runner.advance(i)
            log(f"layer {i + 1}/{len(runner.layers)} quantized")
    return codes, dict(runner.model.state_dict())


def _quantize_layer(runner: LayerRunner, i: int, spec, grid) -> dict[str, QuantWeights]:
    proj = runner.projections(i)
    if spec.method == "awq":
        layer_codes = _awq_layer(runner, i, proj, grid, spec.group_size)
    else:
        layer_codes = _gptq_layer(runner, i, proj, grid, spec)
    return {f"model.layers.{i}.{PROJECTIONS[n]}.{n}.weight": q for n, q in layer_codes.items()}


def _effective(group_size: int, k: int) -> int:
    return k if group_size == -1 else group_size


@torch.no_grad()
def _awq_layer(runner: LayerRunner, i: int, proj: dict, grid, group_size: int) -> dict[str, QuantWeights]:
    inputs = runner.inputs(i, list(proj))
    scale_layer(runner.layers[i], proj, inputs, grid, group_size)
    out = {}
    for name, lin in proj.items():
        out[name] = rtn(lin.weight.float().t(), grid, _effective(group_size, lin.in_features))
        lin.weight.copy_(out[name].dequantize().t())  # the next layers calibrate on the quantized outputs
    return out


@torch.no_grad()
def _gptq_layer(runner: LayerRunner, i: int, proj: dict, grid, spec) -> dict[str, QuantWeights]:
    out = {}
    for step in GPTQ_STEPS:
        h = hessian(runner.inputs(i, [step[0]])[step[0]])
        for name in step:
            lin = proj[name]
            out[name] = gptq(lin.weight, h, grid, _effective(spec.group_size, lin.in_features), spec.desc_act)
            lin.weight.copy_(out[name].dequantize().t())
    return out
