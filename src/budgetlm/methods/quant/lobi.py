"""lobi: HOLA's Lo-Bi (arXiv 2506.18952) — low-bit mixed precision under a bit budget, with an optional
low-rank correction of the quantisation error.

This module owns the method: its config, each candidate's exact stored bytes, and the step (pass 1, the
allocation, pass 2, the report). The sensitivity measures and the quantisation of a weight at one candidate grid
live in lobi_sensitivity.py, the knapsack in lobi_alloc.py; their public names stay importable from here.

1. Sensitivity (pass 1, on the float model, layer by layer with LayerwiseCalibration): for every targeted
   Linear and every candidate grid — each bit width b of `candidates` at each group size of `candidate_groups`
   (default: `group_size` only; with [64, null] a Linear may also take b bits per channel, whose scales cost
   ~0.03 instead of 0.375 bits per weight) — quantise the weight on that grid (rtn, or GPTQ with the layer's
   Hessian) and, with rank r > 0, add the correction below; then measure
   - "output": the Hessian-weighted output error tr(ΔW H ΔWᵀ), ΔW = W − Ŵ_b, H = (2/n) Σ x xᵀ over the
     layer's calibration inputs (HessianStat), i.e. 2× the mean squared output error per token. Cheap, but
     in each Linear's own units: an error in q_proj and one in down_proj of equal size do not cost the model
     alike, so the allocation can starve the Linears that matter (SmolLM2 at 3.0 bpw: KL 3.28);
   - "fisher" (the default): the second-order estimate of that Linear's KL below, ¼ Σ_i F_i (ΔW H ΔWᵀ)_ii, where F_i
     is the mean over tokens of the squared gradient of Σ_t log p(ŷ_t) with respect to output channel i of the
     Linear, ŷ_t sampled from the float model's own next-token distribution (so E[g gᵀ] is the Fisher information,
     the Hessian of the summed KL at ΔW = 0), taken in one forward/backward pass over `fisher_sequences` calibration
     sequences for all Linears at once. Assuming the Fisher diagonal (per channel) and gradients independent of the
     error across tokens, KL ≈ ½ Σ_i F_i · mean_t δy_ti² with mean_t δy_ti² = (ΔW H ΔWᵀ)_ii / 2: nats per token,
     comparable across layers and architectures (a post-norm that rescales a block's output rescales its gradients
     the other way), for one forward and one backward per sequence (24-26 s for SmolLM2);
   - "kl": the mean per-token KL(p_float ‖ p_b) of the model's next-token distribution on `kl_sequences`
     calibration sequences with only that one Linear quantised. This costs one forward pass (over those
     sequences) per Linear per candidate: 210 Linears × 4 candidates = 840 passes for SmolLM2-135M. Passes
     start at the Linear's own decoder layer from cached float hidden states (verified once against a full
     forward; a model where that does not reproduce the logits gets full forwards instead).
2. Allocation: one candidate per Linear minimising the total sensitivity subject to Σ stored bytes ≤
   target_bits · Σ weights / 8 — a multiple-choice knapsack solved exactly by dynamic programming over the
   cost increments above each Linear's cheapest candidate, in units of their greatest common divisor (all
   increments of SmolLM2-135M are multiples of 13,824 bytes, ~600 states at 3 bpw). Only when that grid would
   exceed `MAX_STATES` states are the increments rounded up to a coarser unit (still feasible, near-exact);
   a greedy fill then spends whatever exact budget is left on the upgrades with the best sensitivity drop
   per byte. Costs are the exact `storage_bytes()` of the QuantLinear that will be written (packed codes,
   fp16 scales, uint8 zeros and the fp16 correction), so the achieved bits per weight never exceed the target.
3. Quantisation (pass 2) at the chosen widths; with gptq layer by layer with `advance`, so later layers are
   calibrated on the quantised model's activations.

Embeddings (`embeddings: true`, the default: `target_bits` is then a budget over the decoder Linears and the
embedding matrices, its bits counted like any Linear's): the lm_head and the input table enter the knapsack as
items with the same candidate grids; a tied matrix is one item (both roles, its bytes once), untied ones two. The
lm_head's sensitivity is a Linear's, with H from the final norm's outputs (the calibration runs through every
layer) and, for "fisher", the Fisher diagonal of the logits; the table's is that of its rows at the embedding
output: "fisher" ½ Σ_v Σ_j F_vj δ_vj², F_vj the squared gradient at the embedding output summed over the positions
of token v (per token, over all tokens of the Fisher pass), "output" 2 Σ_v p_v ‖δ_v‖² with p_v the calibration
frequency of token v (the analogue of tr(ΔW H ΔWᵀ)), "kl" a full forward with the matrix changed; a tied matrix
adds both. With quantizer gptq the lm_head uses GPTQ with that Hessian (in pass 2 taken on the quantised model);
an untied table is rounded to nearest (no input activations). `embeddings: false` gives the earlier behaviour
(Linears only). lobi_lora keeps it off by default.

Low-rank correction (rank r > 0): the truncated SVD of the stored quantisation error E = W − Q(W) (Q(W) as
dequantised from the stored fp16 scales), U_r Σ_r and V_rᵀ kept in fp16 in QuantLinear.lr_u / lr_v, so the
layer computes with Q(W) + U_r Σ_r V_rᵀ, the best rank-r approximation of W − Q(W) (Eckart–Young) up to fp16
rounding. It is the initialisation a later adapter step can train (HOLA combines LoRA with low-bit weights);
this step does not train it.
"""

