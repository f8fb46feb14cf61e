"""The one adapter interface: config, attach, train, reattach on load, merge.

Every adapter method is an `AdapterConfig` (rank r, alpha, dropout, module-name `targets`, and an optional
`train: TrainConfig`). Its apply function attaches the adapter in place with the base weights frozen
(`requires_grad` only on adapter parameters), reports the trainable parameters per module, and, when `train` is
set, runs the one training loop (`budgetlm.train.loop.fit`), which trains exactly the parameters that require
gradients. `train: None` attaches only.

Adapters written in budgetlm (LoRA-XS, MARS, the LoRA branch of QLoRA) share one layer: `AdaptedLinear`
computes  y = base(x) + delta(dropout(x)),  where `base` is any Linear-like module (nn.Linear, QuantLinear,
NF4Linear: the frozen base is never dequantised into a stored fp32 copy) and `delta` is the adapter's branch,
computed in fp32 and added to the base's output (under the training loop's optional bf16 autocast, off by
default, autocast picks the matmul precision of both). A delta knows its dense update ΔW (`delta_weight`) for merging,
and its shapes (`meta`) for rebuilding. State shared between layers (MARS's per-block down-projections) lives in
modules registered on the block, referenced by the deltas that use it.

Saving: the adapter's tensors are part of the model's state dict (model.safetensors) and the model lists the
adapter's structure in `budgetlm_parts` (models/handle.py), so a saved folder reloads to the same outputs bit
for bit: `reattach` re-creates the wrappers and shared modules on the fresh model before the tensors load.
peft-backed adapters do the same with peft's own layers (peft_adapters.py). Every adapter can also be written in
peft's format (folder.py: what `budgetlm train` saves): peft's adapters as peft writes them, budgetlm's as a plain
LoRA through each delta's `lora_factors`.

Merging (`merge`) folds ΔW into the base weight, so the model is a plain model again. For a quantised base the
weight is dequantised, ΔW added, and the sum re-quantised on the same grid (the layer's stored scales / zeros or
NF4 block constants; only the codes change): that rounding changes the model, so the accuracy before and after
the merge has to be measured: `merge_and_compare` does it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from pydantic import Field, field_validator
from torch import nn

from budgetlm.errors import ConfigError
from budgetlm.hardware.size import param_count
from budgetlm.methods.base import MethodConfig, StepContext, StepReport, select_linears, set_module
from budgetlm.methods.quant.layers import QuantLinear
from budgetlm.methods.quant.nf4 import NF4Linear, nf4_codes, pack_nibbles
from budgetlm.methods.quant.quantizer import quantize
from budgetlm.models.handle import ModelHandle
from budgetlm.registry import Registry
from budgetlm.train.config import TrainConfig

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DEFAULT_TARGETS = [f"*.{p}" for p in PROJECTIONS]
LINEAR_LIKE: tuple[type, ...] = (nn.Linear, QuantLinear, NF4Linear)
PART = "adapter"  # key of budgetlm's adapters in model.budgetlm_parts (peft's: "peft_adapter")
ATTACHED_ONLY = "attached only (no train config): the adapter is at its initialisation"

# kind -> class with from_meta(meta, shared modules by name): the deltas and shared modules an adapter rebuilds
adapter_modules: Registry[Any] = Registry("adapter module")


class AdapterConfig(MethodConfig):
    """Base of every adapter config (not registered itself)."""

    targets: list[str] = DEFAULT_TARGETS  # the attention and MLP projections
    r: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)  # the update is scaled by alpha / r
    dropout: float = Field(0.0, ge=0, lt=1)  # on the adapter's input
    train: TrainConfig | None = None  # None: attach only

    identity_at_attach: ClassVar[bool] = True  # a freshly attached adapter leaves the outputs unchanged
    quantises_base: ClassVar[str | None] = None  # the step quantises its base first (its base is not the input model)
    cannot_merge: ClassVar[str | None] = None  # why `merge` would not give the trained model (None: it does)

    @field_validator("train")
    @classmethod
    def _no_checkpoints(cls, v: TrainConfig | None) -> TrainConfig | None:
        if v is not None and v.save_every:
            raise ValueError("an adapter step trains without a checkpoint folder: set save_every to 0")
        return v

    @property
    def scale(self) -> float:
        return self.alpha / self.r


# --- targets -----------------------------------------------------------------------------------------------------


def attached(model: nn.Module) -> str | None:
    """The kind of adapter part attached to the model, if any."""
    parts = getattr(model, "budgetlm_parts", None) or {}
    return next((k for k in ("adapter", "peft_adapter") if k in parts), None)


def select_targets(
    model: nn.Module, cfg: AdapterConfig, types: tuple[type, ...] = LINEAR_LIKE
) -> list[tuple[str, nn.Module]]:
    """The Linear-like modules the config adapts; one-line ConfigErrors (checked before anything changes) for an
    adapter already attached, targets matching nothing, or a rank larger than a target allows."""
    method = cfg.method_name
    if attached(model):
        raise ConfigError(
            f"method '{method}': the model already carries an adapter; merge it first (budgetlm.methods.adapt.base."
            "merge) or start from the base model"
        )
    targets = select_linears(model, cfg, types)
    check_rank(targets, cfg.r, method)
    return targets


def check_rank(targets: list[tuple[str, nn.Module]], r: int, method: str, what: str = "r") -> None:
    worst = min(targets, key=lambda t: min(t[1].in_features, t[1].out_features))
    name, mod = worst
    limit = min(mod.in_features, mod.out_features)
    if r > limit:
        raise ConfigError(
            f"method '{method}': {what}={r} exceeds what {name} allows (min(in, out) = min({mod.in_features}, "
            f"{mod.out_features}) = {limit}); use {what} <= {limit} or leave that module out of targets"
        )


def dense_weight(mod: nn.Module) -> torch.Tensor:
    """The fp32 [out, in] weight a Linear-like module computes with."""
    if isinstance(mod, QuantLinear):
        return mod.effective_weight().float()
    if isinstance(mod, NF4Linear):
        return mod.dequantized_weight().float()
    return mod.weight.detach().float()


# --- the adapted layer -------------------------------------------------------------------------------------------


class Delta(nn.Module):
    """An adapter branch: forward(x) -> its contribution to the output; ΔW for merging; shapes for rebuilding."""

    kind: ClassVar[str] = ""
    requantises_on_merge: ClassVar[bool] = True  # merging into a quantised base rounds the sum onto its grid

    def delta_weight(self) -> torch.Tensor:  # [out, in] fp32
        raise NotImplementedError

    def merge_into(self, base: nn.Module) -> nn.Module:
        """`base` with this delta folded in (default: ΔW added to its weight, see `fold`)."""
        return fold(base, self.delta_weight())

    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(A [r, in], B [out, r], s) with forward(x) = s · B A x: the delta as a plain LoRA (peft's format)."""
        raise NotImplementedError

    def meta(self) -> dict:
        raise NotImplementedError


