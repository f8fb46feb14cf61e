"""gptq: GPTQ (Frantar et al., arXiv 2210.17323) — second-order weight quantisation with error feedback.

For a Linear with weight W [out, in] and inputs X, GPTQ minimises ‖(W − Q)X‖² one input column at a time: with
H = (2/n) Σ x xᵀ (calibration.HessianStat), damped by λ = damp·mean(diag H) on the diagonal, and U the upper
Cholesky factor of H⁻¹, column i is rounded to the grid, q_i = Q(w_i), and its scaled error e = (w_i − q_i)/U_ii
is pushed onto the columns not yet quantised, W[:, j] −= e·U_ij. Columns go in lazy blocks of `block_size`: the
feedback is applied inside the block at once and to the rest of the matrix after the block (one matrix product).

Grids are the rtn grids (quantizer.find_grid): per output channel (group_size None, found once from W) or per
group of `group_size` input columns, found when the column processing reaches the group's first column, from
the error-updated weights at that moment (columns of the group beyond the current lazy block get the block's
pending update first, so the lazy schedule gives the same result as the column-at-a-time algorithm). Scales are
rounded to fp16 before any code is chosen, because QuantLinear stores them in fp16: the error feedback then
sees exactly the weights the layer will compute with.

Act-order processes the columns by descending diag(H). With groups and without static groups the codes and
groups belong to W[:, perm] and the layer keeps `perm`; with static groups the grids come from the original W in
natural order before anything is updated, and the codes are stored in natural order (no perm). Per-channel grids
do not depend on column order, so act-order per-channel needs no perm either.

The method calibrates decoder layer by decoder layer (LayerwiseCalibration, compress_layerwise, the loop
SparseGPT shares). Linears fed the same tensor (q/k/v, gate/up in Llama-style blocks) share one Hessian: it is
computed once and their weights are quantised together as one stacked matrix (GPTQ treats rows independently, so
this is exactly the same as quantising them one by one). By default (the GPTQ paper's order) every Hessian of a
layer comes from the layer as it is (one Hessian pass), then an advance pass feeds the quantised layer's outputs
on (two passes per layer). With `true_sequential: true` (the order of the GPTQ code's --true-sequential option)
each input group is quantised from the inputs it receives once the groups before it are quantised: q/k/v from
the layer's inputs, o from the quantised attention, gate/up after o, down after gate/up. This costs one pass over
the calibration batches per layer: the batches run through the layer in lockstep (calibration.Lockstep;
_OnePass pauses each batch at a target until all batches have fed its Hessian, quantises it, and lets them on),
and the pass's outputs are the quantised layer's, the next layer's inputs. It is faster and more accurate
(SmolLM2 4-bit g64: KL 0.130 instead of 0.142) but holds every batch's live activations at the deepest pause:
+0.52x the fp32 model in RSS instead of +0.36-0.41x for the two passes (64 x 256 tokens), which is why it is not
the default (the issue's budget is +0.5x).

Work saved without changing the result: in the two-pass scheme's Hessian pass the target the layer calls after
all the others (down_proj) is replaced by a stub returning zeros, since only its input is needed (checked on every
batch; otherwise the pass is redone in full); the passes over an already quantised layer run with plain nn.Linear
stand-ins holding the dequantised weights (the same matmul QuantLinear does, without unpacking codes per batch);
gptq_layer runs on one intra-op thread. Stats per module: rel_output_error = tr(ΔW H ΔWᵀ)/tr(W H Wᵀ) on the
calibration inputs it was quantised for, bits_per_weight from storage_bytes, the damping used and its retries,
dead inputs, and which modules shared its Hessian.

`embeddings: true` (off by default): the calibration is advanced through every decoder layer after they are
quantised, and the lm_head is quantised by GPTQ with the Hessian of its inputs, the final norm's outputs on the
quantised model (round-to-nearest, H = I, if no final norm is found). A tied input table reads the lm_head's codes
(one matrix, stored once; its codes are then the ones that serve the lm_head best, not each row's nearest); an
untied table is rounded to nearest row by row (a lookup table has no input activations to weigh its columns).
The calibration itself runs on the float table.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable
from typing import Literal

import torch
from pydantic import field_validator

from budgetlm.errors import ConfigError
from budgetlm.hardware.host import bf16_matmul_speedup
from budgetlm.hardware.memory import release_freed_heap
from budgetlm.methods.base import (
    MethodConfig,
    StepContext,
    StepReport,
    implements,
    register_method,
    select_linears,
    set_module,
)
from budgetlm.methods.calibration import (
    HessianStat,
    LayerwiseCalibration,
    Lockstep,
    LockstepError,
    decoder_layers,
)
from budgetlm.methods.quant.embedding import (
    UNTIED_TABLE_NOTE,
    find_embeddings,
    head_inputs,
    install_head,
    quantise_untied_table,
    stats_row,
)
from budgetlm.methods.quant.layers import QuantLinear
from budgetlm.methods.quant.quantizer import SUPPORTED_BITS, Grid, dequantize, find_grid
from budgetlm.methods.quant.rtn import GridConfig, check_group
from budgetlm.models.handle import ModelHandle

FP16_TINY, FP16_MAX = 2.0**-24, 65504.0
MAX_DAMP_RETRIES = 8
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


# --- the per-layer algorithm --------------------------------------------------------------------------------


def storable(grid: Grid) -> Grid:
    """The grid with its scales rounded to the fp16 values QuantLinear stores (kept in fp32)."""
    scales = grid.scales.clamp(FP16_TINY, FP16_MAX).half().float()
    return Grid(scales, grid.zeros, grid.bits, grid.group_size)


def inverse_hessian_cholesky(H: torch.Tensor, damp: float = 0.01) -> tuple[torch.Tensor, float, int]:
    """U: the upper Cholesky factor of (H + λI)⁻¹ with λ = damp·mean(diag H), in H's dtype, plus the damping
    fraction used and how many retries it took (each retry multiplies the damping by 10). H must be finite with
    no zero diagonal entries (handle dead inputs first). Shared with SparseGPT and Lo-Bi."""
    # With J the order-reversing permutation and J H J = L Lᵀ, H = (J L J)(J L J)ᵀ where J L J is upper
    # triangular, so H⁻¹ = Uᵀ U with U = (J L J)⁻¹ = J L⁻¹ J: one Cholesky and one triangular inverse, instead
    # of Cholesky, inverse and a second Cholesky.
    # The factorisation and the triangular solve run in place (cholesky_ex and solve_triangular write into their
    # out= arguments), so at most three n x n matrices are alive besides H: for a 1536-wide down_proj Hessian
    # that keeps the transient under 30 MB.
    n = H.shape[0]
    mean_diag = float(H.diagonal().mean())
    frac = damp
    info = torch.empty((), dtype=torch.int32)
    for retry in range(MAX_DAMP_RETRIES):
        L = H.flip(0, 1)  # a copy
        L.diagonal().add_(frac * mean_diag)
        torch.linalg.cholesky_ex(L, out=(L, info))
        if int(info) == 0:
            U = torch.eye(n, dtype=H.dtype)
            torch.linalg.solve_triangular(L, U, upper=False, out=U)
            del L
            U = U.flip(0, 1)
            if bool(torch.isfinite(U.diagonal()).all()):
                return U, frac, retry
        frac = frac * 10 if frac > 0 else 1e-3
    raise ValueError(f"the Hessian is not positive definite even with damping {frac / 10:g}")


def prepare_weight_and_hessian(
    w: torch.Tensor, H: torch.Tensor, fallback: str
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """W [out, in] and H [in, in] for a column sweep (GPTQ, SparseGPT), in float32 (float64 if w is): W a working
    copy, H the caller's unless it must change (so callers must not write into it). A non-finite H (broken
    activations) becomes I — the sweep then degrades to `fallback`, recorded in the stats —, and dead inputs
    (H_ii == 0: the input is always zero) get H_ii = 1 and zeroed weight columns."""
    dtype = torch.float64 if w.dtype == torch.float64 else torch.float32
    W = w.detach().to(dtype).clone()
    H = H.detach().to(dtype)  # copied below only if it must change (the sweeps never write into H)
    stats: dict = {}
    if not bool(torch.isfinite(H).all()):
        H = torch.eye(W.shape[1], dtype=dtype)
        stats["fallback"] = f"{fallback} (non-finite Hessian)"
    dead = H.diagonal() == 0
    if bool(dead.any()):
        H = H.clone()
        H.diagonal()[dead] = 1.0
    W[:, dead] = 0
    stats["dead_inputs"] = int(dead.sum())
    return W, H, stats


def output_error_rows(w: torch.Tensor, q: torch.Tensor, H: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per output row: (ΔW H ΔWᵀ)_rr and (W H Wᵀ)_rr with ΔW = W − Q (squared output error and output energy
    on the calibration inputs, up to the factor 2/n)."""
    w, H = w.float(), H.float()
    d = w - q.float()
    return ((d @ H) * d).sum(1), ((w @ H) * w).sum(1)


