"""Train and eval folds of one split, for tasks that have nothing else to train on, and the rule that no evaluation
scores items its model was trained on.

The bundled benchmark data has no train splits. ARC trains on its validation split (it is evaluated on test); a
task evaluated on its validation split (hellaswag, boolq, winogrande, piqa: `train_split = TRAIN_FOLD`) trains on
the *train fold* of that split and, once fine-tuned on it, is evaluated on the *eval fold*, named
`<task>:eval-fold` wherever a task name goes (`budgetlm eval --tasks boolq:eval-fold`, a recipe's `tasks`,
`train.eval_tasks`). The folds split the items 80% / 20% by a sha256 of each item with a fixed fold seed (FOLD_SEED,
recorded in every source string): an item's fold depends on nothing else (not the run's seed, the file's order or
which other items are present), so the folds are disjoint and the same from any source and in any run. The item is
hashed by its content — the document the task reads, as canonical JSON — rather than its row number, which
depends on the file's order, and identical items land in the same fold.

`overlap` says when training on some items of a task and evaluating it would score the same items (a pipeline that
trains on `boolq`, its train fold, in a study that evaluates `boolq`, all of validation); contamination.py applies
it, with the other rule on training data, wherever training meets evaluation.
"""

from __future__ import annotations

import hashlib
import json

from budgetlm.data.tasks.base import Item, Task, TaskData
from budgetlm.errors import ConfigError, UnknownNameError

TRAIN_FOLD, EVAL_FOLD = "train-fold", "eval-fold"
FOLDS = (TRAIN_FOLD, EVAL_FOLD)
FOLD_SEED = 0  # fixed: a fold must not move with a run's seed, or an eval fold could hold trained items
EVAL_PERCENT = 20


def in_eval_fold(task_name: str, doc: dict) -> bool:
    """Whether the item with this document is in the eval fold (EVAL_PERCENT of items, by hash)."""
    content = json.dumps({k: v for k, v in doc.items() if k != "fewshot"}, sort_keys=True, ensure_ascii=True)
    digest = hashlib.sha256(f"{FOLD_SEED}\0{task_name}\0{content}".encode()).digest()
    return int.from_bytes(digest[:8], "big") < EVAL_PERCENT * 2**64 // 100


def fold_items(task_name: str, items: list[Item], fold: str) -> tuple[list[Item], str]:
    """The items of `fold` (in their order) and the sentence that says which they are."""
    want_eval = fold == EVAL_FOLD
    kept = [it for it in items if in_eval_fold(task_name, it.doc) == want_eval]
    share = EVAL_PERCENT if want_eval else 100 - EVAL_PERCENT
    other = TRAIN_FOLD if want_eval else EVAL_FOLD
    return kept, (
        f"{fold}: {len(kept):,} of the {len(items):,} items ({share}% by a sha256 of each item, fold seed "
        f"{FOLD_SEED}; disjoint from the {other})"
    )


def has_folds(task) -> bool:
    return getattr(task, "train_split", None) == TRAIN_FOLD


class EvalFold(Task):
    """`<task>:eval-fold`: the task scored on the eval fold of its evaluation split only."""

    def __init__(self, task):
        self.task = task
        self.name = f"{task.name}:{EVAL_FOLD}"
        self.kind = task.kind
        self.description = f"{task.name} on the {EVAL_PERCENT}% eval fold of its {task.split} split (after fine-tuning)"

    def load(self, ctx) -> TaskData:
        data = self.task.load(ctx)
        items, note = fold_items(self.task.name, data.items, EVAL_FOLD)
        return TaskData(items, f"{data.source}; {note}")

    def run(self, lm, items, ctx):
        return self.task.run(lm, items, ctx)

    def aggregations(self):
        return self.task.aggregations()

    def __getattr__(self, attr: str):  # doc_to_text, needs_reference, split, ...: the task's own
        return getattr(self.task, attr)


_VIEWS: dict[str, EvalFold] = {}


def task_option(task, option: str) -> Task:
    """`<task>:<option>`: the one option is eval-fold, for tasks that train on their train fold."""
    name = f"{task.name}:{option}"
    if option != EVAL_FOLD:
        raise UnknownNameError(
            f"unknown task '{name}': the only option after a task's name is ':{EVAL_FOLD}' (e.g. 'boolq:{EVAL_FOLD}')"
        )
    if not has_folds(task):
        trains = getattr(task, "train_split", None)
        why = f"it trains on its {trains} split, not on a fold of" if trains else "it has no train source, nor"
        raise UnknownNameError(
            f"task '{name}': {task.name} has no eval fold ({why} its evaluation split); evaluate '{task.name}'"
        )
    if name not in _VIEWS:
        _VIEWS[name] = EvalFold(task)
    return _VIEWS[name]


# -- which items training reads, and the rule against scoring them ----------------------------------------------
def train_reads(task, split: str | None) -> tuple[str, str | None]:
    """(split, fold or None) of the items training on `task` with DataConfig.split `split` reads."""
    split = split or getattr(task, "train_split", "train")
    if split in FOLDS:
        if not has_folds(task):
            raise ConfigError(
                f"data: task '{task.name}' has no folds (it trains on its {task.train_split} split); "
                f"leave split unset or name a split of the dataset"
            )
        return task.split, split
    return split, None


def overlap(train_task: str, train_split: str | None, eval_task: str) -> str | None:
    """Why evaluating `eval_task` after training on `train_task` (DataConfig.split `train_split`) would score items
    the model trained on; None when it would not."""
    from budgetlm.data.tasks import tasks

    base, _, option = eval_task.partition(":")
    if base != train_task or not hasattr(tasks.get(base), "sources"):  # offline tasks keep their own sets apart
        return None
    task = tasks.get(base)
    split, fold = train_reads(task, train_split)
    eval_fold = EVAL_FOLD if option else None
    if split != task.split or {fold, eval_fold} == {TRAIN_FOLD, EVAL_FOLD}:
        return None
    trained = f"its {fold} ({split})" if fold else f"its {split} split"
    scored = f"its {eval_fold}" if eval_fold else f"all of its {task.split} split"
    if fold == TRAIN_FOLD:
        fix = f"evaluate '{base}:{EVAL_FOLD}' instead"
    elif has_folds(task):
        fix = f"train on its {TRAIN_FOLD} (leave data.split unset) and evaluate '{base}:{EVAL_FOLD}'"
    else:
        fix = f"train on its train source, the {task.train_split} split (leave data.split unset)"
    return f"training on {base} reads {trained} and evaluating {eval_task} scores {scored}: the same items; {fix}"