from __future__ import annotations

import math
import time
from fractions import Fraction
from typing import Literal

import torch
from pydantic import field_validator

from budgetlm.errors import ConfigError
from budgetlm.methods.base import (
    StepContext,
    StepReport,
    implements,
    register_method,
    select_linears,
    set_module,
)
from budgetlm.methods.calibration import HessianStat, LayerwiseCalibration, decoder_layers, require_calibration
from budgetlm.methods.quant.embedding import (
    QuantEmbedding,
    check_embedding_grid,
    embed_scale,
    find_embeddings,
    head_inputs,
    install_head,
)
from budgetlm.methods.quant.layers import QuantLinear
from budgetlm.methods.quant.lobi_alloc import MAX_STATES as MAX_STATES
from budgetlm.methods.quant.lobi_alloc import allocate
from budgetlm.methods.quant.lobi_sensitivity import KLProbe, Quantised
from budgetlm.methods.quant.lobi_sensitivity import fisher_diagonals as fisher_diagonals
from budgetlm.methods.quant.lobi_sensitivity import low_rank as low_rank
from budgetlm.methods.quant.lobi_sensitivity import stored_grid as stored_grid
from budgetlm.methods.quant.lobi_sensitivity import truncated_svd as truncated_svd
from budgetlm.methods.quant.quantizer import SUPPORTED_BITS
from budgetlm.methods.quant.rtn import GridConfig, check_group
from budgetlm.models.handle import ModelHandle
from budgetlm.progress import Progress, track


