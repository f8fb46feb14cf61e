"""Decode and prefill speed of fp32 and budgetlm's quantised variants in one run, against the memory-bandwidth
roofline, llama.cpp on the same codes, the KL cost of the kernels' bf16 activations, and peak RSS in fresh
processes.

    .venv/bin/python benchmarks/bench_decode.py --model smollm2-135m --threads 1,2 [--variants fp32,rtn-w4g64,...]
    (a variant may end in @int4, @q4, @q4a8 or @q4bf: its 4-bit layers on torch's kernel, budgetlm's exact one,
    budgetlm's with int8 activations (lossy) or with bfloat16 activations (lossy), else the host probe's choice; in
    @hf: transformers' forward instead of budgetlm's lean runtime; in @layers: the lean runtime's per-layer path
    instead of its one-call step)
        [--tokens 64 --prompt 128 --repeats 5] [--no-llama-cpp] [--no-rss] [--cpu-time] [--json out.json]

Every variant is made once from a fresh load of the model and saved to a temporary folder; then, for each thread
count, each variant is timed in turn (batch 1, greedy, KV cache; only decode steps are timed, see
budgetlm.hardware.speed), so noise from the shared machine falls on all of them alike. Per variant:
- decode ms/token (median of repeats) and x fp32; prefill tok/s at --prefill tokens and x fp32;
- the roofline: bytes a decode step reads (hardware.size read_bytes_per_token: a 2/3-bit layer on the int4 kernel
  counts the 4 bits per weight it reads) over the measured copy bandwidth; % of roofline = roofline / measured;
- KL (nats/token) of the kernel paths to exact dequantisation on held-out text (pydoc topics), every window
  forced through the kernels: the quality cost of bf16 activations and scales (torch's kernels) or of int8
  activations (@q4a8, every row of a window through it, as decode calls it one row at a time) or of bf16
  activations with exact fp16 tables (@q4bf);
- llama.cpp (llama-cpp-python, same thread count): the variant exported by budgetlm's GGUF writer to the block
  type that holds its codes exactly (Q4_0/Q4_1 for a 4-bit g32/g64 grid, Q8_0 for int8; F32 for fp32);
- peak RSS of a fresh process that loads the saved folder and decodes: total, and above the runtime's own footprint
  (the same process after it ran the tiny model through load and decode, the kernel probes and the tokenizer:
  ~460 MB of Python, torch and transformers that no model format changes); also the peak while loading.
The machine is shared and noisy: load averages are printed, and figures are medians. On a core shared with other
jobs, --cpu-time times budgetlm's and llama.cpp's steps by the calling thread's CPU time instead of wall time (at
1 thread both compute in that thread): the time queued behind other jobs is left out, their cache pressure is not.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from budgetlm.api import apply, load
from budgetlm.hardware.host import cpu_profile, decode_roofline_ms, memory_bandwidth
from budgetlm.hardware.size import model_size
from budgetlm.hardware.speed import decode_speed, prefill_speed
from budgetlm.methods.quant import kernels

ALL = {"embeddings": True}  # the tied embedding / lm_head quantised too: the whole model on the budget
VARIANTS = {
    "fp32": [],
    "rtn-int8": [{"method": "rtn", "bits": 8}],
    "rtn-int8-all": [{"method": "rtn", "bits": 8, **ALL}],
    "rtn-w4g64": [{"method": "rtn", "bits": 4, "group_size": 64}],
    "rtn-w4g64-all": [{"method": "rtn", "bits": 4, "group_size": 64, **ALL}],
    "gptq-w4g64-all": [{"method": "gptq", "bits": 4, "group_size": 64, **ALL}],
    "rtn-w4g32-all": [{"method": "rtn", "bits": 4, "group_size": 32, **ALL}],
    "rtn-w3g64-all": [{"method": "rtn", "bits": 3, "group_size": 64, **ALL}],
    "rtn-w2g64-all": [{"method": "rtn", "bits": 2, "group_size": 64, **ALL}],
}
DEFAULT = "fp32,rtn-int8-all,rtn-w4g64,rtn-w4g64-all,gptq-w4g64-all,rtn-w3g64-all,rtn-w2g64-all"


# `variant@int4` / `variant@q4` / `variant@q4a8` / `variant@q4bf`: the 4-bit layers on torch's / budgetlm's exact /
# budgetlm's int8-activation / budgetlm's bf16-activation kernel; `variant@hf`: transformers' forward instead of
# budgetlm's lean runtime (decode/lean.py); `variant@layers`: the lean runtime's per-layer path instead of its
# one-call step (decode/lean_step.py); several may follow one another (rtn-w4g64-all@int4@hf)
OPTIONS = ("int4", "q4", "q4a8", "q4bf", "hf", "layers")
SWITCHES = {"hf": "BUDGETLM_LEAN", "layers": "BUDGETLM_LEAN_STEP"}  # option: the environment switch it turns off


def split_variant(name: str) -> tuple[str, list[str]]:
    base, *options = name.split("@")
    return base, options


@contextlib.contextmanager
def kernel_choice(options: list[str]):
    with contextlib.ExitStack() as stack:
        for kind in kernels.FOUR_BIT_KINDS:
            if kind in options:
                stack.enter_context(kernels.four_bit_kernel(kind))
        switched = {env: os.environ.get(env) for opt, env in SWITCHES.items() if opt in options}
        for env in switched:
            os.environ[env] = "0"
        try:
            yield
        finally:
            for env, before in switched.items():
                if before is None:
                    os.environ.pop(env, None)
                else:
                    os.environ[env] = before


class ThreadClock:
    """`time` with perf_counter reading the calling thread's CPU time (--cpu-time)."""

    perf_counter = staticmethod(time.thread_time)

    def __getattr__(self, name):
        return getattr(time, name)


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


