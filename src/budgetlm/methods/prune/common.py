"""What every weight-pruning method shares: the config, the masks, the storage of the pruned weight, the report.

A pruning method scores every weight of a targeted Linear and zeroes the lowest-scoring ones; the methods differ
only in the score (|W| for magnitude, |W|·‖X‖ for Wanda, w²/[H⁻¹]² for SparseGPT) and in whether the kept weights
are updated. The comparison group is fixed here, for all of them:

- unstructured (`sparsity` s): within each output row, the k = int(in_features · s) lowest scores are pruned
  (`row_mask`); every row ends with exactly k zeros (more only if a kept weight is itself 0);
- N:M (`pattern` "N:M"): in every run of M consecutive inputs of a row, the N lowest scores are pruned
  (`nm_mask`); M must divide the input width (`check_pattern`) and the sparsity is N/M.

Ties are broken deterministically: a stable sort prunes the lower input index first, so the same scores always
give the same mask.

Storage (`store_pruned`) is what is written: "bitmask" (1 bit per weight plus the kept values) or "nm" (the M−N
kept values of every group plus their positions in ceil(log2 M) bits), both in sparse.SparseLinear; or "dense"
(the Linear keeps its dense weight with zeros, e.g. before a quantisation step that needs an nn.Linear). "auto"
picks "nm" for an N:M pattern and "bitmask" otherwise. Sparsity is measured from the stored weight (exact zeros),
never taken from the config.
"""

from __future__ import annotations

import re
from typing import Literal

import torch
from pydantic import field_validator, model_validator
from torch import nn

from budgetlm.errors import ConfigError
from budgetlm.methods.base import MethodConfig, select_linears, set_module
from budgetlm.methods.prune.sparse import SparseLinear

MAX_M = 16  # positions of an N:M group are stored in ceil(log2 M) <= 4 bits

_PATTERN = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def parse_pattern(pattern: str | None) -> tuple[int, int] | None:
    """(N, M) of an "N:M" pattern (N pruned in every M consecutive inputs), None for no pattern; a malformed or
    impossible pattern is a one-line ConfigError."""
    if pattern is None:
        return None
    match = _PATTERN.match(str(pattern))
    if not match:
        raise ConfigError(f"pattern {pattern!r} is not of the form 'N:M' (e.g. '2:4': 2 of every 4 inputs pruned)")
    n, m = int(match.group(1)), int(match.group(2))
    if n < 1 or n >= m:
        raise ConfigError(
            f"pattern '{n}:{m}': N (weights pruned per group) must be at least 1 and less than M (the group "
            "size), e.g. '2:4'"
        )
    if m > MAX_M:
        raise ConfigError(f"pattern '{n}:{m}': M must be at most {MAX_M} (e.g. '2:4', '4:8', '8:16')")
    return n, m


class PruneConfig(MethodConfig):
    """Shared settings of the weight-pruning methods (not registered itself)."""

    sparsity: float = 0.5  # fraction of each row's weights zeroed (unstructured)
    pattern: str | None = None  # "N:M": N zeroed in every M consecutive inputs; sparsity then N/M
    storage: Literal["auto", "dense", "bitmask", "nm"] = "auto"

    def check(self, model: nn.Module) -> None:
        check_targets(select_linears(model, self), self)

    @field_validator("sparsity")
    @classmethod
    def _sparsity(cls, v: float) -> float:
        if not 0 <= v < 1:
            raise ValueError("sparsity must be in [0, 1): the fraction of weights zeroed, e.g. 0.5")
        return v

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, v: str | None) -> str | None:
        if v is None:
            return v
        try:
            n, m = parse_pattern(v)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        return f"{n}:{m}"

    @model_validator(mode="before")
    @classmethod
    def _sparsity_of_pattern(cls, values):
        """A pattern without a sparsity sets it to N/M (so the dumped config says what is pruned)."""
        if isinstance(values, dict) and values.get("pattern") is not None and "sparsity" not in values:
            try:
                n, m = parse_pattern(values["pattern"])
            except ConfigError:
                return values  # the field validator reports it
            values = {**values, "sparsity": n / m}
        return values

    @model_validator(mode="after")
    def _consistent(self) -> PruneConfig:
        nm = parse_pattern(self.pattern)
        if nm is not None and abs(self.sparsity - nm[0] / nm[1]) > 1e-9:
            raise ValueError(
                f"pattern '{self.pattern}' fixes the sparsity at {nm[0] / nm[1]:g}; "
                f"drop sparsity {self.sparsity:g} or the pattern"
            )
        if nm is None and self.storage == "nm":
            raise ValueError("storage 'nm' needs an N:M pattern (e.g. pattern: '2:4'); use 'bitmask' or 'auto'")
        return self

    @property
    def nm(self) -> tuple[int, int] | None:
        return parse_pattern(self.pattern)

    @property
    def target_sparsity(self) -> float:
        nm = self.nm
        return nm[0] / nm[1] if nm else self.sparsity

    @property
    def label(self) -> str:
        return f"{self.pattern} pattern" if self.pattern else f"{self.sparsity:g} unstructured"

    @property
    def storage_format(self) -> str:
        if self.storage != "auto":
            return self.storage
        return "nm" if self.pattern else "bitmask"