def relative_output_error(w: torch.Tensor, q: torch.Tensor, H: torch.Tensor) -> float:
    """tr(ΔW H ΔWᵀ) / tr(W H Wᵀ): the relative squared output error on the calibration inputs."""
    return ratio(*output_error_rows(w, q, H))


def ratio(err: torch.Tensor, energy: torch.Tensor) -> float:
    num, den = float(err.sum()), float(energy.sum())
    return num / den if den > 0 else float(num > 0)


class single_thread:
    """GPTQ of one layer is a long chain of small dependent ops (and matrices of at most a few thousand rows):
    one intra-op thread is faster for it than waking a thread team for each op, and far more robust on a busy
    machine (measured here: 0.57 s instead of 0.94 s for a 576 x 1536 weight)."""

    def __enter__(self):
        self.n = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.n)


@torch.no_grad()
def gptq_layer(
    w: torch.Tensor,
    H: torch.Tensor,
    bits: int,
    group_size: int | None,
    symmetric: bool,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    static_groups: bool = False,
    keep_zero: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Grid, torch.Tensor | None, dict]:
    """Quantise one weight [out, in] given the Hessian H [in, in] of its inputs.

    `keep_zero` (bool [out, in], True = pruned): weights that must stay exactly 0 — a pruned model quantised
    after pruning. They get the code that dequantises to 0 (the zero point, or 2^(b−1) for a symmetric grid)
    whatever the error feedback has added to them, their error is fed forward like any other, and group grids
    are found with them left out (as zeros).

    Returns (codes uint8 [out, in], grid, perm, stats) in the layout QuantLinear.from_codes expects: when `perm`
    is not None (act-order with groups, no static groups) codes and groups are for W[:, perm]; otherwise they
    are in natural column order. Works in float32 (float64 if `w` is float64). stats: damp (the damping
    fraction used), damp_retries, dead_inputs (columns with H_ii == 0, quantised as zeros), rel_output_error
    (tr(ΔW H ΔWᵀ)/tr(W H Wᵀ) with the undamped H), row_error and row_energy (its per-row terms, tensors [out]).
    The column sweep runs on one intra-op thread (see single_thread); the matrix work around it (the inverse
    Hessian's Cholesky factor, the output energies) on all of them.
    """
    return _gptq(w, H, bits, group_size, symmetric, damp, block_size, act_order, static_groups, keep_zero)


