"""Adapter folders: a trained adapter written in peft's on-disk format, and read back onto its base.

`budgetlm train` saves into its run folder DIR (beside train.json and checkpoints/):

    DIR/adapter_config.json        peft's config of the adapter
    DIR/adapter_model.safetensors  its tensors under peft's keys (base_model.model.<module>.lora_A.weight, ...)
    DIR/budgetlm_adapter.json      budgetlm's record, written last: the base model, the method and its config, how
                                   the adapter was written, the provenance (the marker `budgetlm.api.load` reads)
    DIR/base/                      only when the method quantised its own base (qlora, qmars: NF4; lobi_lora: lobi
                                   mixed bits): that base, without the adapter, as a budgetlm model folder

What peft's format holds, per method:
- lora, dora, loha, vblora are peft adapters: PeftModel.save_pretrained writes them (its README.md model card is
  left out), so `PeftModel.from_pretrained(base_model, DIR)` gives back the trained model bit for bit.
- budgetlm's adapters update each target by a product of low-rank factors, ΔW = s · B·M·A: LoRA-XS (M = R between
  the frozen SVD factors), MARS (A = the shared down-projection, M = this projection's rows of the shared
  mixing), and the plain pairs of qlora, lobi_lora and MARS's o_proj / down_proj (no M). Each is written as a
  peft LoRA per module, lora_A = M·A (the product in fp64, stored fp32), lora_B = B, lora_alpha / r = s
  (alpha_pattern / rank_pattern where modules differ): the same update, so the outputs agree to fp32 rounding,
  bitwise where there is no M. The parameterisation is not kept (LoRA-XS's frozen factors, MARS's sharing):
  training continues from the run's checkpoints, not from this file.
- peft attaches LoRA to nn.Linear only. Where the adapted layers are budgetlm's quantised layers (a base the method
  quantised, stored in DIR/base, or an input model that was already compressed), peft cannot load the file onto
  that base; budgetlm can: `load_adapter_folder` attaches the pairs as its own AdaptedLinear (base.LoRAPair, or
  LoBiPair for lobi_lora so that merging still stores the pair as lobi's correction). The record says which
  (`peft_loadable`), and so do train's notes.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from budgetlm.errors import ConfigError, ModelError
from budgetlm.methods.adapt import peft_adapters
from budgetlm.methods.adapt.base import PART, Delta, LoRAPair, attach, attached
from budgetlm.methods.base import methods, set_module
from budgetlm.models.handle import ModelHandle, is_budgetlm_folder
from budgetlm.models.sources import ADAPTER_RECORD
from budgetlm.utils import atomic_write_json

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
BASE_DIR = "base"
FORMAT = "budgetlm-adapter/1"
PREFIX = "base_model.model."  # peft's key prefix (PeftModel -> LoraModel -> the transformers model)


@dataclass
class SavedAdapter:
    files: list[str]  # what was written into the folder (BASE_DIR: the stored base)
    adapter_bytes: int  # adapter_model.safetensors + adapter_config.json
    base_bytes: int  # the stored base folder (0: the base is the input model)
    peft_loadable: bool
    notes: list[str]


def mb(n: int) -> str:
    return f"{n / 1e6:,.2f} MB"


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


# --- writing -----------------------------------------------------------------------------------------------------


def save_adapter(handle: ModelHandle, folder: str | Path, base: dict, method: str, config: dict) -> SavedAdapter:
    """Write the model's attached adapter into `folder` in peft's format, the base the method quantised into
    folder/base, and budgetlm's record last. `base` names the input model ({"model": spec, "seed": n})."""
    folder = Path(folder)
    model = handle.model
    kind = attached(model)
    if kind is None:
        raise ConfigError("save_adapter: the model carries no adapter; attach and train one first")
    quantised = methods.get(method).quantises_base if method in methods else None
    tmp = folder / ".adapter-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        if kind == peft_adapters.PART:
            peft_adapters.wrapper(model).save_pretrained(str(tmp))
            folded, linear = False, True
        else:
            folded, linear = write_lora(model, tmp)
        for name in (CONFIG, WEIGHTS):
            os.replace(tmp / name, folder / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    files = [CONFIG, WEIGHTS]
    base = dict(base)
    if quantised:
        with without_adapter(handle) as bare:
            bare.save(folder / BASE_DIR)
        files.append(BASE_DIR)
        base.update(folder=BASE_DIR, quantised=quantised)
    saved = SavedAdapter(
        files,
        sum((folder / f).stat().st_size for f in (CONFIG, WEIGHTS)),
        folder_bytes(folder / BASE_DIR) if quantised else 0,
        linear,
        [],
    )
    saved.notes = save_notes(folder, method, kind, base, folded, saved)
    record = {
        "format": FORMAT,
        "method": method,
        "config": config,
        "base": base,
        "written_as": "peft adapter" if kind == peft_adapters.PART else "peft LoRA",
        "peft_loadable": linear,
        "files": files,
        "source": handle.source,
        "provenance": handle.provenance,
        "notes": saved.notes,
    }
    atomic_write_json(folder / ADAPTER_RECORD, record)
    return saved


@torch.no_grad()
def write_lora(model: nn.Module, folder: Path) -> tuple[bool, bool]:
    """budgetlm's adapter as a peft LoRA: adapter_config.json (peft's LoraConfig) and adapter_model.safetensors.
    Returns (a middle factor was folded into lora_A somewhere, every adapted layer is an nn.Linear)."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    part = model.budgetlm_parts[PART]
    tensors, ranks, alphas = {}, {}, {}
    folded, linear = False, True
    for name in part["modules"]:
        layer = model.get_submodule(name)
        a, b, s = layer.delta.lora_factors()
        r = a.shape[0]
        alpha = s * r
        if alpha / r != s:  # peft's scaling lora_alpha / r would not give s exactly: fold s into B
            b, alpha = b * s, float(r)
        tensors[f"{PREFIX}{name}.lora_A.weight"] = a.contiguous()
        tensors[f"{PREFIX}{name}.lora_B.weight"] = b.contiguous()
        ranks[name], alphas[name] = r, alpha
        folded |= not isinstance(layer.delta, LoRAPair)
        linear &= isinstance(layer.base_layer, nn.Linear)
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=part["dropout"],
        target_modules=list(part["modules"]),
        bias="none",
        rank_pattern={n: v for n, v in ranks.items() if v != r},
        alpha_pattern={n: v for n, v in alphas.items() if v != alpha},
        base_model_name_or_path=model.__dict__.get("name_or_path") or None,  # as PeftModel.save_pretrained fills it
        inference_mode=True,
    )
    auto = {"base_model_class": type(model).__name__, "parent_library": type(model).__module__}
    config.save_pretrained(str(folder), auto_mapping_dict=auto)
    save_file(tensors, str(folder / WEIGHTS), metadata={"format": "pt"})
    return folded, linear


@contextmanager
def without_adapter(handle: ModelHandle) -> Iterator[ModelHandle]:
    """The handle with budgetlm's adapter taken off (base layers back in place, shared modules and the part gone,
    provenance up to the adapter step, marked `base_only`); everything is put back on exit."""
    model = handle.model
    parts = model.budgetlm_parts
    part = parts[PART]
    layers = {n: model.get_submodule(n) for n in part["modules"]}
    shared = {n: model.get_submodule(n) for n in part["shared"]}
    provenance = handle.provenance
    steps = [i for i, p in enumerate(provenance) if p.get("method") == part["method"]]
    cut = steps[-1] if steps else len(provenance)
    try:
        for n, layer in layers.items():
            set_module(model, n, layer.base_layer)
        for n in shared:
            parent, _, child = n.rpartition(".")
            delattr(model.get_submodule(parent) if parent else model, child)
        model.budgetlm_parts = {k: v for k, v in parts.items() if k != PART}
        handle.provenance = [*provenance[:cut], *({**p, "base_only": True} for p in provenance[cut : cut + 1])]
        yield handle
    finally:
        for n, mod in shared.items():
            set_module(model, n, mod)
        for n, layer in layers.items():
            set_module(model, n, layer)
        model.budgetlm_parts = parts
        handle.provenance = provenance


def save_notes(folder: Path, method: str, kind: str, base: dict, folded: bool, saved: SavedAdapter) -> list[str]:
    how = "" if kind == peft_adapters.PART else ", as a plain LoRA,"
    notes = [
        f"saved the {method} adapter in peft's format{how} in {folder}: {WEIGHTS} + {CONFIG} "
        f"({mb(saved.adapter_bytes)}); its base: {base_label(base)}"
    ]
    if folded:
        notes.append(
            f"{method}'s middle factor is folded into lora_A (lora_A = M·A in fp64): the same update, outputs equal "
            "to fp32 rounding; continue training from the checkpoints, which keep the method's own parameters"
        )
    if saved.base_bytes:
        notes.append(
            f"the {base['quantised']}-quantised base the adapter was trained on is saved as a budgetlm model folder "
            f"in {folder / BASE_DIR} ({mb(saved.base_bytes)})"
        )
    load = f"evaluate it: budgetlm eval {folder}; in Python: budgetlm.api.load('{folder}')"
    if saved.peft_loadable:
        seed = f", seed={base['seed']}" if base.get("seed") else ""
        model = f"budgetlm.api.load('{base['model']}'{seed}).model"
        notes.append(f"{load}; with peft: PeftModel.from_pretrained({model}, '{folder}')")
    else:
        notes.append(
            f"{load}; peft attaches LoRA to nn.Linear only, not to budgetlm's quantised layers: load it with budgetlm"
        )
    return notes


def base_label(base: dict) -> str:
    if base.get("folder"):
        return f"{base['model']} quantised with {base['quantised']} (saved in {BASE_DIR}/)"
    seed = f" (seed {base['seed']})" if base.get("model") == "tiny-random" and base.get("seed") else ""
    return f"{base['model']}{seed}"


def remove_adapter(folder: str | Path) -> None:
    """Remove an adapter this code wrote into `folder` (the record first, then the files it lists)."""
    folder = Path(folder)
    record_path = folder / ADAPTER_RECORD
    if not record_path.is_file():
        return
    try:
        files = json.loads(record_path.read_text()).get("files", [CONFIG, WEIGHTS])
    except (OSError, ValueError):
        files = [CONFIG, WEIGHTS]
    record_path.unlink()
    for name in files:
        if name in (CONFIG, WEIGHTS):
            (folder / name).unlink(missing_ok=True)
        elif name == BASE_DIR and is_budgetlm_folder(folder / BASE_DIR):
            shutil.rmtree(folder / BASE_DIR)


# --- reading -----------------------------------------------------------------------------------------------------


def load_adapter_folder(path: str | Path) -> ModelHandle:
    """Load an adapter folder: its base (the input model, or the quantised base in path/base), then the adapter
    (through peft where every adapted layer is an nn.Linear, else as budgetlm's own pairs). The adapted layers are
    the base's modules peft's config matches (peft may shorten many names to suffixes such as `q_proj`)."""
    from peft import PeftConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    path = Path(path)
    record = read_record(path)
    try:
        config = PeftConfig.from_pretrained(str(path))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"adapter folder {path}: cannot read {CONFIG} ({_first_line(exc)}); train it again") from None
    handle = load_base(path, record)
    model = handle.model
    targets = [n for n, _ in model.named_modules() if n and check_target_module_exists(config, n)]
    if not targets:
        raise ModelError(
            f"adapter folder {path}: no module of its base {base_label(record['base'])} matches the adapter's "
            "targets; the base changed since training: restore it or train again"
        )
    try:
        if all(isinstance(model.get_submodule(n), nn.Linear) for n in targets):
            peft_adapters.load_peft_adapter(handle, path, record["method"])
        else:
            attach_pairs(handle, path, config, targets, record["method"])
    except (ValueError, KeyError, RuntimeError) as exc:
        raise ModelError(
            f"adapter folder {path}: cannot attach the adapter to its base ({_first_line(exc)}); train it again"
        ) from None
    handle.source = str(path)
    handle.provenance = list(record.get("provenance") or [])
    return handle


def read_record(path: Path) -> dict:
    try:
        record = json.loads((path / ADAPTER_RECORD).read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(
            f"adapter folder {path}: {ADAPTER_RECORD} is unreadable ({_first_line(exc)}); train it again"
        ) from None
    if not isinstance(record, dict) or record.get("format") != FORMAT or not isinstance(record.get("base"), dict):
        raise ModelError(f"adapter folder {path}: {ADAPTER_RECORD} is not a {FORMAT} record; train it again")
    for name in (CONFIG, WEIGHTS):
        if not (path / name).is_file():
            raise ModelError(f"adapter folder {path} has no {name}; train it again (or restore the file)")
    return record


def load_base(path: Path, record: dict) -> ModelHandle:
    """The base the adapter was trained on; a one-line ModelError naming it and the fix when it is gone."""
    from budgetlm.models.sources import BUNDLED, load

    base = record["base"]
    if base.get("folder"):
        folder = path / base["folder"]
        if not is_budgetlm_folder(folder):
            raise ModelError(
                f"adapter folder {path}: its {base.get('quantised', 'quantised')} base model folder {folder} is "
                f"missing or incomplete; restore it from where budgetlm train saved it, or train again"
            )
        return load(folder)
    spec = str(base.get("model", ""))
    if spec not in BUNDLED and not Path(spec).expanduser().exists():
        raise ModelError(
            f"adapter folder {path}: its base model '{spec}' cannot be found; put the model back there, or set "
            f'"base": {{"model": ...}} in {path / ADAPTER_RECORD} to where it is now'
        )
    return load(spec, seed=int(base.get("seed") or 0))


@torch.no_grad()
def attach_pairs(handle: ModelHandle, path: Path, config, targets: list[str], method: str) -> None:
    """Attach the LoRA of adapter_model.safetensors to `targets` as budgetlm's pairs (layers peft cannot wrap; only
    budgetlm's own adapters, written by `write_lora` with exact module names in alpha_pattern, get here)."""
    from safetensors.torch import load_file

    from budgetlm.methods.adapt.lobi_lora import LoBiPair

    tensors = load_file(str(path / WEIGHTS))
    cls = LoBiPair if method == "lobi_lora" else LoRAPair
    alphas = config.alpha_pattern or {}
    deltas: dict[str, Delta] = {}
    for name in targets:
        a, b = tensors[f"{PREFIX}{name}.lora_A.weight"], tensors[f"{PREFIX}{name}.lora_B.weight"]
        r = a.shape[0]
        pair = cls(a.shape[1], b.shape[0], r, alphas.get(name, config.lora_alpha) / r, gen=torch.Generator())
        pair.A.weight.copy_(a)
        pair.B.weight.copy_(b)
        deltas[name] = pair
    attach(handle.model, method, deltas, config.lora_dropout or 0.0)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