@torch.inference_mode()
def kl_to_exact(handle, windows: int = 8, length: int = 256) -> dict | None:
    """Mean KL(exact || kernels) per token over held-out windows, with the perplexity of both paths on the same
    tokens (a KL between two near-random models means little); None when no layer takes a kernel."""
    from budgetlm.data.corpus import heldout_text

    model = handle.model
    if not any(getattr(m, "kernel", None) for m in model.modules()):
        return None
    ids = handle.tokenizer(heldout_text(), add_special_tokens=False)["input_ids"]
    kl = nll_exact = nll_fast = 0.0
    count = 0
    for w in range(windows):
        x = torch.tensor([ids[w * length : (w + 1) * length]])
        with kernels.kernels_enabled(False):
            exact = torch.log_softmax(model(x).logits.float(), -1)[0]
        real, few = kernels.crossover, kernels.ACT8_TOKENS
        kernels.crossover = lambda kind: 1 << 30  # every call through the kernel
        kernels.ACT8_TOKENS = 1 << 30  # q4a8 too: its activations are quantised row by row, as in decode
        try:
            with kernels.kernels_enabled(True):
                fast = torch.log_softmax(model(x).logits.float(), -1)[0]
        finally:
            kernels.crossover, kernels.ACT8_TOKENS = real, few
        kl += float((exact.exp() * (exact - fast)).sum())
        target = x[0, 1:].unsqueeze(1)
        nll_exact -= float(exact[:-1].gather(1, target).sum())
        nll_fast -= float(fast[:-1].gather(1, target).sum())
        count += x.shape[1]
    n_pred = count - windows
    return {"kl": kl / count, "ppl_exact": math.exp(nll_exact / n_pred), "ppl_kernels": math.exp(nll_fast / n_pred)}


RSS_CHILD = """
import json, sys, torch
from budgetlm.hardware.memory import rss_bytes, hwm_bytes, reset_hwm
torch.set_num_threads(int(sys.argv[2]))
from budgetlm.api import load
from budgetlm.hardware.speed import decode_speed
from budgetlm.methods.quant import kernels
from transformers import AutoTokenizer
imports = rss_bytes()
# the runtime's own footprint: the same code paths on the tiny model, the probes, the folder's tokenizer
decode_speed(load("tiny-random"), 4, 8, 1, 0)
kernels.crossover("int4"), kernels.crossover("int8"), kernels.crossover("q4"), kernels.crossover("q8")
kernels.four_bit()  # the 4-bit probe's cold copies (~40 MB, freed): the runtime's, not the model's
tok = AutoTokenizer.from_pretrained(sys.argv[1])
base = rss_bytes()
reset_hwm()
h = load(sys.argv[1])
load_peak = hwm_bytes() or rss_bytes()
reset_hwm()
# a first short decode: the one-time work of a process (the kernel probes of the model's own layer shapes, each
# cycling ~40 MB of cold copies, then freed); the peak of the decode after it is the model's steady cost
decode_speed(h, 2, int(sys.argv[4]), 1, 0)
first_peak = hwm_bytes() or rss_bytes()
reset_hwm()
decode_speed(h, int(sys.argv[3]), int(sys.argv[4]), 1, 0)
out = {"imports": imports, "base": base, "load_peak": load_peak, "first_decode_peak": first_peak,
       "decode_peak": hwm_bytes() or rss_bytes()}
print(json.dumps(out))
"""


