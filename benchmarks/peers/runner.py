"""One row of the peer table, run inside its own process (benchmarks/quant_peers.py --worker).

A row loads the model (not timed), compresses it (timed, peak RSS of the process during that phase), measures
its size and evaluates it with budgetlm's text-ppl and text-cloze on the same sampled items as every other row.
Peak RSS is the whole process's resident set (Python, torch and the loaded model included), from
budgetlm.hardware.memory.PeakRSS, for every row alike.
"""

from __future__ import annotations

import gc
import json
import time
import traceback
from pathlib import Path

import torch

from budgetlm.hardware.memory import PeakRSS


def _metric(m) -> dict:
    return {"value": m.value, "stderr": m.stderr, "n": m.n}


def _task_metrics(ppl: dict, cloze: dict) -> dict:
    out = {
        "kld": _metric(ppl["kld"]),
        "perplexity": _metric(ppl["perplexity"]),
        "bits_per_byte": _metric(ppl["bits_per_byte"]),
        "top1_agreement": _metric(ppl["top1_agreement"]),
        "ppl_tokens": ppl["perplexity"].extra.get("tokens"),
        "ppl_items": ppl["perplexity"].n,
        "ppl_seconds": ppl["seconds"].value,
        "cloze_acc": _metric(cloze["acc"]),
        "cloze_acc_norm": _metric(cloze["acc_norm"]),
        "cloze_items": cloze["acc"].n,
        "cloze_seconds": cloze["seconds"].value,
        "kld_estimator": ppl["kld"].extra.get("kld_estimator"),
    }
    return out


def evaluate_handle(handle, opts: dict) -> dict:
    """budgetlm's own evaluation: text-ppl (KL to the base model's top-32 reference, perplexity) and text-cloze."""
    from budgetlm.api import evaluate

    ppl = evaluate(handle, ["text-ppl"], limit=opts["limit_ppl"], seed=opts["seed"])["text-ppl"]
    cloze = evaluate(handle, ["text-cloze"], limit=opts["limit_cloze"], seed=opts["seed"])["text-cloze"]
    return _task_metrics(ppl, cloze)


def evaluate_lm(lm, base_id: str, opts: dict) -> dict:
    """The harness's steps (budgetlm.evaluation.harness.evaluate) for an LM that is not a ModelHandle: the same
    task data, the same seeded sample of items, the same base-model reference file."""
    from budgetlm.data.tasks import tasks
    from budgetlm.data.tasks.base import TaskContext
    from budgetlm.evaluation.harness import default_reference_dir, ensure_reference, reference_path, sample_items
    from budgetlm.results import Metric

    ref_dir = default_reference_dir(base_id)
    out = {}
    for name, limit in (("text-ppl", opts["limit_ppl"]), ("text-cloze", opts["limit_cloze"])):
        task = tasks.get(name)
        ctx = TaskContext(seed=opts["seed"], reference_dir=ref_dir, is_base=False, base_id=base_id)
        t0 = time.perf_counter()
        items = sample_items(task.load(ctx).items, limit, opts["seed"])
        if getattr(task, "needs_reference", False):
            path = reference_path(ref_dir, task, items)
            ensure_reference(task, lm, items, ctx, path)
            ctx.extra["reference"] = path
        res = task.run(lm, items, ctx)
        res.metrics["seconds"] = Metric(time.perf_counter() - t0, None, len(items), "s")
        out[name] = res.metrics
    return _task_metrics(out["text-ppl"], out["text-cloze"])


def _size(handle) -> dict:
    from budgetlm.hardware.size import model_size

    s = model_size(handle)
    return {
        "stored_bytes": s["stored_bytes"].value,
        "params": s["params"].value,
        "bpw": s["bpw"].value,
        "linear_bytes": s["linear_bytes"].value,
        "linear_bpw": s["linear_bpw"].value,
        "linear_modules": s["linear_bpw"].extra.get("modules"),
        "breakdown": s["stored_bytes"].extra.get("breakdown"),
    }


def _rss(mem: PeakRSS) -> dict:
    return {"peak": mem.peak_bytes, "start": mem.start_bytes, "seconds": round(mem.seconds, 3)}


def model_dir(workdir: Path, model: str) -> Path:
    return workdir / model


def write_meta(mdir: Path, handle) -> None:
    """The model's tokenizer and context length, which the llama.cpp rows evaluate with."""
    from budgetlm.models.lm import HFLM

    handle.tokenizer.save_pretrained(mdir / "tokenizer")
    meta = {"max_length": HFLM(handle).max_length, "source": handle.source}
    (mdir / "meta.json").write_text(json.dumps(meta))


