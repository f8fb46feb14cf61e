"""GPTQ's column sweep and the linear algebra around it, one weight and its Hessian at a time (no model, no
calibration): the sweep itself (gptq_layer, importable from gptq.py as before), the upper Cholesky factor of the damped
inverse Hessian (shared with SparseGPT and Lo-Bi), the working copies of W and H with dead inputs handled and the
output-error measures (shared with SparseGPT), grids rounded to the fp16 scales QuantLinear stores, the one-thread
context the sweeps run in, and the dense stand-in a quantised Linear leaves for the calibration passes after it.

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
"""

from __future__ import annotations

import torch

from budgetlm.errors import ConfigError
from budgetlm.methods.quant.layers import QuantLinear
from budgetlm.methods.quant.quantizer import SUPPORTED_BITS, Grid, dequantize, find_grid
from budgetlm.methods.quant.rtn import check_group

FP16_TINY, FP16_MAX = 2.0**-24, 65504.0
MAX_DAMP_RETRIES = 8


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
