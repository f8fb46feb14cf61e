"""gptq: GPTQ (Frantar et al., arXiv 2210.17323) — second-order weight quantisation with error feedback.

This module owns the method: its config, the step (per group of Linears sharing one input Hessian, one column sweep
of their stacked weights, the QuantLinear layers and their stats), the calibration dtype, and the lm_head and input
embeddings (`embeddings: true`). The pieces it runs live below it: the column sweep and its linear algebra in
gptq_sweep.py, the Hessian passes in methods/hessians.py, and the layer-by-layer loop SparseGPT shares (two passes per
layer, or `true_sequential` in one lockstep pass) in methods/layerwise.py. Their public names stay importable from
here, as before the split.

Linears fed the same tensor (q/k/v, gate/up in Llama-style blocks) share one Hessian: it is computed once and their
weights are quantised together as one stacked matrix (GPTQ treats rows independently, so this is exactly the same
as quantising them one by one). The passes over an already quantised layer run with plain nn.Linear stand-ins
holding the dequantised weights (the same matmul QuantLinear does, without unpacking codes per batch). Stats per
module: rel_output_error = tr(ΔW H ΔWᵀ)/tr(W H Wᵀ) on the calibration inputs it was quantised for,
bits_per_weight from storage_bytes, the damping used and its retries, dead inputs, and which modules shared its
Hessian.

`embeddings: true` (off by default): the calibration is advanced through every decoder layer after they are
quantised, and the lm_head is quantised by GPTQ with the Hessian of its inputs, the final norm's outputs on the
quantised model (round-to-nearest, H = I, if no final norm is found). A tied input table reads the lm_head's codes
(one matrix, stored once; its codes are then the ones that serve the lm_head best, not each row's nearest); an
untied table is rounded to nearest row by row (a lookup table has no input activations to weigh its columns).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import field_validator

from budgetlm.hardware.host import bf16_matmul_speedup
from budgetlm.methods.base import StepContext, StepReport, implements, register_method
from budgetlm.methods.calibration import HessianStat, LayerwiseCalibration
from budgetlm.methods.calibration import Lockstep as Lockstep
from budgetlm.methods.calibration import LockstepError as LockstepError
from budgetlm.methods.hessians import _SharedInputs as _SharedInputs
from budgetlm.methods.hessians import _Stub as _Stub
from budgetlm.methods.layerwise import GroupCompressor as GroupCompressor
from budgetlm.methods.layerwise import _OnePass as _OnePass
from budgetlm.methods.layerwise import assign_layers as assign_layers
from budgetlm.methods.layerwise import compress_layerwise
from budgetlm.methods.quant.embedding import (
    UNTIED_TABLE_NOTE,
    find_embeddings,
    head_inputs,
    install_head,
    quantise_untied_table,
    stats_row,
)
from budgetlm.methods.quant.gptq_sweep import FP16_MAX as FP16_MAX
from budgetlm.methods.quant.gptq_sweep import FP16_TINY as FP16_TINY
from budgetlm.methods.quant.gptq_sweep import MAX_DAMP_RETRIES as MAX_DAMP_RETRIES
from budgetlm.methods.quant.gptq_sweep import dense_stand_in, gptq_layer, ratio
from budgetlm.methods.quant.gptq_sweep import inverse_hessian_cholesky as inverse_hessian_cholesky
from budgetlm.methods.quant.gptq_sweep import output_error_rows as output_error_rows
from budgetlm.methods.quant.gptq_sweep import prepare_weight_and_hessian as prepare_weight_and_hessian
from budgetlm.methods.quant.gptq_sweep import relative_output_error as relative_output_error
from budgetlm.methods.quant.gptq_sweep import single_thread as single_thread
from budgetlm.methods.quant.gptq_sweep import storable as storable
from budgetlm.methods.quant.layers import QuantLinear
from budgetlm.methods.quant.quantizer import Grid
from budgetlm.methods.quant.rtn import GridConfig, check_group
from budgetlm.models.handle import ModelHandle

# the column sweep as the step calls it (_gptq_with), looked up here at each call: test_gptq replaces it to check that
# the sweep gets float32 inputs outside autocast
_gptq = gptq_layer
# calibration_dtype auto takes bfloat16 where a bf16 matmul measures at least this many times faster than float32
# (the Hessians and the sweep stay float32, so a smaller matmul gain barely shows in the step's time)
BF16_PAYS = 2.0


@register_method("gptq")
class GPTQ(GridConfig):
    """GPTQ: Hessian-aware weight quantisation with error feedback, calibrated layer by layer (8/4/3/2 bits)."""

    bits: int = 4
    group_size: int | None = 64  # None: one scale per output channel
    symmetric: bool = False
    damp: float = 0.01  # fraction of mean(diag H) added to the diagonal
    block_size: int = 128  # lazy-batch width
    act_order: bool = False  # quantise columns by descending diag(H)
    static_groups: bool = False  # group grids from the original weights, before any error feedback
    # True: each sub-layer group quantised from the inputs it gets once the groups before it are quantised, in
    # one lockstep pass per layer (faster, more accurate, ~1.4x the extra memory); False: every Hessian from the
    # layer as it is, then an advance pass
    true_sequential: bool = False
    # the calibration passes' matmuls: bfloat16 (CPU autocast) is several times faster on CPUs with AMX or native
    # AVX-512 bf16; the Hessians are then taken from bf16-rounded activations (the column sweep itself is always
    # float32). auto: bfloat16 where a bf16 matmul measures >= BF16_PAYS x faster than float32 here
    # (hardware.host.bf16_matmul_speedup), float32 elsewhere (where bf16 is emulated and slower); the step's notes
    # say which one ran and the measured speed-up
    calibration_dtype: Literal["auto", "float32", "bfloat16"] = "auto"

    needs_calibration = True

    @field_validator("damp")
    @classmethod
    def _damp(cls, v: float) -> float:
        if not 0 <= v < 100:
            raise ValueError("damp must be >= 0 (a fraction of the mean Hessian diagonal, e.g. 0.01)")
        return v

    @field_validator("block_size")
    @classmethod
    def _block(cls, v: int) -> int:
        if v <= 0:
            raise ValueError("block_size must be a positive integer (e.g. 128)")
        return v


def calibration_dtype(setting: str) -> tuple[str, str]:
    """The dtype the calibration passes run in for a `calibration_dtype` setting, and why. auto: bfloat16 where
    a bf16 matmul measures at least BF16_PAYS times faster than float32 on this CPU, float32 elsewhere."""
    if setting != "auto":
        return setting, "as configured"
    speed = bf16_matmul_speedup()
    if speed >= BF16_PAYS:
        return "bfloat16", f"auto: a bf16 matmul measured {speed:.1f}x faster than float32 on this CPU"
    return "float32", f"auto: a bf16 matmul measured {speed:.2f}x the speed of float32 on this CPU"


@implements(GPTQ)
@torch.no_grad()
def apply(handle: ModelHandle, cfg: GPTQ, ctx: StepContext) -> StepReport:
    stats: dict[str, dict] = {}

    def check(targets: list) -> None:
        for name, lin in targets:
            check_group(name, lin.in_features, cfg.group_size)

    def compress(group: list[str], mods: dict, hessians: dict) -> dict:
        dtype = mods[group[0]].weight.dtype
        new = _quantise_group(group, mods, hessians, cfg, stats)
        return {n: (dense_stand_in(q, dtype), q) for n, q in new.items()}

    head_h: dict[str, torch.Tensor | None] = {}
    after_last = None
    if cfg.embeddings:
        cfg.check(handle.model)  # the embedding grid too, before anything changes

        def after_last(cal: LayerwiseCalibration) -> None:
            xs = head_inputs(handle.model, cal.inputs)
            if xs is not None:
                stat = HessianStat()
                for x in xs:
                    stat.add(x)
                head_h["H"] = stat.H

    dtype, why = calibration_dtype(cfg.calibration_dtype)
    notes = compress_layerwise(
        handle, cfg, ctx, compress, check, cfg.true_sequential, getattr(torch, dtype), after_last
    )[0]
    if cfg.embeddings:
        notes.append(_quantise_embeddings(handle.model, cfg, head_h.get("H"), stats))
    retried = [n for n, s in stats.items() if s.get("damp_retries")]
    n_linear = sum(1 for s in stats.values() if "role" not in s)
    notes.insert(0, f"quantised {n_linear} Linear modules with GPTQ ({cfg.bits}-bit, group {cfg.group_size})")
    notes.insert(1, f"calibration passes in {dtype} ({why})")
    kept = [s["kept_zeros"] for s in stats.values() if "kept_zeros" in s]
    if kept:
        notes.append(
            f"{len(kept)} pruned modules kept their {sum(kept):,} zeros exactly (codes of 0); the quantised storage "
            "is dense codes, so the sparsity saves no further bytes"
        )
    if retried:
        notes.append(f"Cholesky needed more damping for {len(retried)} modules: {', '.join(retried[:5])}")
    return StepReport("gptq", cfg.model_dump(), stats=stats, notes=notes)


def _quantise_embeddings(model: torch.nn.Module, cfg: GPTQ, H: torch.Tensor | None, stats: dict) -> str:
    """GPTQ of the lm_head with the Hessian of its inputs (the final norm's outputs on the quantised model; I, i.e.
    round-to-nearest, without a final norm); an untied input table by round-to-nearest; a tied table reads the
    lm_head's codes. Returns the step's note."""
    e = find_embeddings(model, "gptq")
    how = []
    if e.head is not None:
        w = e.head.weight.detach().float()
        hess = H if H is not None else torch.eye(w.shape[1])
        codes, grid, perm, st = _gptq_with(w, hess, cfg)
        head = QuantLinear.from_codes(codes, grid, e.head.bias, perm=perm)
        install_head(model, e, head)
        rel = ratio(st["row_error"], st["row_energy"])
        stats[e.head_name] = stats_row(
            head,
            "tied" if e.tied else "head",
            quantizer="gptq" if H is not None else "rtn",
            rel_output_error=rel,
            damp=st["damp"],
            damp_retries=st["damp_retries"],
        )
        what = "the tied embedding / lm_head matrix (once, shared)" if e.tied else "the lm_head"
        how.append(
            f"{what} with GPTQ on the Hessian of the final norm's outputs"
            if H is not None
            else f"{what} by round-to-nearest (no final norm found to take its input Hessian from)"
        )
    if quantise_untied_table(model, e, cfg, stats):
        how.append(UNTIED_TABLE_NOTE)
    return "quantised " + "; ".join(how)


def _gptq_with(w: torch.Tensor, H: torch.Tensor, cfg: GPTQ, keep_zero: torch.Tensor | None = None):
    """gptq_layer (as _gptq) with the step's settings."""
    args = (cfg.bits, cfg.group_size, cfg.symmetric, cfg.damp, cfg.block_size, cfg.act_order, cfg.static_groups)
    return _gptq(w, H, *args, keep_zero)


