"""awq: activation-aware weight quantisation (Lin et al., arXiv 2306.00978).

A few input channels of each Linear carry much larger activations than the rest; their weights matter more. AWQ
multiplies those weight columns by a per-input-channel factor s before quantising (so they get relatively finer
steps) and divides the activations by s, which costs nothing at inference because 1/s is folded into the op that
produces the Linear's input:

    y = W x = (W·diag(s)) (diag(s)⁻¹ x)   →   W' = Q(W·diag(s)), and the preceding op's output channels ÷ s.

Per decoder layer (calibrated layer by layer with LayerwiseCalibration, on the inputs the already-quantised
earlier layers produce), for each group of Linears that share an input and whose input comes from an op that can
absorb 1/s:
  1. q/k/v ← input_layernorm,               block output: self_attn's output;
  2. gate/up ← the norm before the MLP      (post_attention_layernorm for Llama, pre_feedforward_layernorm for
     Gemma 3), block output: mlp's output;
  3. o ← v (only without grouped-query attention, v_proj.out_features == o_proj.in_features; otherwise o_proj is
     quantised without scales), block output: self_attn's output;
  4. down ← up,                             block output: down_proj's output.
s_x = mean |x| per input channel over all calibration tokens; for α ∈ {0, 1/n_grid, …}: s = s_x^α normalised by
√(max(s)·min(s)) (computed in log space, so equal s_x give s = 1 exactly and every α ties with α = 0), the
group's weights become Q(W·diag(s))·diag(s)⁻¹ and the block output's MSE against the float block picks α (the
smallest α wins ties). The scales are then folded: the consumers' columns × s, the producer's output channels ÷ s
(an RMSNorm/LayerNorm weight and bias, or the rows and bias of v_proj/up_proj). Gemma's RMSNorm computes x·(1 + w),
so its weight becomes (1 + w)/s − 1; which form a norm has is detected numerically, and folding random scales into
a copy of the first decoder layer must leave its output unchanged before anything is changed.

Then a clipping search per Linear (not q/k, whose errors the attention scores amplify): per output row and group,
the range is clamped to ±max|w|·(1 − i/clip_grid) for i < max_shrink·clip_grid, and the shrink with the least
error of the group's partial output Σ_t (x_t,g · (w_g − Q(w_g)))² is kept. That error is computed over all
calibration tokens from the per-group Gram blocks X_gᵀX_g (exact and cheaper than the paper's token subsample).
Finally each Linear is quantised on its clipped grid into a QuantLinear with real packed storage.

Departure for the CPU: the α search runs the blocks on a subsample of `search_tokens` calibration tokens (whole
sequences for attention, a seeded random token sample for the token-wise MLP and down_proj); s_x and the clipping
statistics use all calibration tokens.

`embeddings: true` (off by default): after the decoder layers, the lm_head is quantised from its inputs (the final
norm's outputs on the quantised model). Untied: AWQ's α search on the logits' MSE over a `search_tokens` sample,
1/s folded into the final norm, then the clipping search. Tied: the clipping search only — scaling the columns
of a shared matrix would scale the input table's rows as well — and the table reads the lm_head's codes. An untied
input table is rounded to nearest (a lookup table has no input activations).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import ClassVar

import torch
from pydantic import field_validator, model_validator
from torch import nn

from budgetlm.errors import ModelError
from budgetlm.methods.base import (
    StepContext,
    StepReport,
    implements,
    register_method,
    select_linears,
    set_module,
)
from budgetlm.methods.calibration import InputStat, LayerwiseCalibration, decoder_layers, require_calibration
from budgetlm.methods.quant.embedding import (
    UNTIED_TABLE_NOTE,
    final_norm,
    find_embeddings,
    head_inputs,
    install_head,
    quantise_untied_table,
    stats_row,
)
from budgetlm.methods.quant.layers import QuantLinear
from budgetlm.methods.quant.quantizer import Grid, dequantize, find_grid, quantize
from budgetlm.methods.quant.rtn import GridConfig
from budgetlm.models.handle import ModelHandle

FP16_TINY, FP16_MAX = 2.0**-24, 65504.0


@register_method("awq")
class AWQ(GridConfig):
    """AWQ: activation-aware per-channel weight scales folded into the preceding op, plus a clipping search."""

    needs_calibration: ClassVar[bool] = True

    bits: int = 4
    group_size: int | None = 64  # None: one scale per output channel
    symmetric: bool = False
    n_grid: int = 20  # α ∈ {0, 1/n_grid, …, (n_grid − 1)/n_grid}
    clip: bool = True
    clip_grid: int = 20  # max ← max·(1 − i/clip_grid)
    max_shrink: float = 0.5  # … for i < max_shrink·clip_grid
    search_tokens: int = 512  # tokens sampled for the α search of mlp/down_proj (attention: the first batch)

    @field_validator("n_grid", "clip_grid", "search_tokens")
    @classmethod
    def _positive(cls, v: int) -> int:
        if v < 1:
            raise ValueError("must be a positive integer")
        return v

    @field_validator("max_shrink")
    @classmethod
    def _shrink(cls, v: float) -> float:
        if not 0.0 <= v < 1.0:
            raise ValueError("max_shrink must be in [0, 1) (0.5: try clipping the range down to half)")
        return v

    @model_validator(mode="after")
    def _steps(self) -> AWQ:
        if self.clip and self.clip_steps < 1:
            raise ValueError(f"clip_grid·max_shrink = {self.clip_grid * self.max_shrink:g} gives no clipping step")
        return self

    @property
    def clip_steps(self) -> int:
        return int(round(self.max_shrink * self.clip_grid))


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


# ----------------------------------------------------------------------------------------------- folding


def norm_kind(norm: nn.Module) -> str:
    """'mul' for norms computing x̂·w (+ b) (Llama RMSNorm, LayerNorm), 'one_plus' for x̂·(1 + w) (Gemma);
    detected numerically on a copy (weight 0 then 1). Anything else is a one-line ModelError."""
    w = getattr(norm, "weight", None)
    if not isinstance(w, torch.Tensor) or w.ndim != 1:
        raise ModelError(f"awq cannot fold scales into {type(norm).__name__}: it has no 1-D weight")
    probe = copy.deepcopy(norm).float()
    x = torch.randn(4, w.numel(), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        if getattr(probe, "bias", None) is not None:
            probe.bias.zero_()
        probe.weight.zero_()
        y0 = probe(x)
        probe.weight.fill_(1.0)
        y1 = probe(x)
    if y1.abs().max() > 0 and y0.abs().max() <= 1e-6 * y1.abs().max():
        return "mul"
    if y0.abs().max() > 0 and torch.allclose(y1, 2 * y0, rtol=1e-4, atol=1e-6):
        return "one_plus"
    raise ModelError(f"awq cannot fold scales into {type(norm).__name__}: its output is neither x·w nor x·(1+w)")


@torch.no_grad()
def fold_into_norm(norm: nn.Module, s: torch.Tensor, kind: str) -> None:
    """Divide the norm's output channels by s."""
    w = norm.weight.data
    new = w.float() / s if kind == "mul" else (1.0 + w.float()) / s - 1.0
    w.copy_(new.to(w.dtype))
    if getattr(norm, "bias", None) is not None:
        norm.bias.data.copy_((norm.bias.data.float() / s).to(norm.bias.dtype))


