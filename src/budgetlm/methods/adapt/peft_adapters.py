"""lora, dora, loha, vblora: adapters through peft (0.21), not rewritten.

- lora: LoRA (Hu et al., arXiv 2106.09685), ΔW = (alpha/r) B A, A kaiming-uniform, B = 0 (peft's default init);
- dora: DoRA (Liu et al., arXiv 2402.09353), peft's LoraConfig(use_dora=True): the weight is split into a
  magnitude vector (trainable) and a direction updated by LoRA;
- loha: LoHa (Hyeon-Woo et al., FedPara, arXiv 2108.06098), ΔW = (B1 A1) ⊙ (B2 A2) · alpha/r, one factor zero;
- vblora: VB-LoRA (Li et al., arXiv 2405.15179): every rank-one piece of every adapter is a top-k mixture of
  sub-vectors from one vector bank shared by the whole model. Not zero-initialised (bank and logits are random),
  so attaching it changes the outputs. `vector_length` must divide the widths of every target (64 divides
  SmolLM2's 576).

How the adapter lives in a ModelHandle: `get_peft_model` injects peft's layers into handle.model in place (the
handle keeps the transformers model, so names, evaluation and later steps see the model they know), freezes the
base and leaves requires_grad on the adapter only. The PeftModel wrapper is kept in the model's __dict__ (not a
registered submodule) for peft's own save / merge.

Saving (the choice): ModelHandle.save writes the adapter *unmerged* inside model.safetensors, next to the base
weights, and records the peft config in budgetlm.json ("parts"); loading re-injects the adapter with peft
(`reattach`) before the tensors load, so the folder reloads to bit-identical outputs and can keep training.
Merging on save was rejected: it loses the adapter and, for a quantised base, changes the model. For peft's own
format, `save_peft_adapter(handle, dir)` writes adapter_config.json + adapter_model.safetensors with
PeftModel.save_pretrained, which `PeftModel.from_pretrained(base_model, dir)` (or `load_peft_adapter`) reads.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from pydantic import Field
from torch import nn

from budgetlm.errors import ConfigError
from budgetlm.methods.adapt.base import AdapterConfig, finish, select_targets
from budgetlm.methods.base import StepContext, StepReport, implements, register_method
from budgetlm.models.handle import ModelHandle

PART = "peft_adapter"
_WRAPPER = "_budgetlm_peft"  # key of the PeftModel in the model's __dict__


@register_method("lora")
class LoRA(AdapterConfig):
    """LoRA through peft: a trainable low-rank update B A (B zero-initialised) on each target."""


@register_method("dora")
class DoRA(AdapterConfig):
    """DoRA through peft: weight-decomposed LoRA (trainable magnitude + LoRA-updated direction)."""


@register_method("loha")
class LoHa(AdapterConfig):
    """LoHa through peft: a Hadamard product of two low-rank updates."""


@register_method("vblora")
class VBLoRA(AdapterConfig):
    """VB-LoRA through peft: low-rank updates composed from one shared vector bank (top-k mixtures)."""

    num_vectors: int = Field(256, ge=1)  # vectors in the shared bank
    vector_length: int = Field(64, ge=1)  # must divide the in and out widths of every target
    topk: int = Field(2, ge=1)

    identity_at_attach = False  # the bank and the logits are random: the update is not zero at the start


def peft_config(cfg: AdapterConfig, names: list[str]):
    """The peft config of an adapter config over the exact module names `names`."""
    from peft import LoHaConfig, LoraConfig, VBLoRAConfig

    common = {"r": cfg.r, "target_modules": names}
    if isinstance(cfg, (LoRA, DoRA)):
        return LoraConfig(
            lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, use_dora=isinstance(cfg, DoRA), bias="none", **common
        )
    if isinstance(cfg, LoHa):
        return LoHaConfig(alpha=cfg.alpha, module_dropout=cfg.dropout, **common)
    return VBLoRAConfig(
        num_vectors=cfg.num_vectors,
        vector_length=cfg.vector_length,
        topk=cfg.topk,
        vblora_dropout=cfg.dropout,
        **common,
    )


def _check(cfg: AdapterConfig, targets: list[tuple[str, nn.Module]]) -> None:
    if isinstance(cfg, VBLoRA):
        if cfg.topk > cfg.num_vectors:
            raise ConfigError(f"method 'vblora': topk={cfg.topk} exceeds num_vectors={cfg.num_vectors}")
        for name, mod in targets:
            if mod.in_features % cfg.vector_length or mod.out_features % cfg.vector_length:
                raise ConfigError(
                    f"method 'vblora': vector_length={cfg.vector_length} does not divide the widths of {name} "
                    f"({mod.in_features} -> {mod.out_features}); use a common divisor such as 64 or 32"
                )


def _jsonable(d: dict) -> dict:
    return json.loads(json.dumps(d, default=lambda o: sorted(o) if isinstance(o, set) else str(o)))


def inject(model: nn.Module, config, method: str) -> None:
    """Inject peft's layers for `config` into the model in place and record the part."""
    from peft import get_peft_model

    wrapper = get_peft_model(model, config)
    model.__dict__[_WRAPPER] = wrapper
    meta = {"method": method, "config": _jsonable(config.to_dict())}
    model.budgetlm_parts = {**(getattr(model, "budgetlm_parts", None) or {}), PART: meta}


