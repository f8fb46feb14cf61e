"""HQQ (Half-Quadratic Quantization, `hqq` package): data-free 2/3/4-bit, asymmetric, group or per-channel.

HQQ quantises each Linear with its proximal optimiser of the zero point (hqq.core.quantize.Quantizer). We call
HQQLinear with its own base config (`BaseQuantizeConfig(nbits, group_size, axis=1)`: groups of consecutive input
weights, like budgetlm's) and compute_dtype float16, which is how HQQ stores scale and zero (fp16) on its
normal GPU path. The wrapper dequantises with HQQ's own `dequantize()` (fp16, as HQQ does) and multiplies in
fp32 with the fp32 activations of the rest of the model.

Stored bytes are HQQ's real tensors: W_q (4-bit: two codes per uint8; 3-bit: ten codes per int32, rows padded
to a multiple of 10; 2-bit: four codes per uint8), scale and zero (fp16, one each per group). Bias stays fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from budgetlm.methods.base import MethodConfig, select_linears, set_module


class HQQWrapped(torch.nn.Module):
    layer_kind = "peer_hqq"  # only for model_size; these layers are never saved or reloaded

    def __init__(self, lin: torch.nn.Linear, bits: int, group_size: int | None):
        super().__init__()
        from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

        self.in_features, self.out_features = lin.in_features, lin.out_features
        cfg = BaseQuantizeConfig(nbits=bits, group_size=group_size, axis=1)
        bias = None if lin.bias is None else lin.bias.detach().clone()
        inner = HQQLinear(lin, cfg, del_orig=True, compute_dtype=torch.float16, device="cpu")
        inner.bias = None  # the wrapper keeps the fp32 bias
        object.__setattr__(self, "inner", inner)  # not a submodule: its state_dict holds non-tensor metadata
        meta = inner.meta
        self.register_buffer("W_q", inner.W_q.data)
        self.register_buffer("scale", meta["scale"])
        self.register_buffer("zero", meta["zero"])
        self.bias = torch.nn.Parameter(bias) if bias is not None else None
        self.bits, self.group_size = bits, meta["group_size"]

    def storage_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.W_q, self.scale, self.zero))

    def layer_meta(self) -> dict:
        return {"bits": self.bits, "group_size": self.group_size}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.inner.dequantize().float()
        return F.linear(x, w, self.bias)


@torch.no_grad()
def apply_hqq(handle, bits: int, group_size: int | None) -> dict:
    """Replace every Linear budgetlm's methods would target (all but lm_head) by an HQQ layer, in place."""
    targets = select_linears(handle.model, MethodConfig())
    for name, lin in targets:
        if group_size and lin.in_features % group_size:
            raise ValueError(f"group_size {group_size} does not divide {name}'s {lin.in_features} inputs")
    for name, lin in targets:
        set_module(handle.model, name, HQQWrapped(lin, bits, group_size))
    handle.provenance.append({"method": "peer:hqq", "config": {"bits": bits, "group_size": group_size}})
    return {"layers": len(targets), "library": f"hqq {_version('hqq')}"}


def _version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)
