"""AWQ's searches and the grids they quantise on, one weight or one group of Linears at a time: the rtn grid
with fp16-rounded scales and its fast fake quantisation, the activation-aware scales s = s_x^α and the α search on a
block's output MSE (search_alpha: the weights are restored afterwards), the per-(row, group) clipping search on the
Gram blocks of the inputs (search_clip), and the final QuantLinear of a Linear on its clipped grid. What is searched
for which group, and where the scales are folded, is awq.py's and awq_layout.py's.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from budgetlm.methods.quant.layers import QuantLinear
from budgetlm.methods.quant.quantizer import Grid, dequantize, find_grid, quantize

if TYPE_CHECKING:
    from budgetlm.methods.quant.awq import AWQ

FP16_TINY, FP16_MAX = 2.0**-24, 65504.0


# ----------------------------------------------------------------------------------------------- quantiser


def awq_grid(w: torch.Tensor, cfg: AWQ) -> Grid:
    """The rtn grid of w with scales rounded to fp16 (QuantLinear stores them in fp16): codes are chosen on the
    grid the layer will compute with."""
    grid = find_grid(w, cfg.bits, cfg.group_size, cfg.symmetric)
    grid.scales = grid.scales.clamp(FP16_TINY, FP16_MAX).half().float()
    return grid


def fake_quantize(w: torch.Tensor, cfg: AWQ) -> torch.Tensor:
    """dequantize(quantize(w, grid), grid) on awq_grid(w), computed per group by broadcasting (the same
    arithmetic without expanding the scales to the weight's shape: the searches call this hundreds of times)."""
    grid = awq_grid(w, cfg)
    out_f, in_f = w.shape
    wg = w.float().reshape(out_f, grid.scales.shape[1], -1)
    scale = grid.scales.unsqueeze(-1)
    if grid.zeros is None:
        half = 2 ** (cfg.bits - 1)
        q = torch.clamp(torch.round(wg / scale), -half, half - 1)
        return (q * scale).reshape(out_f, in_f)
    zero = grid.zeros.unsqueeze(-1)
    q = torch.clamp(torch.round(wg / scale) + zero, 0, grid.qmax)
    return ((q - zero) * scale).reshape(out_f, in_f)


def clip_weight(w: torch.Tensor, shrink: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """w clamped per (row, group) to ±max|w|·shrink; shrink is [out, n_groups]."""
    out_f, in_f = w.shape
    g = group_size or in_f
    wg = w.float().reshape(out_f, in_f // g, g)
    lim = wg.abs().amax(-1, keepdim=True) * shrink.unsqueeze(-1)
    return torch.maximum(torch.minimum(wg, lim), -lim).reshape(out_f, in_f)


# ----------------------------------------------------------------------------------------------- scales


def awq_scales(s_x: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = s_x^α / √(max(s_x^α)·min(s_x^α)), in log space: equal s_x give exactly s = 1 for every α. Channels
    with (almost) no activation are floored at 1e-6 of the largest so the logarithm stays finite."""
    s_x = s_x.double()
    floor = max(float(s_x.max()) * 1e-6, 1e-30)
    lx = s_x.clamp_min(floor).log()
    mid = (lx.max() + lx.min()) / 2
    return torch.exp(alpha * (lx - mid)).float()


def block_mse(out: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
    err = sum(float((o.float() - r.float()).pow(2).sum()) for o, r in zip(out, ref, strict=True))
    return err / max(sum(r.numel() for r in ref), 1)


@dataclass
class ScaleSearch:
    alpha: float
    scales: torch.Tensor
    losses: list[float]  # block MSE per α on the grid; losses[0] (α = 0) is plain rtn of the group


@torch.no_grad()
def search_alpha(
    linears: list[nn.Linear],
    s_x: torch.Tensor,
    block: Callable[[], list[torch.Tensor]],
    cfg: AWQ,
    quantized: list[bool] | None = None,
) -> ScaleSearch:
    """The α whose scales give the least block-output MSE when the `quantized` linears (default: all) use
    Q(W·diag(s))·diag(s)⁻¹; `block()` runs the block on the search inputs with the linears' current weights.
    The weights are restored before returning; the smallest α wins ties."""
    quantized = quantized if quantized is not None else [True] * len(linears)
    ref = block()
    originals = [lin.weight.data.clone() for lin in linears]
    losses: list[float] = []
    best_loss, best_alpha = math.inf, 0.0
    try:
        for k in range(cfg.n_grid):
            alpha = k / cfg.n_grid
            s = awq_scales(s_x, alpha)
            for lin, w0, q in zip(linears, originals, quantized, strict=True):
                if q:
                    ws = w0.float() * s
                    lin.weight.data.copy_((fake_quantize(ws, cfg) / s).to(w0.dtype))
            loss = block_mse(block(), ref)
            losses.append(loss)
            if loss < best_loss:
                best_loss, best_alpha = loss, alpha
    finally:
        for lin, w0 in zip(linears, originals, strict=True):
            lin.weight.data.copy_(w0)
    return ScaleSearch(best_alpha, awq_scales(s_x, best_alpha), losses)


# ----------------------------------------------------------------------------------------------- clipping


def group_gram(x: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """Per-group Gram blocks X_gᵀX_g / n: [n_groups, g, g] from inputs [n, in]."""
    n, in_f = x.shape
    g = group_size or in_f
    xg = x.float().reshape(n, in_f // g, g).transpose(0, 1)  # [G, n, g]
    return torch.bmm(xg.transpose(1, 2), xg) / max(n, 1)


@torch.no_grad()
def search_clip(w: torch.Tensor, gram: torch.Tensor, cfg: AWQ) -> torch.Tensor:
    """Per (row, group) shrink factor of the range with the least partial-output error dᵀ(X_gᵀX_g)d, where d is
    the group's rounding error; returns [out, n_groups]."""
    out_f, in_f = w.shape
    g = cfg.group_size or in_f
    n_groups = in_f // g
    w = w.float()
    best_err = torch.full((out_f, n_groups), math.inf)
    best = torch.ones(out_f, n_groups)
    for i in range(cfg.clip_steps):
        f = 1.0 - i / cfg.clip_grid
        shrink = torch.full((out_f, n_groups), f)
        d = (w - fake_quantize(clip_weight(w, shrink, cfg.group_size), cfg)).reshape(out_f, n_groups, g)
        err = (torch.einsum("ogk,gkl->ogl", d, gram) * d).sum(-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, shrink, best)
    return best


def quantize_linear(lin: nn.Linear, cfg: AWQ, shrink: torch.Tensor | None) -> tuple[QuantLinear, float]:
    """A QuantLinear of lin's current weight on its (clipped) grid, and the relative weight MSE."""
    w = lin.weight.data.float()
    wc = clip_weight(w, shrink, cfg.group_size) if shrink is not None else w
    grid = awq_grid(wc, cfg)
    codes = quantize(wc, grid)
    err = (dequantize(codes, grid) - w).pow(2).mean() / w.pow(2).mean().clamp_min(1e-12)
    return QuantLinear.from_codes(codes, grid, lin.bias), float(err)