def _gptq(
    w: torch.Tensor,
    H: torch.Tensor,
    bits: int,
    group_size: int | None,
    symmetric: bool,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    static_groups: bool = False,
    keep_zero: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Grid, torch.Tensor | None, dict]:
    if bits not in SUPPORTED_BITS:
        raise ConfigError(f"gptq: bits must be one of {', '.join(map(str, SUPPORTED_BITS))}, got {bits}")
    out_f, in_f = w.shape
    if H.shape != (in_f, in_f):
        raise ValueError(f"Hessian shape {tuple(H.shape)} does not match the weight's {in_f} input columns")
    check_group("the weight", in_f, group_size)
    g = group_size or in_f
    grouped = g < in_f
    W, H, stats = prepare_weight_and_hessian(w, H, "rtn")
    dtype = W.dtype
    energy = ((W @ H) * W).sum(1)  # tr(W H Wᵀ) per row (dead columns of the original H add nothing)

    static_grid = None
    if grouped and static_groups:
        static_grid = storable(find_grid(W, bits, g, symmetric))
    perm = None
    if act_order:
        perm = torch.argsort(H.diagonal(), descending=True, stable=True)
        W, H = W[:, perm], H[perm][:, perm]
    if keep_zero is not None:
        keep_zero = keep_zero.bool() if perm is None else keep_zero.bool()[:, perm]
        keep_zero_t = keep_zero.t().contiguous()  # [in, out] in processing order
    U, frac, stats["damp_retries"] = inverse_hessian_cholesky(H, damp)
    stats["damp"] = frac
    lam = frac * float(H.diagonal().mean())
    del H

    Wt = W.t().contiguous()  # [in, out]: a column of W is a contiguous row here
    Qt = torch.empty(in_f, out_f, dtype=torch.uint8)
    half, qmax = 2 ** (bits - 1), 2**bits - 1
    sq_err = torch.zeros(out_f, dtype=dtype)  # Σ_j e_j²: the damped objective tr(ΔW (H + λI) ΔWᵀ)

    # per-column scale/zero source: one grid (per-channel), static per-group grids, or grids found on the fly
    col_scale = col_zero = None
    if not grouped:
        grid = storable(find_grid(W, bits, None, symmetric))
        s = grid.scales[:, 0].to(dtype)
        z = None if grid.zeros is None else grid.zeros[:, 0].to(dtype)
    elif static_grid is not None:
        gidx = (perm if perm is not None else torch.arange(in_f)) // g
        col_scale = static_grid.scales.t()[gidx].to(dtype)  # [in, out], in processing order
        col_zero = None if static_grid.zeros is None else static_grid.zeros.t()[gidx].to(dtype)
    group_scales: list[torch.Tensor] = []
    group_zeros: list[torch.Tensor] = []

    with single_thread():
        for i1 in range(0, in_f, block_size):
            i2 = min(i1 + block_size, in_f)
            nb = i2 - i1
            W1 = Wt[i1:i2]  # view: updated in place
            U1 = U[i1:i2, i1:i2]
            E1 = torch.empty(nb, out_f, dtype=dtype)
            Q1 = torch.empty(nb, out_f, dtype=dtype)  # the block's codes, converted to uint8 once per block
            dinv = (1.0 / U1.diagonal()).tolist()
            for i in range(nb):
                j = i1 + i
                if grouped and static_grid is None and j % g == 0:
                    cols = W1[i : i + g]
                    if j + g > i2:  # the group runs past this block: add the block's pending update first
                        rest = Wt[i2 : j + g] - U[i1:j, i2 : j + g].t() @ E1[:i]
                        cols = torch.cat([cols, rest])
                    if keep_zero is not None:
                        cols = cols.masked_fill(keep_zero_t[j : j + cols.shape[0]], 0)
                    gr = storable(find_grid(cols.t(), bits, None, symmetric))
                    s = gr.scales[:, 0].to(dtype)
                    z = None if gr.zeros is None else gr.zeros[:, 0].to(dtype)
                    group_scales.append(gr.scales)
                    group_zeros.append(gr.zeros)
                elif col_scale is not None:
                    s = col_scale[j]
                    z = None if col_zero is None else col_zero[j]
                x = W1[i]
                q = torch.div(x, s, out=Q1[i]).round_()
                if z is None:
                    q.clamp_(-half, half - 1).add_(half)
                    if keep_zero is not None:
                        q.masked_fill_(keep_zero_t[j], half)
                    dq = (q - half).mul_(s)
                else:
                    q.add_(z).clamp_(0, qmax)
                    if keep_zero is not None:
                        q.copy_(torch.where(keep_zero_t[j], z, q))
                    dq = (q - z).mul_(s)
                e = E1[i]
                torch.sub(x, dq, out=e).mul_(dinv[i])
                if i + 1 < nb:
                    W1[i + 1 :].addr_(U1[i, i + 1 :], e, alpha=-1)
            Qt[i1:i2] = Q1
            sq_err.add_((E1 * E1).sum(0))
            if i2 < in_f:
                Wt[i2:].addmm_(U[i1:i2, i2:].t(), E1, alpha=-1)
    del Wt, U

    codes = Qt.t().contiguous()  # in processing order
    if not grouped:
        out_grid = grid
    elif static_grid is not None:
        out_grid = static_grid
    else:
        zeros = None if symmetric else torch.cat(group_zeros, dim=1)
        out_grid = Grid(torch.cat(group_scales, dim=1), zeros, bits, g)
    if static_grid is not None and perm is not None:
        deq = dequantize(codes[:, torch.argsort(perm)], out_grid)[:, perm]
    else:
        deq = dequantize(codes, out_grid)
    # the column-by-column updates are exact for the damped quadratic, so Σ e² = tr(ΔW (H + λI) ΔWᵀ) with
    # ΔW = W − Q over the live columns (dead ones are 0 − 0); removing λ‖ΔW‖² leaves tr(ΔW H ΔWᵀ)
    err = (sq_err - lam * (W - deq.to(dtype)).pow(2).sum(1)).clamp_min(0)
    out_perm = None
    if perm is not None:
        if grouped and static_grid is None:
            out_perm = perm
        else:
            codes = codes[:, torch.argsort(perm)].contiguous()
    stats |= {"rel_output_error": ratio(err, energy), "row_error": err.float(), "row_energy": energy.float()}
    return codes, out_grid, out_perm, stats


