"""The one rule on what a model was trained on and what it may then be scored on. Two cases:
- the same items: training on a task's items and evaluating those items (a task that trains on its train fold is
  then evaluated on `<task>:eval-fold`; folds.overlap says when a training split and an evaluation meet);
- data made from a task's test items: gsm_symbolic's templates are GSM8K's test questions, so training on
  gsm_symbolic bars gsm8k (`gsm8k:<option>` too).

What a model was trained on is read the same way everywhere (`trained_on`: every `data` mapping with a `task` in a
step config, a list of steps, a provenance or an adapter folder's record), and the rule is applied through `check`:
- a training run (train/config.py): `data` against its own `eval_tasks`; and (train/loop.py, before the first
  step) the training the model's provenance records against those `eval_tasks`;
- a recipe (experiments/recipe.py): every pipeline's training steps, and what each model folder records of its
  training, against the study's tasks (before the study writes anything);
- an evaluation (evaluation/harness.py): the training recorded in the model's provenance against the tasks asked
  for; `budgetlm eval --allow-contamination` evaluates anyway and marks the score.
"""

from __future__ import annotations

from collections.abc import Iterable

from budgetlm.errors import ConfigError

CONTAMINATES = {("gsm_symbolic", "gsm8k"): "gsm_symbolic's templates are GSM8K's test questions"}

Training = tuple[str, str | None]  # (task, DataConfig.split: None for the task's train source)


def reason(train: Training, eval_task: str) -> tuple[str, bool] | None:
    """Why scoring `eval_task` after training on `train` is contaminated, and whether that reason already names its
    fix; None when it is not."""
    from budgetlm.data.tasks.folds import overlap

    task, split = train
    if why := CONTAMINATES.get((task, eval_task.partition(":")[0])):
        return f"evaluating {eval_task} after training on {task}, but {why}, so the score would be contaminated", False
    if why := overlap(task, split, eval_task):
        return why, True
    return None


def first(trained: Iterable[Training], evaluated: Iterable[str]) -> tuple[Training, str, str, bool] | None:
    """The first (training, evaluation task, reason, reason names its fix) the rule forbids, or None."""
    evaluated = list(evaluated)
    for train in trained:
        for ev in evaluated:
            if found := reason(train, ev):
                return (train, ev, *found)
    return None


def check(trained: Iterable[Training], evaluated: Iterable[str], where: str, fix: str) -> None:
    """A one-line ConfigError when a forbidden pair is present: '<where>: <reason>; <fix>' (fix may name them as
    {train} and {eval}; a reason that names its own fix, like evaluating the eval fold instead, keeps that one)."""
    found = first(trained, evaluated)
    if found:
        (task, _), ev, why, own_fix = found
        raise ConfigError(f"{where}: {why}" + ("" if own_fix else f"; {fix.format(train=task, eval=ev)}"))


def trained_on(record) -> list[Training]:
    """(task, split) of every training named anywhere in a step config, a list of steps, a provenance list or an
    adapter folder's record: every mapping under a `data` key with a `task` (a TrainConfig's DataConfig, dumped)."""
    found: list[Training] = []

    def walk(node) -> None:
        if isinstance(node, dict):
            data = node.get("data")
            if isinstance(data, dict) and isinstance(data.get("task"), str):
                split = data.get("split")
                found.append((data["task"], split if isinstance(split, str) else None))
            for value in node.values():
                walk(value)
        elif isinstance(node, list | tuple):
            for value in node:
                walk(value)

    walk(record)
    return list(dict.fromkeys(found))
