"""wanda: Pruning by Weights and activations (Sun et al., arXiv 2306.11695).

The score of weight W_ij of a Linear is S_ij = |W_ij| · ‖X_j‖₂, where ‖X_j‖₂ is the L2 norm of input feature j
over all calibration tokens (calibration.NormStat). The comparison group is each output row: the
int(in · sparsity) lowest scores of the row are zeroed, or the N lowest of every M consecutive inputs for an N:M
pattern (common.row_mask / nm_mask). The kept weights are not updated.

Layer by layer (calibration.LayerwiseCalibration), as in the paper: one pass of the current inputs through a
decoder layer gathers the input norms of all its targeted Linears, the layer is pruned, and the *pruned* layer's
outputs become the next layer's inputs (cal.advance). During the advance the pruned Linears are still plain
nn.Linear with zeros (no per-batch reconstruction); they are then stored as common.store_pruned says. A target
the layer never calls on the calibration text gets no norm and is pruned by magnitude (said in the notes).
Calibration is required: none given is the one-line require_calibration error, before anything changes.
"""

from __future__ import annotations

import torch

from budgetlm.methods.base import StepContext, StepReport, implements, register_method, select_linears
from budgetlm.methods.calibration import LayerwiseCalibration, NormStat, require_calibration
from budgetlm.methods.layerwise import assign_layers
from budgetlm.methods.prune.common import (
    PruneConfig,
    check_targets,
    prune_mask,
    pruned_stats,
    sparsity_report,
    store_pruned,
)
from budgetlm.models.handle import ModelHandle


@register_method("wanda")
class Wanda(PruneConfig):
    """Wanda: prune the lowest |W|·‖X‖₂ per output row (or N:M), calibrated layer by layer; no weight update."""

    needs_calibration = True


def wanda_scores(weight: torch.Tensor, input_l2: torch.Tensor) -> torch.Tensor:
    """S_ij = |W_ij| · ‖X_j‖₂ (float32)."""
    return weight.detach().abs().float() * input_l2.float()[None, :]


@implements(Wanda)
@torch.no_grad()
def apply(handle: ModelHandle, cfg: Wanda, ctx: StepContext) -> StepReport:
    model = handle.model
    targets = select_linears(model, cfg)
    check_targets(targets, cfg)
    per_layer = assign_layers(model, targets, "wanda")
    del targets
    tokens = require_calibration(ctx.calibration(handle.tokenizer), "wanda")
    last = max(i for i, (_, mods) in enumerate(per_layer) if mods)
    cal = LayerwiseCalibration(model, tokens, method="wanda", progress=ctx.progress)

    stats: dict[str, dict] = {}
    never: list[str] = []
    for i, layer in cal.layers(last):
        mods = per_layer[i][1]
        if mods:
            norms = cal.collect(layer, mods, NormStat)
            for name, lin in mods.items():
                st = norms[name]
                if st.n == 0:
                    never.append(name)
                scores = wanda_scores(lin.weight, st.l2 if st.n else torch.ones(lin.in_features))
                lin.weight.data.masked_fill_(prune_mask(scores, cfg), 0)
        if i < last:
            cal.advance(layer)  # the pruned layer's outputs feed the next layer
        for name, lin in mods.items():
            stats[name] = pruned_stats(store_pruned(model, name, lin.weight, lin.bias, cfg))
    del cal

    notes = [f"wanda pruning, {cfg.label}, per output row, on {tokens.numel():,} calibration tokens"]
    if never:
        notes.append(f"{', '.join(never)} never ran on the calibration text: pruned by magnitude")
    notes += sparsity_report(stats, model)
    return StepReport("wanda", cfg.model_dump(), stats=stats, notes=notes)
