"""The pruning table: magnitude, Wanda, SparseGPT and ShortGPT on smollm2-135m at 50% unstructured sparsity, 2:4
and 25% of the layers removed, plus the "prune then quantise" pipelines of the "7B into under 2 GB" studies.

One row per setting, each in a fresh process (so its peak RSS is its own; results go to a JSON file after every
row and a rerun skips the rows already there): KL divergence to the loaded model and perplexity on held-out text
(budgetlm's text-ppl), text-cloze accuracy, stored bytes (of the format really written: bitmask or 2:4
compressed for the sparse rows), bits per Linear weight, overall sparsity, pruning time and peak RSS, and the
prefill (tokens/s) and decode (ms/token) speed of the pruned model measured on this CPU. There is no sparse matrix
kernel here, so unstructured and 2:4 sparsity give no speed-up (the sparse layers rebuild a dense weight; the
table shows what that costs); ShortGPT's layers are really gone.

    nice -n 10 .venv/bin/python benchmarks/prune.py [--model smollm2-135m] [--quick] [--rows NAME,...]
        [--out FILE] [--fresh] [--dry-run]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from peers.rows import add_worker_args, load_results, mib, pm, run_in_process, run_worker, save_row  # noqa: E402

LIMITS = {"full": (32, 60), "quick": (8, 20)}  # (text-ppl chunks, text-cloze items)


def plan(model: str) -> list[dict]:
    rows = [{"name": "dense (as loaded)", "steps": []}]
    for method in ("magnitude", "wanda", "sparsegpt"):
        rows.append({"name": f"{method} 50%", "steps": [{"method": method, "sparsity": 0.5}]})
    for method in ("magnitude", "wanda", "sparsegpt"):
        rows.append({"name": f"{method} 2:4", "steps": [{"method": method, "pattern": "2:4"}]})
    rows.append({"name": "shortgpt 25% layers", "steps": [{"method": "shortgpt", "fraction": 0.25}]})
    rows.append(
        {
            "name": "wanda 2:4 + gptq 4-bit g64",
            "steps": [{"method": "wanda", "pattern": "2:4"}, {"method": "gptq", "bits": 4, "group_size": 64}],
        }
    )
    rows.append(
        {
            "name": "shortgpt 25% + rtn int8",
            "steps": [{"method": "shortgpt", "fraction": 0.25}, {"method": "rtn", "bits": 8}],
        }
    )
    for row in rows:
        row["model"] = model
    return rows


def row_key(row: dict) -> str:
    return f"{row['model']} | {row['name']}"


# --- the worker (one row, in its own process) ------------------------------------------------------------------


def run_row(row: dict, opts: dict) -> dict:
    import torch

    from budgetlm.api import load
    from budgetlm.hardware.memory import PeakRSS
    from budgetlm.hardware.speed import decode_speed, prefill_speed
    from budgetlm.methods.base import apply_steps, methods
    from peers.runner import _rss, _size, evaluate_handle

    if opts.get("threads"):
        torch.set_num_threads(opts["threads"])
    for step in row["steps"]:  # import every method before the clock starts
        methods.get(step["method"])
    with PeakRSS("load") as mem_load:
        handle = load(row["model"])
    res: dict = {"rss_load": _rss(mem_load), "notes": [], "stats": {}}
    with PeakRSS("compress") as mem:
        t0 = time.perf_counter()
        reports = apply_steps(handle, row["steps"])
        res["compress_seconds"] = time.perf_counter() - t0
    res["rss_compress"] = _rss(mem)
    for r in reports:
        res["notes"] += [f"{r.method}: {n}" for n in r.notes]
        if r.method in ("magnitude", "wanda", "sparsegpt"):
            res["stats"][r.method] = {k: v.get("sparsity") for k, v in r.stats.items() if isinstance(v, dict)}
    gc.collect()
    res["size"] = _size(handle)
    res["sparsity"] = _zeros(handle.model)
    res["layers"] = handle.model.config.num_hidden_layers
    with PeakRSS("eval") as mem_eval:
        res["metrics"] = evaluate_handle(handle, opts)
    res["rss_eval"] = _rss(mem_eval)
    pre = prefill_speed(handle, opts["prefill_tokens"], repeats=opts["repeats"], seed=opts["seed"])
    dec = decode_speed(handle, opts["decode_tokens"], repeats=opts["repeats"], seed=opts["seed"])
    res["prefill_tok_s"] = {"value": pre.value, "sd": pre.extra.get("sd"), "median": pre.extra.get("median")}
    res["decode_ms"] = {"value": dec.value, "sd": dec.extra.get("sd"), "median": dec.extra.get("median")}
    res["status"] = "ok"
    return res


def _zeros(model) -> dict:
    """Exact zeros in the weights the decoder's Linear layers compute with (what a pruned model really holds)."""
    from budgetlm.hardware.size import linear_modules

    zeros = total = 0
    for mod in linear_modules(model).values():
        w = _effective_weight(mod)
        zeros += int((w == 0).sum())
        total += w.numel()
    return {"zeros": zeros, "weights": total, "fraction": zeros / max(total, 1)}


def _effective_weight(mod):
    for attr in ("effective_weight", "dense_weight", "dequantized_weight"):
        fn = getattr(mod, attr, None)
        if callable(fn):
            return fn()
    return mod.weight.detach()


# --- the table -------------------------------------------------------------------------------------------------


def _pruned_sparsity(r: dict) -> str:
    """The sparsity of the Linears the pruning step targeted (its report's note), else the exact zeros over every
    Linear including the tied lm_head, which no step prunes (marked *)."""
    for note in r.get("notes", []):
        m = re.search(r"sparsity ([0-9.]+) over their", note)
        if m:
            return m.group(1)
    return f"{r['sparsity']['fraction']:.3f}*"