def fresh_rss(folder: Path, threads: int, tokens: int, prompt: int) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", RSS_CHILD, str(folder), str(threads), str(tokens), str(prompt)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def llamacpp_row(handle, name: str, threads: int, args) -> dict | None:
    """llama.cpp's decode ms/token and prefill tok/s for the variant's GGUF export to the block type that holds
    its codes exactly (hardware.llamacpp; None without the extra or when no block type holds them)."""
    import shutil

    from budgetlm.errors import BudgetLMError
    from budgetlm.hardware import llamacpp

    try:
        llamacpp.require_llama_cpp()
    except BudgetLMError:
        return None
    folder = llamacpp.temp_folder()
    try:
        try:
            report, _why = llamacpp.export_for_bench(handle, folder)
        except BudgetLMError as exc:
            return {"gguf_type": None, "why_not": str(exc)}
        res = llamacpp.measure_gguf(
            report.path,
            threads=threads,
            gguf_type=report.gguf_type,
            prefill=(args.prefill,),
            decode_tokens=args.tokens,
            decode_prompt=args.prompt,
            repeats=args.repeats,
            energy=False,
        )
        speed = res["speed"]
        return {
            "gguf_type": report.gguf_type,
            "gguf_mb": report.path.stat().st_size / 1e6,
            "decode_ms": speed["decode_ms_per_token"].extra["median"],
            "prefill_tok_s": speed[f"prefill_tok_s@{args.prefill}"].extra["median"],
        }
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m", help="bundled name, GGUF file or model folder")
    p.add_argument("--variants", default=DEFAULT, help=f"comma-separated, from: {', '.join(VARIANTS)}")
    p.add_argument("--tokens", type=int, default=64, help="new tokens decoded per repeat")
    p.add_argument("--prompt", type=int, default=128, help="prompt tokens prefilled (untimed) before decoding")
    p.add_argument("--prefill", type=int, default=512, help="prompt length of the timed prefill")
    p.add_argument("--prefill-repeats", type=int, default=5, help="timed prefills per cell (the median is reported)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", default="1,2", help="comma-separated torch thread counts")
    p.add_argument("--no-llama-cpp", action="store_true")
    p.add_argument("--no-rss", action="store_true")
    p.add_argument("--no-kl", action="store_true")
    p.add_argument("--cpu-time", action="store_true", help="time steps by thread CPU time (1 thread, shared core)")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if split_variant(n)[0] not in VARIANTS or set(split_variant(n)[1]) - set(OPTIONS)]
    if unknown:
        p.error(
            f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}, "
            "each optionally @int4, @q4, @q4a8, @q4bf, @hf, @layers"
        )
    threads = [int(t) for t in args.threads.split(",")]
    if args.cpu_time:
        if threads != [1]:
            p.error("--cpu-time times one thread: use --threads 1")
        from budgetlm.hardware import llamacpp, speed

        speed.time = llamacpp.time = ThreadClock()

    prof = cpu_profile()
    bw = memory_bandwidth()
    print(
        f"# {args.model}: batch 1, greedy, {args.tokens} new tokens after a {args.prompt}-token prompt, "
        f"{args.repeats} repeats; prefill {args.prefill} tokens, {args.prefill_repeats} repeats; "
        f"{'thread CPU' if args.cpu_time else 'wall'} time"
    )
    print(f"# host: {prof['cpu_model']}, {prof['usable_cpus']} CPUs; copy bandwidth {bw.value:.1f} GB/s best")
    print(f"# load average before: {loadavg()}")
    tmp = Path(tempfile.mkdtemp(prefix="bench_decode_"))
    handles, rows = {}, {}
    for name in names:
        handle = load(args.model)
        base_name, kernel = split_variant(name)
        steps = [dict(s) for s in VARIANTS[base_name]]
        if steps:
            apply(handle, steps)
        handle.save(tmp / name)
        with kernel_choice(kernel):
            kl = None if args.no_kl else kl_to_exact(handle)
            size = model_size(handle)
        handles[name] = handle
        rows[name] = {
            "variant": name,
            "steps": steps,
            "options": kernel,
            "stored_mb": size["stored_bytes"].value / 1e6,
            "bpw": size["bpw"].value,
            "linear_bpw": size["linear_bpw"].value,
            "read_mb_per_token": size["read_bytes_per_token"].value / 1e6,
            "kl_kernels_vs_exact": kl,
            "by_threads": {},
        }
        print(f"# {name} built (load average {loadavg()})", file=sys.stderr)
    for t in threads:
        torch.set_num_threads(t)
        for name in names:
            h = handles[name]
            with kernel_choice(split_variant(name)[1]):
                dec = decode_speed(h, args.tokens, args.prompt, args.repeats, 1, seed=0)
                pre = prefill_speed(h.model, args.prefill, args.prefill_repeats, 1, seed=0)
            roof = decode_roofline_ms(rows[name]["read_mb_per_token"] * 1e6, bw.value)
            cell = {
                "decode_ms": dec.extra["median"],
                "decode_ms_repeats": dec.extra["repeats"],
                "prefill_tok_s": pre.extra["median"],
                "roofline_ms": roof,
                "pct_roofline": roof / dec.extra["median"] * 100,
                "crossover": {k: kernels.crossover(k) for k in ("int4", "q4", "int8")},
                "four_bit_probe": kernels.four_bit(),
                "runtime": dec.extra.get("decoder"),
                "loadavg": loadavg(),
            }
            if not args.no_llama_cpp:
                cell["llama_cpp"] = llamacpp_row(h, name, t, args)
            if not args.no_rss:
                cell["rss"] = fresh_rss(tmp / name, t, args.tokens, args.prompt)
            rows[name]["by_threads"][t] = cell
            print(f"# {name} @ {t} thread(s) done (load average {loadavg()})", file=sys.stderr)
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)  # the variants' saved folders (the benchmark's own temporary files)
    print(table(rows, names, threads))
    print(f"# load average after: {loadavg()}")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {"model": args.model, "host": prof, "bandwidth_gb_s": bw.value, "rows": rows}, indent=2, default=str
            )
        )
    return 0


