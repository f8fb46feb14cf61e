"""magnitude: zero the weights of smallest absolute value — the data-free pruning baseline.

The score of W_ij is |W_ij|. With `scope: row` (default) each output row is a comparison group: the
int(in · sparsity) smallest of the row are zeroed, or the N smallest of every M consecutive inputs for an N:M
pattern (common.row_mask / nm_mask). With `scope: global` one threshold is taken over all targeted Linears
together: the k = int(total · sparsity) smallest |W| of all of them are zeroed, so rows and modules end with
different sparsities (ties broken as a stable sort over the modules in model order, then row-major). An N:M
pattern is per row by definition, so `scope: global` with a pattern is rejected. No calibration and no weight
update; the pruned weights are stored as common.store_pruned says (bitmask, N:M or dense).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import model_validator

from budgetlm.methods.base import StepContext, StepReport, implements, register_method, select_linears
from budgetlm.methods.prune.common import (
    PruneConfig,
    check_targets,
    prune_mask,
    pruned_stats,
    sparsity_report,
    store_pruned,
)
from budgetlm.models.handle import ModelHandle
from budgetlm.progress import track


@register_method("magnitude")
class Magnitude(PruneConfig):
    """Magnitude pruning: zero the smallest |W| per output row (or globally), unstructured or N:M; data-free."""

    scope: Literal["row", "global"] = "row"

    @model_validator(mode="after")
    def _scope(self) -> Magnitude:
        if self.scope == "global" and self.pattern:
            raise ValueError(f"an N:M pattern ('{self.pattern}') is per row; use scope 'row' or drop the pattern")
        return self


def global_masks(scores: dict[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    """True where pruned: the k = int(total · sparsity) lowest scores over all tensors together; ties go to the
    earlier entry (tensors in dict order, each row-major), as a stable sort of the concatenation would."""
    flat = torch.cat([s.reshape(-1) for s in scores.values()])
    k = int(flat.numel() * sparsity)
    if k == 0:
        pruned = torch.zeros(flat.numel(), dtype=torch.bool)
    else:
        t = torch.kthvalue(flat, k).values
        below = flat < t
        tied = flat == t
        pruned = below | (tied & (tied.cumsum(0) <= k - int(below.sum())))
    out, start = {}, 0
    for name, s in scores.items():
        out[name] = pruned[start : start + s.numel()].reshape(s.shape)
        start += s.numel()
    return out


@implements(Magnitude)
@torch.no_grad()
def apply(handle: ModelHandle, cfg: Magnitude, ctx: StepContext) -> StepReport:
    model = handle.model
    targets = select_linears(model, cfg)
    check_targets(targets, cfg)
    masks = None
    if cfg.scope == "global":
        masks = global_masks({n: lin.weight.detach().abs().float() for n, lin in targets}, cfg.sparsity)
    stats = {}
    for name, lin in track(targets, "magnitude", label=lambda _, t: t[0], enabled=ctx.progress, throttled=True):
        w = lin.weight.detach()
        mask = masks.pop(name) if masks is not None else prune_mask(w.abs().float(), cfg)
        layer = store_pruned(model, name, w.masked_fill(mask, 0), lin.bias, cfg)
        stats[name] = pruned_stats(layer)
    notes = [f"magnitude pruning, {cfg.label}, scope {cfg.scope}"] + sparsity_report(stats, model)
    return StepReport("magnitude", cfg.model_dump(), stats=stats, notes=notes)
