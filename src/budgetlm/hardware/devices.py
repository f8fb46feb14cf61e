"""Device profiles and the roofline projection of a model measured here onto them. Every output is "projected".

Profiles live in devices.yaml beside this module (package data): per device its memory (GiB), memory bandwidth
(GB/s) and peak ops/s (GOP/s: fp32, and fp16 / int8 where the vendor states them), each figure with its source and,
when computed from other figures, the formula (`derived`). `load_devices()` reads and validates them.

A `Workload` is what the projection needs of one model (a cell): its stored weight bytes, the bytes a decode step
reads (hardware/size.py `read_bytes_per_token`), its parameters, the KV cache bytes per token of context (from the
model's config) and the context the projection is stated at. `project(workload, device)` gives:
  fits            weights + KV cache at the context + runtime overhead <= the device's memory
  decode          ratio x max(bytes / bandwidth, flops / peak) ms per token, with bytes = bytes read per token + the
                  KV cache at the context (a decode step at that position reads all of it), flops = 2 x parameters
  prefill         peak / flops per token / ratio tokens per second
where `ratio` is this host's measured decode ms / its roofline ms (hardware/host.py memory_bandwidth and
decode_roofline_ms), taken from the cell's own measurement when it has one; without one the ratio is 1 and the
projection says it is uncalibrated (the bare roofline). The peak used is the fp32 one unless asked otherwise
(budgetlm computes in fp32).
Simplifications, stated: the weights counted for memory are the stored bytes (a pruned layer's dense copy or a 2/3-bit
grid held in the 4-bit layout takes more); the prefill is scaled by the decode ratio (no host peak is measured to
calibrate it by); the runtime overhead is a torch CPU process's, whatever runtime the device would use.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from budgetlm.errors import ConfigError, DataError, ModelError, unknown
from budgetlm.results import Metric
from budgetlm.utils import yaml_load

GIB = 2**30
# what a torch CPU process holds besides weights and KV cache (interpreter, torch and transformers, activations at
# batch 1): stated, not measured per device
OVERHEAD_BYTES = 512 * 2**20
DEFAULT_CONTEXT = 2048
SIZE_ROWS = ("stored_bytes", "read_bytes_per_token", "params")  # the size rows a projection needs of a cell
Precision = Literal["fp32", "fp16", "int8"]


class Figure(BaseModel):
    """One figure of a profile with where it comes from."""

    model_config = ConfigDict(extra="forbid")
    value: float = Field(gt=0)
    source: str = Field(min_length=10, description="vendor page title and URL (what it says there)")
    derived: str | None = Field(None, min_length=10, description="the formula, when computed from other figures")
    part: str | None = Field(None, description="which part of the device a peak belongs to (CPU, GPU, NPU)")


class Device(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    label: str
    memory_gib: Figure
    bandwidth_gb_s: Figure
    peak_gops: dict[Precision, Figure]

    @model_validator(mode="after")
    def _fp32_peak(self) -> Device:
        if "fp32" not in self.peak_gops:
            raise ValueError("peak_gops needs an fp32 figure")
        return self

    @property
    def memory_bytes(self) -> float:
        return self.memory_gib.value * GIB


def profiles_path() -> Path:
    return Path(str(resources.files("budgetlm") / "hardware" / "devices.yaml"))


def load_devices(path: str | Path | None = None) -> dict[str, Device]:
    """The profiles by name, validated (a bad file is one ConfigError naming the device and field)."""
    path = Path(path) if path is not None else profiles_path()
    doc = yaml_load(path.read_text())
    entries = doc.get("devices") if isinstance(doc, dict) else None
    if not isinstance(entries, dict) or not entries:
        raise ConfigError(f"device profiles {path}: expected a 'devices:' mapping of name -> profile")
    out = {}
    for name, entry in entries.items():
        if not isinstance(entry, dict):
            raise ConfigError(f"device profiles {path}: device {name}: expected a mapping of its figures")
        try:
            out[str(name)] = Device.model_validate({**entry, "name": str(name)})
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(map(str, err["loc"])) or "profile"
            raise ConfigError(f"device profiles {path}: device {name}: {where}: {err['msg']}") from None
    return out


def select(names: str | None, devices: dict[str, Device]) -> dict[str, Device]:
    """The devices named in a comma-separated list (all when None); an unknown name gets the close ones."""
    if names is None:
        return devices
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    if not wanted:
        raise ConfigError("--device is empty; give device names from `budgetlm devices`")
    for n in wanted:
        if n not in devices:
            raise unknown("device", n, devices)
    return {n: devices[n] for n in wanted}


@dataclass(frozen=True)
class Calibration:
    """This host's decode against its own roofline: ratio = measured / roofline (>= 1 when the roofline holds)."""

    measured_decode_ms: float
    roofline_decode_ms: float
    host_bandwidth_gb_s: float
    where: str  # the cell folder it was measured in

    @property
    def ratio(self) -> float:
        return self.measured_decode_ms / self.roofline_decode_ms

    def to_dict(self) -> dict:
        return {"ratio": self.ratio, **asdict(self)}