@register_method("lobi")
class LoBi(GridConfig):
    """Lo-Bi mixed precision: per-Linear bit widths chosen by sensitivity under an average bit budget."""

    target_bits: float = 3.0  # average stored bits per targeted weight, scales/zeros/correction included
    candidates: list[int] = [2, 3, 4, 8]
    group_size: int | None = 64  # None: one scale per output channel
    # the grids a Linear may get: every candidate bit width at each of these group sizes (None: per channel);
    # unset: group_size only. Per-channel grids cost ~0.03 bpw of scales where g64 costs 0.375, so a budget such
    # as 3.0 bpw can keep every Linear at 3 bits per channel instead of mixing 2- and 3-bit g64
    candidate_groups: list[int | None] | None = None
    symmetric: bool = False
    # fisher (default): each Linear's KL estimated from the Fisher diagonal of its outputs, comparable across
    # layers; output: the raw Hessian-weighted output error; kl: the KL measured by a forward per Linear and grid
    sensitivity: Literal["fisher", "output", "kl"] = "fisher"
    quantizer: Literal["rtn", "gptq"] = "rtn"
    rank: int = 0  # low-rank correction rank (0: none)
    kl_sequences: int = 4  # calibration sequences per KL measurement (sensitivity "kl")
    fisher_sequences: int = 16  # calibration sequences of the Fisher pass (sensitivity "fisher")
    # the input embedding / lm_head enter the allocation (on by default: target_bits is a whole-model budget over
    # every weight lobi quantises; see GridConfig and the module docstring)
    embeddings: bool = True

    @field_validator("target_bits")
    @classmethod
    def _target(cls, v: float) -> float:
        if not (v > 0 and math.isfinite(v)):
            raise ValueError("target_bits must be a positive number of bits per weight, e.g. 3.0")
        return v

    @field_validator("candidates")
    @classmethod
    def _candidates(cls, v: list[int]) -> list[int]:
        bad = [b for b in v if b not in SUPPORTED_BITS]
        if not v or bad:
            raise ValueError(f"candidates must be a non-empty list of bit widths from {list(SUPPORTED_BITS)}")
        return sorted(set(v))

    @field_validator("candidate_groups")
    @classmethod
    def _groups(cls, v: list[int | None] | None) -> list[int | None] | None:
        if v is None:
            return v
        if not v or any(g is not None and g <= 0 for g in v):
            raise ValueError("candidate_groups must be a non-empty list of group sizes > 0 or null (per channel)")
        return list(dict.fromkeys(v))

    def check(self, model: torch.nn.Module) -> None:
        groups = list(dict.fromkeys(g for _, g in self.grids()))
        for name, lin in select_linears(model, self):
            for g in groups:
                check_group(name, lin.in_features, g)
            if self.rank > min(lin.in_features, lin.out_features):
                raise ConfigError(
                    f"lobi rank {self.rank} exceeds {name}'s smaller dimension "
                    f"{min(lin.in_features, lin.out_features)}; choose a rank such as 8 or 16"
                )
        if self.embeddings:
            check_embedding_grid(model, "lobi", self.candidates, groups, self.rank)

    def grids(self) -> list[tuple[int, int | None]]:
        """The (bits, group size) options every Linear chooses from."""
        groups = self.candidate_groups if self.candidate_groups is not None else [self.group_size]
        return [(b, g) for g in groups for b in self.candidates]

    @field_validator("rank")
    @classmethod
    def _rank(cls, v: int) -> int:
        if v < 0:
            raise ValueError("rank must be >= 0 (0: no low-rank correction)")
        return v

    @field_validator("kl_sequences", "fisher_sequences")
    @classmethod
    def _n_seq(cls, v: int, info) -> int:
        if v < 1:
            raise ValueError(f"{info.field_name} must be >= 1")
        return v

    needs_calibration = True


# ----------------------------------------------------------------------------------------------- quantisation


def storage_bytes(in_features: int, out_features: int, bits: int, cfg: LoBi, group: int | None) -> int:
    """The exact storage_bytes() of the QuantLinear lobi writes (built on the meta device: nothing allocated)."""
    g = group or in_features
    with torch.device("meta"):
        layer = QuantLinear(in_features, out_features, bits, g, cfg.symmetric, False, False, cfg.rank)
    return layer.storage_bytes()


def _block_index(model, targets) -> dict[str, int]:
    """Decoder-layer index of every targeted Linear; a target outside the decoder layers is a ConfigError."""
    blocks = decoder_layers(model)
    ids = {id(b): i for i, b in enumerate(blocks)}
    prefixes = {name: ids[id(mod)] for name, mod in model.named_modules() if id(mod) in ids}
    out = {}
    for name, _ in targets:
        hit = [i for p, i in prefixes.items() if name.startswith(p + ".")]
        if not hit:
            raise ConfigError(
                f"method 'lobi' calibrates Linears inside the decoder layers, but '{name}' is outside them; "
                f"add it to ignore (ignore: [lm_head, {name}])"
            )
        out[name] = hit[0]
    return out


