"""AWQ (Lin et al. 2023, arXiv:2306.00978) as AutoAWQ runs it (casper-hansen/AutoAWQ
awq/quantize/quantizer.py `_search_best_scale`, `_compute_best_scale`, `_search_best_clip`), per
decoder layer: an activation-aware scale search, then a weight clipping search, then round to nearest.

Scales: input channels that see large activations matter most; scaling such a channel's weights up
by s (and the input down by s, folded into the operation before) shrinks their relative rounding
error. For each group of linears that share an input, s = mean|x|^a / mean|w~|^(1-a) (AutoAWQ's
default `duo_scaling`; w~ is |w| over its quantization group's max), normalised by sqrt(max * min),
a on a 20-point grid in [0, 1), chosen by the mean squared error of the output of the block the group
feeds -- the whole attention for q/k/v, the whole MLP for gate/up, the linear itself for o and down
-- with the group's weights quantized, against the float output. The groups and their preceding
operations are AutoAWQ's for Llama (awq/models/llama.py `get_layers_for_scaling`): input_layernorm
-> q/k/v, v_proj -> o_proj (only when their shapes match: not under GQA), post_attention_layernorm
-> gate/up, up_proj -> down_proj.

Clipping: per output channel and group, the weights are clamped to +-r * max|w| before quantizing,
r in 1, 0.95, ..., 0.55 chosen by the squared error of that group's share of the output on the
calibration inputs (after the scales). Skipped for q and k, as AutoAWQ does: their error passes
through the attention scores, which a per-linear output error does not see.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from workbench.quantize.rtn import Grid, fake_quantize

N_GRID = 20
LOSS_TOKENS = 1024  # the losses on about this many tokens (whole sequences for attention), for CPU time
CLIP_GRID, CLIP_MAX_SHRINK, CLIP_TOKENS = 20, 0.5, 512  # AutoAWQ's `_compute_best_clip` defaults
NO_CLIP = ("q_proj", "k_proj")


def scale_groups(layer, proj: dict[str, nn.Linear], attention: Callable) -> list[tuple[nn.Module, list[str], Callable]]:
    """(preceding operation, linears sharing its output, the block whose output the loss compares)."""
    groups = [(layer.input_layernorm, ["q_proj", "k_proj", "v_proj"], attention)]
    if proj["v_proj"].weight.shape == proj["o_proj"].weight.shape:
        groups.append((proj["v_proj"], ["o_proj"], proj["o_proj"]))
    groups += [(layer.post_attention_layernorm, ["gate_proj", "up_proj"], layer.mlp),
               (proj["up_proj"], ["down_proj"], proj["down_proj"])]
    return groups


def _grouped_abs_mean(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """Per input channel, the mean over output rows of |w| / max|w| of its quantization group. w [N, K]."""
    n, k = w.shape
    pad = (-k) % group_size
    a = torch.cat([w.abs(), w.new_zeros(n, pad)], dim=1).view(n, -1, group_size)
    return (a / (a.amax(dim=2, keepdim=True) + 1e-6)).view(n, -1)[:, :k].mean(dim=0)


@torch.no_grad()
def search_scale(x: torch.Tensor, linears: list[nn.Linear], block: Callable, grid: Grid,
                 group_size: int) -> torch.Tensor:
    """The best per-input-channel scale s [K] for `linears` ([N_i, K] each) on inputs x [..., K]: the
    one whose quantized weights change `block`'s output on x least. The linears are left as they were."""
    originals = [lin.weight.detach().clone() for lin in linears]
    w = torch.cat(originals, dim=0).float()
    x_mean = x.abs().reshape(-1, x.shape[-1]).mean(dim=0)
    w_mean = _grouped_abs_mean(w, group_size)
    reference = block(x)
    best, best_loss = torch.ones_like(x_mean), float("inf")
    try:
        for step in range(N_GRID):
            a = step / N_GRID
            s = (x_mean.pow(a) / (w_mean.pow(1 - a) + 1e-4)).clamp(min=1e-4)
            s = s / (s.max() * s.min()).sqrt()
            for lin, orig in zip(linears, originals):  # Q(W s) / s
                lin.weight.copy_(fake_quantize((orig * s).t(), grid, group_size).t() / s)
            loss = (block(x) - reference).pow(2).mean().item()
            if loss < best_loss:
                best, best_loss = s, loss
    finally:
        for lin, orig in zip(linears, originals):
            lin.weight.copy_(orig)
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