def run_torch_row(row: dict, opts: dict) -> dict:
    from budgetlm.api import load

    workdir = Path(opts["workdir"])
    with PeakRSS("load") as mem_load:
        t0 = time.perf_counter()
        handle = load(row["model"])
        load_s = time.perf_counter() - t0
    res: dict = {"load_seconds": load_s, "rss_load": _rss(mem_load), "notes": []}
    if row["kind"] == "base":
        write_meta(model_dir(workdir, row["model"]), handle)
    # import every library before the clock starts: compression time is the work, not the imports
    from budgetlm.methods.base import apply_steps, methods
    from peers.hqq_peer import apply_hqq
    from peers.quanto_peer import apply_quanto

    if row["kind"] == "budgetlm":
        for step in row["steps"]:
            methods.get(step["method"])
    elif row["kind"] == "hqq":
        import hqq.core.quantize  # noqa: F401
    elif row["kind"] == "quanto":
        import optimum.quanto  # noqa: F401
    with PeakRSS("compress") as mem:
        t0 = time.perf_counter()
        if row["kind"] == "budgetlm":
            reports = apply_steps(handle, row["steps"])
            for r in reports:
                res["notes"] += r.notes
        elif row["kind"] == "hqq":
            res["peer"] = apply_hqq(handle, row["bits"], row["group_size"])
        elif row["kind"] == "quanto":
            res["peer"] = apply_quanto(handle, row["bits"], row["group"])
        compress_s = time.perf_counter() - t0
    gc.collect()
    res["compress_seconds"] = compress_s if row["kind"] != "base" else None
    res["rss_compress"] = _rss(mem) if row["kind"] != "base" else None
    res["size"] = _size(handle)
    with PeakRSS("eval") as mem_eval:
        res["metrics"] = evaluate_handle(handle, opts)
    res["rss_eval"] = _rss(mem_eval)
    return res


def run_llamacpp_row(row: dict, opts: dict) -> dict:
    import gguf  # noqa: F401 - imported before any timed phase
    import llama_cpp  # noqa: F401
    from transformers import AutoTokenizer

    from budgetlm.models.sources import BUNDLED
    from peers import llamacpp_peer as lp

    workdir = Path(opts["workdir"])
    mdir = model_dir(workdir, row["model"])
    meta_file, tok_dir = mdir / "meta.json", mdir / "tokenizer"
    if not meta_file.is_file():  # the base row writes it; its result may come from an earlier machine
        from budgetlm.api import load

        write_meta(mdir, load(row["model"]))
    f16 = mdir / "f16.gguf"
    f16_info = mdir / "f16.json"
    threads = opts["threads"]
    res: dict = {"notes": []}
    resolver = BUNDLED.get(row["model"], (None, None))[1]
    bundled = resolver() if resolver else None
    if row["type"] == "F16":
        from budgetlm.api import load

        with PeakRSS("load") as mem_load:
            t0 = time.perf_counter()
            handle = load(row["model"])
            res["load_seconds"] = time.perf_counter() - t0
        res["rss_load"] = _rss(mem_load)
        f16.unlink(missing_ok=True)
        with PeakRSS("compress") as mem:
            t0 = time.perf_counter()
            how = lp.export_f16(handle, f16, bundled, threads)
            res["compress_seconds"] = time.perf_counter() - t0
        res["rss_compress"] = _rss(mem)
        f16_info.write_text(json.dumps({"made_by": how}))
        del handle
        gc.collect()
        target = f16
    else:
        if not f16.is_file():
            raise RuntimeError(f"{f16} missing: the llama.cpp F16 row of {row['model']} writes it; run it first")
        target = mdir / f"{row['type']}.gguf"
        with PeakRSS("compress") as mem:
            t0 = time.perf_counter()
            lp.quantize(f16, target, row["type"], threads)
            res["compress_seconds"] = time.perf_counter() - t0
        res["rss_compress"] = _rss(mem)
    made_by = json.loads(f16_info.read_text())["made_by"] if f16_info.is_file() else "unknown"
    res["notes"].append(f"F16 GGUF source: {made_by}")
    sizes = lp.gguf_sizes(target)
    res["size"] = sizes
    res["notes"].append(f"Linear tensor types: {sizes['linear_types']}")
    meta = json.loads(meta_file.read_text())
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    with PeakRSS("eval") as mem_eval:
        lm = lp.LlamaCppLM(target, tokenizer, meta["max_length"], threads)
        res["tokenizer_check"] = lm.tokenizer_check("The quick brown fox jumps over the lazy dog; print(x[0])")
        res["metrics"] = evaluate_lm(lm, row["model"], opts)
        lm.close()
    res["rss_eval"] = _rss(mem_eval)
    if target != f16:
        target.unlink(missing_ok=True)
    return res


def run_row(row: dict, opts: dict) -> dict:
    if opts.get("threads"):
        torch.set_num_threads(int(opts["threads"]))
    t0 = time.perf_counter()
    try:
        if row["kind"] == "llamacpp":
            res = run_llamacpp_row(row, opts)
        else:
            res = run_torch_row(row, opts)
        res["status"] = "ok"
    except Exception as exc:  # noqa: BLE001 - a failed row is recorded, the table goes on
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        res = {"status": "error", "error": f"{type(exc).__name__}: {first}", "traceback": traceback.format_exc()}
    res["row_seconds"] = time.perf_counter() - t0
    res["threads"] = torch.get_num_threads()
    return res
