"""The calibrated algorithms' pieces on synthetic weights: AWQ's scale and clipping searches never do
worse than plain round to nearest on what they measure, and leave the layers as they found them."""
from __future__ import annotations

import torch
from torch import nn

from workbench.quantize.awq import clip_weight, fold_scale, search_scale
from workbench.quantize.rtn import Grid, fake_quantize

GRID = Grid(4)


def outlier_inputs(t: int, k: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(t, k, generator=gen)
    x[:, :3] *= 30  # a few channels with large activations: what AWQ protects
    return x


def output_error(x, w, quantized) -> float:
    return (x @ quantized.t() - x @ w.t()).pow(2).mean().item()


def test_scale_search_beats_round_to_nearest_and_restores_the_weights():
    k, n, gs = 96, 40, 32
    x = outlier_inputs(256, k)
    lin = nn.Linear(k, n, bias=False)
    before = lin.weight.detach().clone()
    s = search_scale(x, [lin], lin, GRID, gs)
    assert torch.equal(lin.weight, before)
    w = before.float()
    plain = output_error(x, w, fake_quantize(w.t(), GRID, gs).t())
    scaled = output_error(x, w, fake_quantize((w * s).t(), GRID, gs).t() / s)
    assert scaled < 0.9 * plain  # the outlier channels make the identity scale clearly worse
    prev = nn.Linear(8, k, bias=True)
    x_in = torch.randn(5, 8)
    y = lin(prev(x_in))
    fold_scale(prev, [lin], s)
    torch.testing.assert_close(lin(prev(x_in)), y, rtol=1e-4, atol=1e-4)  # folding keeps the float output


def test_clipping_only_shrinks_weights_and_never_raises_the_output_error():
    k, n, gs = 80, 24, 32  # 80 = 2 x 32 + 16: a shorter last group
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(n, k, generator=gen) * 0.02
    w[:, 5] = 0.5  # one large weight per row stretches its group's grid
    x = torch.randn(300, k, generator=gen)
    clipped = clip_weight(w, x, GRID, gs)
    assert clipped.shape == w.shape
    assert (clipped.abs() <= w.abs() + 1e-7).all()
    plain = output_error(x, w, fake_quantize(w.t(), GRID, gs).t())
    better = output_error(x, w, fake_quantize(clipped.t(), GRID, gs).t())
    assert better <= plain