def table(rows: list[dict], results: dict) -> str:
    head = (
        "| setting | layers | sparsity | KL to dense (nats/token) | perplexity | text-cloze acc | stored MB "
        "| linear bpw | prune s | peak RSS prune (MiB) | prefill tok/s | decode ms/token |"
    )
    lines = [head, "|" + "---|" * 12]
    for row in rows:
        r = results.get(row_key(row))
        if r is None:
            continue
        if r.get("status") != "ok":
            lines.append(f"| {row['name']} | error: {r.get('error', '?')[:160]} |" + " |" * 10)
            continue
        met, size = r["metrics"], r["size"]
        cells = [
            row["name"],
            str(r["layers"]),
            _pruned_sparsity(r),
            pm(met["kld"], 4),
            pm(met["perplexity"], 2),
            pm(met["cloze_acc"], 3),
            f"{size['stored_bytes'] / 1e6:.1f}",
            f"{size['linear_bpw']:.2f}",
            f"{r['compress_seconds']:.1f}",
            mib(r["rss_compress"]["peak"]),
            f"{r['prefill_tok_s']['median']:.0f}",
            f"{r['decode_ms']['median']:.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def speed_side_by_side(model: str, threads: int, repeats: int = 5) -> None:
    """Prefill and decode speed of the dense model, a 2:4-pruned one (magnitude: data-free, the same SparseLinear
    layers every N:M method produces) and ShortGPT-25%, measured in one process one after the other, so the ratios
    are comparable on a noisy machine (the per-row speeds of the table run in separate processes)."""
    import torch

    from budgetlm.api import load
    from budgetlm.hardware.speed import decode_speed, prefill_speed
    from budgetlm.methods.base import apply_steps

    if threads:
        torch.set_num_threads(threads)
    variants = {"dense": [], "2:4 (SparseLinear)": [{"method": "magnitude", "pattern": "2:4"}]}
    variants["shortgpt 25%"] = [{"method": "shortgpt", "fraction": 0.25}]
    out = {}
    for name, steps in variants.items():
        handle = load(model)
        apply_steps(handle, steps)
        pre = prefill_speed(handle, 256, repeats=repeats, seed=0)
        dec = decode_speed(handle, 32, repeats=repeats, seed=0)
        out[name] = (pre.extra["median"], dec.extra["median"])
        del handle
    base_pre, base_dec = out["dense"]
    print(f"{torch.get_num_threads()} threads")
    print("| model | prefill tok/s (256) | vs dense | decode ms/token | vs dense |")
    print("|---|---|---|---|---|")
    for name, (pre, dec) in out.items():
        print(f"| {name} | {pre:.0f} | {pre / base_pre:.2f}x | {dec:.1f} | {base_dec / dec:.2f}x faster |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--quick", action="store_true", help="fewer evaluation items (8 text-ppl chunks, 20 cloze)")
    ap.add_argument("--rows", help="comma-separated row names to run (default all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=2 * 3600)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--fresh", action="store_true")
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--speed", action="store_true", help="only the side-by-side speed of dense, 2:4 and ShortGPT")
    add_worker_args(ap)
    args = ap.parse_args()

    if args.worker:
        run_worker(args, run_row)
        return

    if args.speed:
        speed_side_by_side(args.model, args.threads)
        return
    mode = "quick" if args.quick else "full"
    limit_ppl, limit_cloze = LIMITS[mode]
    opts = {
        "limit_ppl": limit_ppl,
        "limit_cloze": limit_cloze,
        "seed": args.seed,
        "threads": args.threads,
        "prefill_tokens": 256,
        "decode_tokens": 32,
        "repeats": 3,
    }
    out = args.out or HERE / "peers" / "results" / f"prune-{args.model}{'-quick' if args.quick else ''}.json"
    rows = plan(args.model)
    if args.rows:
        wanted = {s.strip() for s in args.rows.split(",")}
        unknown = wanted - {r["name"] for r in rows}
        if unknown:
            sys.exit(f"unknown rows {sorted(unknown)}; the rows are: {', '.join(r['name'] for r in rows)}")
        rows = [r for r in rows if r["name"] in wanted or not r["steps"]]
    if args.dry_run:
        for row in rows:
            print(row_key(row), json.dumps(row["steps"]))
        return
    data = load_results(out, opts, args.fresh)
    results = data["rows"]
    logs = Path(os.environ.get("BUDGETLM_CACHE", Path.home() / ".cache" / "budgetlm")) / "bench" / "prune" / "logs"
    print(f"{len(rows)} rows, results in {out}", flush=True)
    for i, row in enumerate(rows, 1):
        key = row_key(row)
        if results.get(key, {}).get("status") == "ok":
            continue
        print(f"[{i}/{len(rows)}] {key} ...", end=" ", flush=True)
        log = logs / (key.replace(" ", "_").replace("|", "").replace("/", "-").replace(":", "-") + ".log")
        res = run_in_process(Path(__file__).resolve(), row, opts, log, args.timeout)
        res["row"] = row
        results = save_row(out, opts, key, res)
        if res.get("status") == "ok":
            print(
                f"KL {res['metrics']['kld']['value']:.4f}, ppl {res['metrics']['perplexity']['value']:.2f}, "
                f"sparsity {res['sparsity']['fraction']:.3f} ({res['wall_seconds']:.0f}s)",
                flush=True,
            )
        else:
            print(f"error: {res.get('error')}", flush=True)
    print()
    print(table(rows, results))


if __name__ == "__main__":
    main()