# --- Hessians shared by modules fed the same tensor ----------------------------------------------------------


class _SharedInputs:
    """Hands out Hessian stats that compute one H per distinct input tensor: a module called with the very
    tensor another module of the same batch already received (q/k/v, gate/up) follows that module's H."""

    def __init__(self) -> None:
        self.batch = -1
        self.seen: dict[int, tuple[torch.Tensor, _SharedHessian]] = {}
        self.order: list[_SharedHessian] = []
        self.calls: list[tuple[int, int]] = []  # (batch, id(stat)) of every call, in call order

    def stat(self) -> _SharedHessian:
        return _SharedHessian(self)

    def last_called(self, ids: set[int]) -> bool:
        """Whether, in every batch, the stats in `ids` were fed after all the others."""
        seen_last: dict[int, bool] = {}
        for batch, sid in self.calls:
            if sid in ids:
                seen_last[batch] = True
            elif seen_last.get(batch):
                return False
        return True


class _SharedHessian(HessianStat):
    def __init__(self, pool: _SharedInputs) -> None:
        super().__init__()
        self.pool = pool
        self.leader: _SharedHessian | None = None
        self.calls = 0
        self.broken = False  # the sharing pattern changed between batches: collect this one again alone

    def add(self, x: torch.Tensor) -> None:
        pool = self.pool
        if self.calls > pool.batch:  # the first module called in a new batch
            pool.batch = self.calls
            pool.seen.clear()
        pool.calls.append((self.calls, id(self)))
        hit = pool.seen.get(id(x))
        owner = hit[1] if hit is not None and hit[0] is x else None
        if self.calls == 0:
            self.leader = owner or self
            pool.order.append(self)
        elif self.leader is not self and owner is not self.leader:
            self.broken = True
        if self.leader is self:
            super().add(x)
            pool.seen[id(x)] = (x, self)
        self.calls += 1

    @property
    def hessian(self) -> torch.Tensor | None:
        return self.H if self.leader is self else self.leader.H