class AdaptedLinear(nn.Module):
    """y = base(x) + delta(dropout(x)); the delta runs in fp32 and is added to the base's output."""

    def __init__(self, base: nn.Module, delta: Delta, dropout: float = 0.0):
        super().__init__()
        self.base_layer = base
        self.delta = delta
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.in_features, self.out_features = base.in_features, base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        return y + self.delta(self.dropout(x).float()).to(y.dtype)


class LoRAPair(Delta):
    """A standalone LoRA pair: scale * B A x with A [r, in] ~ N(0, 1/r) and B [out, r] = 0 (MARS's o_proj and
    down_proj, QLoRA's branch). `frozen_a`: A is frozen and pre-scaled by `scale` (MARS opt 1), so the forward
    uses scale 1 and only B trains."""

    kind = "lora_pair"

    def __init__(self, in_f: int, out_f: int, r: int, scale: float, frozen_a: bool = False, gen=None):
        super().__init__()
        self.r, self.scale, self.frozen_a = r, scale, frozen_a
        self.A = nn.Linear(in_f, r, bias=False)
        self.B = nn.Linear(r, out_f, bias=False)
        with torch.no_grad():
            self.A.weight.copy_(torch.randn(r, in_f, generator=gen) / r**0.5)
            self.B.weight.zero_()
            if frozen_a:
                self.A.weight.mul_(scale)
        self.A.weight.requires_grad_(not frozen_a)

    @property
    def out_scale(self) -> float:
        return 1.0 if self.frozen_a else self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.B(self.A(x)) * self.out_scale

    def delta_weight(self) -> torch.Tensor:
        return (self.B.weight.float() @ self.A.weight.float()) * self.out_scale

    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        return self.A.weight.detach(), self.B.weight.detach(), self.out_scale

    def meta(self) -> dict:
        out_f, in_f = self.B.weight.shape[0], self.A.weight.shape[1]
        return {"in": in_f, "out": out_f, "r": self.r, "scale": self.scale, "frozen_a": self.frozen_a}

    @classmethod
    def from_meta(cls, meta: dict, shared: dict[str, nn.Module]) -> LoRAPair:
        return cls(meta["in"], meta["out"], meta["r"], meta["scale"], meta["frozen_a"])


