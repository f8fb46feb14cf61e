"""One training run from the outside (`budgetlm train`, `budgetlm.api.train`): attach an adapter, or unfreeze the
whole model, train it with `fit`, checkpoint under DIR/checkpoints, save what was trained into DIR.

    DIR/train.json       the run: model, method, its resolved config, the resolved TrainConfig, seed
    DIR/checkpoints/     fit's checkpoints (trainable tensors, optimizer, scheduler, RNGs, data position)
    DIR/adapter_config.json, adapter_model.safetensors, budgetlm_adapter.json [, base/]
                         by default: the trained adapter in peft's format and budgetlm's record of its base
                         (methods/adapt/folder.py says what peft's format holds for each method)
    DIR/model.safetensors, config.json, budgetlm.json, ...
                         with merge=True (`--merge`), and for `full`: the trained model as a budgetlm model folder
                         (the adapter folded into the weights), its manifest listing the files it wrote

`budgetlm.api.load(DIR)` (so `budgetlm eval` / `bench`) loads either. Saving one kind removes the other kind
this code wrote before (a resumed run saved again with or without --merge), never any other file.

Methods: every registered adapter (an AdapterConfig: lora, dora, loha, vblora, lora_xs, mars, qlora, qmars,
lobi_lora), with its settings, or `full`: full fine-tuning, where every floating-point parameter of the model
trains (embeddings, norms and, with tied embeddings, the output matrix that shares them: exactly what
requires_grad covers after loading). The adapter's own `train` key is not used here: the run's TrainConfig
comes from `train` (a file and/or `train.key=value` settings), because this run checkpoints to DIR and an
adapter step does not.

Resume: `resume=True` with the same arguments continues from the newest checkpoint and ends with the weights of
an uninterrupted run (fit's guarantee; the adapter's initialisation is a function of the seed, and is then
overwritten by the checkpoint's tensors anyway). Everything is validated before anything is written or loaded:
a method that is no adapter, bad settings, an unknown data task, an out path that is a file or a folder of
files budgetlm train did not write, an out folder holding another run's checkpoints without resume, a resume
folder whose train.json differs from this run (the differing keys are named), and --merge where merging would
not give the trained model (`full`; qlora / qmars, whose merge re-rounds onto NF4; an input model with compressed
layers) are one-line ConfigErrors. A run that fails before its first checkpoint removes what it created (the
folder, or train.json). With resume and no checkpoint yet (killed before the first), the run starts from step 0.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from budgetlm.errors import ConfigError
from budgetlm.models.handle import MANIFEST, PROVENANCE, WEIGHTS, ModelHandle
from budgetlm.train import checkpoint as ckpt
from budgetlm.train.config import TrainConfig
from budgetlm.train.data import check_data
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
    TrainConfig parse, the data task exists and can train."""
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
    cfg = TrainConfig.parse(train)
    check_data(cfg.data)
    return TrainRun(str(model), method, config, cfg, seed)


def check_run(run: TrainRun, out: Path, resume: bool, merge: bool = False, force: bool = False) -> None:
    """Everything that can be refused before a file is written or the model loads (see the module docstring)."""
    check_out_dir(run, out, resume, force)
    if merge:
        check_merge(run)


def check_out_dir(run: TrainRun, out: Path, resume: bool, force: bool = False) -> None:
    """The out folder must be new, empty or an earlier run (utils.check_output: never a file, the current folder or
    a folder of other files, unless `force` moves it aside); an earlier run is continued only with `resume` (from
    the same config) and started afresh only with `force`."""
    from budgetlm.utils import check_output

    out = Path(out)
    if resume and force:
        raise ConfigError("--resume continues the run in --out and --force moves it aside to start afresh; pass one")
    ours = check_output(out, "a training run", marker=RUN_FILE, force=force, resume=True)
    if ours and not resume and not force:
        raise ConfigError(
            f"--out {out} holds a training run; pass --resume to continue it, --force to start afresh (the old run is "
            "moved aside), or choose another --out"
        )
    if force:
        return
    saved = out / RUN_FILE
    if resume and saved.is_file():
        diffs = ckpt.config_differences(json.loads(saved.read_text()), run.to_dict())
        if diffs:
            raise ConfigError(
                f"resume folder {out} was written with another config: {'; '.join(diffs)}; "
                "resume with the same arguments or use a new --out"
            )