def _quantise_group(group: list[str], mods: dict, hessians: dict, cfg: GPTQ, stats: dict) -> dict[str, QuantLinear]:
    """Quantise the Linears of `group` (one shared input Hessian) as one stacked weight; the new layers."""
    lins = [mods[n] for n in group]
    H = hessians.get(group[0])
    if H is None:
        H = torch.eye(lins[0].in_features)
    w = torch.cat([lin.weight.detach().float() for lin in lins]) if len(lins) > 1 else lins[0].weight.detach()
    pruned = any(getattr(lin, "layer_kind", None) == "sparse_linear" for lin in lins)
    keep_zero = (w == 0) if pruned else None  # a pruned model: its zeros stay zeros
    codes, grid, perm, st = _gptq_with(w, H, cfg, keep_zero)
    out, row = {}, 0
    for name, lin in zip(group, lins):
        rows = slice(row, row + lin.out_features)
        row += lin.out_features
        zeros = None if grid.zeros is None else grid.zeros[rows]
        sub = Grid(grid.scales[rows], zeros, grid.bits, grid.group_size)
        out[name] = layer = QuantLinear.from_codes(codes[rows], sub, lin.bias, perm=perm)
        stats[name] = {
            "rel_output_error": ratio(st["row_error"][rows], st["row_energy"][rows]),
            "bits_per_weight": layer.storage_bytes() * 8 / lin.weight.numel(),
            "damp": st["damp"],
            "damp_retries": st["damp_retries"],
            "dead_inputs": st["dead_inputs"],
            "shared_hessian": "+".join(n.rsplit(".", 1)[-1] for n in group) if len(group) > 1 else None,
        } | ({"fallback": st["fallback"]} if "fallback" in st else {})
        if pruned:
            stats[name]["kept_zeros"] = int(keep_zero[rows].sum())
    return out
