"""mars: Multi-Adapter Rank Sharing, as the issue specifies it (the MARS benchmark's adapter), with `opt` 0 or 1.

Per attention block, the projections that read the same input x (q_proj, k_proj, v_proj) share one
down-projection and one mixing matrix:

    D_qkv [s, d] ~ N(0, 1/r),  M_qkv [3r, s] ~ N(0, 1/r),  z = M_qkv D_qkv x = [z_q; z_k; z_v]  (r rows each),
    y_p = W_p x + (α/r) · U_p z_p,      U_p [out_p, r] = 0 at the start, for p in q, k, v.

Per MLP block the same with D_mlp [s, d], M_mlp [2r, s] split into gate and up, each with its own zero U.
o_proj and down_proj (whose inputs nothing else reads) get a standalone LoRA pair, A [r, in] ~ N(0, 1/r),
B [out, r] = 0 (base.LoRAPair). s = r unless set. N(0, 1/r) is read as variance 1/r (std r^-1/2).

- opt 0: D, M, U and both halves of the standalone pairs train.
- opt 1: the down-projections (the shared D's and the standalone A's) are frozen and pre-scaled by α/r, so the
  forward uses no further scale and only M, U (and the standalone B's, the pairs' up-projections) train.

Trainable parameters per decoder layer (d = hidden, o_q, o_k, o_v, i = MLP width, s = r by default):
    opt 0:  2·s·d + 5·r·s + r·(o_q + o_k + o_v + 2i) + r·(d_o_in + d) + r·(i + d)
    opt 1:  5·r·s + r·(o_q + o_k + o_v + 2i) + r·d + r·d

Design choices:
- the shared D and M are one module per block (`mars_qkv` on the attention module, `mars_gate_up` on the MLP
  module), saved once; each projection's delta (MarsDelta) references it and computes its rows of M D x. Each
  projection recomputes D x (r·d multiply-adds, as a LoRA A would) rather than caching it between calls:
  identical values and gradients, no state kept between forwards;
- grouping is by module name within one parent module (q/k/v under the attention, gate/up under the MLP); a
  targeted projection outside those groups gets a standalone pair, as o_proj and down_proj do;
- the dropout of the adapter input is drawn per projection (default 0).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from budgetlm.errors import ConfigError
from budgetlm.methods.adapt.base import (
    AdapterConfig,
    Delta,
    LoRAPair,
    attach,
    finish,
    seeded,
    select_targets,
)
from budgetlm.methods.base import StepContext, StepReport, implements, register_method
from budgetlm.models.handle import ModelHandle

GROUPS = {"qkv": ("q_proj", "k_proj", "v_proj"), "gate_up": ("gate_proj", "up_proj")}


@register_method("mars")
class MARS(AdapterConfig):
    """MARS: shared down-projection and mixing per attention / MLP block, per-projection zero-initialised ups."""

    opt: Literal[0, 1] = 0  # 1: down-projections frozen and pre-scaled by alpha / r; only M and the ups train
    s: int | None = Field(None, ge=1)  # rows of the shared down-projections (None: r)


class MarsShared(nn.Module):
    """D [s, d] and M [k·r, s] of one block; `frozen_down`: D is frozen and pre-scaled (opt 1)."""

    kind = "mars_shared"

    def __init__(self, d: int, s: int, k: int, r: int, scale: float, frozen_down: bool, gen=None):
        super().__init__()
        self.d, self.s, self.k, self.r, self.scale, self.frozen_down = d, s, k, r, scale, frozen_down
        self.down = nn.Linear(d, s, bias=False)
        self.mix = nn.Linear(s, k * r, bias=False)
        with torch.no_grad():
            self.down.weight.copy_(torch.randn(s, d, generator=gen) / r**0.5)
            self.mix.weight.copy_(torch.randn(k * r, s, generator=gen) / r**0.5)
            if frozen_down:
                self.down.weight.mul_(scale)
        self.down.weight.requires_grad_(not frozen_down)

    def meta(self) -> dict:
        keys = ("d", "s", "k", "r", "scale", "frozen_down")
        return {k: getattr(self, k) for k in keys}

    @classmethod
    def from_meta(cls, meta: dict, shared: dict[str, nn.Module]) -> MarsShared:
        return cls(meta["d"], meta["s"], meta["k"], meta["r"], meta["scale"], meta["frozen_down"])


class MarsDelta(Delta):
    """(α/r) · U_p (M D x)[rows of p], or U_p (M D' x) with D' = (α/r) D pre-scaled (opt 1)."""

    kind = "mars"

    def __init__(self, shared: MarsShared, shared_name: str, index: int, out_f: int):
        super().__init__()
        self.__dict__["shared"] = shared  # registered on its block, not here: saved once
        self.shared_name, self.index = shared_name, index
        self.up = nn.Linear(shared.r, out_f, bias=False)
        nn.init.zeros_(self.up.weight)

    @property
    def out_scale(self) -> float:
        return 1.0 if self.shared.frozen_down else self.shared.scale

    def _mix_rows(self) -> torch.Tensor:
        r = self.shared.r
        return self.shared.mix.weight[self.index * r : (self.index + 1) * r]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(F.linear(self.shared.down(x), self._mix_rows())) * self.out_scale

    def delta_weight(self) -> torch.Tensor:
        sh = self.shared
        return self.up.weight.float() @ self._mix_rows().float() @ sh.down.weight.float() * self.out_scale

    @torch.no_grad()
    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """A' = M_p·D (this projection's rows of the shared mixing times the shared down-projection; fp64, stored
        fp32) and B = U_p: the same update as a plain LoRA of rank r."""
        a = self._mix_rows().double() @ self.shared.down.weight.double()
        return a.float(), self.up.weight.detach(), self.out_scale

    def meta(self) -> dict:
        return {"shared": self.shared_name, "index": self.index, "out": self.up.out_features}

    @classmethod
    def from_meta(cls, meta: dict, shared: dict[str, nn.Module]) -> MarsDelta:
        return cls(shared[meta["shared"]], meta["shared"], meta["index"], meta["out"])


def mars_deltas(
    targets: list[tuple[str, nn.Module]], cfg: MARS, gen: torch.Generator
) -> tuple[dict[str, Delta], dict[str, MarsShared]]:
    """The deltas of every target and the shared modules of each (parent, group)."""
    s = cfg.s or cfg.r
    frozen = cfg.opt == 1
    members: dict[tuple[str, str], list[tuple[str, nn.Module]]] = {}
    deltas: dict[str, Delta] = {}
    for name, mod in targets:
        parent, _, child = name.rpartition(".")
        group = next((g for g, names in GROUPS.items() if child in names), None)
        if group is None:
            deltas[name] = LoRAPair(mod.in_features, mod.out_features, cfg.r, cfg.scale, frozen, gen)
        else:
            members.setdefault((parent, group), []).append((name, mod))
    shared: dict[str, MarsShared] = {}
    for (parent, group), mods in members.items():
        d = {m.in_features for _, m in mods}
        if len(d) != 1:
            raise ConfigError(f"method 'mars': {[n for n, _ in mods]} share an input but their widths differ ({d})")
        sname = f"{parent}.mars_{group}" if parent else f"mars_{group}"
        shared[sname] = sh = MarsShared(d.pop(), s, len(mods), cfg.r, cfg.scale, frozen, gen)
        for i, (name, mod) in enumerate(mods):
            deltas[name] = MarsDelta(sh, sname, i, mod.out_features)
    order = [n for n, _ in targets]
    return {n: deltas[n] for n in order}, shared


def attach_mars(handle: ModelHandle, cfg: MARS, ctx: StepContext) -> list[str]:
    targets = select_targets(handle.model, cfg)
    deltas, shared = mars_deltas(targets, cfg, seeded(ctx))
    attach(handle.model, cfg.method_name, deltas, cfg.dropout, shared)
    return [*shared, *deltas]


@implements(MARS)
def apply(handle: ModelHandle, cfg: MARS, ctx: StepContext) -> StepReport:
    names = attach_mars(handle, cfg, ctx)
    n_shared = sum(1 for n in names if ".mars_" in n or n.startswith("mars_"))
    notes = [
        f"MARS opt {cfg.opt} on {len(names) - n_shared} modules with {n_shared} shared down-projections "
        f"(r={cfg.r}, s={cfg.s or cfg.r})"
    ]
    return finish(handle, cfg, ctx, names, notes)
