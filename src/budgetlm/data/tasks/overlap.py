"""The one rule on training data that would contaminate an evaluation: pairs (trained on, evaluated on) whose
training items are made from the evaluation's test items. Today one pair: gsm_symbolic's templates are GSM8K's
test questions, so a model trained on gsm_symbolic must not be scored on gsm8k.

The places that apply it, all through `check`:
- a training run (train/config.py): `data.task` against its own `eval_tasks`; and (train/loop.py, before the
  first step) the training the model's provenance records against those `eval_tasks`;
- a recipe (experiments/recipe.py): every pipeline's training steps, and what each model folder records of
  its training, against the study's tasks (before the study writes anything);
- an evaluation (evaluation/harness.py): the training recorded in the model folder's provenance against the
  tasks asked for; `budgetlm eval --allow-contamination` evaluates anyway and marks the score.
"""

from __future__ import annotations

from collections.abc import Iterable

from budgetlm.errors import ConfigError

CONTAMINATES = {("gsm_symbolic", "gsm8k"): "gsm_symbolic's templates are GSM8K's test questions"}


def overlap(trained_on: Iterable[str], evaluated_on: Iterable[str]) -> tuple[str, str, str] | None:
    """The first (training task, evaluation task, reason) pair the rule forbids, or None."""
    evaluated = list(evaluated_on)
    for train in trained_on:
        for ev in evaluated:
            if (train, ev) in CONTAMINATES:
                return train, ev, CONTAMINATES[train, ev]
    return None


def check(trained_on: Iterable[str], evaluated_on: Iterable[str], where: str, fix: str) -> None:
    """A one-line ConfigError when a forbidden pair is present: '<where>: evaluating B after training on A, but
    <reason>, so the B score would be contaminated; <fix>' (fix may name them as {train} and {eval})."""
    found = overlap(trained_on, evaluated_on)
    if found:
        train, ev, reason = found
        raise ConfigError(
            f"{where}: evaluating {ev} after training on {train}, but {reason}, so the {ev} score would be "
            f"contaminated; {fix.format(train=train, eval=ev)}"
        )


def trained_tasks(record) -> list[str]:
    """The training tasks named anywhere in a step config, a list of steps or a provenance list: the `task` of
    every mapping under a `data` key that also has a `split` (a TrainConfig's DataConfig, as dumped)."""
    found: list[str] = []

    def walk(node) -> None:
        if isinstance(node, dict):
            data = node.get("data")
            if isinstance(data, dict) and isinstance(data.get("task"), str) and "split" in data:
                found.append(data["task"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list | tuple):
            for value in node:
                walk(value)

    walk(record)
    return list(dict.fromkeys(found))
