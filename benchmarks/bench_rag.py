"""AdaComp-RAG on sciq-rag and boolq-rag: no retrieval, always k passages, the oracle passage, and the gated,
compressed pipeline with each gate; accuracy, paired tests, latency per query, prompt tokens, peak RSS.

    PYTHONPATH=src .venv/bin/python benchmarks/bench_rag.py [--tasks sciq-rag,boolq-rag] [--model smollm2-135m]
        [--limit 500] [--seed 0] [--k 3] [--budget 128[,64,none...]] [--only PREFIX,...]
        [--threads 2] [--json out.json]
    PYTHONPATH=src .venv/bin/python benchmarks/bench_rag.py --crossover [--sizes 1000 3000 ...]

Every setting is the registered task with its options (rag/tasks.py), scored by the task's own per-item code in one
process on the same seeded sample of the task's evaluation fold (`--limit` items, stratified by label as the harness
samples), interleaved (item by item, every setting in turn, the order rotating) so that the shared machine's load falls
on all settings alike; the gates' thresholds are calibrated first on the calibration fold (disjoint; its size and the
threshold are printed). Items are scored one at a time (batch 1, through the decode runtime with its KV cache:
decode/query.py), so `latency` is a query's: query encoding + search + gate scoring + compression + the
model's loglikelihood of every choice. Paired tests: McNemar on acc (evaluation/stats.py) against the best always-RAG
setting (highest acc of k = 1, 3, 5) and against no-RAG; latency change against the best always-RAG setting. Peak RSS:
the process's, sampled while the setting ran (hardware/memory.py PeakRSS around each of its items, the maximum; model,
encoder and index included).

--crossover times exact top-k search (k = 5, one query, as the pipeline searches) with numpy (matrix-vector
product + argpartition) and faiss IndexFlatIP on random unit vectors of MiniLM's width, per index size: the
median of interleaved repeats. rag/index.py NUMPY_BELOW is set from it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time


def crossover(sizes: list[int], repeats: int, threads: int) -> list[dict]:
    import faiss
    import numpy as np

    from budgetlm.rag.index import _flat_ip, numpy_topk

    faiss.omp_set_num_threads(threads)
    rng = np.random.default_rng(0)
    rows = []
    for n in sizes:
        vecs = rng.standard_normal((n, 384), dtype=np.float32)
        vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
        flat = _flat_ip(vecs)
        queries = vecs[rng.integers(0, n, size=repeats)] + 0.01
        t_np, t_fa = [], []
        for q in queries:
            q = q.reshape(1, -1)
            t = time.perf_counter()
            s1, i1 = numpy_topk(vecs, q, 5)
            t_np.append(time.perf_counter() - t)
            t = time.perf_counter()
            s2, i2 = flat.search(q, 5)
            t_fa.append(time.perf_counter() - t)
            assert (i1 == i2).all(), "numpy and faiss disagree"
        row = {"n": n, "numpy_ms": statistics.median(t_np) * 1e3, "faiss_ms": statistics.median(t_fa) * 1e3}
        rows.append(row)
        print(f"n={n:>9,}  numpy {row['numpy_ms']:8.3f} ms  faiss {row['faiss_ms']:8.3f} ms", flush=True)
    return rows


def settings(k: int, budgets: list[int | None], only: list[str] | None = None) -> list[tuple[str, str]]:
    """(label, task options) in table order: per compression budget (None: the k passages as retrieved), always-RAG
    compressed to it and AdaComp with each gate; `only`: the settings whose label starts with one of these."""
    out = [("no-RAG", "gate=never")]
    out += [(f"always k={n}", f"gate=always:k={n}") for n in (1, 3, 5)]
    out += [(f"always k={k}, compressed {b}", f"gate=always:k={k}:budget={b}") for b in budgets if b is not None]
    out += [("oracle passage", "gate=oracle")]
    for b in budgets:
        size, option = (f"k={k}", f"k={k}") if b is None else (f"k={k}, {b}", f"k={k}:budget={b}")
        out += [(f"AdaComp {g} ({size})", f"gate={g}:{option}") for g in ("grad", "entropy", "margin")]
    return [(label, o) for label, o in out if not only or any(label.startswith(p) for p in only)]


def run_task(
    lm, task_name: str, k: int, budgets: list[int | None], limit: int, seed: int, only: list[str] | None = None
) -> dict:
    """Every setting on the same items, interleaved: item by item, each setting in turn (the order rotating), so
    the shared machine's load falls on all settings alike."""
    from budgetlm.data.tasks import tasks
    from budgetlm.data.tasks.base import TaskContext, aggregate
    from budgetlm.evaluation.harness import sample_items
    from budgetlm.hardware.memory import PeakRSS
    from budgetlm.progress import Progress
    from budgetlm.rag.pipeline import warm_up

    ctx = TaskContext(seed=seed)
    runs = {label: tasks.get(f"{task_name}:{option}") for label, option in settings(k, budgets, only)}
    data = {label: t.load(ctx) for label, t in runs.items()}
    items = sample_items(next(iter(data.values())).items, limit, seed)
    index = runs["always k=1"]._index(ctx)
    calibration = {}
    for label, t in runs.items():
        if t.setting.gate in ("grad", "entropy", "margin"):
            calibration[label] = t.calibrate(lm, index, ctx)
            print(f"{task_name} {label}: calibrated {calibration[label]}", flush=True)
    warm_up(lm)
    records = {label: [] for label in runs}
    peak = dict.fromkeys(runs, 0)
    labels = list(runs)
    with Progress(task_name, len(items), enabled=True, throttled=True) as bar:
        for n, it in enumerate(items):
            for label in labels[n % len(labels) :] + labels[: n % len(labels)]:
                t = runs[label]
                threshold = calibration[label]["threshold"] if label in calibration else t.setting.threshold
                with PeakRSS(label, sample=False) as mem:  # VmHWM; no sampling thread taking time from the timed
                    records[label].append(t._score_item(lm, index, it, threshold))
                peak[label] = max(peak[label], mem.peak_bytes)
            bar.advance()
    results = {}
    for label, t in runs.items():
        recs = records[label]
        m = aggregate(recs, t.aggregations())
        results[label] = {
            "label": label,
            "task": t.name,
            "n": len(recs),
            "acc": m["acc"].value,
            "acc_se": m["acc"].stderr,
            "retrieved": m["retrieved"].value,
            "prompt_tokens": m["prompt_tokens"].value,
            "latency_s": m["latency_s"].value,
            "latency_se": m["latency_s"].stderr,
            "parts_s": {
                p: statistics.fmean(r[p] for r in recs) for p in ("retrieve_s", "gate_s", "compress_s", "score_s")
            },
            "peak_rss_bytes": peak[label],
            "calibration": calibration.get(label),
            "index": index.label,
            "data": data[label].source,
            "correct": [r["acc"] for r in recs],
            "ids": [r["id"] for r in recs],
        }
        r = results[label]
        print(
            f"{task_name} {label}: acc {r['acc']:.4f} ± {r['acc_se']:.4f}, latency {r['latency_s'] * 1e3:.0f} ms, "
            f"tokens {r['prompt_tokens']:.0f}, retrieved {r['retrieved']:.2f}",
            flush=True,
        )
    return results


