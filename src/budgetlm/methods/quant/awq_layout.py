"""Where AWQ's scales go in a decoder layer: the layout of a Llama-like or Gemma-3-like layer (its norms, attention
and MLP Linears, and the four groups of Linears that share an input with the op producing it), which form each norm
has (x·w or Gemma's x·(1 + w), told numerically), folding scales s into a group (the consumers' columns × s, the
producer's output channels ÷ s), and the check that folding random scales into a copy of a layer leaves its output
unchanged. A layer of another shape is a one-line ModelError.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from budgetlm.errors import ModelError

# ----------------------------------------------------------------------------------------------- folding


def norm_kind(norm: nn.Module) -> str:
    """'mul' for norms computing x̂·w (+ b) (Llama RMSNorm, LayerNorm), 'one_plus' for x̂·(1 + w) (Gemma);
    detected numerically on a copy (weight 0 then 1). Anything else is a one-line ModelError."""
    w = getattr(norm, "weight", None)
    if not isinstance(w, torch.Tensor) or w.ndim != 1:
        raise ModelError(f"awq cannot fold scales into {type(norm).__name__}: it has no 1-D weight")
    probe = copy.deepcopy(norm).float()
    x = torch.randn(4, w.numel(), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        if getattr(probe, "bias", None) is not None:
            probe.bias.zero_()
        probe.weight.zero_()
        y0 = probe(x)
        probe.weight.fill_(1.0)
        y1 = probe(x)
    if y1.abs().max() > 0 and y0.abs().max() <= 1e-6 * y1.abs().max():
        return "mul"
    if y0.abs().max() > 0 and torch.allclose(y1, 2 * y0, rtol=1e-4, atol=1e-6):
        return "one_plus"
    raise ModelError(f"awq cannot fold scales into {type(norm).__name__}: its output is neither x·w nor x·(1+w)")


@torch.no_grad()
def fold_into_norm(norm: nn.Module, s: torch.Tensor, kind: str) -> None:
    """Divide the norm's output channels by s."""
    w = norm.weight.data
    new = w.float() / s if kind == "mul" else (1.0 + w.float()) / s - 1.0
    w.copy_(new.to(w.dtype))
    if getattr(norm, "bias", None) is not None:
        norm.bias.data.copy_((norm.bias.data.float() / s).to(norm.bias.dtype))


@torch.no_grad()
def fold_into_linear(prev: nn.Linear, s: torch.Tensor) -> None:
    """Divide the Linear's output channels (weight rows, bias) by s."""
    prev.weight.data.copy_((prev.weight.data.float() / s[:, None]).to(prev.weight.dtype))
    if prev.bias is not None:
        prev.bias.data.copy_((prev.bias.data.float() / s).to(prev.bias.dtype))


@torch.no_grad()
def scale_columns(lin: nn.Linear, s: torch.Tensor) -> None:
    lin.weight.data.copy_((lin.weight.data.float() * s[None, :]).to(lin.weight.dtype))


# ----------------------------------------------------------------------------------------------- layout


@dataclass
class Layout:
    """The modules of one Llama-like or Gemma-3-like decoder layer AWQ works with."""

    attn: nn.Module
    mlp: nn.Module
    input_norm: nn.Module
    mlp_norm: nn.Module
    input_kind: str
    mlp_kind: str
    linears: dict[str, nn.Linear] = field(default_factory=dict)  # q, k, v, o, gate, up, down

    @property
    def scale_o(self) -> bool:
        """o_proj can take scales from v_proj only without grouped-query attention."""
        return self.linears["v"].out_features == self.linears["o"].in_features

    def fold(self, group: str, s: torch.Tensor) -> None:
        """Apply scales s to a group: consumers' columns × s, producer's output channels ÷ s."""
        li = self.linears
        if group == "qkv":
            fold_into_norm(self.input_norm, s, self.input_kind)
            consumers = [li["q"], li["k"], li["v"]]
        elif group == "gate_up":
            fold_into_norm(self.mlp_norm, s, self.mlp_kind)
            consumers = [li["gate"], li["up"]]
        elif group == "o":
            fold_into_linear(li["v"], s)
            consumers = [li["o"]]
        elif group == "down":
            fold_into_linear(li["up"], s)
            consumers = [li["down"]]
        else:  # pragma: no cover - internal
            raise ValueError(group)
        for lin in consumers:
            scale_columns(lin, s)


