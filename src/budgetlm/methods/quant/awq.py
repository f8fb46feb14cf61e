"""awq: activation-aware weight quantisation (Lin et al., arXiv 2306.00978).

This module owns the method: its config, the layer-by-layer run (capturing each group's inputs, the α search and
folding per group, the clipping search, quantising the targeted Linears) and the lm_head (`embeddings: true`). The
searches and the grids they quantise on live in awq_search.py, the decoder-layer layout and the folding of scales
in awq_layout.py; their public names stay importable from here.

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
from budgetlm.methods.quant.awq_layout import ATTN as ATTN
from budgetlm.methods.quant.awq_layout import (
    GROUPS,
    Layout,
    check_folding,
    fold_into_norm,
    layout,
    norm_kind,
    scale_columns,
)
from budgetlm.methods.quant.awq_layout import MLP as MLP
from budgetlm.methods.quant.awq_layout import fold_into_linear as fold_into_linear
from budgetlm.methods.quant.awq_search import FP16_MAX as FP16_MAX
from budgetlm.methods.quant.awq_search import FP16_TINY as FP16_TINY
from budgetlm.methods.quant.awq_search import ScaleSearch, group_gram, quantize_linear, search_alpha, search_clip
from budgetlm.methods.quant.awq_search import awq_grid as awq_grid
from budgetlm.methods.quant.awq_search import awq_scales as awq_scales
from budgetlm.methods.quant.awq_search import block_mse as block_mse
from budgetlm.methods.quant.awq_search import clip_weight as clip_weight
from budgetlm.methods.quant.awq_search import fake_quantize as fake_quantize
from budgetlm.methods.quant.embedding import (
    UNTIED_TABLE_NOTE,
    final_norm,
    find_embeddings,
    head_inputs,
    install_head,
    quantise_untied_table,
    stats_row,
)
from budgetlm.methods.quant.rtn import GridConfig
from budgetlm.models.handle import ModelHandle


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
