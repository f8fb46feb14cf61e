"""Checkpoints of a training run: enough to continue it bit for bit.

Layout, one folder per saved step under <out_dir>/checkpoints/:

    step-000040/trainable.safetensors   the parameters with requires_grad (by their names in the model)
    step-000040/optimizer.safetensors   AdamW's per-parameter tensors (step, exp_avg, exp_avg_sq) and the
                                        torch RNG state
    step-000040/state.json              format, step, the resolved TrainConfig, the trainable names and shapes,
                                        the optimizer's param groups, the scheduler's state, python's and
                                        numpy's RNG states, the data order (seed, examples consumed,
                                        fingerprint) and the history (losses, lrs, step times, evaluations)

A folder is written under a hidden temporary name and renamed into place when complete, so a kill at any
moment leaves either the previous checkpoints or a complete new one; leftovers of a killed write are
ignored and removed. Only the `keep` newest checkpoints stay. Nothing is pickled.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from budgetlm.errors import ConfigError
from budgetlm.utils import atomic_dir

FORMAT = "budgetlm.train.checkpoint/1"
_STEP_DIR = re.compile(r"step-(\d{6,})")


# --- RNG states --------------------------------------------------------------------------------------------
def rng_state() -> tuple[torch.Tensor, dict]:
    """(torch CPU generator state, JSON of python's and numpy's global generators)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return torch.get_rng_state(), {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }


def set_rng_state(torch_state: torch.Tensor, states: dict) -> None:
    torch.set_rng_state(torch_state)
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


# --- finding and checking ----------------------------------------------------------------------------------
def checkpoints_dir(out_dir: Path) -> Path:
    return Path(out_dir) / "checkpoints"


def list_checkpoints(out_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first."""
    root = checkpoints_dir(out_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.fullmatch(p.name)
        if m and (p / "state.json").is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(out_dir: Path) -> Path | None:
    found = list_checkpoints(out_dir)
    return found[-1][1] if found else None


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_differences(saved: dict, current: dict) -> list[str]:
    """'key (saved -> current)' for every dotted key whose value differs."""
    a, b = _flatten(saved), _flatten(current)
    return [f"{k} ({a.get(k)!r} -> {b.get(k)!r})" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def read_state(path: Path) -> dict:
    state = json.loads((Path(path) / "state.json").read_text())
    if state.get("format") != FORMAT:
        raise ConfigError(f"checkpoint {path} has format {state.get('format')!r}, not {FORMAT}; start a new out_dir")
    return state


def check_compatible(path: Path, state: dict, config: dict, trainable: dict[str, torch.nn.Parameter]) -> None:
    """The saved run must be this run: same resolved config, same trainable parameters."""
    diffs = config_differences(state["config"], config)
    if diffs:
        raise ConfigError(
            f"resume folder {path.parent.parent} was written with another config: {'; '.join(diffs)}; "
            "resume with the same config or use a new out_dir"
        )
    saved = {k: list(v) for k, v in state["trainable"].items()}
    now = {k: list(p.shape) for k, p in trainable.items()}
    if saved != now:
        only_saved = sorted(set(saved) - set(now))[:3]
        only_now = sorted(set(now) - set(saved))[:3]
        reshaped = sorted(k for k in set(saved) & set(now) if saved[k] != now[k])[:3]
        raise ConfigError(
            f"resume folder {path.parent.parent} trained other parameters (only saved: {only_saved}, only now: "
            f"{only_now}, other shape: {reshaped}); attach the same adapter or use a new out_dir"
        )


# --- save / load -------------------------------------------------------------------------------------------
@dataclass
class Snapshot:
    """What a checkpoint holds besides the tensors' owners (the model's parameters and the optimizer)."""

    step: int
    config: dict
    scheduler: dict
    data: dict
    history: dict


def _split_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors, state = {}, {}
    for idx, entries in sd["state"].items():
        state[str(idx)] = {}
        for key, val in entries.items():
            if torch.is_tensor(val):
                tensors[f"state.{idx}.{key}"] = val.detach().contiguous()
                state[str(idx)][key] = "tensor"
            else:
                state[str(idx)][key] = val
    return tensors, {"state": state, "param_groups": sd["param_groups"]}


def _join_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state = {}
    for idx, entries in meta["state"].items():
        state[int(idx)] = {k: tensors[f"state.{idx}.{k}"] if v == "tensor" else v for k, v in entries.items()}
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def save_checkpoint(
    out_dir: Path,
    snap: Snapshot,
    trainable: dict[str, torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    keep: int,
) -> Path:
    """Write step-<step>/ atomically, then drop all but the `keep` newest checkpoints."""
    from safetensors.torch import save_file

    root = checkpoints_dir(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{snap.step:06d}"
    with atomic_dir(final, marker="state.json") as tmp:
        save_file({k: p.detach().contiguous() for k, p in trainable.items()}, str(tmp / "trainable.safetensors"))
        opt_tensors, opt_meta = _split_optimizer(optimizer)
        torch_rng, rng = rng_state()
        save_file({**opt_tensors, "rng.torch": torch_rng}, str(tmp / "optimizer.safetensors"))
        state = {
            "format": FORMAT,
            "step": snap.step,
            "config": snap.config,
            "trainable": {k: list(p.shape) for k, p in trainable.items()},
            "optimizer": opt_meta,
            "scheduler": snap.scheduler,
            "rng": rng,
            "data": snap.data,
            "history": snap.history,
        }
        (tmp / "state.json").write_text(json.dumps(state))
    for _, old in list_checkpoints(out_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for leftover in root.glob(".step-*"):  # temporary folders of writes that were killed
        shutil.rmtree(leftover, ignore_errors=True)
    return final


def load_checkpoint(
    path: Path, trainable: dict[str, torch.nn.Parameter], optimizer: torch.optim.Optimizer
) -> tuple[dict, torch.Tensor]:
    """Copy the saved trainable tensors into the parameters and restore the optimizer; returns the state
    JSON and the torch RNG state (restored by the caller once everything else is set up)."""
    from safetensors.torch import load_file

    state = read_state(path)
    weights = load_file(str(path / "trainable.safetensors"))
    with torch.no_grad():
        for name, p in trainable.items():
            p.copy_(weights[name])
    opt_tensors = load_file(str(path / "optimizer.safetensors"))
    torch_rng = opt_tensors.pop("rng.torch")
    optimizer.load_state_dict(_join_optimizer(opt_tensors, state["optimizer"]))
    return state, torch_rng
