"""sparsegpt: SparseGPT (Frantar & Alistarh, arXiv 2301.00774) — one-shot pruning with OBS error feedback.

For a Linear with weight W [out, in] and inputs X, SparseGPT looks for a sparse Ŵ with small ‖(W − Ŵ)X‖². It is
GPTQ with "round to 0 where pruned, keep the value elsewhere" in place of rounding: with H = (2/n) Σ x xᵀ
(calibration.HessianStat), damped by λ = damp·mean(diag H), and U the upper Cholesky factor of (H + λI)⁻¹
(gptq_sweep.inverse_hessian_cholesky), the columns are processed left to right; column c becomes q_c (w_c where kept,
0 where pruned) and its scaled error e = (w_c − q_c)/U_cc is pushed onto the columns not yet processed,
W[:, j] −= e·U_cj. U_cc² is the [H⁻¹]_cc of the OBS formulas at the moment column c is reached (the inverse
Hessian of the columns still free), so the error of pruning weight w_c is w_c²/U_cc².

The mask:
- unstructured (adaptive mask selection, the paper's §3.3 and Algorithm 1): when a block of `block_size`
  columns is reached (its weights already carry the updates of all earlier columns), the weights of the whole
  block [out, B] with the smallest w²/U_cc² are pruned. The comparison group is the block's whole weight
  matrix, not each row (`mask_scope: block`, the paper's choice): rows and columns get different sparsities
  (outlier features keep more weights), while every block has the target sparsity. Block b of columns
  [c1, c2) prunes ⌊s·out·c2⌋ − ⌊s·out·c1⌋ weights, so the layer ends with exactly ⌊s·out·in⌋ (the paper's
  reference prunes ties at the threshold too, one weight more); ties are broken by position.
  `mask_scope: row` makes each row of the block its own group (⌊s·c2⌋ − ⌊s·c1⌋ per row and block, so every
  row ends with exactly ⌊s·in⌋ zeros: the per-row target of magnitude and Wanda).
- N:M (N zeroed in every M consecutive inputs of a row): when column c with c % M == 0 is reached, in each row
  the N of columns c..c+M−1 with the smallest w²/U²_cc of the error-updated weights are pruned. The lazy blocks
  are rounded to a multiple of M so a group never straddles two blocks (for N:M the block width changes only
  the schedule, not the result).

Lazy blocks as in GPTQ: the feedback is applied inside the block column by column and to the rest of the
matrix after the block in one matrix product; the result equals processing one column at a time.

Joint quantisation (`JointQuant`, the paper's §3.5): kept weights are rounded to the rtn grid
(quantizer.find_grid, scales rounded to the fp16 QuantLinear stores) in the same sweep, pruned ones get the
code that dequantises to exactly 0 (the zero point of an asymmetric grid, 2^(b−1) of a symmetric one; every rtn
grid's range contains 0), and the error feedback sees the dequantised values. Per-channel grids come from the
weights before pruning (as the paper's reference does); per-group grids are found when the sweep reaches the
group's first column, from its error-updated weights with the ones already pruned by then left out (set to 0).

Dead inputs (H_ii == 0: the input is always zero) are handled as GPTQ does: H_ii = 1 and the column is zeroed,
so those weights score 0 and are pruned first. A non-finite Hessian falls back to H = I (magnitude pruning).

`apply` runs gptq's layer loop (methods/layerwise.compress_layerwise: Hessian passes with shared Hessians for
Linears fed the same tensor and the last-called stub, dense stand-ins for the later passes) and feeds the pruned
layer's outputs forward. The Linears sharing a Hessian are pruned one by one with it, not stacked as GPTQ does: the
block-wide mask must compare the weights of one module only. A pruned Linear is stored as common.store_pruned
says (bitmask, N:M or dense); with `bits` it becomes a QuantLinear whose dequantised weight has the same zeros.
Stats per module: sparsity (exact zeros of the stored weight: kept weights that quantise to 0 count too),
pruned (the mask's fraction), rel_output_error = tr(ΔW H ΔWᵀ)/tr(W H Wᵀ), damping, dead inputs, the
storage format and bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field, field_validator, model_validator

from budgetlm.errors import ConfigError
from budgetlm.methods.base import StepContext, StepReport, implements, register_method
from budgetlm.methods.layerwise import compress_layerwise
from budgetlm.methods.prune.common import PruneConfig, check_targets, pruned_stats, sparsity_report, store_pruned
from budgetlm.methods.quant.gptq_sweep import (
    dense_stand_in,
    inverse_hessian_cholesky,
    output_error_rows,
    prepare_weight_and_hessian,
    ratio,
    single_thread,
    storable,
)
from budgetlm.methods.quant.layers import QuantLinear
from budgetlm.methods.quant.quantizer import SUPPORTED_BITS, Grid, find_grid
from budgetlm.methods.quant.rtn import check_group
from budgetlm.models.handle import ModelHandle


@dataclass(frozen=True)
class JointQuant:
    """Quantise the kept weights in the same sweep: rtn grid of `bits`, per `group_size` columns (None: per
    output channel), symmetric or asymmetric."""

    bits: int = 4
    group_size: int | None = None
    symmetric: bool = False


def _lowest(scores: torch.Tensor, k: int, dim: int | None = None) -> torch.Tensor:
    """Indices of the k smallest scores (flattened, or along `dim`), ties broken by position."""
    if dim is None:
        return torch.argsort(scores.reshape(-1), stable=True)[:k]
    return torch.argsort(scores, dim=dim, stable=True).narrow(dim, 0, k)


@torch.no_grad()
def sparsegpt_layer(
    w: torch.Tensor,
    H: torch.Tensor,
    sparsity: float,
    nm: tuple[int, int] | None = None,
    block_size: int = 128,
    damp: float = 0.01,
    quant: JointQuant | None = None,
    scope: str = "block",
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Prune one weight [out, in] given the Hessian H [in, in] of its inputs.

    `nm` = (n, m): n zeroed in every m consecutive inputs of each row (`sparsity` is then ignored); otherwise
    unstructured with the comparison group `scope`: "block" (the paper: the whole [out, B] block of
    B = `block_size` columns) or "row" (each row of the block). Returns (weight, mask, stats): the pruned
    weight [out, in] in w's float dtype (float32 or float64) with zeros where pruned — or, with `quant`, the
    uint8 codes [out, in] and stats["grid"] (QuantLinear.from_codes layout, natural column order) — and the mask
    (bool [out, in], True = pruned). stats: sparsity (fraction pruned), damp, damp_retries, dead_inputs,
    rel_output_error (tr(ΔW H ΔWᵀ)/tr(W H Wᵀ) with the undamped H), row_error and row_energy (its per-row terms,
    tensors [out]), and fallback when the Hessian was not finite. Runs on one intra-op thread.
    """
    with single_thread():
        return _sparsegpt(w, H, sparsity, nm, block_size, damp, quant, scope)


