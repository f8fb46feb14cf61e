"""optimum-quanto: weight-only int2/int4 (qint2/qint4), affine (MaxOptimizer: per-group min/max scale + shift).

quanto picks the group size itself (`QModuleMixin.__init__`: 128, lowered by 32 until it divides the input
width: 96 for SmolLM2's 576-wide inputs, 128 for 1536, 640 and 2048) and has no public option for it. For a
like-for-like table we set the layer attribute `weight_group_size` (the value quanto's own quantiser reads)
after `quantize()` and before `freeze()`: 64 for "g64", None (per output channel) for "pc"; "auto" keeps
quanto's choice.

Stored bytes are quanto's real tensors after freeze(): the packed codes (`weight._data._data`, uint8) and the
per-group `_scale` and `_shift`, which quanto keeps in the weight's dtype — fp32 here, since the model is fp32
(+0.5 bit per weight against fp16 scales at group 64). The forward is quanto's own QLinear forward, run with
inference mode switched off (quanto's tensor subclass fails inside torch.inference_mode; no_grad instead).
"""

from __future__ import annotations

import torch

from budgetlm.methods.base import MethodConfig, select_linears, set_module


class QuantoWrapped(torch.nn.Module):
    layer_kind = "peer_quanto"  # only for model_size; never saved or reloaded

    def __init__(self, qlin: torch.nn.Module):
        super().__init__()
        object.__setattr__(self, "inner", qlin)  # not a submodule: its state_dict is quanto's own encoding
        w = qlin.weight
        self.in_features, self.out_features = qlin.in_features, qlin.out_features
        data = w._data._data if hasattr(w._data, "_data") else w._data
        self.register_buffer("codes", data)
        self.register_buffer("scale", w._scale)
        self.register_buffer("shift", w._shift)
        self.group_size = qlin.weight_group_size

    def storage_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale, self.shift))

    def layer_meta(self) -> dict:
        return {"group_size": self.group_size}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # quanto's weight tensor subclass fails under torch.inference_mode ("Cannot set version_counter for
        # inference tensor"), which budgetlm's evaluation uses; no_grad outside inference mode runs the same kernels
        with torch.inference_mode(False), torch.no_grad():
            return self.inner(x)


@torch.no_grad()
def apply_quanto(handle, bits: int, group: str) -> dict:
    """Quantise every Linear budgetlm's methods would target (all but lm_head) with quanto, in place.
    group: "auto" (quanto's choice), "pc" (per output channel) or a number."""
    from optimum.quanto import freeze, qint2, qint4, quantize
    from optimum.quanto.nn import QLinear

    qtype = {2: qint2, 4: qint4}[bits]
    targets = select_linears(handle.model, MethodConfig())
    size = None if group == "pc" else (int(group) if group != "auto" else "auto")
    if isinstance(size, int):
        for name, lin in targets:
            if lin.in_features % size:
                raise ValueError(f"group_size {size} does not divide {name}'s {lin.in_features} inputs")
    names = [name for name, _ in targets]
    excluded = [n for n, m in handle.model.named_modules() if isinstance(m, torch.nn.Linear) and n not in names]
    quantize(handle.model, weights=qtype, exclude=excluded or None)  # quanto's public API
    qlins = {n: m for n, m in handle.model.named_modules() if isinstance(m, QLinear)}
    if sorted(qlins) != sorted(names):
        raise RuntimeError(f"quanto quantised {len(qlins)} Linears, expected {len(names)}")
    if size != "auto":
        for q in qlins.values():
            q.weight_group_size = size
    freeze(handle.model)
    groups: dict[str, int] = {}
    for name, q in qlins.items():
        set_module(handle.model, name, QuantoWrapped(q))
        groups[str(q.weight_group_size)] = groups.get(str(q.weight_group_size), 0) + 1
    handle.provenance.append({"method": "peer:quanto", "config": {"bits": bits, "group": group}})
    return {"layers": len(qlins), "group_sizes": groups, "library": f"optimum-quanto {_version()}"}


def _version() -> str:
    from importlib.metadata import version

    return version("optimum-quanto")