def check_pattern(module_name: str, in_features: int, m: int | None) -> None:
    """M must divide the input width of every targeted Linear (call before changing the model)."""
    if m and in_features % m:
        raise ConfigError(
            f"pattern group size M={m} does not divide {module_name}'s {in_features} input features; pick an M "
            f"that divides it (e.g. 4 or 8) or add {module_name} to ignore"
        )


def check_targets(targets: list[tuple[str, nn.Module]], cfg: PruneConfig) -> None:
    """The checks every weight-pruning method runs on its targets before changing anything."""
    nm = cfg.nm
    for name, lin in targets:
        check_pattern(name, lin.in_features, nm[1] if nm else None)


def row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """True where pruned: the k = int(in · sparsity) lowest scores of every row (stable: lower index first)."""
    out_f, in_f = scores.shape
    k = int(in_f * sparsity)
    mask = torch.zeros(out_f, in_f, dtype=torch.bool)
    if k:
        order = torch.sort(scores, dim=1, stable=True).indices[:, :k]
        mask.scatter_(1, order, True)
    return mask


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """True where pruned: the n lowest scores in every m consecutive inputs of each row (stable)."""
    out_f, in_f = scores.shape
    if in_f % m:
        raise ValueError(f"N:M mask: m={m} does not divide the {in_f} columns")
    groups = scores.reshape(out_f, in_f // m, m)
    order = torch.sort(groups, dim=2, stable=True).indices[..., :n]
    mask = torch.zeros(out_f, in_f // m, m, dtype=torch.bool)
    mask.scatter_(2, order, True)
    return mask.reshape(out_f, in_f)


def prune_mask(scores: torch.Tensor, cfg: PruneConfig) -> torch.Tensor:
    """The mask the config asks for: N:M when a pattern is set, else per-row unstructured."""
    nm = cfg.nm
    return nm_mask(scores, *nm) if nm else row_mask(scores, cfg.sparsity)


def store_pruned(
    model: nn.Module, name: str, weight: torch.Tensor, bias: torch.Tensor | None, cfg: PruneConfig
) -> nn.Module:
    """Replace module `name` by the storage `cfg` asks for, holding `weight` (pruned entries exactly 0, −0.0
    included, in the dtype the layer should keep) and `bias`; returns the new module. "dense" changes the
    nn.Linear in place."""
    weight = weight.detach().masked_fill(weight == 0, 0)  # -0.0 (e.g. from w * mask) is a pruned +0
    fmt = cfg.storage_format
    if fmt == "dense":  # in place: the Linear keeps its identity, dtype and requires_grad
        old = model.get_submodule(name)
        old.weight.data.copy_(weight)
        if bias is not None:
            old.bias.data.copy_(bias)
        return old
    new = SparseLinear.from_dense(weight, bias, fmt, cfg.nm)
    set_module(model, name, new)
    return new


def pruned_stats(module: nn.Module) -> dict:
    """Stats of one stored pruned module: sparsity (fraction of exact zeros of the weight it computes with),
    storage format and bytes of the stored weight (bias excluded), zeros and weight count."""
    kind = getattr(module, "layer_kind", None)
    if kind == "sparse_linear":
        w, fmt, nbytes = module.effective_weight(), module.format, module.storage_bytes()
    else:
        w = module.weight.detach()
        fmt, nbytes = "dense", w.numel() * w.element_size()
    zeros = int((w == 0).sum())
    return {"sparsity": zeros / w.numel(), "format": fmt, "bytes": nbytes, "zeros": zeros, "params": w.numel()}


def model_sparsity(model: nn.Module) -> float:
    """Fraction of exact zeros over every weight of the model (tied tensors once; a replaced layer that keeps its
    weight in buffers — a quantised Linear — counts as the weight it computes with)."""
    zeros = total = 0
    seen: set[int] = set()
    for mod in model.modules():
        weight_fn = getattr(mod, "effective_weight", None)
        if getattr(mod, "layer_kind", None) and not isinstance(mod, nn.Linear) and callable(weight_fn):
            w = weight_fn()
            zeros, total = zeros + int((w == 0).sum()), total + w.numel()
        for p in list(mod.parameters(recurse=False)):
            if id(p) in seen:
                continue
            seen.add(id(p))
            zeros, total = zeros + int((p.detach() == 0).sum()), total + p.numel()
    return zeros / max(total, 1)


def sparsity_report(stats: dict[str, dict], model: nn.Module | None = None) -> list[str]:
    """Notes for a StepReport: overall sparsity of the pruned modules (and of the whole model when given), the
    storage format(s) and bytes. `stats` maps module name to a `pruned_stats` dict."""
    zeros = sum(s["zeros"] for s in stats.values())
    params = sum(s["params"] for s in stats.values())
    nbytes = sum(s["bytes"] for s in stats.values())
    formats = sorted({s["format"] for s in stats.values()})
    notes = [
        f"pruned {len(stats)} Linear modules: sparsity {zeros / max(params, 1):.4f} over their {params:,} weights",
    ]
    if model is not None:
        notes.append(f"whole-model sparsity {model_sparsity(model):.4f} (exact zeros over all weights)")
    notes.append(
        f"storage: {', '.join(formats)}; {nbytes:,} bytes for the pruned weights "
        f"({nbytes * 8 / max(params, 1):.2f} bits per weight); no sparse CPU kernel: no speed-up is claimed"
    )
    return notes