def table(rows: dict, names: list[str], threads: list[int]) -> str:
    head = (
        f"{'variant':<22} {'thr':>3} {'MB':>6} {'bpw':>5} {'lin':>5} {'ms/tok':>7} {'x fp32':>6} {'% roof':>6} "
        f"{'pre tok/s':>9} {'x fp32':>6} {'KL':>7} {'ppl':>7} {'llama.cpp':>16} {'ours/llama':>10} {'RSS MB':>7} "
        f"{'+base':>6} {'x fp32':>6}"
    )
    lines = [head, "-" * len(head)]
    for t in threads:
        base = rows[names[0]]["by_threads"][t]
        for name in names:
            r, c = rows[name], rows[name]["by_threads"][t]
            k = r["kl_kernels_vs_exact"]
            kl = "-" if k is None else f"{k['kl']:.4f}"
            ppl = "-" if k is None else f"{k['ppl_exact']:.4g}"
            lc = c.get("llama_cpp")
            ok = lc and lc.get("gguf_type")
            lcs = f"{lc['gguf_type']} {lc['decode_ms']:.2f}" if ok else "-"
            ratio = f"{c['decode_ms'] / lc['decode_ms']:.2f}" if ok else "-"
            rss = c.get("rss")
            rss_s = (
                f"{rss['decode_peak'] / 1e6:>7.0f} {(rss['decode_peak'] - rss['base']) / 1e6:>6.0f}"
                if rss
                else f"{'-':>7} {'-':>6}"
            )
            brss = base.get("rss")
            rss_x = (
                f"{(rss['decode_peak'] - rss['base']) / (brss['decode_peak'] - brss['base']):.2f}"
                if rss and brss
                else "-"
            )
            lines.append(
                f"{name:<22} {t:>3} {r['stored_mb']:>6.1f} {r['bpw']:>5.2f} {r['linear_bpw']:>5.2f} "
                f"{c['decode_ms']:>7.2f} {base['decode_ms'] / c['decode_ms']:>5.2f}x {c['pct_roofline']:>5.1f}% "
                f"{c['prefill_tok_s']:>9.0f} {c['prefill_tok_s'] / base['prefill_tok_s']:>5.2f}x {kl:>7} {ppl:>7} "
                f"{lcs:>16} {ratio:>10} {rss_s} {rss_x:>6}"
            )
    lines.append(
        "# MB: stored bytes; bpw: whole model; lin: Linear layers; x fp32: fp32 median / variant median "
        "(prefill: variant / fp32); KL: nats/token, kernels vs exact dequantisation; ppl: exact path on the KL's "
        "tokens; RSS: fresh process peak while decoding (after a first short decode, whose one-time probes it "
        "excludes), +base: above the runtime's own footprint, x fp32 on +base"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