def table(task_name: str, results: dict) -> str:
    from budgetlm.evaluation.stats import mcnemar

    always = [r for label, r in results.items() if label.startswith("always k=") and "compressed" not in label]
    best = max(always, key=lambda r: (r["acc"], -r["latency_s"]))
    none = results["no-RAG"]
    lines = [
        f"{task_name}: n = {best['n']} items; best always-RAG = {best['label']}",
        "",
        "| setting | acc ± SE | vs best always: Δacc, McNemar p | vs no-RAG: Δacc, p | retrieved | prompt tokens "
        "| latency ms (retr/gate/compr/score) | Δlatency vs best always | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label, r in results.items():
        assert r["ids"] == best["ids"] == none["ids"], "settings must score the same items"
        vb, vn = mcnemar(best["correct"], r["correct"]), mcnemar(none["correct"], r["correct"])
        parts = "/".join(f"{r['parts_s'][p] * 1e3:.0f}" for p in ("retrieve_s", "gate_s", "compress_s", "score_s"))
        lines.append(
            f"| {label} | {r['acc']:.3f} ± {r['acc_se']:.3f} | {r['acc'] - best['acc']:+.3f}, {vb['p']:.3g} | "
            f"{r['acc'] - none['acc']:+.3f}, {vn['p']:.3g} | {r['retrieved']:.2f} | {r['prompt_tokens']:.0f} | "
            f"{r['latency_s'] * 1e3:.0f} ({parts}) | {100 * (r['latency_s'] / best['latency_s'] - 1):+.0f}% | "
            f"{r['peak_rss_bytes'] / 1e6:.0f} |"
        )
    lines.append("")
    for label, r in results.items():
        if r["calibration"]:
            c = r["calibration"]
            lines.append(
                f"- {label}: threshold {c['threshold']:.4g} calibrated on {c['items']}: calibration acc "
                f"{c['accuracy']:.3f} (never {c['accuracy_never']:.3f}, always {c['accuracy_always']:.3f}), "
                f"retrieval rate {c['retrieval_rate']:.2f}; evidence computed in {c['seconds']} s"
            )
    lines.append(f"- index: {best['index']}")
    lines.append(f"- data: {best['data']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", default="sciq-rag,boolq-rag")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--limit", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument(
        "--budget", default="128", help="compression budget(s) in model tokens, comma-separated; none: uncompressed"
    )
    ap.add_argument("--only", default=None, help="comma-separated label prefixes: run only those settings")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    ap.add_argument("--crossover", action="store_true")
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 3000, 10000, 30000, 100000, 300000])
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--cal-items", type=int, default=300, help="calibration items per task (rag/tasks.py CAL_ITEMS)")
    ap.add_argument("--tables", default=None, help="print the tables of an earlier --json file and stop")
    args = ap.parse_args(argv)
    try:
        budgets = [None if b.strip() == "none" else int(b) for b in str(args.budget).split(",") if b.strip()]
    except ValueError:
        ap.error(f"--budget {args.budget}: whole numbers of model tokens or 'none', comma-separated (e.g. 128,64)")
    if not budgets or any(b is not None and b < 1 for b in budgets):
        ap.error(f"--budget {args.budget}: at least one budget, each at least 1 token or 'none'")
    if args.tables:
        with open(args.tables) as f:
            saved = json.load(f)
        for name, res in saved["tasks"].items():
            print(table(name, res) + "\n")
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # OpenMP's wait policy is the environment's: on an idle machine the default (spin, then sleep) is fastest (a
    # 14-token boolq prompt: 74 ms of transformers' forward against 115 ms with OMP_WAIT_POLICY=PASSIVE, every
    # parallel region waking sleeping threads); on a machine loaded by others, PASSIVE (one MiniLM query: 76 ms
    # against 630 ms spinning at load average 8). Sessions 11-12's tables ran with PASSIVE.
    import torch

    torch.set_num_threads(args.threads)
    load = os.getloadavg()
    print(
        f"threads {args.threads}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'default')}; "
        f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (2 shared cores)",
        flush=True,
    )
    if args.crossover:
        rows = crossover(args.sizes, args.repeats, args.threads)
        out = {"crossover": rows, "threads": args.threads, "load_before": load}
    else:
        from budgetlm.api import load as load_model
        from budgetlm.rag import tasks as rag_tasks

        rag_tasks.CAL_ITEMS = args.cal_items
        from budgetlm.models.lm import HFLM

        handle = load_model(args.model)
        lm = HFLM(handle)
        out = {
            "model": args.model,
            "threads": args.threads,
            "limit": args.limit,
            "seed": args.seed,
            "k": args.k,
            "budgets": budgets,
            "only": args.only,
            "load_before": load,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
            "tasks": {},
        }
        for name in [t.strip() for t in args.tasks.split(",") if t.strip()]:
            only = [p.strip() for p in args.only.split(",")] if args.only else None
            res = run_task(lm, name, args.k, out["budgets"], args.limit, args.seed, only)
            out["tasks"][name] = res
            out["load_after"] = os.getloadavg()
            if args.json:  # after each task: an hour of work is not lost to a later failure
                with open(args.json, "w") as f:
                    json.dump(out, f, indent=1)
            print(table(name, res), flush=True)
        print(f"load average after: {out['load_after'][0]:.2f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
