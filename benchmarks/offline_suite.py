"""The offline default suite on smollm2-135m and on a 2-bit round-to-nearest copy of it.

Checks that text-cloze and arith sit clearly above chance and below ceiling for the base model, and that
every offline task moves when the weights are degraded. The degradation is written here (not the rtn
method): asymmetric round-to-nearest of every Linear weight of the decoder layers in groups of 32 input
weights, dequantised in place. Items are sampled with the seed (not the first N).

    .venv/bin/python benchmarks/offline_suite.py [--model smollm2-135m] [--bits 2] [--text-ppl 40] ...
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

from budgetlm.data.tasks import offline  # noqa: E402
from budgetlm.data.tasks.base import TaskContext  # noqa: E402
from budgetlm.data.tasks.fidelity import fidelity  # noqa: E402
from budgetlm.models.lm import HFLM  # noqa: E402
from budgetlm.models.sources import load  # noqa: E402

TASKS = {"text-ppl": offline.text_ppl, "text-cloze": offline.text_cloze, "arith": offline.arith, "fidelity": fidelity}
DEFAULT_N = {"text-ppl": 40, "text-cloze": 200, "arith": 100, "fidelity": 32}


@torch.no_grad()
def rtn_degrade(model: torch.nn.Module, bits: int = 2, group: int = 32) -> int:
    """Asymmetric RTN of each decoder-layer Linear weight, per group of `group` input weights, in place."""
    qmax = 2**bits - 1
    count = 0
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear) or ".layers." not in f".{name}":
            continue
        w = mod.weight.data
        g = w.reshape(w.shape[0], -1, group)
        lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
        scale = ((hi - lo) / qmax).clamp(min=1e-8)
        zero = torch.round(-lo / scale)
        q = torch.clamp(torch.round(g / scale) + zero, 0, qmax)
        w.copy_(((q - zero) * scale).reshape_as(w))
        count += 1
    return count


def sample(items, n: int, seed: int):
    if n >= len(items):
        return items
    return random.Random(seed).sample(items, n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--bits", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    for t, n in DEFAULT_N.items():
        ap.add_argument(f"--{t}", type=int, default=n, help=f"items of {t} (default {n})")
    ap.add_argument("--tasks", default=",".join(TASKS))
    args = ap.parse_args()
    names = args.tasks.split(",")
    ctx = TaskContext(seed=args.seed)
    handle = load(args.model)
    lm = HFLM(handle)
    print(f"model {args.model}, torch threads {torch.get_num_threads()}, load avg {os.getloadavg()}", flush=True)
    chosen, sources = {}, {}
    for name in names:
        data = TASKS[name].load(ctx)
        chosen[name] = sample(data.items, getattr(args, name.replace("-", "_")), args.seed)
        sources[name] = data.source
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        refs = {}
        for name in names:
            task = TASKS[name]
            if getattr(task, "needs_reference", False):
                refs[name] = Path(tmp) / name
                t0 = time.perf_counter()
                task.write_reference(lm, chosen[name], refs[name])
                print(f"{name}: reference written in {time.perf_counter() - t0:.1f}s", flush=True)
        for label in ("base", "degraded"):
            if label == "degraded":
                n_lin = rtn_degrade(handle.model, args.bits)
                print(f"degraded {n_lin} Linear weights to {args.bits}-bit RTN (group 32, asymmetric)", flush=True)
            for name in names:
                c = TaskContext(seed=args.seed, is_base=label == "base", extra={"reference": refs.get(name)})
                t0 = time.perf_counter()
                res = TASKS[name].run(lm, chosen[name], c)
                dt = time.perf_counter() - t0
                results.setdefault(name, {})[label] = (res, dt)
                summary = ", ".join(f"{m}={v.value:.4g}" for m, v in res.metrics.items())
                print(f"{label:8s} {name}: {summary} ({dt:.1f}s)", flush=True)
    print(f"\nload avg at end {os.getloadavg()}")
    print("| task | metric | base | degraded | n | seconds (base / degraded) |")
    print("|---|---|---|---|---|---|")
    for name in names:
        (rb, tb), (rd, td) = results[name]["base"], results[name]["degraded"]
        for m, mb in rb.metrics.items():
            md = rd.metrics[m]
            fmt = lambda x: f"{x.value:.4f} ± {x.stderr:.4f}"  # noqa: E731
            print(f"| {name} | {m} | {fmt(mb)} | {fmt(md)} | {mb.n} | {tb:.1f} / {td:.1f} |")
    for name in names:
        print(f"{name}: {sources[name]}", file=sys.stderr)


if __name__ == "__main__":
    main()
