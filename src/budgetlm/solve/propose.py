"""Proposals: pipelines not yet run, each a best cell's pipeline with one budget setting of one step moved to its
neighbouring value, and `--run`, which evaluates them as new cells of the same study.

The best cells are the chosen one and its Pareto neighbours (choose.py). The settings that trade accuracy for cost
and their neighbouring values (KNOBS): `bits` the supported widths on either side (quantizer.SUPPORTED_BITS: 4 -> 3
and 8), `group_size` / `r` / `rank` / NF4's `block_size` halved and doubled, `sparsity` +-0.1, `target_bits` +-0.5,
ShortGPT's `n_layers` +-1 and `fraction` +-0.05. A value is proposed only when the method's config accepts it (its
validators, as a recipe's step is resolved) and its shape check (MethodConfig.check: a group size must divide every
targeted width) passes on each model of the study wherever the step's current value passes it; a pipeline whose
resolved steps some cell of the store already has (done, failed or running) is never proposed, nor one twice.
A proposal is named like a recipe's expanded settings: `<pipeline>.<key>-<value>` (the source's own `.<key>-<old>`
replaced when its name has one).

`--run` writes the study's recorded recipe with the proposals added to its pipelines to DIR/recipe.solve.yaml and
runs it through the study driver (experiments/study.py run_study) in DIR: the finished cells keep their ids and are
skipped, the proposals run on every model of the study. A store whose recorded recipe no longer plans the same cell
ids (written by another budgetlm) is refused first, as running it would redo every cell.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from budgetlm.errors import BudgetLMError, ConfigError
from budgetlm.experiments import store as st
from budgetlm.solve.choose import Solution

DERIVED = "recipe.solve.yaml"


def _halve_double(v: Any) -> list:
    return [v // 2, v * 2] if isinstance(v, int) and not isinstance(v, bool) and v >= 2 else []


def _step(delta: float) -> Callable[[Any], list]:
    def around(v: Any) -> list:
        if isinstance(v, bool) or not isinstance(v, int | float):
            return []
        return [round(v - delta, 6), round(v + delta, 6)]

    return around


def _supported_bits(v: Any) -> list:
    from budgetlm.methods.quant.quantizer import SUPPORTED_BITS

    widths = sorted(SUPPORTED_BITS)
    if v not in widths:
        return []
    i = widths.index(v)
    return widths[max(0, i - 1) : i] + widths[i + 1 : i + 2]


KNOBS: dict[str, Callable[[Any], list]] = {
    "bits": _supported_bits,
    "group_size": _halve_double,
    "r": _halve_double,
    "rank": _halve_double,
    "block_size": _halve_double,
    "sparsity": _step(0.1),
    "target_bits": _step(0.5),
    "n_layers": _step(1),
    "fraction": _step(0.05),
}
# settings of those names that change how a method runs, not the model it makes: GPTQ's and SparseGPT's lazy-batch
# width (NF4's block_size is its quantisation block and stays a knob)
NOT_KNOBS = {("gptq", "block_size"), ("sparsegpt", "block_size")}


@dataclass
class Proposal:
    name: str
    steps: list[dict]
    source: str  # the pipeline it comes from
    source_cell: str
    step: int  # index of the changed step
    method: str
    setting: str
    before: Any
    after: Any

    def change(self) -> str:
        return f"step {self.step + 1} {self.method}: {self.setting} {self.before} -> {self.after}"

    def to_dict(self) -> dict:
        return {**asdict(self), "change": self.change()}


def proposals(solution: Solution) -> list[Proposal]:
    """Neighbouring settings of the chosen cell's and its neighbours' pipelines, in that order (see the module
    docstring); also stored in solution.proposals."""
    with st.Store.open(solution.directory) as store:
        cells = store.cells()
        recipe = store.get_meta("recipe") or {}
    taken = {_key(_resolved_steps(c["config"].get("steps") or [])) for c in cells}
    names = {c["pipeline"] for c in cells} | set(recipe.get("pipelines") or {})
    shapes = _Shapes(list(dict.fromkeys([*(recipe.get("models") or []), *(c["model"] for c in cells)])))
    sources = {c.cell_id: c for c in [solution.chosen, *(n for _, _, n in solution.neighbours)]}
    out = []
    for cand in sources.values():
        steps = _resolved_steps(cand.cell["config"].get("steps") or [])
        for i, step in enumerate(steps):
            for key, new in _moves(step):
                changed = _resolve({**step, key: new})
                if changed is None or changed.get(key) == step[key] or not shapes.accept(step, changed):
                    continue
                new_steps = [*steps[:i], changed, *steps[i + 1 :]]
                if _key(new_steps) in taken:
                    continue
                taken.add(_key(new_steps))
                name = _name(cand.cell["pipeline"], key, step[key], new, names)
                names.add(name)
                source = cand.cell["pipeline"]
                out.append(Proposal(name, new_steps, source, cand.cell_id, i, step["method"], key, step[key], new))
    solution.proposals = out
    return out


def _moves(step: dict):
    """(setting, neighbouring value) of each budget setting of a step (KNOBS)."""
    for key, value in step.items():
        if key not in KNOBS or (step.get("method"), key) in NOT_KNOBS:
            continue
        if key == "group_size" and step.get("bits", 0) is None:
            continue  # a group size without bits (sparsegpt that does not quantise) changes nothing
        for new in KNOBS[key](value):
            yield key, new


def _resolve(step: dict) -> dict | None:
    """The step with every default filled in, as a recipe resolves it; None when its method refuses it."""
    from budgetlm.methods.base import parse_config

    values = {k: v for k, v in step.items() if k != "method"}
    try:
        return {"method": step.get("method"), **parse_config(step.get("method"), values).model_dump(mode="json")}
    except BudgetLMError:
        return None


def _resolved_steps(steps: list) -> list:
    return [_resolve(s) or s if isinstance(s, dict) else s for s in steps]


def _key(steps: list) -> str:
    return json.dumps(steps, sort_keys=True, default=str)


class _Shapes:
    """The method's shape check of a changed step on each model of the study (weightless copies, built once)."""

    def __init__(self, models: list[str]):
        self.models, self._built = models, {}

    def accept(self, before: dict, after: dict) -> bool:
        """False when `after` fails the check on a model where `before` passes it (where `before` fails too, the
        model the step sees is not the original one, e.g. a step after a pruning one: the cell decides)."""
        from budgetlm.methods.base import parse_config
        from budgetlm.models.sources import skeleton

        old = parse_config(before["method"], {k: v for k, v in before.items() if k != "method"})
        new = parse_config(after["method"], {k: v for k, v in after.items() if k != "method"})
        for spec in self.models:
            if spec not in self._built:
                self._built[spec] = skeleton(spec)
            model = self._built[spec]
            if model is None or not _passes(old, model):
                continue
            if not _passes(new, model):
                return False
        return True


