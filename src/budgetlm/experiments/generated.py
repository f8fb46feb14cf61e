"""Generated studies: a recipe's `study:` turns one of its pipelines into a family of ordinary pipelines (cells).

    study: ablation                        # or {kind: ablation, pipeline: full}
    study: {kind: transfer, pipeline: hola, train_tasks: [arith, arc_easy]}

- ablation (HOLA's component table): the pipeline itself (the full pipeline), then the same pipeline with each step
  removed in turn, named `<pipeline>-minus-<method>` (`<pipeline>-minus-<i>-<method>` when a method occurs twice).
  The pipeline needs two steps or more.
- transfer (HOLA's cross-domain matrix): the pipeline adapts on each training task in turn and every cell is
  evaluated on every task of the recipe. The pipeline's training steps (every step whose `train.data.task` is a task,
  not `corpus`) must share one task, T; for each other training task A, `<pipeline>@train-<A>` is the pipeline with
  that task set to A (its `split` unset: A's own train source). The pipeline itself is the row of T.
  `train_tasks` defaults to the recipe's tasks that can train (an evaluation option such as `:eval-fold` dropped).

`pipeline` defaults to the only pipeline besides the baseline. The resolved recipe records every generated pipeline's
role in `study.roles` ({pipeline: "full" or the removed step, for ablation; {pipeline: training task}, for
transfer}), which the report reads. Expansion is idempotent: a resolved recipe parses to itself.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

from budgetlm.errors import ConfigError, suggest

KINDS = ("ablation", "transfer")
FULL = "full"
AGNOSTIC = "corpus"  # task-agnostic training data: not an adaptation to a task, never varied by transfer


def expand(study, pipelines: dict[str, list[dict]], tasks: list[str], origin: str,
           resolve: Callable[[dict, str], dict]) -> tuple[dict[str, list[dict]], dict]:  # fmt: skip
    """(pipelines with the generated ones added, the study's settings resolved with its roles). `pipelines` maps names
    to resolved steps, the baseline included; `resolve(step, where)` re-validates a changed step."""
    where = f"{origin}: study"
    own = [p for p in pipelines if p != "baseline"]
    name = study.pipeline
    if name is None:
        if len(own) != 1:
            listed = ", ".join(own) or "none"
            raise ConfigError(
                f"{where}: name the pipeline the {study.kind} study starts from (study.pipeline); pipelines: {listed}"
            )
        name = own[0]
    elif name not in own:
        raise ConfigError(f"{where}.pipeline: no pipeline '{name}'{suggest(name, own)}; pipelines: {', '.join(own)}")
    steps = pipelines[name]
    if study.kind == "ablation":
        if study.train_tasks is not None:
            raise ConfigError(f"{where}.train_tasks: only a transfer study adapts on tasks; remove it")
        made, roles = ablation(name, steps, where)
    else:
        made, roles = transfer(name, steps, study.train_tasks, tasks, where, resolve)
    out = dict(pipelines)
    for new, new_steps in made.items():
        if new in out and out[new] != new_steps:
            raise ConfigError(f"{where}: the {study.kind} study names a pipeline '{new}', which the recipe already "
                              "defines with other steps; rename that pipeline")  # fmt: skip
        out[new] = new_steps
    settings = study.model_copy(update={"pipeline": name, "roles": roles})
    return out, settings


def ablation(name: str, steps: list[dict], where: str) -> tuple[dict[str, list[dict]], dict[str, str]]:
    if len(steps) < 2:
        raise ConfigError(
            f"{where}: an ablation removes each step in turn, but pipeline '{name}' has {len(steps)} step(s); "
            "give it two or more"
        )
    count = Counter(s["method"] for s in steps)
    made, roles = {}, {name: FULL}
    for i, step in enumerate(steps):
        method = step["method"]
        label = f"{name}-minus-" + (f"{i + 1}-{method}" if count[method] > 1 else method)
        made[label] = steps[:i] + steps[i + 1 :]
        roles[label] = f"step {i + 1} {method}"
    return made, roles


def trained_task(steps: list[dict], where: str, name: str) -> str:
    """The one task the pipeline's training steps adapt on."""
    found = {data["task"] for data in _task_data(steps)}
    if not found:
        raise ConfigError(
            f"{where}: a transfer study adapts on each task in turn, but pipeline '{name}' has no training step on a "
            f"task (a step with train.data.task other than {AGNOSTIC}); add one, e.g. {{method: lora, train: {{data: "
            "{task: arith}}}"
        )
    if len(found) > 1:
        raise ConfigError(f"{where}: pipeline '{name}' trains on several tasks ({', '.join(sorted(found))}); a "
                          "transfer study varies one: make its training steps share a task")  # fmt: skip
    return found.pop()


def transfer(name: str, steps: list[dict], train_tasks: list[str] | None, tasks: list[str], where: str,
             resolve: Callable[[dict, str], dict]) -> tuple[dict[str, list[dict]], dict[str, str]]:  # fmt: skip
    own = trained_task(steps, where, name)
    wanted = default_train_tasks(tasks) if train_tasks is None else list(train_tasks)
    if train_tasks is not None:
        for i, task in enumerate(wanted):
            _check_trainable(task, f"{where}.train_tasks[{i}]")
        if len(set(wanted)) != len(wanted):
            raise ConfigError(f"{where}.train_tasks: a task is listed twice")
    others = [t for t in wanted if t != own]
    if not others:
        raise ConfigError(
            f"{where}: a transfer study needs a training task besides '{own}' (pipeline '{name}' trains on it); "
            "list them in study.train_tasks"
        )
    made, roles = {}, {name: own}
    for task in others:
        label = f"{name}@train-{task}"
        new = [_retarget(step, task) for step in steps]
        made[label] = [resolve(s, f"study: pipelines.{label}[{i}]") if s is not o else s
                       for i, (s, o) in enumerate(zip(new, steps))]  # fmt: skip
        roles[label] = task
    return made, roles


def default_train_tasks(tasks: list[str]) -> list[str]:
    """The recipe's tasks that can train, as training names (`boolq:eval-fold` -> boolq), in order."""
    out = []
    for task in tasks:
        base = task.partition(":")[0]
        if base not in out and _trainable(base):
            out.append(base)
    return out


def _trainable(task: str) -> bool:
    try:
        _check_trainable(task, "")
    except ConfigError:
        return False
    return True


def _check_trainable(task: str, where: str) -> None:
    from pydantic import ValidationError

    from budgetlm.train.config import DataConfig
    from budgetlm.train.data import check_data

    try:
        cfg = DataConfig(task=task)
    except ValidationError as exc:
        raise ConfigError(f"{where}: {exc.errors()[0]['msg'].removeprefix('Value error, ')}") from None
    if task == AGNOSTIC:
        raise ConfigError(f"{where}: '{AGNOSTIC}' is task-agnostic text, not a task to adapt on")
    try:
        check_data(cfg)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _task_data(node) -> list[dict]:
    """Every `data` mapping with a task other than corpus under a step (its train config)."""
    found = []
    if isinstance(node, dict):
        data = node.get("data")
        if isinstance(data, dict) and isinstance(data.get("task"), str) and data["task"] != AGNOSTIC:
            found.append(data)
        for key, value in node.items():
            if key != "data":
                found += _task_data(value)
    elif isinstance(node, list):
        for value in node:
            found += _task_data(value)
    return found


def _retarget(step: dict, task: str) -> dict:
    """The step with every task `data` mapping set to `task` (split unset); the same object when it trains on none."""
    if not _task_data(step):
        return step

    def walk(node):
        if isinstance(node, dict):
            out = {k: walk(v) for k, v in node.items()}
            data = out.get("data")
            if isinstance(data, dict) and isinstance(data.get("task"), str) and data["task"] != AGNOSTIC:
                out["data"] = {**data, "task": task, "split": None}
            return out
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    return walk(step)
