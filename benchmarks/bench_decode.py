"""Decode speed of fp32 and rtn-int8 in one run, each against the memory-bandwidth roofline of this host.

    .venv/bin/python benchmarks/bench_decode.py --model smollm2-135m [--tokens 64 --repeats 5 --json out.json]

Batch 1, greedy, KV cache, random prompt tokens from a seed; only decode steps are timed (see
budgetlm.hardware.speed). The roofline is the model's bytes read per decode step (hardware.size
read_bytes_per_token) over the measured copy bandwidth (hardware.host); % of roofline = roofline / measured.
The machine is shared and noisy: the load average is printed before and after, and medians are shown.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from budgetlm.api import apply, load
from budgetlm.hardware.host import cpu_profile, decode_roofline_ms, memory_bandwidth
from budgetlm.hardware.size import model_size
from budgetlm.hardware.speed import decode_speed

VARIANTS = {"fp32": [], "rtn-int8": [{"method": "rtn"}]}  # each applied on top of the previous one, in order


def bench_variant(handle, name: str, bw_gb_s: float, args) -> dict:
    size = model_size(handle)
    dec = decode_speed(handle, args.tokens, args.prompt, args.repeats, args.warmup, seed=args.seed)
    read = size["read_bytes_per_token"].value
    roof = decode_roofline_ms(read, bw_gb_s)
    return {
        "variant": name,
        "stored_mb": size["stored_bytes"].value / 1e6,
        "linear_bpw": size["linear_bpw"].value,
        "read_mb_per_token": read / 1e6,
        "ms_mean": dec.value,
        "ms_sd": dec.extra["sd"],
        "ms_median": dec.extra["median"],
        "tok_s": 1e3 / dec.value,
        "tok_s_median": 1e3 / dec.extra["median"],
        "roofline_ms": roof,
        "pct_roofline": roof / dec.value * 100,
        "repeats_ms": dec.extra["repeats"],
        "loadavg_before": dec.extra["loadavg_before"],
        "loadavg_after": dec.extra["loadavg_after"],
    }


def table(rows: list[dict]) -> str:
    head = (
        f"{'variant':<10} {'stored MB':>9} {'bpw':>5} {'ms/tok mean±sd':>16} {'median':>7} {'tok/s':>6} "
        f"{'roofline ms':>11} {'% roof':>6} {'x fp32':>6}"
    )
    base = rows[0]["ms_median"]
    lines = [head, "-" * len(head)]
    for r in rows:
        mean_sd = f"{r['ms_mean']:.2f}±{r['ms_sd']:.2f}"
        lines.append(
            f"{r['variant']:<10} {r['stored_mb']:>9.1f} {r['linear_bpw']:>5.1f} {mean_sd:>16} {r['ms_median']:>7.2f} "
            f"{r['tok_s']:>6.1f} {r['roofline_ms']:>11.2f} {r['pct_roofline']:>5.1f}% {base / r['ms_median']:>5.2f}x"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m", help="bundled name, GGUF file or model folder")
    p.add_argument("--tokens", type=int, default=64, help="new tokens decoded per repeat")
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens prefilled (untimed) before decoding")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    prof = cpu_profile()
    bw = memory_bandwidth()
    print(
        f"# {args.model}: batch 1, greedy, {args.tokens} new tokens after a {args.prompt}-token prompt, "
        f"{args.repeats} repeats + {args.warmup} warm-up"
    )
    print(
        f"# host: {prof['cpu_model']}, {prof['usable_cpus']} CPUs, torch threads {prof['torch_threads']}, "
        f"flags {' '.join(prof['flags'])}; copy bandwidth {bw.value:.1f} GB/s best, {bw.extra['median']:.1f} median"
    )
    print(f"# load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    handle = load(args.model)
    rows = []
    for name, steps in VARIANTS.items():
        if steps:
            apply(handle, steps)
        rows.append(bench_variant(handle, name, bw.value, args))
        print(f"# {name} done (load average {' '.join(f'{x:.2f}' for x in os.getloadavg())})", file=sys.stderr)
    print(table(rows))
    print(f"# load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print("# x fp32 = fp32 median ms / variant median ms; % roof = roofline ms / mean ms (100% = memory-bound floor)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "host": prof, "bandwidth_gb_s": bw.value, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