def _head_hessian(model, cal: LayerwiseCalibration) -> torch.Tensor:
    """H = (2/n) Σ x xᵀ of the lm_head's inputs: the final norm of the calibration's current inputs (the last decoder
    layer's outputs)."""
    xs = head_inputs(model, cal.inputs)
    if xs is None:
        raise ConfigError(
            "lobi: no final norm beside the decoder layers to take the lm_head's inputs from; set embeddings: false"
        )
    stat = HessianStat()
    for x in xs:
        stat.add(x)
    return stat.H


def _gptq():
    try:
        from budgetlm.methods.quant.gptq import gptq_layer
    except ImportError as exc:
        raise ConfigError(f"lobi quantizer 'gptq' is unavailable ({exc}); use quantizer: rtn") from None
    return gptq_layer


def _label(option: tuple[int, int | None], multi: bool, unit: str = "") -> str:
    """'3' (or '3-bit'), with the grid when Linears choose between group sizes: '3 g64', '3-bit per-channel'."""
    b, g = option
    out = f"{b}-{unit}" if unit else str(b)
    if multi:
        out += " " + ("per-channel" if g is None else f"g{g}")
    return out


def _fmt(x: float, up: bool) -> str:
    """4 decimals, rounded so that a target typed as shown is inside the range."""
    return f"{(math.ceil if up else math.floor)(x * 1e4) / 1e4:.4f}"


