"""One training run from the outside (`budgetlm train`, `budgetlm.api.train`): attach an adapter, or unfreeze the
whole model, train it with `fit`, checkpoint under DIR/checkpoints, save the trained model into DIR.

    DIR/train.json       the run: model, method, its resolved config, the resolved TrainConfig, seed
    DIR/checkpoints/     fit's checkpoints (trainable tensors, optimizer, scheduler, RNGs, data position)
    DIR/model.safetensors, config.json, budgetlm.json, ...   the trained model (a budgetlm model folder)

Methods: every registered adapter (an AdapterConfig: lora, dora, loha, vblora, lora_xs, mars, qlora, qmars,
lobi_lora), with its settings, or `full`: full fine-tuning, where every floating-point parameter of the model
trains (embeddings, norms and, with tied embeddings, the output matrix that shares them: exactly what
requires_grad covers after loading). The adapter's own `train` key is not used here: the run's TrainConfig
comes from `train` (a file and/or `train.key=value` settings), because this run checkpoints to DIR and an
adapter step does not.

Resume: `resume=True` with the same arguments continues from the newest checkpoint and ends with the weights of
an uninterrupted run (fit's guarantee; the adapter's initialisation is a function of the seed, and is then
overwritten by the checkpoint's tensors anyway). Everything is validated before the model is loaded: a
method that is no adapter, bad settings, an out folder holding another run's checkpoints without resume, or a
resume folder whose train.json differs from this run (the differing keys are named) are one-line ConfigErrors.
With resume and no checkpoint yet (killed before the first), the run starts from step 0.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from budgetlm.errors import ConfigError
from budgetlm.models.handle import MANIFEST, ModelHandle
from budgetlm.train import checkpoint as ckpt
from budgetlm.train.config import TrainConfig
from budgetlm.train.loop import TrainResult, fit
from budgetlm.utils import atomic_write_json

FULL = "full"
RUN_FILE = "train.json"


@dataclass
class TrainRun:
    model: str
    method: str
    config: dict  # the method's resolved config ({} for full fine-tuning)
    train: TrainConfig
    seed: int = 0

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "method": self.method,
            "config": self.config,
            "train": self.train.resolved(),
            "seed": self.seed,
        }


def plan_run(model: str, method: str, settings: dict, train: dict | TrainConfig, seed: int = 0) -> TrainRun:
    """Validate a run without loading the model: the method is an adapter or `full`, its settings and the
    TrainConfig parse."""
    from budgetlm.methods.adapt.base import AdapterConfig
    from budgetlm.methods.base import methods, parse_config

    if method == FULL:
        if settings:
            raise ConfigError(
                f"method 'full' (full fine-tuning) takes no settings, got {sorted(settings)}; set train.* only"
            )
        config = {}
    else:
        cls = methods.get(method)  # unknown names get close-match suggestions
        if not issubclass(cls, AdapterConfig):
            adapters = [n for n in methods.names() if issubclass(methods.get(n), AdapterConfig)]
            raise ConfigError(
                f"method '{method}' is not an adapter; train one of {', '.join(adapters)} or 'full' "
                "(to compress a model use `budgetlm compress`)"
            )
        if "train" in settings:
            raise ConfigError(f"method '{method}': give the training run as train.key=value or a train config file")
        config = parse_config(method, settings).model_dump(mode="json")
    return TrainRun(str(model), method, config, TrainConfig.parse(train), seed)


def check_out_dir(run: TrainRun, out: Path, resume: bool) -> None:
    """Refuse, before anything loads, an out folder that holds another run (or any checkpoints without resume)."""
    out = Path(out)
    if not resume and ckpt.list_checkpoints(out):
        raise ConfigError(f"{out} already holds checkpoints of a run; pass --resume to continue it or use a new --out")
    saved = out / RUN_FILE
    if resume and saved.is_file():
        diffs = ckpt.config_differences(json.loads(saved.read_text()), run.to_dict())
        if diffs:
            raise ConfigError(
                f"resume folder {out} was written with another config: {'; '.join(diffs)}; "
                "resume with the same arguments or use a new --out"
            )


def prepare(handle: ModelHandle, run: TrainRun, progress: bool = False) -> list[str]:
    """Attach the adapter (or unfreeze every floating-point parameter); returns notes."""
    from budgetlm.methods.base import StepContext, apply_steps

    if run.method == FULL:
        for p in handle.model.parameters():
            p.requires_grad_(p.is_floating_point())
        handle.provenance.append({"method": FULL, "config": {}})
        return ["full fine-tuning: every floating-point parameter trains"]
    report = apply_steps(handle, [{"method": run.method, **run.config}], StepContext(seed=run.seed, progress=progress))
    return report[0].notes


def train_run(
    run: TrainRun, out: str | Path, resume: bool = False, progress: bool = True
) -> tuple[ModelHandle, TrainResult, list[str]]:
    """Load, prepare, train with checkpoints under out/checkpoints, save the model into out."""
    from budgetlm.models.sources import load

    out = Path(out)
    check_out_dir(run, out, resume)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / RUN_FILE, run.to_dict())
    handle = load(run.model, seed=run.seed)
    notes = prepare(handle, run, progress)
    result = fit(handle, run.train, out, resume=resume, progress=progress)
    handle.provenance.append({"method": "train", "config": run.train.resolved(), "steps": result.steps})
    save_into(handle, out)
    return handle, result, notes


def save_into(handle: ModelHandle, out: Path) -> None:
    """Write the model folder's files into `out`, keeping what else is there (checkpoints, train.json): saved
    beside, then each file moved in by an atomic rename, the manifest last (a folder without it is no model)."""
    tmp = handle.save(out / ".model-tmp")
    files = sorted(tmp.iterdir(), key=lambda f: f.name == MANIFEST)
    for f in files:
        os.replace(f, out / f.name)
    shutil.rmtree(tmp, ignore_errors=True)
