"""qlora / qmars: an adapter on a frozen NF4 base (QLoRA, Dettmers et al., arXiv 2305.14314), on the CPU.

The step first quantises the base with the quantisation suite's `nf4` (every Linear but the lm_head, NF4
blocks of 64 with double quantisation of the block constants by default: QLoRA's storage format), then attaches
the adapter to the targets, which are now NF4Linear modules:

    y = NF4Linear(x) + delta(x)        (the delta in fp32 on top of the dequantising base's output)

- qlora: the LoRA branch scale · B A x (A [r, in] ~ N(0, 1/r), B = 0; base.LoRAPair). peft's LoRA dispatches
  only on torch / bitsandbytes layer types, not on budgetlm's NF4Linear, so the branch is budgetlm's own
  (the same two-matrix update peft's LoRA computes, with the LoRA paper's Gaussian A).
- qmars: MARS (mars.py, opt 0 or 1) on the NF4 base.

The base stays frozen and 4-bit in memory (its packed codes and constants are buffers); only the adapter trains.
Merging (base.merge) dequantises, adds ΔW and re-quantises on the same NF4 block constants, which changes the
model: measure the accuracy before and after (base.merge_and_compare).
"""

from __future__ import annotations

from pydantic import Field

from budgetlm.methods.adapt.base import (
    AdapterConfig,
    LoRAPair,
    attach,
    finish,
    seeded,
    select_targets,
)
from budgetlm.methods.adapt.mars import MARS, mars_deltas
from budgetlm.methods.base import StepContext, StepReport, implements, register_method
from budgetlm.methods.quant import nf4
from budgetlm.models.handle import ModelHandle


class _NF4Base(AdapterConfig):
    block_size: int = Field(64, ge=1)  # NF4 absmax block
    double_quant: bool = True  # 8-bit double quantisation of the absmax constants

    identity_at_attach = False  # the NF4 quantisation changes the outputs
    quantises_base = "NF4"
    cannot_merge = "merging re-rounds the trained update onto the NF4 4-bit grid, which changes the model"


@register_method("qlora")
class QLoRA(_NF4Base):
    """QLoRA: a LoRA branch (fp32) on a frozen NF4 base with double quantisation."""


@register_method("qmars")
class QMARS(_NF4Base, MARS):
    """QMARS: MARS adapters (opt 0 or 1) on a frozen NF4 base with double quantisation."""


def quantise_base(handle: ModelHandle, cfg: _NF4Base, ctx: StepContext) -> tuple[list[str], list[str]]:
    """Check the targets on the float model (before anything changes), then NF4-quantise every Linear but the
    lm_head. Returns (target names, nf4's notes)."""
    names = [n for n, _ in select_targets(handle.model, cfg)]
    report = nf4.apply(handle, nf4.NF4(block_size=cfg.block_size, double_quant=cfg.double_quant), ctx)
    return names, report.notes


@implements(QLoRA)
def apply_qlora(handle: ModelHandle, cfg: QLoRA, ctx: StepContext) -> StepReport:
    names, notes = quantise_base(handle, cfg, ctx)
    gen = seeded(ctx)
    deltas = {}
    for n in names:
        base = handle.model.get_submodule(n)
        deltas[n] = LoRAPair(base.in_features, base.out_features, cfg.r, cfg.scale, gen=gen)
    attach(handle.model, cfg.method_name, deltas, cfg.dropout)
    return finish(handle, cfg, ctx, names, [*notes, f"LoRA branch (r={cfg.r}, fp32) on {len(names)} NF4 modules"])


@implements(QMARS)
def apply_qmars(handle: ModelHandle, cfg: QMARS, ctx: StepContext) -> StepReport:
    names, notes = quantise_base(handle, cfg, ctx)
    targets = [(n, handle.model.get_submodule(n)) for n in names]
    deltas, shared = mars_deltas(targets, cfg, seeded(ctx))
    attach(handle.model, cfg.method_name, deltas, cfg.dropout, shared)
    return finish(handle, cfg, ctx, [*shared, *deltas], [*notes, f"MARS opt {cfg.opt} on {len(names)} NF4 modules"])