def _passes(cfg, model) -> bool:
    try:
        cfg.check(model)
    except BudgetLMError:
        return False
    return True


def _name(pipeline: str, key: str, old: Any, new: Any, taken: set[str]) -> str:
    from budgetlm.experiments.recipe import _label

    old_label, new_label = f"{key}-{_label(old)}", f"{key}-{_label(new)}"
    pattern = rf"\.{re.escape(old_label)}(?=\.|$)"
    name = re.sub(pattern, f".{new_label}", pipeline, count=1)
    if name == pipeline:
        name = f"{pipeline}.{new_label}"
    base, n = name, 2
    while name in taken:
        name, n = f"{base}-{n}", n + 1
    return name


def run_proposals(directory: str | Path, props: list[Proposal], progress: bool = True, runner=None) -> Path:
    """Add the proposals to the study's recorded recipe (DIR/recipe.solve.yaml) and run it in DIR with the study
    driver; returns the study folder. One-line errors before anything is written (see the module docstring)."""
    from budgetlm._version import __version__
    from budgetlm.experiments.plan import plan
    from budgetlm.experiments.recipe import dump_recipe, parse_recipe
    from budgetlm.experiments.study import run_study
    from budgetlm.utils import atomic_write_text

    directory = Path(directory)
    with st.Store.open(directory) as store:
        recorded, planned = store.get_meta("recipe"), store.get_meta("plan")
    if not isinstance(recorded, dict):
        raise ConfigError(f"{directory} records no recipe; --run adds pipelines to the recipe `budgetlm run` recorded")
    origin = f"the recipe recorded in {directory}"
    rec = parse_recipe(recorded, origin)
    if planned is not None and {c.id for c in plan(rec)} != set(planned):  # (the store keeps the recipe's keys sorted)
        raise BudgetLMError(
            f"the cells of {directory} were planned by another budgetlm (its recipe gives other cell ids with budgetlm "
            f"{__version__}), so --run would run every cell again; rerun the study with this budgetlm first, or solve "
            "without --run"
        )
    pipelines = {**rec.pipelines, **{p.name: p.steps for p in props}}
    derived = parse_recipe({**rec.model_dump(mode="json"), "pipelines": pipelines}, f"{origin} with solve's proposals")
    path = atomic_write_text(directory / DERIVED, dump_recipe(derived))
    return run_study(path, directory, progress=progress, **({"runner": runner} if runner is not None else {}))
