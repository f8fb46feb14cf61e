"""The one rule on training data made from another task's test items: a model trained on such data must not be
scored on that task. Today one pair: gsm_symbolic's templates are GSM8K's test questions, so training on
gsm_symbolic bars gsm8k (`gsm8k:<option>` too).

The places that apply it, all through `check`:
- a training run (train/config.py): `data.task` against its own `eval_tasks`; and (train/loop.py, before the
  first step) the training the model's provenance records against those `eval_tasks`;
- a recipe (experiments/recipe.py): every pipeline's training steps, and what each model folder records of
  its training, against the study's tasks (before the study writes anything);
- an evaluation (evaluation/harness.py): the training recorded in the model's provenance against the tasks
  asked for; `budgetlm eval --allow-contamination` evaluates anyway and marks the score.
"""

from __future__ import annotations

from collections.abc import Iterable

from budgetlm.errors import ConfigError

CONTAMINATES = {("gsm_symbolic", "gsm8k"): "gsm_symbolic's templates are GSM8K's test questions"}


def reason(train_task: str, eval_task: str) -> str | None:
    """Why scoring `eval_task` after training on `train_task` is contaminated, or None when it is not."""
    why = CONTAMINATES.get((train_task, eval_task.partition(":")[0]))
    return f"{why}, so the {eval_task} score would be contaminated" if why else None


def first(trained_on: Iterable[str], evaluated_on: Iterable[str]) -> tuple[str, str, str] | None:
    """The first (training task, evaluation task, reason) pair the rule forbids, or None."""
    evaluated = list(evaluated_on)
    for train in trained_on:
        for ev in evaluated:
            if why := reason(train, ev):
                return train, ev, why
    return None


def check(trained_on: Iterable[str], evaluated_on: Iterable[str], where: str, fix: str) -> None:
    """A one-line ConfigError when a forbidden pair is present: '<where>: evaluating B after training on A, but
    <reason>; <fix>' (fix may name them as {train} and {eval})."""
    found = first(trained_on, evaluated_on)
    if found:
        train, ev, why = found
        raise ConfigError(
            f"{where}: evaluating {ev} after training on {train}, but {why}; {fix.format(train=train, eval=ev)}"
        )


def trained_tasks(record) -> list[str]:
    """The training tasks named anywhere in a step config, a list of steps, a provenance list or an adapter
    folder's record: the `task` of every mapping under a `data` key (a TrainConfig's DataConfig, as dumped)."""
    found: list[str] = []

    def walk(node) -> None:
        if isinstance(node, dict):
            data = node.get("data")
            if isinstance(data, dict) and isinstance(data.get("task"), str):
                found.append(data["task"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list | tuple):
            for value in node:
                walk(value)

    walk(record)
    return list(dict.fromkeys(found))
