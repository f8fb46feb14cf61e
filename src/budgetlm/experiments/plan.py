"""The plan: a resolved recipe expanded into cells, one per model x pipeline.

A cell's id is a short sha256 of the canonical JSON of everything that determines its results (model, the
steps with all defaults filled in, tasks, limit, seed, data folder, batch size, bench settings and the
budgetlm version), so a rerun recognises finished cells and a changed setting makes a new cell.
For each model the baseline cell comes first: it writes the reference outputs its other cells read.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from budgetlm._version import __version__
from budgetlm.experiments.recipe import BASELINE, Recipe
from budgetlm.experiments.runtime import runtime_of

ID_LENGTH = 12


@dataclass
class Cell:
    id: str
    model: str
    pipeline: str
    config: dict  # the resolved config the id hashes

    @property
    def is_baseline(self) -> bool:
        return self.pipeline == BASELINE

    @property
    def runtime(self) -> str:
        return self.config.get("runtime", "torch")

    @property
    def label(self) -> str:
        return f"{self.pipeline} ({model_label(self.model)})"

    def folder(self, study_dir: Path) -> Path:
        return Path(study_dir) / "cells" / f"{_slug(model_label(self.model))}_{_slug(self.pipeline)}_{self.id}"


def cell_config(recipe: Recipe, model: str, pipeline: str) -> dict:
    config = {
        "model": model,
        "pipeline": pipeline,
        "steps": recipe.pipelines[pipeline],
        "tasks": list(recipe.tasks),
        "limit": recipe.limit,
        "seed": recipe.seed,
        "data_dir": recipe.data_dir,
        "eval_batch_size": recipe.eval_batch_size,
        "bench": recipe.bench.model_dump(mode="json"),
        "budgetlm": __version__,
    }
    runtime = runtime_of(pipeline, recipe.runtime)
    if runtime is not None:  # a `<p>@llama.cpp` cell; the key only there: every other id stays the same
        config["runtime"] = runtime
    torch_only = runtime is None  # speculative decoding and latent states are torch's (experiments/runtime.py)
    if recipe.decoding is not None and recipe.decoding.applies(pipeline) and torch_only:  # only when set: likewise
        config["decoding"] = recipe.decoding.resolved()
    if recipe.threads is not None:  # likewise
        config["threads"] = recipe.threads
    if recipe.latent is not None and torch_only:  # likewise
        config["latent"] = recipe.latent.model_dump(mode="json")
    return config


def cell_id(config: dict) -> str:
    canonical = json.dumps(config, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:ID_LENGTH]


def plan(recipe: Recipe) -> list[Cell]:
    """Cells in run order: for each model, its baseline first, then the pipelines in recipe order."""
    pipelines = [BASELINE] + [p for p in recipe.pipelines if p != BASELINE]
    cells = []
    for model in recipe.models:
        for pipeline in pipelines:
            config = cell_config(recipe, model, pipeline)
            cells.append(Cell(cell_id(config), model, pipeline, config))
    return cells


def model_label(model: str) -> str:
    """A short name for a model: the bundled name, or the last part of its path."""
    return Path(model).name if ("/" in model or "\\" in model) else model


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "-", text).strip("-")[:40] or "x"
