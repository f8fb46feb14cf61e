"""A recipe's `latent:` setting and what a cell does with it (HOLA's latent-space figure, measured in the cell):

    latent: {tasks: [arc_easy, text-cloze], items: 64, perplexity: 30}

Off unless the recipe names it (a study without it keeps its cell ids). In each cell, after the evaluation: `items`
items of each named task (a seeded sample, sample_items with the recipe's seed, the same items in every cell), their
prompts as the task builds them, the cell's model's final hidden state at each prompt's last token, and one t-SNE of
them to 2-D (evaluation/latent.py). Written:
  cells/<cell>/latent_states.npy     the hidden states (float32, one row per point, in the order of the points)
  references/latent-<key>.npz        the baseline cell's states and item ids, which its model's other cells compare with
  rows of the phase "latent" (ROWS): the points themselves in the extra of `tsne_kl`, so the report reads the store
t-SNE coordinates of two runs are not comparable (each fit has its own rotation and scale): each cell gets its own
embedding of the same items, drawn as a panel per variant; `cosine_to_baseline` measures how far a variant moved
the representation, in the hidden space itself.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from budgetlm.errors import BudgetLMError, ConfigError, suggest
from budgetlm.results import Metric
from budgetlm.utils import atomic_file

PHASE = "latent"
STATES = "latent_states.npy"
ROWS = {  # metric of the phase "latent" -> what it is
    "silhouette_task": "silhouette of the task labels in the final hidden states (cosine distance), -1..1",
    "silhouette_task_2d": "silhouette of the task labels in the 2-D t-SNE points (euclidean)",
    "cosine_to_baseline": "mean cosine similarity of each item's final hidden state with the baseline cell's",
    "tsne_kl": "t-SNE's final KL divergence; its extra holds the points (x, y, ids, task, tasks)",
    "seconds": "time of the latent phase (prompts, forwards, t-SNE)",
}


class LatentSettings(BaseModel):
    """Which tasks' items, how many of each, and t-SNE's perplexity (scikit-learn: below the number of points)."""

    model_config = ConfigDict(extra="forbid")
    tasks: list[str] = Field(min_length=2)
    items: int = Field(64, ge=1, le=1000)
    perplexity: float = Field(30.0, gt=0)


def check_latent(latent: LatentSettings, tasks: list[str], origin: str) -> None:
    """One-line errors: a task the recipe does not run, a task listed twice or without prompts, a perplexity the
    number of points cannot carry."""
    from budgetlm.data.tasks.base import tasks as registry
    from budgetlm.evaluation.latent import check_task

    seen = set()
    for i, name in enumerate(latent.tasks):
        where = f"{origin}: latent.tasks[{i}]"
        if name not in tasks:
            raise ConfigError(f"{where}: '{name}' is not among the recipe's tasks{suggest(name, tasks)}")
        if name in seen:
            raise ConfigError(f"{where}: '{name}' is listed twice")
        seen.add(name)
        check_task(registry.get(name), where)
    n = latent.items * len(latent.tasks)
    if latent.perplexity >= n:
        raise ConfigError(
            f"{origin}: latent.perplexity {latent.perplexity:g} must be below the number of points, {n} "
            f"({latent.items} items x {len(latent.tasks)} tasks); lower it or raise latent.items"
        )


def run_latent(handle, cfg: dict, cell_dir: Path, baseline: bool) -> dict[str, Metric]:
    """The rows of the phase "latent" for this cell's model (cfg: the cell config, with `latent`)."""
    from budgetlm.data.tasks.base import TaskContext
    from budgetlm.data.tasks.base import tasks as registry
    from budgetlm.evaluation import latent as lt
    from budgetlm.evaluation.harness import sample_items
    from budgetlm.models.lm import HFLM

    t0 = time.perf_counter()
    settings = LatentSettings.model_validate(cfg["latent"])
    seed = cfg["seed"]
    ctx = TaskContext(seed=seed, data_dir=Path(cfg["data_dir"]) if cfg.get("data_dir") else None)
    lm = HFLM(handle)
    prompts, ids, labels = [], [], []
    for k, name in enumerate(settings.tasks):
        task = registry.get(name)
        for item in sample_items(task.load(ctx).items, settings.items, seed):
            prompts.append(lt.prompt_tokens(lm, task, item.doc))
            ids.append(str(item.id))
            labels.append(k)
    states = lt.final_states(lm, prompts)
    points, kl = lt.embed(states, settings.perplexity, seed)
    _save_npy(cell_dir / STATES, states)
    extra = {"states": STATES, "tasks": settings.tasks, "perplexity": settings.perplexity, "seed": seed,
             "distance": lt.DISTANCE, "method": lt.METHOD,
             "hidden": "after the final norm, last prompt token"}  # fmt: skip
    n = len(ids)
    rows = {
        "silhouette_task": Metric(lt.silhouette(states, labels), n=n, extra=extra),
        "silhouette_task_2d": Metric(lt.silhouette(points, labels, "euclidean"), n=n, extra=extra),
    }
    reference = _reference(cfg, ids)
    if baseline and reference is not None:
        _save_reference(reference, ids, states)
    elif reference is not None:
        cos = _to_baseline(reference, ids, states)
        if cos is None:  # the baseline cell failed, or its references were removed: said, not hidden
            extra = {**extra, "cosine_to_baseline": f"not measured: no baseline states of these items ({reference})"}
        else:
            se = float(cos.std(ddof=1) / np.sqrt(n)) if n > 1 else None
            rows["cosine_to_baseline"] = Metric(float(cos.mean()), se, n, extra={**extra, "baseline": reference.name})
    points_extra = {"x": [round(float(v), 4) for v in points[:, 0]], "y": [round(float(v), 4) for v in points[:, 1]],
                    "ids": ids, "task": labels}  # fmt: skip
    rows["tsne_kl"] = Metric(kl, n=n, extra={**extra, **points_extra})
    rows["seconds"] = Metric(time.perf_counter() - t0, n=n, unit="s")
    for m in rows.values():
        m.value = float("nan") if m.value is None else m.value
    return rows


def _reference(cfg: dict, ids: list[str]) -> Path | None:
    """The file of the baseline cell's states for these items (None outside a study)."""
    if not cfg.get("study_dir"):
        return None
    key = json.dumps([cfg["model"], cfg["latent"], cfg["seed"], cfg.get("data_dir"), ids], sort_keys=True)
    return Path(cfg["study_dir"]) / "references" / f"latent-{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz"


def _save_reference(path: Path, ids: list[str], states: np.ndarray) -> None:
    with atomic_file(path) as tmp, open(tmp, "wb") as f:  # a file object: numpy adds no suffix
        np.savez(f, ids=np.asarray(ids), states=states)


def _to_baseline(path: Path, ids: list[str], states: np.ndarray) -> np.ndarray | None:
    """Per item, the cosine of this cell's state with the baseline's (None: no baseline states, or of another
    width)."""
    if not path.is_file():
        return None
    try:
        with np.load(path) as data:
            base_ids, base = [str(i) for i in data["ids"]], data["states"]
    except (OSError, ValueError, KeyError) as exc:
        raise BudgetLMError(f"cannot read the baseline's latent states {path}: {exc}; delete it and rerun") from None
    if base_ids != ids or base.shape != states.shape:
        return None
    from budgetlm.evaluation.latent import cosines

    return cosines(states, base)


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)