def _input_groups(stats: dict[str, _SharedHessian]) -> tuple[list[list[str]], list[str]]:
    """Names grouped by shared input, in the order the layer calls them; plus names never called."""
    name_of = {id(st): n for n, st in stats.items()}
    groups: dict[int, list[str]] = {}
    for st in stats[next(iter(stats))].pool.order:
        if st.broken:
            continue
        groups.setdefault(id(st.leader), []).append(name_of[id(st)])
    never = [n for n, st in stats.items() if st.calls == 0]
    return list(groups.values()), never


# --- the method ------------------------------------------------------------------------------------------------


def assign_layers(
    model: torch.nn.Module, targets: list[tuple[str, torch.nn.Linear]], method: str
) -> list[tuple[str, dict]]:
    """Per decoder layer, (its module-name prefix, {name: Linear} of the targets inside it); a target outside
    every decoder layer is a one-line ConfigError (the Hessians are collected decoder layer by layer)."""
    blocks = decoder_layers(model)
    index = {id(b): i for i, b in enumerate(blocks)}
    prefix = [""] * len(blocks)
    for name, mod in model.named_modules():
        if id(mod) in index:
            prefix[index[id(mod)]] = name
    per_layer: list[tuple[str, dict]] = [(p, {}) for p in prefix]
    outside = []
    for name, lin in targets:
        for p, mods in per_layer:
            if name.startswith(p + "."):
                mods[name] = lin
                break
        else:
            outside.append(name)
    if outside:
        shown = ", ".join(outside[:3]) + (f", ... ({len(outside)} in all)" if len(outside) > 3 else "")
        raise ConfigError(
            f"method '{method}' calibrates the decoder layers one by one, but targets {shown} outside them; add them "
            f"to ignore (e.g. ignore: [lm_head, '*.lm_head', {outside[0]!r}]) or change them in another step"
        )
    return per_layer


class _Stub(torch.nn.Module):
    """Stands in for a target Linear that its layer calls after every other target (down_proj in Llama-style
    blocks) during a Hessian pass: only its input is needed, and its output can reach no other target's input,
    so zeros of the right shape do and its matmul is skipped."""

    def __init__(self, out_features: int):
        super().__init__()
        self.out_features = out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(*x.shape[:-1], self.out_features)


def dense_stand_in(layer: QuantLinear, dtype: torch.dtype) -> torch.nn.Module:
    """An nn.Linear computing exactly what `layer` computes (its dequantised weight), for the calibration passes
    that follow: the forward then skips unpacking the codes for every batch. The int8-kernel path is not exact
    dequantisation, so such a layer stands for itself."""
    if layer.int8_kernel or layer.rank:
        return layer
    lin = torch.nn.Linear(layer.in_features, layer.out_features, bias=False, device="meta")
    lin.weight = torch.nn.Parameter(layer.dequantized_weight().to(dtype), requires_grad=False)
    lin.bias = layer.bias
    return lin


