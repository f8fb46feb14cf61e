"""Tasks are data plus a scoring rule. Three shapes cover the field: multiple choice (scored by
loglikelihood, acc and acc_norm as lm-eval defines them), generation (greedy until stop sequences,
scored per item), and custom runs (perplexity, KL to the base model) that drive the LM themselves.

A task loads its items (from the hub, the local cache, local files or a generator) and states where
they came from; the harness samples --limit items with the seed (stratified by label). Every metric a task
reports is declared in `aggregations()` (results.Aggregate: the mean of a per-item field, or a ratio of two
fields' sums), computed from the per-item records by that declaration, and recorded with it in eval.json so
that `budgetlm compare` recomputes exactly the same statistic.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from budgetlm.errors import BudgetLMError
from budgetlm.registry import Registry
from budgetlm.results import Aggregate, Metric


class TaskRegistry(Registry):
    """The task registry, where `<task>:eval-fold` also names a task: the eval fold of a task that fine-tunes on
    the train fold of its evaluation split (folds.py); a task with `with_options` reads what follows its name's
    first ':' as its settings (`sciq-rag:gate=grad:k=3`)."""

    def get(self, name: str):
        base, sep, option = name.partition(":")
        if not sep:
            return super().get(name)
        task = super().get(base)
        if hasattr(task, "with_options"):  # a task whose settings are part of its name (rag/tasks.py)
            return task.with_options(option)
        from budgetlm.data.tasks.folds import task_option

        return task_option(task, option)

    def __contains__(self, name: str) -> bool:
        if ":" not in name:
            return super().__contains__(name)
        try:
            self.get(name)
        except BudgetLMError:
            return False
        return True


tasks: TaskRegistry = TaskRegistry("task")  # name -> Task instance or "module:attr" (lazy)


@dataclass
class Item:
    id: str
    doc: dict
    label: Any = None  # used to stratify --limit samples


@dataclass
class TaskData:
    items: list[Item]
    source: str  # e.g. "hub allenai/ai2_arc ARC-Easy test", "local /x/test.jsonl", "generated ..."


@dataclass
class TaskContext:
    seed: int = 0
    data_dir: Path | None = None
    reference_dir: Path | None = None  # where the base model's reference outputs are cached
    is_base: bool = True  # the model being evaluated is the base (reference) model itself
    base_id: str = ""  # identifies the base model, so references are keyed by it
    batch_size: int | None = None
    extra: dict = field(default_factory=dict)


@dataclass
class TaskResult:
    metrics: dict[str, Metric]
    records: list[dict]  # per-item logs: {"id": ..., metric: value, ...}


class Task:
    name: str = ""
    kind: str = "custom"  # multiple_choice | generate | perplexity | custom
    description: str = ""

    def load(self, ctx: TaskContext) -> TaskData:
        raise NotImplementedError

    def run(self, lm, items: list[Item], ctx: TaskContext) -> TaskResult:
        raise NotImplementedError

    def aggregations(self) -> dict[str, Aggregate]:
        """{metric: how it is computed from the per-item records} for every metric `run` reports."""
        return {}


def reference_file(path, suffix: str) -> Path:
    """The file a task keeps its base-model reference in: the harness's path plus the task's suffix."""
    path = Path(path)
    return path.parent / f"{path.name}{suffix}"


def means(names) -> dict[str, Aggregate]:
    """Metrics that are the mean of the per-item field of the same name."""
    return {m: Aggregate(m) for m in names}


def aggregate(records: list[dict], aggregations: dict[str, Aggregate], unit: str = "") -> dict[str, Metric]:
    """Each declared metric (value, stderr over items, n) from the per-item records."""
    return {name: agg.metric(records, unit) for name, agg in aggregations.items()}


class MultipleChoiceTask(Task):
    """Subclasses define doc_to_text, doc_to_choices, doc_to_target (index). Scored as lm-eval does:
    acc = argmax of summed loglikelihood; acc_norm = argmax of loglikelihood / len(choice) in characters (the
    choice text, without the delimiter)."""

    kind = "multiple_choice"

    def doc_to_text(self, doc: dict) -> str:
        raise NotImplementedError

    def doc_to_choices(self, doc: dict) -> list[str]:
        raise NotImplementedError

    def doc_to_target(self, doc: dict) -> int:
        raise NotImplementedError

    def requests(self, doc: dict) -> list[tuple[str, str]]:
        """(context, continuation) pairs; the default puts ' ' + choice after the prompt."""
        ctx = self.doc_to_text(doc)
        return [(ctx, " " + c) for c in self.doc_to_choices(doc)]

    def run(self, lm, items: list[Item], ctx: TaskContext) -> TaskResult:
        reqs, spans = [], []
        for it in items:
            r = self.requests(it.doc)
            spans.append((len(reqs), len(r)))
            reqs.extend(r)
        out = lm.loglikelihood(reqs)
        records = []
        for it, (start, k) in zip(items, spans):
            lls = [out[start + j][0] for j in range(k)]
            lens = [len(c) for c in self.doc_to_choices(it.doc)]  # lm-eval: characters of the choice
            norm = [ll / max(1, n) for ll, n in zip(lls, lens)]
            gold = self.doc_to_target(it.doc)
            pred = max(range(k), key=lambda j: lls[j])
            pred_n = max(range(k), key=lambda j: norm[j])
            records.append(
                {
                    "id": it.id,
                    "acc": float(pred == gold),
                    "acc_norm": float(pred_n == gold),
                    "target": gold,
                    "pred": pred,
                    "loglikelihoods": lls,
                }
            )
        return TaskResult(aggregate(records, self.aggregations()), records)

    def aggregations(self) -> dict[str, Aggregate]:
        return means(["acc", "acc_norm"])


class GenerateTask(Task):
    """Subclasses define doc_to_text and score(doc, generation) -> {metric: value}."""

    kind = "generate"
    until: tuple[str, ...] = ("\n\n",)
    max_gen_toks: int = 256
    # wrap the prompt in the model's chat template where it has one; the lm-eval-named tasks say False, as
    # lm-eval runs them by default (without --apply_chat_template), so their prompts and scores compare
    chat: bool = True
    metric_names: tuple[str, ...] = ("exact_match",)

    def doc_to_text(self, doc: dict) -> str:
        raise NotImplementedError

    def score(self, doc: dict, generation: str) -> dict[str, float]:
        raise NotImplementedError

    def run(self, lm, items: list[Item], ctx: TaskContext) -> TaskResult:
        from budgetlm.models.lm import GenArgs

        args = GenArgs(until=list(self.until), max_gen_toks=self.max_gen_toks, chat=self.chat)
        gens = lm.generate_until([(self.doc_to_text(it.doc), args) for it in items])
        records = []
        for it, g in zip(items, gens):
            records.append({"id": it.id, **self.score(it.doc, g), "generation": g})
        return TaskResult(aggregate(records, self.aggregations()), records)

    def aggregations(self) -> dict[str, Aggregate]:
        return means(self.metric_names)
