"""lora_xs: LoRA-XS (Bałazy et al., arXiv 2405.17604), low-rank adaptation with extremely few parameters.

For a target weight W [out, in], the truncated SVD  W ≈ U_r Σ_r V_rᵀ  gives two frozen factors,
B = U_r Σ_r [out, r] and A = V_rᵀ [r, in]; between them sits the only trainable matrix, R [r, r]:

    y = W x + scale · B R A x,        ΔW = scale · B R A,        scale = alpha / r,

so each module trains r² parameters whatever its width. R starts from N(0, σ²) with σ = 1e-5 (the paper's
initialisation: the update is tiny but not exactly zero, so the first gradients reach every entry of R).

Design choices:
- the SVD is of the weight the base layer computes with: the fp32 weight, or the dequantised weight of a
  quantised base (QuantLinear incl. its low-rank correction, NF4Linear); it runs in fp64 for stable factors of
  near-equal singular values and is stored in fp32;
- A and B are frozen nn.Linear modules (saved with the model, counted as Linear storage), R is an nn.Linear
  r -> r; the branch computes in fp32 on top of the base's output (base.AdaptedLinear);
- rank r <= min(in, out) (the SVD has no more factors): a larger r is a one-line ConfigError.
"""

from __future__ import annotations

import torch
from torch import nn

from budgetlm.methods.adapt.base import (
    AdapterConfig,
    Delta,
    attach,
    dense_weight,
    finish,
    seeded,
    select_targets,
)
from budgetlm.methods.base import StepContext, StepReport, implements, register_method
from budgetlm.models.handle import ModelHandle

R_INIT_STD = 1e-5


@register_method("lora_xs")
class LoRAXS(AdapterConfig):
    """LoRA-XS: a trainable r x r matrix between frozen truncated-SVD factors of each weight (r² parameters)."""

    r_init_std: float = R_INIT_STD  # std of R's Gaussian initialisation (0: exactly the base model at step 0)


class XSDelta(Delta):
    """scale · B R A x with frozen B = U_r Σ_r, A = V_rᵀ and trainable R."""

    kind = "lora_xs"

    def __init__(self, in_f: int, out_f: int, r: int, scale: float):
        super().__init__()
        self.r, self.scale = r, scale
        self.A = nn.Linear(in_f, r, bias=False).requires_grad_(False)
        self.R = nn.Linear(r, r, bias=False)
        self.B = nn.Linear(r, out_f, bias=False).requires_grad_(False)

    @classmethod
    @torch.no_grad()
    def from_weight(cls, w: torch.Tensor, r: int, scale: float, r_std: float, gen: torch.Generator) -> XSDelta:
        out_f, in_f = w.shape
        delta = cls(in_f, out_f, r, scale)
        U, S, Vh = torch.linalg.svd(w.double(), full_matrices=False)
        delta.B.weight.copy_((U[:, :r] * S[:r]).float())
        delta.A.weight.copy_(Vh[:r].float())
        delta.R.weight.copy_(torch.randn(r, r, generator=gen) * r_std)
        return delta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.B(self.R(self.A(x))) * self.scale

    def delta_weight(self) -> torch.Tensor:
        return self.B.weight.float() @ self.R.weight.float() @ self.A.weight.float() * self.scale

    @torch.no_grad()
    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """A' = R·A (in fp64, stored fp32) and B: the same update scale · B R A as a plain LoRA."""
        return (self.R.weight.double() @ self.A.weight.double()).float(), self.B.weight.detach(), self.scale

    def meta(self) -> dict:
        return {"in": self.A.in_features, "out": self.B.out_features, "r": self.r, "scale": self.scale}

    @classmethod
    def from_meta(cls, meta: dict, shared: dict[str, nn.Module]) -> XSDelta:
        return cls(meta["in"], meta["out"], meta["r"], meta["scale"])


def attach_lora_xs(handle: ModelHandle, cfg: LoRAXS, ctx: StepContext) -> list[str]:
    targets = select_targets(handle.model, cfg)
    gen = seeded(ctx)
    deltas = {n: XSDelta.from_weight(dense_weight(m), cfg.r, cfg.scale, cfg.r_init_std, gen) for n, m in targets}
    attach(handle.model, cfg.method_name, deltas, cfg.dropout)
    return list(deltas)


@implements(LoRAXS)
def apply(handle: ModelHandle, cfg: LoRAXS, ctx: StepContext) -> StepReport:
    names = attach_lora_xs(handle, cfg, ctx)
    notes = [f"LoRA-XS on {len(names)} modules: frozen SVD factors of rank {cfg.r}, R ~ N(0, {cfg.r_init_std}²)"]
    return finish(handle, cfg, ctx, names, notes)