@dataclass(frozen=True)
class Workload:
    label: str
    weights_bytes: float
    read_bytes_per_token: float
    params: float
    kv_bytes_per_token: float
    context: int
    calibration: Calibration | None = None

    @property
    def kv_bytes(self) -> float:
        return self.kv_bytes_per_token * self.context

    @property
    def flops_per_token(self) -> float:
        return 2 * self.params


def kv_bytes_per_token(config, bytes_per_value: int, context: int) -> float:
    """KV cache bytes per token of a `context`-token cache, averaged over the context: keys and values of every
    layer (num_key_value_heads x head_dim each); a sliding-window layer (config.layer_types) holds its window only."""
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    layers = config.num_hidden_layers
    types = getattr(config, "layer_types", None) or ["full_attention"] * layers
    window = getattr(config, "sliding_window", None)
    tokens = sum(min(context, window) if (t == "sliding_attention" and window) else context for t in types)
    return 2 * kv_heads * head_dim * bytes_per_value * tokens / context


def check_context(context: int | None, window: int | None) -> int:
    """The context to project at: --context, else DEFAULT_CONTEXT or the model's window if shorter."""
    if context is None:
        return min(DEFAULT_CONTEXT, window) if window else DEFAULT_CONTEXT
    if context < 1:
        raise ConfigError(f"--context must be a positive number of tokens (got {context})")
    if window and context > window:
        raise ConfigError(f"--context {context} is longer than the model's context window ({window} tokens)")
    return context


def _window(config) -> int | None:
    return getattr(config, "max_position_embeddings", None)


def _value_bytes(dtype: str) -> int:
    return {"float32": 4, "bfloat16": 2, "float16": 2}.get(dtype.removeprefix("torch."), 4)


def workload_from_model(handle, context: int | None) -> Workload:
    """A loaded model's workload from its size (hardware/size.py) and config; no measurement, so uncalibrated."""
    from budgetlm.hardware.size import model_size
    from budgetlm.hardware.speed import compute_dtype

    model = getattr(handle, "model", handle)
    size = model_size(model)
    context = check_context(context, _window(model.config))
    return Workload(
        label=str(getattr(handle, "source", "model")),
        weights_bytes=size["stored_bytes"].value,
        read_bytes_per_token=size["read_bytes_per_token"].value,
        params=size["params"].value,
        kv_bytes_per_token=kv_bytes_per_token(model.config, _value_bytes(compute_dtype(model)), context),
        context=context,
    )


def workload_from_cell(folder: Path, context: int | None) -> Workload:
    """A finished cell's workload: its measured size and decode (result.json), its model's config (the cell's saved
    model, else the model it started from), calibrated by its own decode against its own roofline."""
    folder = Path(folder)
    result, cell = _read_json(folder / "result.json"), _read_json(folder / "config.json")
    if "model" not in cell:
        raise DataError(f"{folder / 'config.json'} names no model; the study driver writes it")
    label = f"{cell['model']} {cell.get('pipeline', '')}".strip()
    spec = result.get("model_folder") or cell["model"]
    return workload_from_phases(result.get("phases") or {}, spec, label, str(folder), context)