def _sparsegpt(w, H, sparsity, nm, block_size, damp, quant, scope):
    out_f, in_f = w.shape
    if H.shape != (in_f, in_f):
        raise ValueError(f"Hessian shape {tuple(H.shape)} does not match the weight's {in_f} input columns")
    if nm is not None:
        n, m = nm
        if not 1 <= n < m or in_f % m:
            raise ConfigError(f"sparsegpt: pattern {n}:{m} needs 1 <= N < M and M dividing the {in_f} input columns")
        block_size = max(m, block_size // m * m)
    elif not 0 <= sparsity < 1:
        raise ConfigError(f"sparsegpt: sparsity must be in [0, 1), got {sparsity}")
    if scope not in ("block", "row"):
        raise ConfigError(f"sparsegpt: mask scope must be 'block' or 'row', got {scope!r}")
    if quant is not None:
        if quant.bits not in SUPPORTED_BITS:
            raise ConfigError(f"sparsegpt: bits must be one of {', '.join(map(str, SUPPORTED_BITS))}")
        check_group("the weight", in_f, quant.group_size)
    W, H, stats = prepare_weight_and_hessian(w, H, "magnitude")
    dtype = W.dtype
    W0 = W.clone()
    U, stats["damp"], stats["damp_retries"] = inverse_hessian_cholesky(H, damp)
    d2 = U.diagonal().square()  # U_cc²: [H⁻¹]_cc when column c is reached

    Wt = W.t().contiguous()  # [in, out]: a column of W is a contiguous row here
    pruned = torch.zeros(in_f, out_f, dtype=torch.bool)
    if quant is not None:
        bits, g = quant.bits, quant.group_size or in_f
        half, qmax = 2 ** (bits - 1), 2**bits - 1
        codes_t = torch.empty(in_f, out_f, dtype=torch.uint8)
        scales, zeros = [], []
        if quant.group_size is None:  # per channel: the grid of the weights before pruning
            grid = storable(find_grid(W, bits, None, quant.symmetric))
            s, z = grid.scales[:, 0].to(dtype), None if grid.zeros is None else grid.zeros[:, 0].to(dtype)

    for i1 in range(0, in_f, block_size):
        i2 = min(i1 + block_size, in_f)
        nb = i2 - i1
        W1, P1 = Wt[i1:i2], pruned[i1:i2]  # views: updated in place
        U1 = U[i1:i2, i1:i2]
        E1 = torch.empty(nb, out_f, dtype=dtype)
        if nm is None and scope == "block":  # adaptive mask: the lowest w²/U_cc² over the whole block
            k = int(sparsity * i2 * out_f) - int(sparsity * i1 * out_f)
            P1.view(-1)[_lowest(W1.square() / d2[i1:i2, None], k)] = True
        elif nm is None:  # the lowest of each row of the block
            k = int(sparsity * i2) - int(sparsity * i1)
            P1.scatter_(0, _lowest(W1.square() / d2[i1:i2, None], k, dim=0), True)
        for i in range(nb):
            j = i1 + i
            if nm is not None and i % m == 0:
                scores = W1[i : i + m].square() / d2[j : j + m, None]
                P1[i : i + m].scatter_(0, _lowest(scores, n, dim=0), True)
            x, p = W1[i], P1[i]
            if quant is None:
                q = x.masked_fill(p, 0)
            else:
                if quant.group_size is not None and j % g == 0:
                    cols = W1[i : i + g]
                    if j + g > i2:  # the group runs past this block: add the block's pending update first
                        cols = torch.cat([cols, Wt[i2 : j + g] - U[i1:j, i2 : j + g].t() @ E1[:i]])
                    cols = cols.masked_fill(pruned[j : j + g], 0)
                    gr = storable(find_grid(cols.t(), bits, None, quant.symmetric))
                    scales.append(gr.scales)
                    zeros.append(gr.zeros)
                    s, z = gr.scales[:, 0].to(dtype), None if gr.zeros is None else gr.zeros[:, 0].to(dtype)
                c = torch.round(x / s)
                if z is None:
                    c = c.clamp_(-half, half - 1).masked_fill_(p, 0)
                    q = c * s
                    c += half
                else:
                    c = c.add_(z).clamp_(0, qmax)
                    c = torch.where(p, z, c)
                    q = (c - z) * s
                codes_t[j] = c
            e = E1[i]
            torch.sub(x, q, out=e).div_(U1[i, i])
            W1[i] = q
            if i + 1 < nb:
                W1[i + 1 :].addr_(U1[i, i + 1 :], e, alpha=-1)
        if i2 < in_f:
            Wt[i2:].addmm_(U[i1:i2, i2:].t(), E1, alpha=-1)

    result = Wt.t().contiguous()
    mask = pruned.t().contiguous()
    err, energy = output_error_rows(W0, result, H)
    stats |= {
        "sparsity": float(mask.float().mean()),
        "rel_output_error": ratio(err, energy),
        "row_error": err,
        "row_energy": energy,
    }
    if quant is None:
        return result, mask, stats
    if quant.group_size is not None:
        grid = Grid(torch.cat(scales, 1), None if quant.symmetric else torch.cat(zeros, 1), bits, g)
    stats["grid"] = grid
    return codes_t.t().contiguous(), mask, stats


# --- the method ------------------------------------------------------------------------------------------------


@register_method("sparsegpt")
class SparseGPT(PruneConfig):
    """SparseGPT: OBS pruning with error feedback (unstructured or N:M, optional joint quantisation), layer by layer."""

    damp: float = Field(0.01, ge=0, lt=100)  # fraction of mean(diag H) added to the diagonal
    block_size: int = Field(128, gt=0)  # adaptive-mask block (and lazy-batch) width
    mask_scope: Literal["block", "row"] = "block"  # unstructured comparison group: the block (paper) or each row
    bits: int | None = None  # joint quantisation of the kept weights (None: keep them in full precision)
    group_size: int | None = 64  # with bits: columns per scale (None: per output channel)
    symmetric: bool = False

    needs_calibration = True

    @field_validator("group_size")
    @classmethod
    def _group(cls, v: int | None) -> int | None:
        if v is not None and v <= 0:
            raise ValueError("group_size must be a positive integer (e.g. 64), or null for per-channel scales")
        return v

    @field_validator("bits")
    @classmethod
    def _bits(cls, v: int | None) -> int | None:
        if v is not None and v not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {', '.join(map(str, SUPPORTED_BITS))} (or null: no quantisation)")
        return v

    @model_validator(mode="after")
    def _quant_storage(self) -> SparseGPT:
        if self.bits is not None and self.storage != "auto":
            raise ValueError(
                f"storage '{self.storage}' holds full-precision weights; with bits set the pruned weights are stored "
                "as quantised codes (zeros included): leave storage at auto or drop bits"
            )
        return self

    @property
    def joint_quant(self) -> JointQuant | None:
        return None if self.bits is None else JointQuant(self.bits, self.group_size, self.symmetric)


def _stand_in(weight: torch.Tensor, bias: torch.Tensor | None) -> torch.nn.Linear:
    """A plain Linear holding the pruned weight, for the calibration passes and the advance of the layer."""
    lin = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    lin.weight = torch.nn.Parameter(weight, requires_grad=False)
    lin.bias = bias
    return lin


@implements(SparseGPT)
@torch.no_grad()
def apply(handle: ModelHandle, cfg: SparseGPT, ctx: StepContext) -> StepReport:
    model = handle.model
    quant = cfg.joint_quant
    stats: dict[str, dict] = {}
    report: dict[str, dict] = {}

    def check(targets: list) -> None:
        check_targets(targets, cfg)
        for name, lin in targets:
            if quant is not None:
                check_group(name, lin.in_features, quant.group_size)

    def compress(group: list[str], mods: dict, hessians: dict) -> dict:
        # one module at a time with the shared H: the block-wide mask compares the weights of one module only
        out = {}
        for name in group:
            lin = mods[name]
            H = hessians.get(name)
            H = torch.eye(lin.in_features) if H is None else H
            dtype = lin.weight.dtype
            result, _, st = sparsegpt_layer(
                lin.weight.detach(), H, cfg.sparsity, cfg.nm, cfg.block_size, cfg.damp, quant, cfg.mask_scope
            )
            if quant is None:
                final = store_pruned(model, name, result.to(dtype), lin.bias, cfg)
                stand_in = final if final is lin else _stand_in(result.to(dtype), lin.bias)
                report[name] = pruned_stats(final)
            else:
                final = QuantLinear.from_codes(result, st["grid"], lin.bias)
                stand_in = dense_stand_in(final, dtype)
                w = final.dequantized_weight()
                nbytes = final.storage_bytes()
                zeros = int((w == 0).sum())
                report[name] = {"sparsity": zeros / w.numel(), "format": f"quant{quant.bits}", "bytes": nbytes}
                report[name] |= {"zeros": zeros, "params": w.numel(), "bits_per_weight": nbytes * 8 / w.numel()}
            stats[name] = (
                report[name]
                | {
                    "pruned": st["sparsity"],
                    "rel_output_error": st["rel_output_error"],
                    "damp": st["damp"],
                    "damp_retries": st["damp_retries"],
                    "dead_inputs": st["dead_inputs"],
                    "shared_hessian": "+".join(n.rsplit(".", 1)[-1] for n in group) if len(group) > 1 else None,
                }
                | ({"fallback": st["fallback"]} if "fallback" in st else {})
            )
            out[name] = (stand_in, final)
        return out

    notes = compress_layerwise(handle, cfg, ctx, compress, check)[0]
    where = "over each" if cfg.mask_scope == "block" else "per row of each"
    scope = "" if cfg.pattern else f", mask {where} {cfg.block_size}-column block"
    joint = "" if quant is None else f", kept weights quantised to {quant.bits} bits (group {quant.group_size})"
    notes.insert(0, f"sparsegpt pruning, {cfg.label}{scope}{joint}")
    notes += sparsity_report(report, model)
    if quant is not None:
        notes.append("with bits the pruned weights are stored as codes of 0: the sparsity saves no bytes")
    retried = [n for n, s in stats.items() if s["damp_retries"]]
    if retried:
        notes.append(f"Cholesky needed more damping for {len(retried)} modules: {', '.join(retried[:5])}")
    return StepReport("sparsegpt", cfg.model_dump(), stats=stats, notes=notes)