def reattach(model: nn.Module, meta: dict) -> None:
    """Re-inject a saved peft adapter into a freshly built model (the tensors are loaded next)."""
    from peft import PeftConfig

    inject(model, PeftConfig.from_peft_type(**meta["config"]), meta["method"])


def wrapper(model: nn.Module):
    """The PeftModel around a model carrying a peft adapter."""
    if _WRAPPER not in model.__dict__:
        raise ConfigError("the model carries no peft adapter; apply lora, dora, loha or vblora first")
    return model.__dict__[_WRAPPER]


def save_peft_adapter(handle: ModelHandle, folder: str | Path) -> Path:
    """Write the adapter in peft's format (PeftModel.save_pretrained): adapter_config.json and
    adapter_model.safetensors, loadable with PeftModel.from_pretrained(base_model, folder)."""
    folder = Path(folder)
    wrapper(handle.model).save_pretrained(str(folder))
    return folder


def load_peft_adapter(handle: ModelHandle, folder: str | Path, method: str = "lora") -> None:
    """Attach an adapter saved in peft's format (PeftModel.from_pretrained) to the handle's model, in place."""
    from peft import PeftModel

    model = handle.model
    pm = PeftModel.from_pretrained(model, str(folder))
    model.__dict__[_WRAPPER] = pm
    meta = {"method": method, "config": _jsonable(pm.peft_config["default"].to_dict())}
    model.budgetlm_parts = {**(getattr(model, "budgetlm_parts", None) or {}), PART: meta}


def merge_peft(model: nn.Module) -> list[str]:
    """Fold the peft adapter into the base weights (peft's merge_and_unload) and forget the wrapper."""
    pm = model.__dict__.pop(_WRAPPER)
    method = model.budgetlm_parts[PART]["method"]
    pm.merge_and_unload()
    if hasattr(model, "peft_config"):
        del model.peft_config
    return [f"merged {method} into the base weights (peft merge_and_unload)"]


@torch.no_grad()
def _attach(handle: ModelHandle, cfg: AdapterConfig, ctx: StepContext) -> list[str]:
    targets = select_targets(handle.model, cfg, (nn.Linear,))
    _check(cfg, targets)
    names = [n for n, _ in targets]
    with torch.random.fork_rng(devices=[]):  # peft initialises from the global generator: seed it, restore after
        torch.manual_seed(ctx.seed)
        inject(handle.model, peft_config(cfg, names), cfg.method_name)
    return names


@implements(LoRA)
@implements(DoRA)
@implements(LoHa)
@implements(VBLoRA)
def apply(handle: ModelHandle, cfg: AdapterConfig, ctx: StepContext) -> StepReport:
    names = _attach(handle, cfg, ctx)
    report = finish(handle, cfg, ctx, names, [f"{cfg.method_name} through peft on {len(names)} modules (r={cfg.r})"])
    if isinstance(cfg, VBLoRA):
        report.notes.append("the vector bank is shared by all modules: counted once, at the first module")
    return report