class _Hessians:
    """One Hessian pass over a decoder layer's calibration inputs for the `remaining` target Linears: the
    Hessian of each, grouped by shared input in call order. The modules the layer called last on the first
    pass (by name within the layer) are stubbed on later passes when that is provably harmless (they are
    called after every other target in every batch); otherwise the pass is redone without stubs."""

    def __init__(self) -> None:
        self.tail: set[str] | None = None  # local names of the last-called input group, learnt once

    def collect(self, cal, model, layer, prefix: str, remaining: dict) -> tuple[list[list[str]], list[str], dict]:
        local = {n: n[len(prefix) + 1 :] for n in remaining}
        stubbed = [n for n in remaining if self.tail and local[n] in self.tail]
        if stubbed:
            result = self._pass(cal, model, layer, remaining, stubbed)
            if result is not None:
                return result
            self.tail = set()  # the call order differs from the first layer's: no more stubs
        result = self._pass(cal, model, layer, remaining, [])
        if self.tail is None and result[0]:
            self.tail = {local[n] for n in result[0][-1]}
        return result

    def _pass(self, cal, model, layer, remaining: dict, stubbed: list[str]):
        pool = _SharedInputs()
        mods = dict(remaining)
        try:
            for n in stubbed:
                mods[n] = _Stub(remaining[n].out_features)
                set_module(model, n, mods[n])
            hs = cal.collect(layer, mods, pool.stat)
        except Exception:
            if not stubbed:
                raise
            return None
        finally:
            for n in stubbed:
                set_module(model, n, remaining[n])
        if stubbed and not pool.last_called({id(hs[n]) for n in stubbed}):
            return None
        groups, never = _input_groups(hs)
        hessians = {n: hs[n].hessian for g in groups for n in g}
        broken = [n for n, st in hs.items() if st.broken]
        if broken:  # the sharing pattern changed between batches: collect those again, one H each
            again = cal.collect(layer, {n: remaining[n] for n in broken}, HessianStat)
            hessians |= {n: st.H for n, st in again.items()}
            groups += [[n] for n in broken]
        return groups, never, hessians


