"""lobi_lora: HOLA's Lo-Bi adapter path (arXiv 2506.18952) — LoRA on a Lo-Bi mixed-precision base, with the
LoRA pair initialised from the quantisation error.

1. Quantise the targets with `lobi` (methods/quant/lobi.py, all its settings: target_bits, candidates,
   group_size, sensitivity, quantizer, ...): per-Linear bit widths under the `target_bits` budget, chosen by
   sensitivity. The budget is the frozen base's, as QLoRA's 4 bits are: lobi runs without a stored correction
   (its `rank` stays 0), and the adapter is counted as what it is, trainable fp32 parameters.
2. For every target, E = W − Q(W) (Q(W) dequantised from the stored grid) and its truncated SVD
   E ≈ U_r Σ_r V_rᵀ (lobi.truncated_svd, the code lobi's own correction uses) give the LoRA pair

       B = U_r Σ_r^½  [out, r],     A = Σ_r^½ V_rᵀ  [r, in],     y = Q(W) x + B A x,

   so at step 0 the layer computes Q(W) + B A, whose error ‖W − Q(W) − B A‖_F = (Σ_{i>r} σ_i²)^½ is the
   Eckart–Young optimum for rank r. The balanced split (Σ^½ on both sides) gives A and B the same scale, so
   neither factor dominates the first updates (the PiSSA / LoftQ initialisation). The pair is applied
   unscaled: it starts as the error itself, so `alpha` has no role and setting it is an error.
3. The quantised base (packed codes, fp16 scales/zeros, no stored correction) is frozen; A and B train in fp32
   with the one training loop (`train`), and are what a checkpoint holds.

Design choices:
- the base's budget excludes the adapter (the alternative, lobi with rank r, budgets an fp16 correction and
  measures sensitivity with it; on narrow models the correction alone then costs bits per weight, e.g. ~2 on
  the 128-wide test model); the pair is computed in fp32 from the exact error, so step 0 is the optimum to
  fp32 rounding;
- the original float Linears are kept until every pair is built (one float copy of the targets at the peak);
- merging (`base.merge`) does not re-quantise: the codes stay, and the trained B A becomes the QuantLinear's
  fp16 low-rank correction (lr_u = B, lr_v = A): the merged model is a plain `lobi` model of rank r, with
  r·(in + out) fp16 values per module on top of the budgeted base; the only change is the fp16 rounding of B
  and A.
"""

from __future__ import annotations

import torch
from pydantic import field_validator
from torch import nn

from budgetlm.methods.adapt.base import AdapterConfig, LoRAPair, attach, finish, select_targets
from budgetlm.methods.base import StepContext, StepReport, implements, register_method
from budgetlm.methods.quant import lobi
from budgetlm.methods.quant.layers import QuantLinear
from budgetlm.models.handle import ModelHandle


@register_method("lobi_lora")
class LoBiLoRA(AdapterConfig, lobi.LoBi):
    """Lo-Bi LoRA: a LoRA pair initialised from the SVD of the quantisation error, on a frozen lobi base."""

    alpha: float | None = None  # not used: the pair is applied unscaled (see the module docstring)
    # the frozen base's embedding / lm_head stay float unless asked (lobi's default is on): the adapter path is
    # unchanged by the embeddings option until it is tried and measured with it
    embeddings: bool = False
    identity_at_attach = False  # the quantisation changes the outputs (the pair only corrects them)
    quantises_base = "lobi"

    @field_validator("rank")
    @classmethod
    def _no_stored_correction(cls, v: int) -> int:
        if v:
            raise ValueError("lobi_lora's correction is the trainable pair of rank r; remove rank (lobi's own)")
        return v

    @field_validator("alpha")
    @classmethod
    def _no_alpha(cls, v: float | None) -> float | None:
        if v is not None:
            raise ValueError("lobi_lora applies its pair unscaled (it starts as the quantisation error); remove alpha")
        return v

    @property
    def scale(self) -> float:
        return 1.0


class LoBiPair(LoRAPair):
    """B A x with B = U_r Σ_r^½, A = Σ_r^½ V_rᵀ of the quantisation error, both trainable, unscaled."""

    kind = "lobi_lora"
    requantises_on_merge = False

    def __init__(self, in_f: int, out_f: int, r: int, scale: float = 1.0, frozen_a: bool = False, gen=None):
        super().__init__(in_f, out_f, r, scale, frozen_a, gen)

    @classmethod
    @torch.no_grad()
    def from_error(cls, err: torch.Tensor, r: int) -> LoBiPair:
        out_f, in_f = err.shape
        pair = cls(in_f, out_f, r)
        u, s, vh = lobi.truncated_svd(err, r)
        root = s.sqrt()
        pair.B.weight.copy_(u * root)
        pair.A.weight.copy_(root[:, None] * vh)
        return pair

    def merge_into(self, base: nn.Module) -> nn.Module:
        """A QuantLinear base keeps its codes and gets B A as its fp16 low-rank correction."""
        if not isinstance(base, QuantLinear) or base.rank:
            return super().merge_into(base)
        correction = (self.B.weight.detach() * self.out_scale, self.A.weight.detach())
        return QuantLinear.from_codes(base.codes(), base.grid(), base.bias, base.perm, correction)


@implements(LoBiLoRA)
def apply(handle: ModelHandle, cfg: LoBiLoRA, ctx: StepContext) -> StepReport:
    model = handle.model
    originals = dict(select_targets(model, cfg, (nn.Linear,)))  # checked before anything changes
    quant = lobi.LoBi(**{k: getattr(cfg, k) for k in lobi.LoBi.model_fields})  # rank 0: no stored correction
    report = lobi.apply(handle, quant, ctx)  # validates its own settings before changing the model
    deltas: dict[str, LoBiPair] = {}
    bits: dict[int, int] = {}
    for name, linear in originals.items():
        layer = model.get_submodule(name)
        err = linear.weight.detach().float() - layer.dequantized_weight().float()
        deltas[name] = LoBiPair.from_error(err, cfg.r)
        bits[layer.bits] = bits.get(layer.bits, 0) + 1
    del originals
    attach(model, cfg.method_name, deltas, cfg.dropout)
    notes = [
        *report.notes,
        f"LoRA pairs (r={cfg.r}, fp32, trainable) initialised from the SVD of W − Q(W) on {len(deltas)} modules "
        f"({', '.join(f'{b}-bit × {n}' for b, n in sorted(bits.items()))}); merge stores B A as lobi's fp16 "
        "correction",
    ]
    out = finish(handle, cfg, ctx, list(deltas), notes)
    out.stats["lobi"] = {n: report.stats[n] for n in deltas}
    return out
