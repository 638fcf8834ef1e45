"""AWQ's activation-aware scale search (Lin et al. 2023, arXiv:2306.00978; AutoAWQ's
`_search_best_scale`, casper-hansen/AutoAWQ awq/quantize/quantizer.py), per decoder layer.

Input channels that see large activations matter most; scaling such a channel's weights up by s
(and the input down by s, folded into the operation before) shrinks their relative rounding error.
For each group of linears that share an input, s = mean|x|^alpha (normalised by sqrt(max * min)),
alpha on a grid of 20 points in [0, 1), is chosen by the mean squared error of the group's outputs
with the weights quantized, against the float outputs. The groups and their preceding operations are
AutoAWQ's for Llama (awq/models/llama.py `get_layers_for_scaling`): input_layernorm -> q/k/v,
v_proj -> o_proj (only when their shapes match: not under GQA), post_attention_layernorm -> gate/up,
up_proj -> down_proj. Not done here: AutoAWQ's optional weight clipping search (`auto_clip`) and its
`duo_scaling` variant that also divides by the weights' mean magnitude.
"""
from __future__ import annotations

import torch
from torch import nn

from workbench.quantize.rtn import Grid, fake_quantize

N_GRID = 20
LOSS_TOKENS = 1024  # the grid's losses on an even subset of the calibration tokens (the scales' mean|x| uses all)


def scale_groups(layer, proj: dict[str, nn.Linear]) -> list[tuple[nn.Module, list[str]]]:
    groups = [(layer.input_layernorm, ["q_proj", "k_proj", "v_proj"])]
    if proj["v_proj"].weight.shape == proj["o_proj"].weight.shape:
        groups.append((proj["v_proj"], ["o_proj"]))
    groups += [(layer.post_attention_layernorm, ["gate_proj", "up_proj"]), (proj["up_proj"], ["down_proj"])]
    return groups


@torch.no_grad()
def search_scale(x: torch.Tensor, weights: list[torch.Tensor], grid: Grid, group_size: int) -> torch.Tensor:
    """The best per-input-channel scale s [K] for linears `weights` ([N_i, K] each) on inputs x [T, K]."""
    w = torch.cat(weights, dim=0).float()  # [N, K]
    x_mean = x.abs().mean(dim=0)
    x = x[::max(1, x.shape[0] // LOSS_TOKENS)]
    reference = x @ w.t()
    best, best_loss = torch.ones_like(x_mean), float("inf")
    for step in range(N_GRID):
        s = x_mean.pow(step / N_GRID).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        quantized = fake_quantize((w * s).t(), grid, group_size).t() / s  # Q(W s) / s, [N, K]
        loss = (x @ quantized.t() - reference).pow(2).mean().item()
        if loss < best_loss:
            best, best_loss = s, loss
    return best


@torch.no_grad()
def fold_scale(prev: nn.Module, linears: list[nn.Linear], s: torch.Tensor) -> None:
    """x / s into the operation before (a norm's weight, or a linear's output rows), W * s into the layers."""
    if isinstance(prev, nn.Linear):
        prev.weight.div_(s.view(-1, 1))
        if prev.bias is not None:
            prev.bias.div_(s)
    else:  # RMSNorm: y = x_normed * weight
        prev.weight.div_(s)
    for lin in linears:
        lin.weight.mul_(s.view(1, -1))


def scale_layer(layer, proj: dict[str, nn.Linear], inputs: dict[str, torch.Tensor], grid: Grid,
                group_size: int) -> None:
    """Search and fold every scale group of one decoder layer (inputs captured before any folding:
    folding leaves every linear's float output unchanged)."""
    for prev, names in scale_groups(layer, proj):
        k = proj[names[0]].in_features
        s = search_scale(inputs[names[0]], [proj[n].weight for n in names], grid, k if group_size == -1 else group_size)
        fold_scale(prev, [proj[n] for n in names], s)