class _Gate(torch.nn.Module):
    """Stands in for a target Linear during a one-pass (lockstep) calibration of its decoder layer: its calls go
    to the layer's _OnePass, which pauses the batch until the Linear can be compressed. Attributes other than
    forward (weight, in_features, ...) are the original Linear's."""

    def __init__(self, name: str, original: torch.nn.Module, sequencer: _OnePass) -> None:
        super().__init__()
        self.__dict__["_gate"] = (name, original, sequencer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        name, _, sequencer = self.__dict__["_gate"]
        return sequencer.arrive(name, x)

    def __getattr__(self, attr: str):
        gate = self.__dict__.get("_gate")
        if gate is None:
            raise AttributeError(attr)
        return getattr(gate[1], attr)


class _OnePass:
    """GPTQ's true-sequential order in one pass of the calibration batches through a decoder layer.

    Each target is replaced by a _Gate. A batch reaching a target not yet compressed adds its input to that
    target's Hessian and pauses (calibration.Lockstep); when every batch has paused there, the target is
    compressed from the Hessian of all of them, together with the targets predicted to share its input (the
    input groups seen in the previous layer, by local name: q/k/v, gate/up), and the batches go on through the
    compressed stand-ins. A target called with the very tensor an earlier target paused on shares that Hessian.
    Every later call of a grouped target is checked to get its owner's tensor; a wrong prediction raises
    LockstepError (the caller restores the layer and redoes it without predictions). The pass's outputs are the
    compressed layer's, so no separate advance pass is needed."""

    def __init__(self, cal, model, layer, prefix: str, remaining: dict, compress: GroupCompressor, plan) -> None:
        self.lock = Lockstep(cal, layer)
        self.model, self.prefix, self.remaining, self.compress = model, prefix, remaining, compress
        self.plan: dict[str, list[str]] | None = plan  # local name -> local names of its input group
        self.stand_in: dict[str, torch.nn.Module] = {}
        self.final: dict[str, torch.nn.Module] = {}
        self.owner: dict[str, str] = {}  # name -> the name whose pause collected the Hessian it used
        self.hessians: dict[str, torch.Tensor] = {}  # owner -> H
        self.stats: dict[str, HessianStat] = {}
        self.slot: dict[int, tuple[weakref.ref, str]] = {}  # batch -> (tensor, owner) of its last pause
        self.groups: dict[str, list[str]] = {}  # owner -> its input group, in call order
        self.seconds = {"hessians": 0.0, "compress": 0.0}

    def local(self, name: str) -> str:
        return name[len(self.prefix) + 1 :]

    def arrive(self, name: str, x: torch.Tensor) -> torch.Tensor:
        b = self.lock.batch
        slot = self.slot.get(b)
        paused_on = None if slot is None else slot[0]()
        if name in self.stand_in:
            owner = self.owner[name]
            if owner != name and (paused_on is not x or slot[1] != owner):
                raise LockstepError(f"{name} was compressed with {owner}'s Hessian but is fed another tensor")
            return self.stand_in[name](x)
        if paused_on is x:  # the tensor an earlier target paused on: share its Hessian
            with torch.autocast("cpu", enabled=False):  # compress in full precision even inside a bf16 pass
                self._compress([name], slot[1])
            return self.stand_in[name](x)
        t0 = time.perf_counter()
        self.stats.setdefault(name, HessianStat()).add(x)
        self.seconds["hessians"] += time.perf_counter() - t0
        self.slot[b] = (weakref.ref(x), name)  # weak: a finished batch's last input is freed at once
        self.lock.pause(name)
        return self.stand_in[name](x)

    def on_pause(self, name: str) -> None:
        self.hessians[name] = self.stats.pop(name).H
        group = [name]
        if self.plan is not None:
            partners = self.plan.get(self.local(name), ())
            group += [n for n in self.remaining if n != name and n not in self.stand_in and self.local(n) in partners]
        self._compress(group, name)

    def _compress(self, group: list[str], owner: str) -> None:
        t0 = time.perf_counter()
        H = self.hessians.get(owner)
        new = self.compress(group, self.remaining, {n: H for n in group} if H is not None else {})
        for n, (stand_in, final) in new.items():
            self.stand_in[n], self.final[n], self.owner[n] = stand_in, final, owner
        self.groups.setdefault(owner, []).extend(group)
        self.seconds["compress"] += time.perf_counter() - t0

    def run(self) -> tuple[dict[str, torch.nn.Module], list[str]]:
        """Compress the layer in one pass; returns ({name: final module}, names never called). The inputs of
        the calibration become this layer's outputs. On LockstepError the layer's targets are restored."""
        for n, mod in self.remaining.items():
            set_module(self.model, n, _Gate(n, mod, self))
        try:
            self.lock.run(self.on_pause)
        except BaseException:
            for n, mod in self.remaining.items():
                set_module(self.model, n, mod)
            raise
        finally:
            self.slot.clear()  # the batches' tensors
            self.stats.clear()
        never = [n for n in self.remaining if n not in self.final]
        for n in never:
            self._compress([n], n)  # no Hessian: H = I
        for n, final in self.final.items():
            set_module(self.model, n, final)
        return dict(self.final), never

    @torch.no_grad()
    def probe(self) -> dict[str, list[str]]:
        """The input groups of the layer as it is, by local name, from one batch run without pausing: the
        prediction for the first layer (later layers take the groups the previous one showed)."""
        seen: list[tuple[torch.Tensor, list[str]]] = []

        def hook(name):
            def record(_m, args):
                hit = next((names for t, names in seen if t is args[0]), None)
                if hit is None:
                    seen.append((args[0], [name]))
                else:
                    hit.append(name)

            return record

        handles = [m.register_forward_pre_hook(hook(n)) for n, m in self.remaining.items()]
        try:
            with self.lock.cal.compute():
                self.lock.cal.layer_output(self.lock.layer, self.lock.cal.inputs[0])
        finally:
            for h in handles:
                h.remove()
        return {self.local(n): [self.local(m) for m in g] for _, g in seen for n in g}

    def learnt_plan(self) -> dict[str, list[str]]:
        """The input groups seen, by local name: the prediction for the next layer."""
        return {self.local(n): [self.local(m) for m in g] for g in self.groups.values() for n in g}


# A group compressor: given one shared-input group of names, the {name: Linear} still to compress and the
# Hessians, returns {name: (stand_in, final)}: `stand_in` computes exactly what `final` computes and serves the
# later passes over the layer and its `advance` (cheaper than e.g. unpacking codes per batch); `final` is
# installed once the layer is done.
GroupCompressor = Callable[[list[str], dict, dict], dict[str, tuple[torch.nn.Module, torch.nn.Module]]]


@torch.no_grad()
def compress_layerwise(
    handle: ModelHandle,
    cfg: MethodConfig,
    ctx: StepContext,
    compress: GroupCompressor,
    check: Callable[[list[tuple[str, torch.nn.Linear]]], None] | None = None,
    true_sequential: bool = False,
    compute_dtype: torch.dtype | None = None,
    after_last: Callable[[LayerwiseCalibration], None] | None = None,
) -> tuple[list[str], dict[str, float]]:
    """The layer-by-layer Hessian loop shared by GPTQ and SparseGPT over the Linears `cfg` targets (`check`
    validates them before anything changes). Per decoder layer:
    - `true_sequential` (one pass, _OnePass): the batches run through the layer in lockstep; each input group is
      compressed from the inputs it receives once the groups before it are compressed, and the pass's outputs
      feed the next layer. If the batches of a layer do not pause alike (an input-dependent call pattern), that
      layer falls back to separate passes, one per input group.
    - otherwise: one Hessian pass collects every group's Hessian from the layer as it is (gptq's shared-input
      passes), `compress` replaces each group, and an advance pass feeds the changed layer's outputs forward.
    `compute_dtype` (e.g. torch.bfloat16) runs the layer passes under CPU autocast (LayerwiseCalibration).
    `after_last`: the calibration is advanced through every decoder layer (the compressed ones included) and
    `after_last(cal)` gets it, its inputs then being the last layer's outputs (gptq's lm_head Hessian).
    Returns (notes, seconds per phase). A target never called on the calibration text is compressed with H = I."""
    model, method = handle.model, cfg.method_name
    targets = select_linears(model, cfg)
    if check is not None:
        check(targets)
    per_layer = assign_layers(model, targets, method)
    del targets  # hold no reference to a replaced Linear, so its fp32 weight is freed as the step goes
    last = max(i for i, (_, mods) in enumerate(per_layer) if mods)
    if after_last is not None:
        last = len(per_layer) - 1
    cal = LayerwiseCalibration(
        model, ctx.calibration(handle.tokenizer), method=method, compute_dtype=compute_dtype, progress=ctx.progress
    )

    notes: list[str] = []
    never_called: list[str] = []
    seconds = {"hessians": 0.0, method: 0.0, "forward": 0.0}
    passes = _Hessians()
    plan: dict[str, list[str]] | None = None
    for i, layer in cal.layers(last):
        prefix, remaining = per_layer[i][0], per_layer[i][1]
        per_layer[i] = (prefix, {})
        done: dict[str, torch.nn.Module] | None = None
        if true_sequential and remaining:
            t0, spent = time.perf_counter(), seconds["hessians"] + seconds[method]
            # predicted input groups: the previous layer's, or a probe of this one; then none (each target
            # compressed as it is reached, sharers with the Hessian of the tensor they share)
            cal.status("one pass: hessians and column sweeps")
            for attempt in (plan or "probe", None):
                one = _OnePass(cal, model, layer, prefix, remaining, compress, None)
                one.plan = one.probe() if attempt == "probe" else attempt
                try:
                    done, never = one.run()
                except LockstepError as e:
                    why = str(e)
                    continue
                finally:
                    seconds["hessians"] += one.seconds["hessians"]
                    seconds[method] += one.seconds["compress"]
                plan = one.learnt_plan()
                never_called += never
                remaining.clear()  # the original Linears: free their weights before the next layer
                break
            else:
                notes.append(f"decoder layer {i}: {why}; it was compressed in separate passes")
                plan = None
            one = None
            seconds["forward"] += time.perf_counter() - t0 - (seconds["hessians"] + seconds[method] - spent)
        if done is None:
            done = {}
            while remaining:
                t0 = time.perf_counter()
                cal.status(f"hessians of {len(remaining)} Linears")
                groups, never, hessians = passes.collect(cal, model, layer, prefix, remaining)
                if true_sequential and groups:
                    groups = groups[:1]
                elif never:
                    never_called += never
                    groups += [[n] for n in never]
                release_freed_heap()  # the pass's activations: keep the RSS at the live memory
                t1 = time.perf_counter()
                cal.status("column sweep")
                for group in groups:
                    for n, (stand_in, final) in compress(group, remaining, hessians).items():
                        set_module(model, n, stand_in)  # later passes over this layer see an exact stand-in
                        remaining.pop(n)
                        done[n] = final
                seconds["hessians"] += t1 - t0
                seconds[method] += time.perf_counter() - t1
            if i < last or after_last is not None:
                t0 = time.perf_counter()
                cal.status("forward to the next layer")
                cal.advance(layer)
                seconds["forward"] += time.perf_counter() - t0
            for n, final in done.items():
                set_module(model, n, final)
    if after_last is not None:
        after_last(cal)
    del cal
    if never_called:
        notes.append(f"{', '.join(never_called)} never ran on the calibration text: {method} used H = I for them")
    notes.append(
        "seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items()) + " (the rest: capturing the inputs)"
    )
    return notes, seconds


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
    """gptq_layer with the step's settings."""
    args = (cfg.bits, cfg.group_size, cfg.symmetric, cfg.damp, cfg.block_size, cfg.act_order, cfg.static_groups)
    return gptq_layer(w, H, *args, keep_zero)


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
