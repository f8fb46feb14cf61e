"""A method is a config plus a function. The config is a typed pydantic model (validated, serialisable,
with `targets`/`ignore` module-name patterns); `@implements(Config)` marks the function that applies it
to a ModelHandle in place and returns a StepReport. `apply_steps` runs an ordered pipeline of steps.
"""

from __future__ import annotations

import fnmatch
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from budgetlm.errors import ConfigError
from budgetlm.models.handle import ModelHandle
from budgetlm.registry import Registry

methods: Registry[type[MethodConfig]] = Registry("method")


def _register_builtin() -> None:
    methods.add("rtn", "budgetlm.methods.quant.rtn:RTN")
    methods.add("nf4", "budgetlm.methods.quant.nf4:NF4")
    methods.add("gptq", "budgetlm.methods.quant.gptq:GPTQ")
    methods.add("awq", "budgetlm.methods.quant.awq:AWQ")
    methods.add("lobi", "budgetlm.methods.quant.lobi:LoBi")
    methods.add("magnitude", "budgetlm.methods.prune.magnitude:Magnitude")
    methods.add("wanda", "budgetlm.methods.prune.wanda:Wanda")
    methods.add("sparsegpt", "budgetlm.methods.prune.sparsegpt:SparseGPT")
    methods.add("shortgpt", "budgetlm.methods.prune.shortgpt:ShortGPT")
    methods.add("lora", "budgetlm.methods.adapt.peft_adapters:LoRA")
    methods.add("dora", "budgetlm.methods.adapt.peft_adapters:DoRA")
    methods.add("loha", "budgetlm.methods.adapt.peft_adapters:LoHa")
    methods.add("vblora", "budgetlm.methods.adapt.peft_adapters:VBLoRA")
    methods.add("lora_xs", "budgetlm.methods.adapt.lora_xs:LoRAXS")
    methods.add("mars", "budgetlm.methods.adapt.mars:MARS")
    methods.add("qlora", "budgetlm.methods.adapt.qlora:QLoRA")
    methods.add("qmars", "budgetlm.methods.adapt.qlora:QMARS")
    methods.add("kd", "budgetlm.methods.distill.kd:KD")
    methods.add("hidden_kd", "budgetlm.methods.distill.kd:HiddenKD")
    methods.add("lobi_lora", "budgetlm.methods.adapt.lobi_lora:LoBiLoRA")


class MethodConfig(BaseModel):
    """Base of every method config. `targets`/`ignore` are fnmatch patterns over module names."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    targets: list[str] = ["*"]
    ignore: list[str] = ["lm_head", "*.lm_head"]

    method_name: ClassVar[str] = ""
    needs_calibration: ClassVar[bool] = False
    apply_fn: ClassVar[Callable[..., StepReport] | None] = None

    @classmethod
    def describe(cls) -> str:
        return (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""

    def check(self, model: torch.nn.Module) -> None:
        """Raise a one-line ConfigError when this config cannot apply to `model` (targets that match nothing, a group
        size that does not divide a width, more layers removed than exist). Reads only module names and shapes, so it
        also runs on a weightless copy (meta device) before a study writes anything; `apply` calls it first. The
        default checks nothing."""


def register_method(name: str):
    def deco(cls: type[MethodConfig]) -> type[MethodConfig]:
        cls.method_name = name
        methods.add(name, cls)
        return cls

    return deco


def implements(cfg_cls: type[MethodConfig]):
    def deco(fn):
        cfg_cls.apply_fn = staticmethod(fn)
        return fn

    return deco


@dataclass
class StepContext:
    seed: int = 0
    n_calibration: int = 64
    calibration_len: int = 256
    progress: bool = False
    _calibration: torch.Tensor | None = None

    def calibration(self, tokenizer) -> torch.Tensor:
        """[n, seq_len] token ids of calibration text (built once per context)."""
        if self._calibration is None:
            from budgetlm.data.corpus import calibration_batches

            self._calibration = calibration_batches(tokenizer, self.n_calibration, self.calibration_len, self.seed)
        return self._calibration


@dataclass
class StepReport:
    method: str
    config: dict
    seconds: float = 0.0
    peak_rss: int | None = None
    stats: dict[str, Any] = field(default_factory=dict)  # per-module: error, bits, sparsity...
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def parse_config(name: str, values: dict) -> MethodConfig:
    """Validate a step's config; a bad key or value raises a one-line ConfigError naming it."""
    cls = methods.get(name)
    try:
        return cls.model_validate(values)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(x) for x in err["loc"]) or "config"
        if err["type"] == "extra_forbidden":
            allowed = ", ".join(k for k in cls.model_fields)
            raise ConfigError(f"method '{name}': unknown setting '{loc}' (allowed: {allowed})") from None
        raise ConfigError(
            f"method '{name}': {loc}: {err['msg'].removeprefix('Value error, ')} (got {err.get('input')!r})"
        ) from None


def select_linears(
    model: torch.nn.Module, cfg: MethodConfig, types: tuple[type, ...] = (torch.nn.Linear,)
) -> list[tuple[str, torch.nn.Linear]]:
    """The nn.Linear modules (or modules of `types`) a config targets, in model order; none is a one-line
    ConfigError naming the patterns and the Linear modules that exist."""
    out, linears = [], []
    # with `embeddings: true` (integer-grid quantisers) the lm_head is quantised as the embedding matrix, not here
    head = model.get_output_embeddings() if getattr(cfg, "embeddings", False) else None
    for name, mod in model.named_modules():
        if not isinstance(mod, types) or (head is not None and mod is head):
            continue
        linears.append(name)
        if any(fnmatch.fnmatchcase(name, p) for p in cfg.ignore):
            continue
        if any(fnmatch.fnmatchcase(name, p) for p in cfg.targets):
            out.append((name, mod))
    if not out:
        method = cfg.method_name or type(cfg).__name__
        if not linears:
            raise ConfigError(f"method '{method}': the model has no nn.Linear layers left to change")
        shown = ", ".join(linears[:4]) + (f", ... ({len(linears)} in all)" if len(linears) > 4 else "")
        raise ConfigError(
            f"method '{method}': targets {cfg.targets} (ignore {cfg.ignore}) match no nn.Linear module; "
            f"the model has {shown}"
        )
    return out


def set_module(model: torch.nn.Module, name: str, new: torch.nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def apply_steps(handle: ModelHandle, steps: list[dict], ctx: StepContext | None = None) -> list[StepReport]:
    """Apply {"method": name, **config} steps in order, in place; record each in the provenance."""
    from budgetlm.hardware.memory import PeakRSS

    ctx = ctx or StepContext()
    parsed = []
    for step in steps:  # validate the whole pipeline before changing anything
        step = dict(step)
        if "method" not in step:
            raise ConfigError(f"pipeline step {step} has no 'method' key; write e.g. {{method: rtn, bits: 8}}")
        name = step.pop("method")
        parsed.append(parse_config(name, step))
    reports = []
    for cfg in parsed:
        t0 = time.perf_counter()
        with PeakRSS() as rss:
            report = type(cfg).apply_fn(handle, cfg, ctx)
        report.seconds = time.perf_counter() - t0
        report.peak_rss = rss.peak_bytes
        handle.provenance.append({"method": cfg.method_name, "config": cfg.model_dump(), "seconds": report.seconds})
        reports.append(report)
    return reports


_register_builtin()
