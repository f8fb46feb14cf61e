"""rtn: weight-only round-to-nearest quantisation of Linear weights into packed integer storage."""

from __future__ import annotations

import torch
from pydantic import field_validator

from budgetlm.errors import ConfigError
from budgetlm.methods.base import (
    MethodConfig,
    StepContext,
    StepReport,
    implements,
    register_method,
    select_linears,
    set_module,
)
from budgetlm.methods.quant.layers import QuantLinear
from budgetlm.methods.quant.quantizer import SUPPORTED_BITS, dequantize, find_grid, quantize
from budgetlm.models.handle import ModelHandle
from budgetlm.progress import track


class GridConfig(MethodConfig):
    """The validation every integer-grid quantiser's config shares (rtn, gptq, awq, lobi): `bits` among the
    supported widths, `group_size` positive or null (per channel). Subclasses declare the fields and defaults.

    `embeddings` (the one switch for the four methods): also quantise the input embedding table and the lm_head,
    on the method's grid (methods/quant/embedding.py): the lm_head becomes a QuantLinear, the table a
    QuantEmbedding; with tied weights the matrix is quantised once and both read the same codes. Independent of
    `targets`/`ignore` (which select decoder Linears). Off by default for rtn, gptq and awq, so their results
    stay comparable with earlier ones (bits per weight over the Linears); on by default for lobi, whose
    `target_bits` is a budget over every weight it quantises, so the matrix enters the bit allocation."""

    embeddings: bool = False

    @field_validator("bits", check_fields=False)
    @classmethod
    def _bits(cls, v: int) -> int:
        if v not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {', '.join(map(str, SUPPORTED_BITS))}")
        return v

    @field_validator("group_size", check_fields=False)
    @classmethod
    def _group(cls, v: int | None) -> int | None:
        if v is not None and v <= 0:
            raise ValueError("group_size must be a positive integer (or null for per-channel)")
        return v

    def check(self, model: torch.nn.Module) -> None:
        for name, lin in select_linears(model, self):
            check_group(name, lin.in_features, self.group_size)
        if self.embeddings:
            from budgetlm.methods.quant.embedding import check_embedding_grid

            check_embedding_grid(model, self.method_name, [self.bits], [self.group_size])


@register_method("rtn")
class RTN(GridConfig):
    """Round-to-nearest weight quantisation (8/4/3/2 bits, per-channel or per-group, symmetric or not).

    With `embeddings: true` the lm_head and the input table are rounded to nearest on the same grid (a tied
    matrix once, shared by both)."""

    bits: int = 8
    group_size: int | None = None  # None: one scale per output channel
    symmetric: bool = True


def check_group(name: str, in_features: int, group_size: int | None) -> None:
    if group_size and in_features % group_size:
        raise ConfigError(
            f"group_size {group_size} does not divide {name}'s {in_features} input features; "
            f"pick a divisor such as 32 or 64, or null for per-channel"
        )


@implements(RTN)
@torch.no_grad()
def apply(handle: ModelHandle, cfg: RTN, ctx: StepContext) -> StepReport:
    cfg.check(handle.model)
    targets = select_linears(handle.model, cfg)
    stats = {}
    for name, lin in track(targets, "rtn", label=lambda _, t: t[0], enabled=ctx.progress, throttled=True):
        w = lin.weight.data
        grid = find_grid(w, cfg.bits, cfg.group_size, cfg.symmetric)
        codes = quantize(w, grid)
        err = (dequantize(codes, grid) - w.float()).pow(2).mean() / w.float().pow(2).mean().clamp_min(1e-12)
        layer = QuantLinear.from_codes(codes, grid, lin.bias)
        set_module(handle.model, name, layer)
        stats[name] = {"rel_mse": float(err), "bits_per_weight": layer.storage_bytes() * 8 / w.numel()}
    notes = [f"quantised {len(targets)} Linear modules"]
    if cfg.embeddings:
        notes.append(quantise_embeddings(handle.model, cfg, stats))
    return StepReport("rtn", cfg.model_dump(), stats=stats, notes=notes)


def quantise_embeddings(model: torch.nn.Module, cfg: GridConfig, stats: dict) -> str:
    """Round-to-nearest of the lm_head and the input table on cfg's grid (a tied matrix once); the step's note."""
    from budgetlm.methods.quant.embedding import find_embeddings, install_head, quantise_untied_table, stats_row

    e = find_embeddings(model, cfg.method_name)
    if e.head is not None:
        w = e.head.weight.data
        grid = find_grid(w, cfg.bits, cfg.group_size, cfg.symmetric)
        head = QuantLinear.from_codes(quantize(w, grid), grid, e.head.bias)
        install_head(model, e, head)
        stats[e.head_name] = stats_row(head, "tied" if e.tied else "head", quantizer="rtn")
    quantise_untied_table(model, e, cfg, stats)
    what = "the tied embedding / lm_head matrix (once, shared)" if e.tied else "the lm_head and the input embedding"
    return f"quantised {what} with rtn on the same grid"