adapter_modules.add(LoRAPair.kind, LoRAPair)
adapter_modules.add("lora_xs", "budgetlm.methods.adapt.lora_xs:XSDelta")
adapter_modules.add("mars", "budgetlm.methods.adapt.mars:MarsDelta")
adapter_modules.add("mars_shared", "budgetlm.methods.adapt.mars:MarsShared")
adapter_modules.add("lobi_lora", "budgetlm.methods.adapt.lobi_lora:LoBiPair")


def attach(
    model: nn.Module,
    method: str,
    deltas: dict[str, Delta],
    dropout: float,
    shared: dict[str, nn.Module] | None = None,
) -> None:
    """Freeze the model, register the shared modules, wrap every named module with its delta, and record the
    structure in model.budgetlm_parts (what `reattach` rebuilds on load)."""
    shared = shared or {}
    model.requires_grad_(False)
    for name, mod in shared.items():
        set_module(model, name, mod)
    for name, delta in deltas.items():
        set_module(model, name, AdaptedLinear(model.get_submodule(name), delta, dropout))
    part = {
        "method": method,
        "dropout": dropout,
        "shared": {n: {"kind": m.kind, **m.meta()} for n, m in shared.items()},
        "modules": {n: {"kind": d.kind, **d.meta()} for n, d in deltas.items()},
    }
    model.budgetlm_parts = {**(getattr(model, "budgetlm_parts", None) or {}), PART: part}


def reattach(model: nn.Module, part: dict) -> None:
    """Re-create a saved adapter's structure on a freshly built model (the tensors are loaded next)."""
    shared = {n: adapter_modules.get(m["kind"]).from_meta(m, {}) for n, m in part["shared"].items()}
    deltas = {n: adapter_modules.get(m["kind"]).from_meta(m, shared) for n, m in part["modules"].items()}
    attach(model, part["method"], deltas, part["dropout"], shared)


# --- reporting and training --------------------------------------------------------------------------------------


def trainable_report(model: nn.Module, names: list[str]) -> tuple[dict[str, dict], int]:
    """Trainable parameters per named module (a parameter shared by several counts once, at its first module),
    and the total over the whole model."""
    seen: set[int] = set()
    stats = {}
    for name in names:
        n = 0
        for p in model.get_submodule(name).parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                n += p.numel()
        stats[name] = {"trainable_params": n}
    total = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return stats, total