@torch.no_grad()
def fold_into_linear(prev: nn.Linear, s: torch.Tensor) -> None:
    """Divide the Linear's output channels (weight rows, bias) by s."""
    prev.weight.data.copy_((prev.weight.data.float() / s[:, None]).to(prev.weight.dtype))
    if prev.bias is not None:
        prev.bias.data.copy_((prev.bias.data.float() / s).to(prev.bias.dtype))


@torch.no_grad()
def scale_columns(lin: nn.Linear, s: torch.Tensor) -> None:
    lin.weight.data.copy_((lin.weight.data.float() * s[None, :]).to(lin.weight.dtype))


# ----------------------------------------------------------------------------------------------- layout


@dataclass
class Layout:
    """The modules of one Llama-like or Gemma-3-like decoder layer AWQ works with."""

    attn: nn.Module
    mlp: nn.Module
    input_norm: nn.Module
    mlp_norm: nn.Module
    input_kind: str
    mlp_kind: str
    linears: dict[str, nn.Linear] = field(default_factory=dict)  # q, k, v, o, gate, up, down

    @property
    def scale_o(self) -> bool:
        """o_proj can take scales from v_proj only without grouped-query attention."""
        return self.linears["v"].out_features == self.linears["o"].in_features

    def fold(self, group: str, s: torch.Tensor) -> None:
        """Apply scales s to a group: consumers' columns × s, producer's output channels ÷ s."""
        li = self.linears
        if group == "qkv":
            fold_into_norm(self.input_norm, s, self.input_kind)
            consumers = [li["q"], li["k"], li["v"]]
        elif group == "gate_up":
            fold_into_norm(self.mlp_norm, s, self.mlp_kind)
            consumers = [li["gate"], li["up"]]
        elif group == "o":
            fold_into_linear(li["v"], s)
            consumers = [li["o"]]
        elif group == "down":
            fold_into_linear(li["up"], s)
            consumers = [li["down"]]
        else:  # pragma: no cover - internal
            raise ValueError(group)
        for lin in consumers:
            scale_columns(lin, s)