def check_merge(run: TrainRun) -> None:
    """--merge must give the trained model: refuse full fine-tuning (nothing to merge), an adapter whose merge
    re-rounds (qlora / qmars onto NF4), and an input model whose layers are compressed (folding ΔW into packed or
    pruned weights would re-round or densify them)."""
    from budgetlm.methods.base import methods

    if run.method == FULL:
        raise ConfigError(
            "--merge: method 'full' trains the whole model, which is saved as it is; there is no adapter to merge: "
            "drop --merge"
        )
    reason = methods.get(run.method).cannot_merge
    if reason:
        raise ConfigError(
            f"--merge: {run.method} cannot be merged exactly ({reason}); drop --merge (the adapter is saved with "
            "its base), or merge and measure with budgetlm.methods.adapt.base.merge_and_compare"
        )
    kinds = compressed_layers(run.model)
    if kinds:
        what = ", ".join(f"{k} x {n}" for k, n in kinds.items())
        raise ConfigError(
            f"--merge: the model {run.model} has compressed layers ({what}); folding the adapter into them would "
            "re-round or densify them: drop --merge"
        )


def compressed_layers(spec: str) -> Counter:
    """Layer kinds a budgetlm model folder lists as replaced (quant_linear, nf4_linear, sparse_linear), counted."""
    manifest = Path(spec).expanduser() / MANIFEST
    try:
        modules = json.loads(manifest.read_text()).get("modules", {}) if manifest.is_file() else {}
        return Counter(m.get("kind", "?") for m in modules.values())
    except (OSError, ValueError, AttributeError):
        return Counter()  # an unreadable manifest is the loader's one-line error


def base_record(run: TrainRun) -> dict:
    """The input model as an adapter folder names its base: a bundled name as it is, a path made absolute."""
    from budgetlm.models.sources import BUNDLED

    spec = run.model if run.model in BUNDLED else str(Path(run.model).expanduser().resolve())
    return {"model": spec, "seed": run.seed}


def prepare(handle: ModelHandle, run: TrainRun, progress: bool = False) -> list[str]:
    """Attach the adapter (or unfreeze every floating-point parameter); returns notes."""
    from budgetlm.methods.base import StepContext, apply_steps

    if run.method == FULL:
        for p in handle.model.parameters():
            p.requires_grad_(p.is_floating_point())
        handle.provenance.append({"method": FULL, "config": {}})
        return ["full fine-tuning: every floating-point parameter trains"]
    from budgetlm.methods.adapt.base import ATTACHED_ONLY

    report = apply_steps(handle, [{"method": run.method, **run.config}], StepContext(seed=run.seed, progress=progress))
    return [n for n in report[0].notes if n != ATTACHED_ONLY]  # the run trains it next