GROUPS = {"qkv": ("q", "k", "v"), "gate_up": ("gate", "up"), "o": ("o",), "down": ("down",)}
ATTN = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj"}
MLP = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}


def layout(layer: nn.Module, model_type: str) -> Layout:
    """The AWQ layout of a decoder layer; a one-line ModelError naming the model type if it is not Llama-like
    (input_layernorm → self_attn, post_attention_layernorm → mlp) or Gemma-3-like (pre_feedforward_layernorm)."""

    def fail(what: str) -> ModelError:
        return ModelError(
            f"awq supports Llama-like and Gemma-3-like decoder layers; model type '{model_type}' "
            f"({type(layer).__name__}) has {what}; use gptq or rtn for this model"
        )

    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    input_norm = getattr(layer, "input_layernorm", None)
    mlp_norm = getattr(
        layer, "pre_feedforward_layernorm", None
    )  # Gemma 3: post_attention_layernorm is on attn's output
    if mlp_norm is None:
        mlp_norm = getattr(layer, "post_attention_layernorm", None)  # Llama: the norm before the MLP
    if attn is None or mlp is None or input_norm is None or mlp_norm is None:
        parts = {"self_attn": attn, "mlp": mlp, "input_layernorm": input_norm, "a pre-MLP norm": mlp_norm}
        raise fail("no " + ", ".join(n for n, m in parts.items() if m is None))
    linears = {}
    for key, (parent, attr) in {
        **{k: (attn, v) for k, v in ATTN.items()},
        **{k: (mlp, v) for k, v in MLP.items()},
    }.items():
        mod = getattr(parent, attr, None)
        if not isinstance(mod, nn.Linear):
            raise fail(f"no nn.Linear {attr}")
        linears[key] = mod
    kinds = []
    for norm in (input_norm, mlp_norm):
        try:
            kinds.append(norm_kind(norm))
        except ModelError as exc:
            raise fail(f"a norm it cannot fold into ({exc})") from None
    return Layout(attn, mlp, input_norm, mlp_norm, kinds[0], kinds[1], linears)


@torch.no_grad()
def check_folding(lay: Layout, layer: nn.Module, x: torch.Tensor, kwargs: dict, model_type: str) -> None:
    """Fold random scales into a copy of a decoder layer: its output must not change (else ModelError)."""
    twin = copy.deepcopy(layer)
    mods = dict(twin.named_modules())
    names = {id(m): n for n, m in layer.named_modules()}

    def mirror(m: nn.Module) -> nn.Module:
        return mods[names[id(m)]]

    twin_lay = Layout(
        mirror(lay.attn),
        mirror(lay.mlp),
        mirror(lay.input_norm),
        mirror(lay.mlp_norm),
        lay.input_kind,
        lay.mlp_kind,
        {k: mirror(v) for k, v in lay.linears.items()},
    )
    gen = torch.Generator().manual_seed(0)
    for group in GROUPS:
        if group == "o" and not twin_lay.scale_o:
            continue
        width = twin_lay.linears[GROUPS[group][0]].in_features
        twin_lay.fold(group, torch.exp(torch.rand(width, generator=gen) - 0.5))

    def delta(mod):
        y = mod(x, **kwargs)
        return (y[0] if isinstance(y, tuple) else y) - x

    d0, d1 = delta(layer), delta(twin)
    rel = float((d1 - d0).norm() / d0.norm().clamp_min(1e-12))
    if not rel < 1e-3:
        raise ModelError(
            f"awq: folding scales into model type '{model_type}' ({type(layer).__name__}) changes the float "
            f"layer's output (relative error {rel:.1e}); this layout is not supported, use gptq or rtn"
        )