GROUPS = {"qkv": ("q", "k", "v"), "gate_up": ("gate", "up"), "o": ("o",), "down": ("down",)}
ATTN = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj"}
MLP = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}


def layout(layer: nn.Module, model_type: str) -> Layout:
    """The AWQ layout of a decoder layer; a one-line ModelError naming the model type if it is not Llama-like
    (input_layernorm → self_attn, post_attention_layernorm → mlp) or Gemma-3-like (pre_feedforward_layernorm)."""

    def fail(what: str) -> ModelError:
        return ModelError(
            f"awq supports Llama-like and Gemma-3-like decoder layers; model type '{model_type}' "
            f"({type(layer).__name__}) has {what}; use gptq or rtn for this model"
        )

    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    input_norm = getattr(layer, "input_layernorm", None)
    mlp_norm = getattr(
        layer, "pre_feedforward_layernorm", None
    )  # Gemma 3: post_attention_layernorm is on attn's output
    if mlp_norm is None:
        mlp_norm = getattr(layer, "post_attention_layernorm", None)  # Llama: the norm before the MLP
    if attn is None or mlp is None or input_norm is None or mlp_norm is None:
        parts = {"self_attn": attn, "mlp": mlp, "input_layernorm": input_norm, "a pre-MLP norm": mlp_norm}
        raise fail("no " + ", ".join(n for n, m in parts.items() if m is None))
    linears = {}
    for key, (parent, attr) in {
        **{k: (attn, v) for k, v in ATTN.items()},
        **{k: (mlp, v) for k, v in MLP.items()},
    }.items():
        mod = getattr(parent, attr, None)
        if not isinstance(mod, nn.Linear):
            raise fail(f"no nn.Linear {attr}")
        linears[key] = mod
    kinds = []
    for norm in (input_norm, mlp_norm):
        try:
            kinds.append(norm_kind(norm))
        except ModelError as exc:
            raise fail(f"a norm it cannot fold into ({exc})") from None
    return Layout(attn, mlp, input_norm, mlp_norm, kinds[0], kinds[1], linears)


