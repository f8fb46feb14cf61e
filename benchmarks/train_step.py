"""Training cost per adapter, and recovery of a ShortGPT-pruned model by LoRA and by distillation.

Part 1, step time: every adapter at r = 8 (LoRA-XS at r = 64, 8x, as in peft_ranks) and full fine-tuning on the
model, through the one training loop (train.loop.fit) with batch 4 x 256 tokens of corpus text (every token a
target), fp32, no gradient checkpointing: the median seconds per optimizer update over `--steps` updates after
one warm-up update, the process's peak RSS during training, and the trainable parameters.

Part 2, recovery: ShortGPT removes 25% of the decoder layers; then a fixed budget of `--recovery-steps` updates
(batch 4 x 256 corpus tokens, lr 2e-4) of
  - LoRA recovery: LoRA r = 8 trained on the next-token loss;
  - KD recovery: the same LoRA trained by logit distillation from the unpruned model (method `kd`, w_kd = 1,
    T = 1), only when budgetlm.methods.distill exists (imported lazily; the row is skipped with a message if not).
Each row reports text-ppl (perplexity, and KL divergence to the loaded model) and text-cloze accuracy before
(`shortgpt 25%`) and after recovery, with the dense model as the reference row.

Every row runs in a fresh process (its peak RSS is its own, a crash costs one row); results go to
benchmarks/results/train_step-<model>.json after each row, and a rerun skips the rows already there.

    nice -n 10 .venv/bin/python benchmarks/train_step.py [--model smollm2-135m] [--steps 5]
        [--recovery-steps 100] [--part step|recovery|both] [--out FILE] [--fresh]
    .venv/bin/python benchmarks/train_step.py --model tiny-random --steps 2      # a smoke run (both parts)
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from peers.rows import add_worker_args, load_results, mib, pm, run_in_process, run_worker, save_row  # noqa: E402

RANK = 8
ADAPTERS = {  # name -> adapter step at r = 8 (attach only: the loop below trains it)
    "lora": {"method": "lora", "r": RANK},
    "dora": {"method": "dora", "r": RANK},
    "loha": {"method": "loha", "r": RANK},
    "vblora": {"method": "vblora", "r": RANK},
    "lora_xs (r=64)": {"method": "lora_xs", "r": 8 * RANK},
    "mars opt0": {"method": "mars", "r": RANK, "opt": 0},
    "mars opt1": {"method": "mars", "r": RANK, "opt": 1},
    "qlora": {"method": "qlora", "r": RANK},
    "qmars opt0": {"method": "qmars", "r": RANK, "opt": 0},
    "lobi_lora (4 bpw)": {"method": "lobi_lora", "r": RANK, "target_bits": 4.0},
}


def has_distill() -> bool:
    return importlib.util.find_spec("budgetlm.methods.distill") is not None


def plan(model: str, part: str) -> list[dict]:
    rows = []
    if part in ("step", "both"):
        rows.append({"part": "step", "name": "full fine-tuning", "steps": [], "full": True})
        rows += [{"part": "step", "name": n, "steps": [s]} for n, s in ADAPTERS.items()]
    if part in ("recovery", "both"):
        prune = {"method": "shortgpt", "fraction": 0.25}
        lora = {"method": "lora", "r": RANK}
        rows.append({"part": "recovery", "name": "dense (as loaded)", "steps": []})
        rows.append({"part": "recovery", "name": "shortgpt 25%", "steps": [prune]})
        rows.append({"part": "recovery", "name": "+ LoRA recovery", "steps": [prune, lora], "recover": "lora"})
        rows.append({"part": "recovery", "name": "+ KD recovery", "steps": [prune, lora], "recover": "kd"})
    for r in rows:
        r["model"] = model
    return rows


def row_key(row: dict) -> str:
    return f"{row['part']}: {row['name']}"


# ------------------------------------------------------------------------------------------------ worker


def train_config(opts: dict, steps: int) -> dict:
    return {
        "steps": steps,
        "lr": 2e-4,
        "batch_size": opts["batch"],
        "max_len": opts["seq"],
        "max_grad_norm": 1.0,
        "seed": opts["seed"],
        "data": {"task": "corpus", "limit": opts["batch"] * max(steps, 1)},
    }


def run_row(row: dict, opts: dict) -> dict:
    import torch

    from budgetlm.api import evaluate, load
    from budgetlm.hardware.memory import PeakRSS
    from budgetlm.hardware.size import param_count
    from budgetlm.methods.base import StepContext, apply_steps
    from budgetlm.train import fit

    if opts["threads"]:
        torch.set_num_threads(opts["threads"])
    out: dict = {"status": "ok", "threads": torch.get_num_threads(), "load_average": os.getloadavg()}
    with PeakRSS("prepare") as rss:
        handle = load(row["model"], seed=opts["seed"])
        t0 = time.perf_counter()
        reports = apply_steps(handle, row["steps"], StepContext(seed=opts["seed"]))
        out["prepare_seconds"] = time.perf_counter() - t0
    out["prepare_peak_rss"] = rss.peak_bytes
    out["notes"] = [n for r in reports for n in r.notes]
    if row.get("full"):
        for p in handle.model.parameters():
            p.requires_grad_(p.is_floating_point())

    if row["part"] == "step":
        res = fit(handle, train_config(opts, opts["steps"] + 1), progress=False)  # update 1 is the warm-up
        out["step_seconds"] = statistics.median(res.step_times[1:])
        out["step_seconds_all"] = res.step_times
        out["train_peak_rss"] = res.peak_rss_bytes
        out["trainable_params"] = res.trainable_params
        out["params"] = param_count(handle.model)  # logical weights: a quantised base counts in x out
        return out

    if row.get("recover") == "lora":
        res = fit(handle, train_config(opts, opts["recovery_steps"]), progress=False)
        out.update(recovery_seconds=sum(res.step_times), train_peak_rss=res.peak_rss_bytes)
        out["trainable_params"], out["losses"] = res.trainable_params, [res.losses[0], res.losses[-1]]
    elif row.get("recover") == "kd":
        if not has_distill():
            return {"status": "skipped", "error": "budgetlm.methods.distill is not there yet: no KD recovery"}
        cfg = {"method": "kd", "w_kd": 1.0, "temperature": 1.0, "train": train_config(opts, opts["recovery_steps"])}
        t0 = time.perf_counter()
        with PeakRSS("kd") as rss:
            rep = apply_steps(handle, [cfg], StepContext(seed=opts["seed"]))[0]
        out.update(recovery_seconds=time.perf_counter() - t0, train_peak_rss=rss.peak_bytes)
        train = rep.stats["train"]
        out["trainable_params"], out["losses"] = train["trainable_params"], [train["losses"][0], train["losses"][-1]]
    results = evaluate(handle, ["text-ppl", "text-cloze"], limit=opts["eval_limit"], seed=opts["seed"])
    out["eval"] = {t: {m: v.to_dict() for m, v in ms.items()} for t, ms in results.items()}
    return out


# ------------------------------------------------------------------------------------------------ tables


def section(title: str, head: list[str], rows: list[dict], results: dict, line) -> list[str]:
    """A markdown table: `line(row, result)` for the rows that ran, the status and error for the others."""
    out = [title, "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        res = results.get(row_key(r), {})
        if res.get("status") == "ok":
            out.append("| " + " | ".join([r["name"], *line(res)]) + " |")
        else:
            out.append(
                f"| {r['name']} | {res.get('status', 'not run')}: {res.get('error', '')[:80]} |" + "|" * (len(head) - 2)
            )
    return [*out, ""]


def table(rows: list[dict], results: dict, opts: dict) -> str:
    steps = [r for r in rows if r["part"] == "step"]
    rec = [r for r in rows if r["part"] == "recovery"]
    full = results.get(row_key(steps[0]), {}).get("step_seconds") if steps else None

    def step_line(res: dict) -> list[str]:
        t, n = res["step_seconds"], res["trainable_params"]
        ratio = f"{t / full:.2f}x" if full else "—"
        return [f"{n:,}", f"{100 * n / res['params']:.3f}", f"{t:.3f}", ratio, mib(res["train_peak_rss"])]

    def recovery_line(res: dict) -> list[str]:
        ppl, cloze = res["eval"].get("text-ppl", {}), res["eval"].get("text-cloze", {})
        n, secs = res.get("trainable_params"), res.get("recovery_seconds")
        return [
            pm(ppl.get("perplexity"), 2),
            pm(ppl.get("kld"), 4),
            pm(cloze.get("acc"), 3),
            "—" if n is None else f"{n:,}",
            "—" if secs is None else f"{secs:.0f}",
            mib(res.get("train_peak_rss", res.get("prepare_peak_rss"))),
        ]

    lines = []
    if steps:
        title = (
            f"### Step time, r = {RANK}, batch {opts['batch']} x {opts['seq']} tokens, fp32, median of {opts['steps']} "
            "timed updates"
        )
        head = ["method", "trainable params", "% of model", "s / step", "vs full", "peak RSS MiB (train)"]
        lines += section(title, head, steps, results, step_line)
    if rec:
        title = (
            f"### Recovery after ShortGPT 25%: {opts['recovery_steps']} updates of {opts['batch']} x {opts['seq']} "
            "corpus tokens"
        )
        head = ["row", "text-ppl perplexity", "KLD to dense", "text-cloze acc", "trainable", "recovery s",
                "peak RSS MiB"]  # fmt: skip
        lines += section(title, head, rec, results, recovery_line)
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--steps", type=int, help="timed updates per method (default 5); also the recovery budget "
                    "when --recovery-steps is not given")  # fmt: skip
    ap.add_argument("--recovery-steps", type=int, help="recovery updates (default 100, or --steps)")
    ap.add_argument("--part", choices=["step", "recovery", "both"], default="both")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--eval-limit", type=int, default=40, help="text-ppl chunks / text-cloze items")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=3 * 3600)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--fresh", action="store_true")
    add_worker_args(ap)
    args = ap.parse_args()
    if args.worker:
        run_worker(args, run_row)
        return

    steps = args.steps if args.steps is not None else 5
    recovery = args.recovery_steps if args.recovery_steps is not None else (args.steps or 100)
    opts = {"steps": steps, "recovery_steps": recovery, "batch": args.batch, "seq": args.seq,
            "eval_limit": args.eval_limit, "seed": args.seed, "threads": args.threads}  # fmt: skip
    out = args.out or HERE / "results" / f"train_step-{args.model}.json"
    rows = plan(args.model, args.part)
    data = load_results(out, opts, args.fresh)
    results = data["rows"]
    if not has_distill():
        print("note: budgetlm.methods.distill is not available: the KD recovery row is skipped", flush=True)
    for row in rows:
        key = row_key(row)
        if results.get(key, {}).get("status") in ("ok", "skipped"):
            continue
        print(f"running {key} ...", flush=True)
        log = out.parent / "logs" / f"train_step-{args.model}-{key.replace(' ', '_').replace(':', '')}.log"
        res = run_in_process(Path(__file__).resolve(), row, opts, log, args.timeout)
        results = save_row(out, opts, key, res)
        status = res.get("status")
        print(f"  {status} in {res['wall_seconds']:.0f} s" + (f": {res.get('error')}" if status != "ok" else ""))
    print()
    print(table(rows, results, opts))
    print(f"\nresults: {out}")


if __name__ == "__main__":
    main()
