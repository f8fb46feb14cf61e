"""budgetlm's evaluation harness vs lm-evaluation-harness's `hf` backend, in one run, on the same model
(smollm2-135m saved as a Hugging Face folder) and the same multiple-choice items (text-cloze written out as
an lm-eval local task). Prints items/s of each at the batch sizes tried, the best-vs-best ratio, and the
agreement of the per-request loglikelihoods.

Needs lm-eval (`pip install -e '.[bench]'`). Run: .venv/bin/python benchmarks/eval_vs_lm_eval.py --items 100
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def build_items(task_name: str, n: int, seed: int):
    from budgetlm.data.tasks import tasks
    from budgetlm.data.tasks.base import TaskContext
    from budgetlm.evaluation.harness import sample_items

    task = tasks.get(task_name)
    items = sample_items(task.load(TaskContext(seed=seed)).items, n, seed)
    return [(it.id, task.requests(it.doc), task.doc_to_target(it.doc)) for it in items]


def write_lm_eval_task(folder: Path, items) -> str:
    rows = [{"id": i, "query": reqs[0][0], "choices": [c for _, c in reqs], "gold": gold} for i, reqs, gold in items]
    data = folder / "items.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "budgetlm_cloze.yaml").write_text(
        "task: budgetlm_cloze\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: '{{query}}'\n"
        "doc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{gold}}'\n"
        "target_delimiter: ''\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )
    return "budgetlm_cloze"


def run_lm_eval(model_dir: Path, task_dir: Path, task: str, batch_size: int):
    import lm_eval
    from lm_eval.tasks import TaskManager

    t0 = time.perf_counter()
    res = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={model_dir},dtype=float32,device=cpu",
        tasks=[task],
        task_manager=TaskManager(include_path=str(task_dir)),
        batch_size=batch_size,
        log_samples=True,
    )
    seconds = time.perf_counter() - t0
    lls = {}
    for s in res["samples"][task]:
        doc_id = s["doc"]["id"]
        lls[doc_id] = [float(r[0][0]) for r in s["resps"]]
    return seconds, lls, res["results"][task]


def run_budgetlm(handle, items, batch_size):
    from budgetlm.models.lm import HFLM

    lm = HFLM(handle, batch_size=batch_size)
    reqs = [r for _, rs, _ in items for r in rs]
    t0 = time.perf_counter()
    out = lm.loglikelihood(reqs)
    seconds = time.perf_counter() - t0
    lls, k = {}, 0
    for i, rs, _ in items:
        lls[i] = [out[k + j][0] for j in range(len(rs))]
        k += len(rs)
    return seconds, lls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--task", default="text-cloze")
    ap.add_argument("--items", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lm-eval-batch", default="1,8,32", help="lm-eval batch sizes to try")
    ap.add_argument("--budgetlm-batch", default="auto,8", help="budgetlm batch sizes to try (auto: token budget)")
    a = ap.parse_args()

    from budgetlm.models.sources import load

    handle = load(a.model)
    items = build_items(a.task, a.items, a.seed)
    n_reqs = sum(len(r) for _, r, _ in items)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = tmp / "hf"
        handle.model.save_pretrained(model_dir)
        handle.tokenizer.save_pretrained(model_dir)
        task = write_lm_eval_task(tmp, items)
        print(f"model {a.model}, task {a.task}: {len(items)} items, {n_reqs} requests, load avg {os.getloadavg()}")
        rows, ours, theirs = [], {}, {}
        for bs in a.budgetlm_batch.split(","):
            secs, lls = run_budgetlm(handle, items, None if bs == "auto" else int(bs))
            ours[bs] = (secs, lls)
            rows.append(("budgetlm", bs, secs, len(items) / secs))
        for bs in a.lm_eval_batch.split(","):
            secs, lls, metrics = run_lm_eval(model_dir, tmp, task, int(bs))
            theirs[bs] = (secs, lls)
            rows.append(("lm-eval hf", bs, secs, len(items) / secs))
    print(f"{'tool':12s} {'batch':>6s} {'seconds':>9s} {'items/s':>9s}")
    for tool, bs, secs, ips in rows:
        print(f"{tool:12s} {bs:>6s} {secs:9.1f} {ips:9.2f}")
    best_ours = min(ours.values(), key=lambda v: v[0])
    best_theirs = min(theirs.values(), key=lambda v: v[0])
    print(f"throughput ratio (best budgetlm / best lm-eval): {best_theirs[0] / best_ours[0]:.2f}x")
    diffs = [
        abs(x - y)
        for i in best_ours[1]
        for x, y in zip(best_ours[1][i], best_theirs[1][str(i)] if str(i) in best_theirs[1] else best_theirs[1][i])
    ]
    print(f"per-request loglikelihood agreement: max |diff| {max(diffs):.2e}, mean {sum(diffs) / len(diffs):.2e}")
    print(f"within 1e-4: {sum(d <= 1e-4 for d in diffs)}/{len(diffs)}")


if __name__ == "__main__":
    main()