def finish(handle: ModelHandle, cfg: AdapterConfig, ctx: StepContext, names: list[str], notes: list[str]) -> StepReport:
    """The StepReport of an attached adapter (trainable parameters per module and in all), after training it when
    cfg.train is set."""
    model = handle.model
    stats, total = trainable_report(model, names)
    params = param_count(model)  # a quantised base counts its logical weights
    stats["total"] = {"trainable_params": total, "params": params}  # a study records these as the step's metrics
    notes = [f"{cfg.method_name}: {total:,} trainable parameters ({100 * total / params:.3f}% of {params:,})", *notes]
    if cfg.train is not None:
        from budgetlm.train.loop import fit

        result = fit(handle, cfg.train, progress=ctx.progress)
        stats["train"] = summary = result.to_dict()
        stats["total"].update(
            train_seconds=sum(result.step_times),
            train_peak_rss=result.peak_rss_bytes,
            train_loss_last=result.losses[-1] if result.losses else float("nan"),
        )
        losses = summary["losses"]
        if losses:
            notes.append(f"trained {cfg.train.steps} steps: loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    else:
        notes.append(ATTACHED_ONLY)
    return StepReport(cfg.method_name, cfg.model_dump(), stats=stats, notes=notes)


def seeded(ctx: StepContext) -> torch.Generator:
    return torch.Generator().manual_seed(ctx.seed)


# --- merging -----------------------------------------------------------------------------------------------------


@torch.no_grad()
def fold(base: nn.Module, dw: torch.Tensor) -> nn.Module:
    """`base` with ΔW added to its weight. A quantised base is dequantised, ΔW added and the sum re-quantised on
    the same grid (QuantLinear: its scales / zeros; NF4Linear: its block constants); only the codes change."""
    if isinstance(base, QuantLinear):
        w = base.dequantized_weight().float() + dw
        perm = None if base.perm is None else base.perm.long()
        grid = base.grid()
        codes = quantize(w if perm is None else w[:, perm], grid)
        corr = (base.lr_u.float(), base.lr_v.float()) if base.rank else None
        return QuantLinear.from_codes(codes, grid, base.bias, perm, corr)
    if isinstance(base, NF4Linear):
        new = copy.deepcopy(base)
        flat = (base.dequantized_weight().float() + dw).reshape(-1)
        nb, bs = base.n_blocks, base.block_size
        blocks = torch.cat([flat, flat.new_zeros(nb * bs - flat.numel())]).reshape(nb, bs)
        absmax = base.block_absmax()
        denom = torch.where(absmax != 0, absmax, torch.ones_like(absmax))
        x = torch.where(absmax[:, None] != 0, blocks / denom[:, None], torch.zeros_like(blocks))
        new.qweight.copy_(pack_nibbles(nf4_codes(x).reshape(-1)[: flat.numel()]))
        return new
    base.weight.add_(dw.to(base.weight.dtype))
    return base


@torch.no_grad()
def merge(handle: ModelHandle) -> StepReport:
    """Fold the attached adapter into the base weights; the model is a plain model again (all its parameters
    trainable, as after loading). Merged and unmerged outputs agree to rounding for a float base; a quantised base
    is re-quantised (see `fold`), so measure accuracy before and after (`merge_and_compare`)."""
    model = handle.model
    kind = attached(model)
    if kind is None:
        raise ConfigError("merge: the model carries no adapter; attach one first (e.g. method: lora)")
    if kind == "peft_adapter":
        from budgetlm.methods.adapt.peft_adapters import merge_peft

        notes = merge_peft(model)
    else:
        part = model.budgetlm_parts[PART]
        quantised, corrections = [], []
        for name in part["modules"]:
            layer = model.get_submodule(name)
            base = layer.base_layer
            if isinstance(base, (QuantLinear, NF4Linear)):
                (quantised if layer.delta.requantises_on_merge else corrections).append(name)
            set_module(model, name, layer.delta.merge_into(base))
        for name in part["shared"]:
            parent, _, child = name.rpartition(".")
            delattr(model.get_submodule(parent), child)
        notes = [f"merged {part['method']} into {len(part['modules'])} modules"]
        if quantised:
            notes.append(
                f"{len(quantised)} quantised bases were dequantised, merged and re-quantised on their grids: the "
                "accuracy before and after the merge must be measured (merge_and_compare)"
            )
        if corrections:
            notes.append(
                f"{len(corrections)} quantised bases kept their codes and store the pair as their fp16 low-rank "
                "correction: the outputs change by the fp16 rounding of the pair"
            )
    parts = dict(model.budgetlm_parts)
    parts.pop(kind)
    model.budgetlm_parts = parts
    for p in model.parameters():
        p.requires_grad_(p.is_floating_point())
    handle.provenance.append({"method": "merge", "config": {}, "notes": notes})
    return StepReport("merge", {}, notes=notes)


def merge_and_compare(
    handle: ModelHandle,
    score: Callable[[ModelHandle], dict[str, float]] | None = None,
    tasks: tuple[str, ...] = ("text-ppl",),
    limit: int | None = 50,
) -> dict[str, Any]:
    """Merge the adapter and measure the model before and after. `score(handle) -> {metric: value}` defaults to
    evaluating `tasks` with the harness. Returns {"before", "after", "merge": StepReport}."""
    if score is None:

        def score(h: ModelHandle) -> dict[str, float]:
            from budgetlm.evaluation.harness import evaluate

            res = evaluate(h, list(tasks), limit=limit)
            return {f"{t}/{m}": met.value for t, ms in res.items() for m, met in ms.items()}

    before = score(handle)
    report = merge(handle)
    after = score(handle)
    report.stats = {"before": before, "after": after}
    return {"before": before, "after": after, "merge": report}