@implements(LoBi)
@torch.no_grad()
def apply(handle: ModelHandle, cfg: LoBi, ctx: StepContext) -> StepReport:
    t_start = time.perf_counter()
    model = handle.model
    cfg.check(model)
    targets = select_linears(model, cfg)
    block_of = _block_index(model, targets)
    options = cfg.grids()
    groups = list(dict.fromkeys(g for _, g in options))
    multi = len(groups) > 1
    cost = [[storage_bytes(lin.in_features, lin.out_features, b, cfg, g) for b, g in options] for _, lin in targets]
    n_weights = sum(lin.weight.numel() for _, lin in targets)
    # the embedding matrices (embeddings: true): one item when tied (both roles, its bytes once), else the lm_head
    # and the input table as two items
    e = find_embeddings(model, "lobi") if cfg.embeddings else None
    mats = e.matrices() if e is not None else []
    mat_weight = {n: (e.emb.weight if role == "embedding" else e.head.weight) for n, role in mats}
    cost += [[storage_bytes(e.hidden, e.vocab, b, cfg, g) for b, g in options] for _ in mats]
    n_weights += e.n_weights() if e is not None else 0
    what = f"{len(targets)} targeted Linears" + (f" and {len(mats)} embedding matrices" if mats else "")
    budget = math.floor(Fraction(cfg.target_bits) * n_weights / 8)
    lo, hi = sum(min(c) for c in cost), sum(max(c) for c in cost)
    lo_bpw, hi_bpw = lo * 8 / n_weights, hi * 8 / n_weights
    if budget < lo or Fraction(cfg.target_bits) * n_weights > hi * 8:
        raise ConfigError(
            f"lobi target_bits {cfg.target_bits} is outside the achievable range {_fmt(lo_bpw, True)}–"
            f"{_fmt(hi_bpw, False)} bits per weight for this model's {what} "
            f"(candidates {cfg.candidates}, group sizes {groups}, rank {cfg.rank}, scales/zeros/correction "
            "included); choose a target in that range"
        )
    gptq_layer = _gptq() if cfg.quantizer == "gptq" else None
    tokens = require_calibration(ctx.calibration(handle.tokenizer), "lobi")
    head_name = next((n for n, role in mats if role != "embedding"), None)
    has_table = any(role != "head" for _, role in mats)

    # pass 1: sensitivity of every targeted Linear at every candidate, on the float model
    t0 = time.perf_counter()
    names = [n for n, _ in targets]
    by_block: dict[int, list[tuple[str, torch.nn.Linear]]] = {}
    for name, lin in targets:
        by_block.setdefault(block_of[name], []).append((name, lin))
    sens: dict[str, list[float]] = {}
    need_h = cfg.sensitivity in ("output", "fisher") or cfg.quantizer == "gptq"
    need_head_h = need_h and head_name is not None  # the lm_head's Hessian: the final norm's outputs
    t_fisher = time.perf_counter()
    fisher = None
    if cfg.sensitivity == "fisher":
        with Progress("lobi", enabled=ctx.progress) as bar:
            n_seq = min(cfg.fisher_sequences, tokens.shape[0])
            bar.status(f"Fisher diagonals from {n_seq} calibration sequences (one forward and backward pass)")
            fnames = names + ([head_name] if head_name else [])
            res = fisher_diagonals(model, tokens[: cfg.fisher_sequences], fnames, ctx.seed, embedding=has_table)
            fisher, emb_fisher = res if has_table else (res, None)
    t_fisher = time.perf_counter() - t_fisher
    probe = KLProbe(model, tokens[: cfg.kl_sequences]) if cfg.sensitivity == "kl" else None
    last = max(by_block)
    # with the lm_head to quantise, the calibration runs through every layer to the final norm
    walk_last = len(decoder_layers(model)) - 1 if need_head_h else last
    title = f"lobi {cfg.sensitivity} sensitivity"
    if need_h:
        cal = LayerwiseCalibration(model, tokens, method="lobi", progress=ctx.progress, title=title)
        walk = cal.layers(walk_last)
    else:
        blocks = decoder_layers(model)[: last + 1]
        name_layer = lambda i, _: f"layer {i + 1}/{last + 1}"  # noqa: E731
        cal, walk = None, enumerate(track(blocks, title, label=name_layer, enabled=ctx.progress, throttled=True))
    for i, layer in walk:
        mods = dict(by_block.get(i, []))
        hs = cal.collect(layer, mods, HessianStat) if mods and need_h else {}
        for name, lin in mods.items():
            if cal is not None:
                cal.status(f"{name.rpartition('.')[2]}: {len(options)} candidate grids")
            H = hs[name].H if need_h else None
            row = []
            for option in options:
                q = Quantised(lin.weight, option, cfg, H, gptq_layer)
                if fisher is not None:
                    row.append(q.fisher_kl(H, fisher[name]))
                    continue
                if probe is None:
                    row.append(q.output_error(H))
                    continue
                saved = lin.weight.data
                lin.weight.data = q.weight.to(saved.dtype)
                try:
                    row.append(probe.kl(i))
                finally:
                    lin.weight.data = saved
            sens[name] = row
        if need_h and (i < walk_last or need_head_h):
            cal.advance(layer)
    H_head = _head_hessian(model, cal) if need_head_h else None
    freq = None
    if e is not None:
        freq = torch.bincount(tokens.reshape(-1), minlength=e.vocab)[: e.vocab].double() / tokens.numel()
    scale2 = (embed_scale(e.emb) or 1.0) ** 2 if e is not None else 1.0
    for name, role in mats:
        if cal is not None:
            cal.status(f"{name}: {len(options)} candidate grids")
        w = mat_weight[name]
        row = []
        for option in options:
            q = Quantised(w, option, cfg, H_head if role != "embedding" else None, gptq_layer)
            if probe is not None:
                saved = w.data
                w.data = q.weight.to(saved.dtype)  # a tied matrix: both roles change
                try:
                    row.append(probe.kl(None))
                finally:
                    w.data = saved
                continue
            val = 0.0
            if role != "embedding":  # as the lm_head: the Linear estimate on the final norm's outputs
                val += q.fisher_kl(H_head, fisher[name]) if fisher is not None else q.output_error(H_head)
            if role != "head":  # as the input table: each token's row error at the embedding output
                err2 = q.err.double().pow(2) * scale2
                if fisher is not None:  # KL ≈ ½ Σ_v Σ_j F_vj δ_vj² (F per token id, frequency included)
                    ids, rows = emb_fisher
                    val += 0.5 * float((rows.double() * err2[ids]).sum())
                else:  # 2 · mean over tokens of the squared output error, as tr(ΔW H ΔWᵀ) is for a Linear
                    val += 2 * float(freq @ err2.sum(1))
            row.append(val)
        sens[name] = row
    kl_path = (
        ""
        if probe is None
        else ("; KL forwards start at each Linear's layer" if probe.fast else "; KL uses full forwards")
    )
    del cal, probe, walk
    t_sens = time.perf_counter() - t0

    # allocation
    all_names = names + [n for n, _ in mats]
    choice, how = allocate([sens[n] for n in all_names], cost, budget)
    chosen = {n: options[k] for n, k in zip(all_names, choice, strict=True)}

    # pass 2: quantise at the chosen widths
    t0 = time.perf_counter()
    layers: dict[str, QuantLinear | QuantEmbedding] = {}
    H_head = None
    if cfg.quantizer == "gptq":
        cal = LayerwiseCalibration(model, tokens, method="lobi", progress=ctx.progress, title="lobi quantise")
        for i, layer in cal.layers(walk_last):
            mods = dict(by_block.get(i, []))
            if mods:
                hs = cal.collect(layer, mods, HessianStat)
                for name, lin in mods.items():
                    layers[name] = Quantised(lin.weight, chosen[name], cfg, hs[name].H, gptq_layer).layer(lin.bias)
                    set_module(model, name, layers[name])
            if i < walk_last or need_head_h:
                cal.advance(layer)
        H_head = _head_hessian(model, cal) if need_head_h else None
        del cal
    else:
        for name, lin in targets:
            layers[name] = Quantised(lin.weight, chosen[name], cfg, None).layer(lin.bias)
            set_module(model, name, layers[name])
    for name, role in mats:  # the lm_head by GPTQ on the quantised model's final norm outputs (quantizer gptq)
        q = Quantised(mat_weight[name], chosen[name], cfg, H_head if role != "embedding" else None, gptq_layer)
        if role == "embedding":
            layers[name] = QuantEmbedding.from_codes(q.codes, q.grid, embed_scale(e.emb), correction=q.correction)
            set_module(model, name, layers[name])
        else:
            layers[name] = q.layer(e.head.bias)
            install_head(model, e, layers[name])  # tied: the table reads these codes
    t_quant = time.perf_counter() - t0

    stored = sum(layer.storage_bytes() for layer in layers.values())
    achieved = stored * 8 / n_weights
    stats = {}
    roles = dict(mats)
    for name, k in zip(all_names, choice, strict=True):
        layer = layers[name]
        stats[name] = ({"role": roles[name]} if name in roles else {}) | {
            "bits": options[k][0],
            "group_size": options[k][1],
            "bits_per_weight": layer.storage_bytes() * 8 / (layer.in_features * layer.out_features),
            "sensitivity": sens[name][k],
            "sensitivity_by_bits": {_label(o, multi): s for o, s in zip(options, sens[name], strict=True)},
        }
    hist = {o: sum(1 for v in chosen.values() if v == o) for o in options}
    unit = {"kl": "KL (nats/token)", "fisher": "estimated KL (nats/token)"}.get(cfg.sensitivity, "tr(ΔW H ΔWᵀ)")
    notes = [
        f"achieved {achieved:.4f} bits per weight over the {what} (target {cfg.target_bits}; "
        f"achievable {lo_bpw:.4f}–{hi_bpw:.4f}); {stored} B stored",
        "bits chosen: " + ", ".join(f"{_label(o, multi, 'bit')} × {c}" for o, c in hist.items()),
        f"sensitivity {cfg.sensitivity} [{unit}] with {cfg.quantizer}"
        + (f" + rank-{cfg.rank} correction" if cfg.rank else "")
        + f": total {sum(sens[n][k] for n, k in zip(all_names, choice, strict=True)):.6g}{kl_path}",
        f"allocation: {how}",
        f"time: sensitivity {t_sens:.1f} s"
        + (f" (Fisher pass {t_fisher:.1f} s)" if fisher is not None else "")
        + f", quantisation {t_quant:.1f} s, total {time.perf_counter() - t_start:.1f} s",
    ]
    return StepReport("lobi", cfg.model_dump(), stats=stats, notes=notes)
