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
    supported widths, `group_size` positive or null (per channel). Subclasses declare the fields and defaults."""

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


@register_method("rtn")
class RTN(GridConfig):
    """Round-to-nearest weight quantisation (8/4/3/2 bits, per-channel or per-group, symmetric or not)."""

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
    return StepReport("rtn", cfg.model_dump(), stats=stats, notes=[f"quantised {len(targets)} Linear modules"])