def workload_from_phases(phases: dict, spec: str, label: str, where: str, context: int | None) -> Workload:
    """The workload of a measured model from its figures ({phase: {metric: {"value", "extra"}}}: a result.json's or
    the results store's rows) and the config of `spec` (its model), calibrated by its decode against its roofline
    when both were measured; `where` names the cell (its folder)."""
    size, speed = phases.get("size") or {}, phases.get("speed") or {}
    if any(k not in size for k in SIZE_ROWS):
        raise DataError(f"{where}: the cell was not benchmarked (it has no size phase)")
    config = config_of(str(spec))
    if config is None:
        raise ModelError(f"{where}: cannot read the config of its model {spec}")
    context = check_context(context, _window(config))
    calibration = None
    dec, roof = speed.get("decode_ms_per_token"), speed.get("decode_roofline_ms")
    if dec and roof and all(math.isfinite(r["value"] or math.nan) and r["value"] > 0 for r in (dec, roof)):
        calibration = Calibration(
            dec["value"], roof["value"], (roof.get("extra") or {}).get("bandwidth_gb_s", float("nan")), where
        )
    dtype = (speed.get("decode_ms_per_token", {}).get("extra") or {}).get("dtype", "float32")
    return Workload(
        label=label,
        weights_bytes=size["stored_bytes"]["value"],
        read_bytes_per_token=size["read_bytes_per_token"]["value"],
        params=size["params"]["value"],
        kv_bytes_per_token=kv_bytes_per_token(config, _value_bytes(dtype), context),
        context=context,
        calibration=calibration,
    )


@functools.lru_cache(maxsize=64)
def config_of(spec: str):
    """A model's config read through its skeleton (None when unreadable), once per process: a study's cells share a
    few models, and reading Gemma 3's from its GGUF takes ~25 s here."""
    from budgetlm.models.sources import skeleton

    module = skeleton(spec)
    return None if module is None else module.config


def _read_json(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text())
    except ValueError as exc:
        raise DataError(f"{path} is not JSON ({exc}); a cell folder holds what `budgetlm run` wrote") from None
    if not isinstance(doc, dict):
        raise DataError(f"{path} is not a JSON object; a cell folder holds what `budgetlm run` wrote")
    return doc


def project(
    work: Workload, device: Device, precision: Precision = "fp32", overhead_bytes: float = OVERHEAD_BYTES
) -> dict[str, Metric]:
    """The projected figures of `work` on `device` (see the module docstring), each source "projected", carrying the
    ratio it was scaled by and the device figures it used."""
    if precision not in device.peak_gops:
        raise ConfigError(f"device {device.name} has no {precision} peak; it states {', '.join(device.peak_gops)}")
    cal = work.calibration
    ratio = cal.ratio if cal else 1.0
    how = {
        "projected": True,
        "device": device.name,
        "context": work.context,
        "precision": precision,
        "host_ratio": ratio,
        "calibration": cal.to_dict() if cal else "uncalibrated: no decode measured here, the bare roofline (ratio 1)",
    }
    bw = device.bandwidth_gb_s.value * 1e9
    peak = device.peak_gops[precision].value * 1e9
    needed = work.weights_bytes + work.kv_bytes + overhead_bytes
    memory_ms = (work.read_bytes_per_token + work.kv_bytes) / bw * 1e3
    compute_ms = work.flops_per_token / peak * 1e3
    decode_ms = ratio * max(memory_ms, compute_ms)
    prefill = peak / work.flops_per_token / ratio
    parts = {"weights": work.weights_bytes, "kv_cache": work.kv_bytes, "runtime_overhead": overhead_bytes}
    return {
        "fits": Metric(
            float(needed <= device.memory_bytes),
            unit="bool",
            source="projected",
            extra={**how, "needed_bytes": needed, "memory_bytes": device.memory_bytes, **parts},
        ),
        "memory_needed": Metric(needed, unit="B", source="projected", extra={**how, **parts}),
        "decode_ms_per_token": Metric(
            decode_ms,
            unit="ms/token",
            source="projected",
            extra={
                **how,
                "memory_ms": memory_ms,
                "compute_ms": compute_ms,
                "bound": "memory" if memory_ms >= compute_ms else "compute",
                "formula": "host_ratio x max((read_bytes_per_token + kv_bytes) / bandwidth, 2 x params / peak)",
            },
        ),
        "prefill_tok_s": Metric(
            prefill,
            unit="tok/s",
            source="projected",
            extra={**how, "formula": "peak / (2 x params) / host_ratio"},
        ),
    }


def project_all(work: Workload, devices: dict[str, Device], precision: Precision = "fp32") -> dict[str, dict]:
    return {name: project(work, dev, precision) for name, dev in devices.items()}