def _call_attn(attn: nn.Module, x: torch.Tensor, kw: dict) -> torch.Tensor:
    kw = dict(kw)
    if "hidden_states" in kw:
        kw["hidden_states"] = x
        y = attn(**kw)
    else:
        y = attn(x, **kw)
    return y[0] if isinstance(y, tuple) else y


class _Keep(InputStat):
    """Keeps a module's inputs, flattened to [tokens, features]."""

    def __init__(self) -> None:
        self.xs: list[torch.Tensor] = []

    def add(self, x: torch.Tensor) -> None:
        self.xs.append(x.detach().reshape(-1, x.shape[-1]))

    def cat(self) -> torch.Tensor:
        out = torch.cat(self.xs)
        self.xs.clear()
        return out


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


@torch.no_grad()
def check_folding(lay: Layout, layer: nn.Module, x: torch.Tensor, kwargs: dict, model_type: str) -> None:
    """Fold random scales into a copy of a decoder layer: its output must not change (else ModelError)."""
    twin = copy.deepcopy(layer)
    mods = dict(twin.named_modules())
    names = {id(m): n for n, m in layer.named_modules()}

    def mirror(m: nn.Module) -> nn.Module:
        return mods[names[id(m)]]

    twin_lay = Layout(
        mirror(lay.attn),
        mirror(lay.mlp),
        mirror(lay.input_norm),
        mirror(lay.mlp_norm),
        lay.input_kind,
        lay.mlp_kind,
        {k: mirror(v) for k, v in lay.linears.items()},
    )
    gen = torch.Generator().manual_seed(0)
    for group in GROUPS:
        if group == "o" and not twin_lay.scale_o:
            continue
        width = twin_lay.linears[GROUPS[group][0]].in_features
        twin_lay.fold(group, torch.exp(torch.rand(width, generator=gen) - 0.5))

    def delta(mod):
        y = mod(x, **kwargs)
        return (y[0] if isinstance(y, tuple) else y) - x

    d0, d1 = delta(layer), delta(twin)
    rel = float((d1 - d0).norm() / d0.norm().clamp_min(1e-12))
    if not rel < 1e-3:
        raise ModelError(
            f"awq: folding scales into model type '{model_type}' ({type(layer).__name__}) changes the float "
            f"layer's output (relative error {rel:.1e}); this layout is not supported, use gptq or rtn"
        )


# ----------------------------------------------------------------------------------------------- method