def scale_layer(layer, proj: dict[str, nn.Linear], inputs: dict[str, torch.Tensor], attention: Callable,
                grid: Grid, group_size: int) -> None:
    """Search and fold every scale group of one decoder layer (the scales' mean|x| on all the tokens,
    the losses on a subset). `inputs` [batch, seq, K] are captured
    before any folding, and each search sees the float weights of the groups not yet searched: folding
    leaves every block's float output unchanged (the earlier groups' scales are folded, not quantized)."""
    for prev, names, block in scale_groups(layer, proj, attention):
        k = proj[names[0]].in_features
        x = inputs[names[0]]  # [batch, seq, K]
        if block is attention:  # whole sequences, about LOSS_TOKENS tokens of them
            x = x[:max(1, LOSS_TOKENS // x.shape[1])]
        else:  # token-wise blocks: an even subset of the tokens
            x = x.reshape(-1, k)[::max(1, x.numel() // k // LOSS_TOKENS)]
        s = search_scale(x, [proj[n] for n in names], block, grid, k if group_size == -1 else group_size)
        fold_scale(prev, [proj[n] for n in names], s)


@torch.no_grad()
def clip_weight(weight: torch.Tensor, x: torch.Tensor, grid: Grid, group_size: int) -> torch.Tensor:
    """weight [N, K] clamped per output channel and group to the shrink of its max|w| whose quantized
    group output on x [T, K] is closest to the float one (AutoAWQ's `_compute_best_clip`)."""
    n, k = weight.shape
    pad = (-k) % group_size
    w = weight.float()
    w = torch.cat([w, w[:, -1:].expand(n, pad)], dim=1) if pad else w  # a copied column: same min and max
    x = x.reshape(-1, k)[::max(1, x.numel() // k // CLIP_TOKENS)].float()
    x = torch.cat([x, x.new_zeros(x.shape[0], pad)], dim=1) if pad else x  # padded inputs add nothing
    g = w.shape[1] // group_size
    wg = w.view(n, g, group_size).permute(1, 2, 0)  # [G, gs, N]
    xg = x.view(-1, g, group_size).transpose(0, 1)  # [G, T, gs]
    reference = torch.bmm(xg, wg)  # [G, T, N]: each group's share of the output
    absmax = wg.abs().amax(dim=1, keepdim=True)  # [G, 1, N]
    best_max, best_err = absmax.clone(), torch.full_like(absmax, float("inf"))
    for step in range(int(CLIP_MAX_SHRINK * CLIP_GRID)):
        max_val = absmax * (1 - step / CLIP_GRID)
        clipped = torch.maximum(torch.minimum(wg, max_val), -max_val)
        q = fake_quantize(clipped.reshape(-1, n), grid, group_size).view_as(wg)
        err = (torch.bmm(xg, q) - reference).pow(2).mean(dim=1, keepdim=True)  # [G, 1, N]
        better = err < best_err
        best_err, best_max = torch.where(better, err, best_err), torch.where(better, max_val, best_max)
    clipped = torch.maximum(torch.minimum(wg, best_max), -best_max)
    return clipped.permute(2, 0, 1).reshape(n, -1)[:, :k].to(weight.dtype)


def clip_layer(proj: dict[str, nn.Linear], inputs: dict[str, torch.Tensor], grid: Grid, group_size: int) -> None:
    """Clip every linear but q and k, on the inputs they see after the scales are folded."""
    for name, lin in proj.items():
        if name not in NO_CLIP:
            size = lin.in_features if group_size == -1 else group_size
            lin.weight.copy_(clip_weight(lin.weight, inputs[name], grid, size))