def train_run(
    run: TrainRun,
    out: str | Path,
    resume: bool = False,
    progress: bool = True,
    merge: bool = False,
    force: bool = False,
) -> tuple[ModelHandle, TrainResult, list[str]]:
    """Load, prepare, train with checkpoints under out/checkpoints, save the adapter (or, with merge, the merged
    model) into out. Returns (handle, result, notes: what trained, what ran, what was saved where, how to load).
    With `force`, whatever is in out (an earlier run, other files) is first moved aside, never deleted."""
    from budgetlm.models.sources import load
    from budgetlm.utils import move_aside

    out = Path(out)
    check_run(run, out, resume, merge, force)
    if force and out.is_dir() and any(out.iterdir()):
        move_aside(out)
    created = None if out.exists() else out
    if created is None and not (out / RUN_FILE).exists():
        created = out / RUN_FILE
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / RUN_FILE, run.to_dict())
    try:
        handle = load(run.model, seed=run.seed)
        notes = prepare(handle, run, progress)
        result = fit(handle, run.train, out, resume=resume, progress=progress)
    except Exception:
        if created is not None and not ckpt.list_checkpoints(out):  # failed before any checkpoint: undo this call
            if created == out:
                shutil.rmtree(out)
            else:
                created.unlink(missing_ok=True)
        raise
    handle.provenance.append({"method": "train", "config": run.train.resolved(), "steps": result.steps})
    notes.append(trained_note(result))
    notes += save_output(handle, run, out, merge)
    return handle, result, notes


def trained_note(result: TrainResult) -> str:
    loss = f"loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f}" if result.losses else "no loss recorded"
    data = f"{result.examples} examples of {result.data_source}"
    where = f"; checkpoints in {result.out_dir / 'checkpoints'}" if result.out_dir else ""
    start = result.resumed_from
    if start is None:
        return f"trained {result.steps} steps on {data}: {loss}{where}"
    if start >= result.steps:
        return f"resumed a finished run (checkpoint at step {start} of {result.steps}): no step ran; {loss}{where}"
    return f"resumed from the checkpoint at step {start}: ran steps {start + 1}-{result.steps} on {data}; {loss}{where}"


def save_output(handle: ModelHandle, run: TrainRun, out: Path, merge: bool) -> list[str]:
    """Save the adapter in peft's format, or the merged / fully fine-tuned model as a budgetlm model folder; remove
    the other kind of output if an earlier save of this run left one. Returns notes."""
    from budgetlm.methods.adapt import folder

    if run.method == FULL or merge:
        notes = []
        if merge:
            from budgetlm.methods.adapt.base import merge as merge_adapter

            notes = merge_adapter(handle).notes
            what = "the merged model (adapter folded into the weights)"
        else:
            what = "the whole trained model (full fine-tuning has no adapter)"
        files = save_into(handle, out)
        folder.remove_adapter(out)
        size = folder.mb(sum((out / f).stat().st_size for f in files))
        return [*notes, f"saved {what} as a budgetlm model folder in {out} ({size}); evaluate it: budgetlm eval {out}"]
    saved = folder.save_adapter(handle, out, base_record(run), run.method, run.config)
    remove_model(out)
    return saved.notes


def save_into(handle: ModelHandle, out: Path) -> list[str]:
    """Write the model folder's files into `out`, keeping what else is there (checkpoints, train.json): saved
    beside, then each file moved in by an atomic rename, the manifest last (a folder without it is no model).
    The manifest lists the files (`remove_model` removes exactly those). Returns their names."""
    tmp = handle.save(out / ".model-tmp")
    files = sorted(f.name for f in tmp.iterdir())
    manifest = json.loads((tmp / MANIFEST).read_text())
    (tmp / MANIFEST).write_text(json.dumps({**manifest, "files": files}, indent=2))
    for name in sorted(files, key=lambda n: n == MANIFEST):
        os.replace(tmp / name, out / name)
    shutil.rmtree(tmp, ignore_errors=True)
    return files


def remove_model(out: Path) -> None:
    """Remove a model folder save_into wrote into `out` (the manifest first, then the files it lists)."""
    manifest = out / MANIFEST
    if not manifest.is_file():
        return
    try:
        files = json.loads(manifest.read_text()).get("files")
    except (OSError, ValueError):
        files = None
    files = files or [WEIGHTS, PROVENANCE, "config.json", "generation_config.json"]
    manifest.unlink()
    for name in files:
        if "/" not in name and name not in (RUN_FILE, ckpt.checkpoints_dir(out).name):
            (out / name).unlink(missing_ok=True)