def _token_sample(x: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    """[1, ≤n, d]: a seeded random sample of n token rows of x [tokens, d] (all of them if fewer)."""
    if x.shape[0] > n:
        x = x[torch.randperm(x.shape[0], generator=gen)[:n]]
    return x.unsqueeze(0)


def _quantize_into(model: nn.Module, name: str, lin: nn.Linear, cfg: AWQ, shrink: torch.Tensor | None) -> dict:
    ql, err = quantize_linear(lin, cfg, shrink)
    set_module(model, name, ql)
    return {
        "rel_mse": err,
        "mean_shrink": float(shrink.mean()) if shrink is not None else 1.0,
        "bits_per_weight": ql.storage_bytes() * 8 / lin.weight.numel(),
    }


@torch.no_grad()
def _awq_layer(
    cal: LayerwiseCalibration,
    layer: nn.Module,
    lay: Layout,
    names: dict[str, str | None],
    n_attn: int,
    cfg: AWQ,
    gen: torch.Generator,
) -> tuple[dict[str, dict], dict[str, ScaleSearch]]:
    """Search, fold and clip the scales of one decoder layer, then quantise its targeted Linears in place."""
    li = lay.linears
    search_view = copy.copy(cal)  # the same calibration state, limited to the sequences the α search uses
    search_view.inputs = cal.inputs[:n_attn]
    cal.status("capturing the groups' inputs")
    attn_x, attn_kw = search_view.capture_inputs(layer, lay.attn)
    kept = cal.collect(layer, {"qkv": li["q"], "gate_up": li["gate"], "o": li["o"], "down": li["down"]}, _Keep)
    inputs = {g: kept.pop(g).cat() for g in GROUPS}  # each group's input over all calibration tokens

    def attn_block() -> list[torch.Tensor]:
        return [_call_attn(lay.attn, x, kw) for x, kw in zip(attn_x, attn_kw, strict=True)]

    searches: dict[str, ScaleSearch] = {}
    stats: dict[str, dict] = {}
    for group, members in GROUPS.items():
        quant = [names[m] is not None for m in members]
        if not any(quant) or (group == "o" and not lay.scale_o):
            continue
        x_all = inputs[group]
        cal.status(f"scale search for {group}")
        if group in ("qkv", "o"):
            block = attn_block
        else:
            module = lay.mlp if group == "gate_up" else li["down"]
            block = partial(lambda mod, xs: [mod(xs)], module, _token_sample(x_all, cfg.search_tokens, gen))
        res = search_alpha([li[m] for m in members], x_all.abs().float().mean(0), block, cfg, quant)
        searches[group] = res
        for m in members:
            if names[m]:
                stats[names[m]] = {"alpha": res.alpha, "block_mse": min(res.losses), "block_mse_rtn": res.losses[0]}
        if res.alpha == 0.0:
            continue  # s = 1 exactly: nothing to fold
        lay.fold(group, res.scales)
        inputs[group] = x_all / res.scales  # the consumers now see x / s
        if group == "qkv":
            attn_x = [x / res.scales for x in attn_x]

    shrinks: dict[str, torch.Tensor] = {}
    if cfg.clip:
        cal.status("clipping search")
        for group, members in GROUPS.items():
            clipped = [m for m in members if names[m] is not None and m not in ("q", "k")]
            if clipped:
                gram = group_gram(inputs[group], cfg.group_size)
                for m in clipped:
                    shrinks[m] = search_clip(li[m].weight.data, gram, cfg)
    for m, lin in li.items():
        if names[m] is not None:
            stats.setdefault(names[m], {"alpha": None}).update(
                _quantize_into(cal.model, names[m], lin, cfg, shrinks.get(m))
            )
    return stats, searches


@torch.no_grad()
def _awq_embeddings(model: nn.Module, cal: LayerwiseCalibration, cfg: AWQ, gen: torch.Generator, stats: dict) -> str:
    """The lm_head from its inputs (the final norm's outputs on the quantised model, `cal` advanced through every
    layer): an untied lm_head gets AWQ's scale search (logits MSE on a token sample) folded into the final norm,
    then the clipping search; a tied one only the clipping search — its columns cannot be rescaled without
    rescaling the input table's rows too — and the table reads its codes. An untied table is rounded to nearest
    (no input activations). Returns the step's note."""
    e = find_embeddings(model, "awq")
    how = []
    if e.head is not None:
        xs = head_inputs(model, cal.inputs)
        head, shrink, alpha = e.head, None, None
        if xs is None:
            how.append("the lm_head on a plain grid (no final norm found to take its inputs from)")
        else:
            x_all = torch.cat([x.reshape(-1, x.shape[-1]) for x in xs])
            if not e.tied:
                norm = final_norm(model)
                kind = norm_kind(norm)
                sample = _token_sample(x_all, cfg.search_tokens, gen)
                res = search_alpha([head], x_all.abs().float().mean(0), lambda: [head(sample)], cfg)
                alpha = res.alpha
                if res.alpha:
                    fold_into_norm(norm, res.scales, kind)
                    scale_columns(head, res.scales)
                    x_all = x_all / res.scales
            if cfg.clip:
                shrink = search_clip(head.weight.data, group_gram(x_all, cfg.group_size), cfg)
            what = "the tied embedding / lm_head matrix (once, shared)" if e.tied else "the lm_head"
            scaled = "clipping search only" if e.tied else f"scales folded into the final norm (α {alpha:.2f})"
            how.append(f"{what} from the final norm's outputs: {scaled}" + ("" if cfg.clip else ", no clipping"))
        ql, err = quantize_linear(head, cfg, shrink)
        install_head(model, e, ql)
        stats[e.head_name] = stats_row(
            ql,
            "tied" if e.tied else "head",
            alpha=alpha,
            rel_mse=err,
            mean_shrink=float(shrink.mean()) if shrink is not None else 1.0,
        )
    if quantise_untied_table(model, e, cfg, stats):
        how.append(UNTIED_TABLE_NOTE)
    return "quantised " + "; ".join(how)


@implements(AWQ)
@torch.no_grad()
def apply(handle: ModelHandle, cfg: AWQ, ctx: StepContext) -> StepReport:
    model = handle.model
    model_type = getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__
    # everything that can fail is checked before the model changes
    tokens = require_calibration(ctx.calibration(handle.tokenizer) if ctx.n_calibration > 0 else None, "awq")
    cfg.check(model)
    targets = select_linears(model, cfg)
    target_ids = {id(lin): name for name, lin in targets}
    try:
        blocks = decoder_layers(model)
    except ModelError:
        raise ModelError(
            f"awq supports Llama-like and Gemma-3-like decoder models; model type '{model_type}' has no "
            "model.layers list; use rtn for this model"
        ) from None
    layouts = [layout(layer, model_type) for layer in blocks]
    grouped = {id(lin) for lay in layouts for lin in lay.linears.values()}
    plain = [(n, lin) for n, lin in targets if id(lin) not in grouped]  # outside the groups: no scales

    stats: dict[str, dict] = {}
    searches: dict[str, list[ScaleSearch]] = {g: [] for g in GROUPS}
    if cfg.embeddings:
        cfg.check(model)  # the embedding grid, before anything changes
    head_note = None
    if len(plain) < len(targets) or cfg.embeddings:
        gen = torch.Generator().manual_seed(ctx.seed)
        cal = LayerwiseCalibration(model, tokens, method="awq", progress=ctx.progress)
        first = cal.inputs[0]
        check_folding(layouts[0], blocks[0], first, cal.kwargs(0, first.shape[0]), model_type)
        n_attn = max(1, min(len(cal.inputs), math.ceil(cfg.search_tokens / (first.shape[0] * first.shape[1]))))
        for i, layer in cal.layers():
            names = {k: target_ids.get(id(m)) for k, m in layouts[i].linears.items()}
            if any(names.values()) and len(plain) < len(targets):
                layer_stats, layer_searches = _awq_layer(cal, layer, layouts[i], names, n_attn, cfg, gen)
                stats.update(layer_stats)
                for g, res in layer_searches.items():
                    searches[g].append(res)
            if i < len(blocks) - 1 or cfg.embeddings:
                cal.advance(layer)
        if cfg.embeddings:
            head_note = _awq_embeddings(model, cal, cfg, gen, stats)
        del cal
    for name, lin in plain:
        stats[name] = {"alpha": None, **_quantize_into(model, name, lin, cfg, None)}

    notes = [f"quantised {len(targets)} Linear modules to {cfg.bits} bits, group {cfg.group_size}"]
    summary = [
        f"{g}: mean α {sum(r.alpha for r in rs) / len(rs):.2f}, block MSE "
        f"×{sum(min(r.losses) / r.losses[0] for r in rs if r.losses[0] > 0) / len(rs):.2f} of rtn's"
        for g, rs in searches.items()
        if rs
    ]
    if summary:
        notes.append("scale search per group: " + "; ".join(summary))
    if layouts and not any(lay.scale_o for lay in layouts):
        notes.append("grouped-query attention: o_proj is quantised without scales (v_proj cannot absorb them)")
    if head_note:
        notes.append(head_note)
    if plain:
        notes.append(f"{len(plain)} Linear modules outside the AWQ groups quantised on plain grids (no scales)")
    return StepReport("awq", cfg.model_dump(), stats=stats, notes=notes)
