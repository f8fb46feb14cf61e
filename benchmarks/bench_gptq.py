"""GPTQ on smollm2-135m: compression time and peak RSS against the issue's targets (at most 60 s, peak RSS at
most 1.5x the fp32 model), and text-ppl perplexity before/after against rtn at the same bits and group size.

    .venv/bin/python benchmarks/bench_gptq.py [--model smollm2-135m --bits 4 --group 64 --limit 40 --json out.json]
    .venv/bin/python benchmarks/bench_gptq.py --no-eval     # load + gptq only: time, CPU time and peak RSS

Order of work: load (time and peak RSS of load() alone), gptq via apply_steps with the default calibration
(64 x 256 tokens) right after the load (so its peak RSS is not inflated by an earlier evaluation), text-ppl of
the gptq model (the base model's reference is computed in a separate process or read from the cache), then a
fresh load for the fp32 baseline and rtn. Peak RSS is the whole process's (budgetlm.hardware.memory.PeakRSS:
sampled /proc/self/statm + VmHWM); "step delta" is the peak minus the RSS when the step started. The machine is
shared: the load average and the step's CPU time (all threads) are printed with the wall time.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import resource
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

from budgetlm.api import evaluate, load  # noqa: E402
from budgetlm.hardware.memory import PeakRSS, rss_bytes  # noqa: E402
from budgetlm.methods import calibration  # noqa: E402
from budgetlm.methods.base import StepContext, apply_steps  # noqa: E402

MB = 1e6


def fp32_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters and buffers held as fp32 (tied weights counted once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * 4
    return total


def trim() -> int:
    """Return freed heap to the OS (glibc malloc_trim) and give the RSS after it."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    return rss_bytes()


def ppl(handle, limit: int, seed: int) -> dict:
    res = evaluate(handle, ["text-ppl"], limit=limit, seed=seed)["text-ppl"]
    return {k: res[k].value for k in ("perplexity", "kld", "top1_agreement")}


def cpu_seconds() -> float:
    """User + system CPU time of this process so far (all threads)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def loadavg() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--limit", type=int, default=40, help="text-ppl chunks to score (100 exist)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--act-order", action="store_true")
    ap.add_argument("--one-pass", action="store_true", help="true_sequential: true (one pass per layer; default: two)")
    ap.add_argument(
        "--calibration-dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16"],
        help="gptq's calibration_dtype (auto: bfloat16 where a bf16 matmul measures >= 2x faster, else float32)",
    )
    ap.add_argument(
        "--heap-buffers",
        action="store_true",
        help="A/B: calibrate without hardware.memory.mapped_large_buffers (freed activations stay in the heap)",
    )
    ap.add_argument("--no-eval", action="store_true", help="only load and gptq (time and memory)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    out: dict = {"model": args.model, "bits": args.bits, "group": args.group, "threads": torch.get_num_threads()}
    out["true_sequential"] = args.one_pass
    out["calibration_dtype"] = args.calibration_dtype
    out["mapped_buffers"] = not args.heap_buffers
    if args.heap_buffers:
        calibration.mapped_large_buffers = contextlib.nullcontext
    out["loadavg_start"] = loadavg()

    with PeakRSS("load") as mem:
        t0 = time.perf_counter()
        h = load(args.model)
        load_s = time.perf_counter() - t0
    out["load"] = {"seconds": load_s, "peak_rss_mb": mem.peak_bytes / MB, "rss_after_mb": rss_bytes() / MB}
    out["load"]["rss_after_trim_mb"] = trim() / MB
    out["fp32_model_mb"] = fp32_bytes(h.model) / MB
    out["target_rss_mb"] = 1.5 * out["fp32_model_mb"]
    print(
        f"load: {load_s:.1f} s, peak RSS {mem.peak_bytes / MB:.0f} MB, after {out['load']['rss_after_mb']:.0f} MB "
        f"({out['load']['rss_after_trim_mb']:.0f} MB after malloc_trim); fp32 model {out['fp32_model_mb']:.0f} MB"
    )

    step = {"method": "gptq", "bits": args.bits, "group_size": args.group, "act_order": args.act_order}
    step["true_sequential"] = args.one_pass
    step["calibration_dtype"] = args.calibration_dtype
    ctx = StepContext()  # default calibration: 64 x 256 tokens
    cpu0 = cpu_seconds()
    with PeakRSS("gptq") as mem:
        rep = apply_steps(h, [step], ctx)[0]
    cpu = cpu_seconds() - cpu0
    errs = [s["rel_output_error"] for s in rep.stats.values()]
    bpw = [s["bits_per_weight"] for s in rep.stats.values()]
    out["gptq"] = {
        "seconds": rep.seconds,
        "cpu_seconds": cpu,
        "peak_rss_mb": rep.peak_rss / MB,
        "start_rss_mb": mem.start_bytes / MB,
        "step_delta_mb": mem.delta_bytes / MB,
        "modules": len(rep.stats),
        "mean_rel_output_error": sum(errs) / len(errs),
        "max_rel_output_error": max(errs),
        "bits_per_weight": sum(bpw) / len(bpw),
        "notes": rep.notes,
        "loadavg_after": loadavg(),
    }
    g = out["gptq"]
    print(
        f"gptq: {g['seconds']:.1f} s, peak RSS {g['peak_rss_mb']:.0f} MB (start {g['start_rss_mb']:.0f} MB, "
        f"+{g['step_delta_mb']:.0f} MB), load average {g['loadavg_after']}"
    )
    for n in rep.notes:
        print("  note:", n)
    if args.no_eval:
        if args.json:
            with open(args.json, "w") as f:
                json.dump(out, f, indent=2)
        return
    out["gptq"]["text_ppl"] = ppl(h, args.limit, args.seed)
    del h, rep
    trim()

    h = load(args.model)
    out["fp32"] = {"text_ppl": ppl(h, args.limit, args.seed)}
    rtn = {"method": "rtn", "bits": args.bits, "group_size": args.group, "symmetric": False}
    rep = apply_steps(h, [rtn])[0]
    out["rtn"] = {"seconds": rep.seconds, "peak_rss_mb": rep.peak_rss / MB, "text_ppl": ppl(h, args.limit, args.seed)}
    out["loadavg_end"] = loadavg()

    print()
    print(f"{args.model}, {args.bits}-bit, group {args.group}, asymmetric; text-ppl on {args.limit} held-out chunks")
    print(f"{'variant':<8} {'seconds':>8} {'peak RSS MB':>12} {'perplexity':>11} {'KL nats':>8} {'top-1 agree':>11}")
    for name in ("fp32", "rtn", "gptq"):
        r = out[name]
        sec = f"{r['seconds']:.1f}" if "seconds" in r else "-"
        rss = f"{r['peak_rss_mb']:.0f}" if "peak_rss_mb" in r else "-"
        t = r["text_ppl"]
        print(f"{name:<8} {sec:>8} {rss:>12} {t['perplexity']:>11.3f} {t['kld']:>8.4f} {t['top1_agreement']:>11.3f}")
    print(
        f"targets: gptq <= 60 s (got {g['seconds']:.1f}); peak RSS <= 1.5 x fp32 = {out['target_rss_mb']:.0f} MB "
        f"(got {g['peak_rss_mb']:.0f}; load() alone peaks at {out['load']['peak_rss_mb']:.0f})"
    )
    print(f"load average start/end: {out['loadavg_start']} / {out['loadavg_end']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
