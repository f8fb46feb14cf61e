"""Compute the base model's reference outputs for one task in a process of its own:
python -m budgetlm.evaluation.reference BASE TASK PATH IDS_JSON [--seed S] [--data-dir D]

What it is doing goes to stderr as "progress: ..." lines, which the evaluation relays to its own progress."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from budgetlm.errors import BudgetLMError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("base")
    ap.add_argument("task")
    ap.add_argument("path")
    ap.add_argument("ids")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-dir")
    a = ap.parse_args(argv)
    from budgetlm.data.tasks import tasks
    from budgetlm.data.tasks.base import TaskContext
    from budgetlm.models.lm import HFLM
    from budgetlm.models.sources import load
    from budgetlm.progress import relay_lines, say

    try:
        task = tasks.get(a.task)
        ctx = TaskContext(seed=a.seed, data_dir=Path(a.data_dir) if a.data_dir else None, is_base=True)
        by_id = {it.id: it for it in task.load(ctx).items}
        items = [by_id[i] for i in json.loads(Path(a.ids).read_text())]
        say(f"loading {a.base}", sys.stderr)
        handle = load(a.base)
        say(f"scoring {len(items)} items with {a.base}", sys.stderr)
        with relay_lines(sys.stderr):
            task.write_reference(HFLM(handle), items, Path(a.path))
    except (BudgetLMError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
