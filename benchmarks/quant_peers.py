"""budgetlm's quantisers side by side with the peers that run on this CPU: HQQ, optimum-quanto and llama.cpp.

One row per (model, method, setting): KL divergence to the loaded (unquantised) model and perplexity on held-out
text (budgetlm's text-ppl: KL against the base model's top-32 reference, a lower bound of the full KL),
text-cloze accuracy, stored bytes, bits per Linear weight, compression time and peak RSS. Every row runs in a
fresh process (`--worker`), so its peak RSS is its own and a crash costs one row; results go to a JSON file
after every row and a rerun skips the rows already there (delete the file, or pass --fresh, to start over).

Rows: the model as loaded (fp32, the reference); budgetlm's rtn/gptq/awq/lobi at about 2, 3 and 4 bits per
weight, group 64 and per channel, asymmetric (plus rtn 4-bit group 32, see the facts below); HQQ 2/3/4-bit and
optimum-quanto int2/int4 (benchmarks/peers/); llama.cpp F16 and Q8_0/Q5_0/Q4_1/Q4_0 (and the k-quants Q3_K_M,
Q2_K, to show their fallback) quantised from an F16 GGUF export with llama_model_quantize and evaluated by
llama.cpp on the same token windows. `--quick` evaluates fewer items and only group 64.

    nice -n 10 .venv/bin/python benchmarks/quant_peers.py [--models smollm2-135m,gemma3-270m] [--quick]
        [--methods rtn,gptq,awq,lobi,hqq,quanto,llamacpp] [--out FILE] [--threads N] [--fresh] [--table]

Sizes: "stored MB" is the whole model as stored (budgetlm and the torch peers: safetensors payload of the state
dict, tied weights once, so the fp32 embedding budgetlm's methods leave alone is in it; llama.cpp: the GGUF's
tensor payload, where llama.cpp also quantises the embedding, to Q8_0 here). "linear bpw" is bits per weight of
the decoder's Linear weights (q/k/v/o, gate/up/down) including their scales, zeros and packing: the comparable
figure. Times exclude loading the model; the llama.cpp rows' time is llama_model_quantize from the F16 file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from peers.rows import load_results, mib, pm, run_in_process, save_row  # noqa: E402

HERE = Path(__file__).resolve().parent
MODELS = ("smollm2-135m", "gemma3-270m")
BUDGETLM = ("rtn", "gptq", "awq", "lobi")
PEERS = ("hqq", "quanto", "llamacpp")
LIMITS = {"full": (None, None), "quick": (8, 20)}  # (text-ppl chunks, text-cloze items); None: all (100, 132)
LLAMA_TYPES = ("F16", "Q8_0", "Q5_0", "Q4_1", "Q4_0", "Q3_K_M", "Q2_K")
LOBI_TARGETS = (2.5, 3.0, 4.0)
NOMINAL = {"F16": 16, "Q8_0": 8, "Q5_0": 5, "Q5_1": 5, "Q4_1": 4, "Q4_0": 4, "Q3_K_M": 3, "Q2_K": 2}


# --- the plan --------------------------------------------------------------------------------------------------


def _g(group: int | None) -> str:
    return f"g{group}" if group else "per-channel"


def available_methods(names: tuple[str, ...]) -> tuple[list[str], dict[str, str]]:
    """budgetlm methods that are registered and import; the others with the reason."""
    from budgetlm.methods.base import methods

    ok, missing = [], {}
    for name in names:
        try:
            methods.get(name)
            ok.append(name)
        except Exception as exc:  # noqa: BLE001 - a method being written may not import yet
            missing[name] = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"
    return ok, missing


def budgetlm_step(name: str, **values) -> dict:
    """A step dict with only the settings the method's config has (asymmetric where it has `symmetric`)."""
    from budgetlm.methods.base import methods

    fields = methods.get(name).model_fields
    step = {"method": name}
    for k, v in values.items():
        if k in fields:
            step[k] = v
    if "symmetric" in fields:
        step["symmetric"] = False
    if "calibration_dtype" in fields:  # the same numerics on every machine (auto is bf16 on CPUs where bf16 is fast)
        step["calibration_dtype"] = "float32"
    if "true_sequential" in fields:  # gptq's rows in the table ran in its true-sequential one-pass order
        step["true_sequential"] = True
    return step


def plan(models: list[str], groups: list[int | None], selected: set[str], budgetlm_ok: list[str]) -> list[dict]:
    rows: list[dict] = []

    def add(model, kind, method, setting, nominal, **kw):
        rows.append({"model": model, "kind": kind, "method": method, "setting": setting, "nominal_bits": nominal, **kw})

    for model in models:
        add(model, "base", "fp32 (as loaded)", "reference", 32)
        for name in [m for m in BUDGETLM if m in budgetlm_ok and m in selected]:
            if name == "lobi":
                # lobi's quantiser: gptq where it is available, whether or not gptq rows are selected
                quantizer = "gptq" if available_methods(("gptq",))[0] else "rtn"
                # g64 rows choose bit widths at group 64; with per-channel selected, "g64+pc" rows choose each
                # Linear's grid too (candidate_groups [64, null]) rather than per channel only
                grids = ([("g64", 64, None)] if 64 in groups else []) + (
                    [("g64+pc", 64, [64, None])] if None in groups else []
                )
                # sensitivity: the Linear's raw output error, and its diagonal-Fisher KL estimate ("fisher" rows)
                for sensitivity in ("fisher", "output"):  # lobi's default first
                    for target in LOBI_TARGETS:
                        for label, g, both in grids:
                            step = budgetlm_step(
                                name, target_bits=target, group_size=g, quantizer=quantizer, sensitivity=sensitivity
                            )
                            if both:
                                step["candidate_groups"] = both
                            add(
                                model,
                                "budgetlm",
                                name,
                                f"target {target:g} bpw {label} {quantizer} {sensitivity}",
                                int(target),
                                steps=[step],
                            )
                continue
            bits_list = (3, 4) if name == "awq" else (2, 3, 4)
            for bits in bits_list:
                for g in groups:
                    add(
                        model,
                        "budgetlm",
                        name,
                        f"b{bits} {_g(g)} asym",
                        bits,
                        steps=[budgetlm_step(name, bits=bits, group_size=g)],
                    )
            if name == "rtn":  # the bundled weights' own grid (smollm2: Q4_1 = 4-bit, group 32, asymmetric)
                add(model, "budgetlm", name, "b4 g32 asym", 4, steps=[budgetlm_step(name, bits=4, group_size=32)])
        if "hqq" in selected:
            for bits in (2, 3, 4):
                for g in groups:
                    add(model, "hqq", "HQQ", f"b{bits} {_g(g)}", bits, bits=bits, group_size=g)
        if "quanto" in selected:
            for bits in (2, 4):
                for g in groups:
                    add(
                        model,
                        "quanto",
                        "quanto",
                        f"int{bits} {_g(g)}",
                        bits,
                        bits=bits,
                        group="pc" if g is None else str(g),
                    )
        if "llamacpp" in selected:
            for t in LLAMA_TYPES:
                add(model, "llamacpp", "llama.cpp", t, NOMINAL[t], type=t)
    return rows


def row_key(row: dict) -> str:
    return f"{row['model']} | {row['method']} | {row['setting']}"


# --- the table -------------------------------------------------------------------------------------------------


def table(rows: list[dict], results: dict) -> str:
    head = (
        "| model | method | setting | KL to fp32 (nats/token) | perplexity | text-cloze acc | stored MB "
        "| linear bpw | compress s | peak RSS compress (MiB) | peak RSS eval (MiB) |"
    )
    lines = [head, "|" + "---|" * 11]
    for row in rows:
        r = results.get(row_key(row))
        if r is None:
            continue
        pre = f"| {row['model']} | {row['method']} | {row['setting']} |"
        if r.get("status") != "ok":
            lines.append(pre + f" error: {r.get('error', '?')[:160]} |" + " |" * 7)
            continue
        met, size = r["metrics"], r["size"]
        comp = r.get("compress_seconds")
        rss_c = (r.get("rss_compress") or {}).get("peak")
        cells = [
            pm(met["kld"], 4),
            pm(met["perplexity"], 3),
            pm(met["cloze_acc"], 3),
            f"{size['stored_bytes'] / 1e6:.1f}",
            f"{size['linear_bpw']:.3f}",
            "—" if comp is None else f"{comp:.1f}",
            mib(rss_c),
            mib(r["rss_eval"]["peak"]),
        ]
        lines.append(pre + " " + " | ".join(cells) + " |")
    return "\n".join(lines)


def facts(models: list[str]) -> list[str]:
    """The two facts, read from the bundled GGUF files' tensor tables."""
    import gguf

    from budgetlm.models.sources import BUNDLED
    from peers.llamacpp_peer import LINEAR_TENSOR

    out = []
    for model in models:
        resolver = BUNDLED.get(model, (None, None))[1]
        if resolver is None:
            continue
        path = resolver()
        reader = gguf.GGUFReader(str(path))
        lin = [t for t in reader.tensors if LINEAR_TENSOR.match(t.name)]
        types = Counter(t.tensor_type.name for t in lin)
        emb = next((t.tensor_type.name for t in reader.tensors if t.name == "token_embd.weight"), "?")
        widths = sorted({int(t.shape[0]) for t in lin})
        not256 = sum(int(t.shape[0]) % 256 != 0 for t in lin)
        hidden = int(next(t.shape[0] for t in reader.tensors if t.name == "token_embd.weight"))
        kinds = ", ".join(f"{k} x{v}" for k, v in types.most_common())
        line = f"- {model}: the bundled file {path.name} stores its {len(lin)} decoder Linear weights as {kinds} "
        line += f"(token embedding {emb}); the fp32 model every row starts from is that file dequantised. "
        if set(types) == {"Q4_1"}:
            line += (
                "Q4_1 is 4-bit, group 32, asymmetric with a free fp16 offset (x = d*q + m), so a 4-bit group-32 "
                "min/max grid (llama.cpp's Q4_1) lands back on the grid the weights already sit on: nearly lossless "
                "for that reason alone, not because 4 bits suffice. budgetlm's asymmetric grids instead store an "
                "integer zero point and always include 0 in the range (quantizer.find_grid), a lattice that does not "
                "contain Q4_1's, so its rtn b4 g32 row does not get that free ride."
            )
        else:
            line += (
                "Its 640-wide tensors were written as Q5_0/Q8_0 (llama.cpp's fallbacks for Q4_K/Q6_K), so here it "
                "is 5-bit group-32 (Q5_0) that re-quantises nearly losslessly; the Q4_1 statement is about smollm2."
            )
        out.append(line)
        out.append(
            f"- {model}: hidden size {hidden} is not a multiple of 256 (Linear input widths {widths}): "
            f"{not256} of its {len(lin)} Linear weights have rows that are not multiples of 256, so llama.cpp's "
            f"k-quants (256-weight super-blocks) cannot hold them and llama-quantize falls back to legacy types "
            f"on those tensors (see the Q3_K_M and Q2_K rows' real bits per weight). budgetlm's 2- and 3-bit "
            f"methods are exactly where users have no llama.cpp option for these models."
        )
    return out


def checks(rows: list[dict], results: dict) -> list[str]:
    """The issue's targets, computed from the rows present."""
    out = []
    by_model: dict[str, list[tuple[dict, dict]]] = {}
    for row in rows:
        r = results.get(row_key(row))
        if r and r.get("status") == "ok":
            by_model.setdefault(row["model"], []).append((row, r))
    for model, items in by_model.items():
        for band in (2, 3):
            ours = [(row, r) for row, r in items if row["kind"] == "budgetlm" and row["nominal_bits"] == band]
            peers = [(row, r) for row, r in items if row["kind"] in PEERS and row["nominal_bits"] == band]
            if not ours:
                out.append(f"- {model}, {band}-bit: no budgetlm row yet")
                continue
            best = min(ours, key=lambda x: x[1]["metrics"]["kld"]["value"])
            bpw = best[1]["size"]["linear_bpw"]
            head = (
                f"- {model}, {band}-bit: best budgetlm {best[0]['method']} {best[0]['setting']} "
                f"KL {best[1]['metrics']['kld']['value']:.4f} at {bpw:.3f} bpw"
            )
            # two readings of "the best peer at equal or higher bits per weight": among the peers' settings of
            # this band that really store under band + 1 bits per weight (a k-quant that falls back to 4-bit
            # types is no 2- or 3-bit option), and literally among every setting of the band at >= our bpw
            readings = [
                ("band", [p for p in peers if bpw - 1e-9 <= p[1]["size"]["linear_bpw"] < band + 1]),
                ("literal", [p for p in peers if p[1]["size"]["linear_bpw"] >= bpw - 1e-9]),
            ]
            for label, rivals in readings:
                if not rivals:
                    out.append(head + f"; {label}: no {band}-bit peer row at >= {bpw:.3f} bpw")
                    continue
                peer = min(rivals, key=lambda x: x[1]["metrics"]["kld"]["value"])
                ratio = best[1]["metrics"]["kld"]["value"] / max(peer[1]["metrics"]["kld"]["value"], 1e-12)
                verdict = "meets" if ratio <= 0.7 else "misses"
                what = (
                    f"best {band}-bit peer storing {bpw:.2f}-{band + 1} bpw"
                    if label == "band"
                    else f"best {band}-bit-named peer at >= {bpw:.2f} bpw"
                )
                out.append(
                    head + f" vs {what}: {peer[0]['method']} {peer[0]['setting']} "
                    f"KL {peer[1]['metrics']['kld']['value']:.4f} at {peer[1]['size']['linear_bpw']:.3f} bpw: "
                    f"ratio {ratio:.2f} ({verdict} the <= 0.7x target)"
                )
        base = next((r for row, r in items if row["kind"] == "base"), None)
        g4 = next((r for row, r in items if row["method"] == "gptq" and row["setting"].startswith("b4 g64")), None)
        if g4 and base:
            fp32 = base["size"]["stored_bytes"]
            rss = g4["rss_compress"]["peak"]
            before = g4["rss_load"]["start"]  # the process before loading the model: Python, torch, budgetlm
            out.append(
                f"- {model}, GPTQ-4 g64: {g4['compress_seconds']:.1f} s at {g4.get('threads', '?')} thread(s) in this "
                "run (benchmarks/bench_gptq.py times it alone); peak RSS while compressing "
                f"{rss / 2**20:.0f} MiB = {rss / fp32:.2f}x the fp32 model's {fp32 / 2**20:.0f} MiB, "
                f"{(rss - before) / fp32:.2f}x without the {before / 2**20:.0f} MiB the process held before loading "
                f"the model (target <= 1.5x)"
            )
    return out


def notes(rows: list[dict], results: dict) -> list[str]:
    out = []
    for row in rows:
        r = results.get(row_key(row))
        if not r or r.get("status") != "ok":
            continue
        if row["kind"] == "llamacpp" and row["type"] == "F16":
            made = next((n for n in r.get("notes", []) if n.startswith("F16 GGUF source")), "")
            out.append(f"- {row['model']}: {made}; llama.cpp F16 KL to the fp32 reference = evaluation-path floor")
        if row["kind"] == "llamacpp" and row["type"] in ("Q3_K_M", "Q2_K"):
            out.append(f"- {row['model']} {row['type']}: Linear tensor types {r['size']['linear_types']}")
        if row["kind"] == "quanto" and r.get("peer"):
            out.append(f"- {row['model']} quanto {row['setting']}: group sizes used {r['peer'].get('group_sizes')}")
    return out


# --- main ------------------------------------------------------------------------------------------------------


def worker(row_json: str, opts_json: str, result: str) -> None:
    from peers.runner import run_row

    res = run_row(json.loads(row_json), json.loads(opts_json))
    Path(result).write_text(json.dumps(res, default=str))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--quick", action="store_true", help="fewer items, group 64 only")
    ap.add_argument("--groups", help="g64,pc: group 64 and/or per-channel rows (default both; --quick g64)")
    ap.add_argument("--methods", default=",".join(BUDGETLM + PEERS), help="subset of " + ",".join(BUDGETLM + PEERS))
    ap.add_argument("--limit-ppl", type=int, help="text-ppl chunks (default: all 100; --quick 8)")
    ap.add_argument("--limit-cloze", type=int, help="text-cloze items (default: all 132; --quick 20)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch and llama.cpp threads (0: torch's default)")
    ap.add_argument("--timeout", type=float, default=4 * 3600, help="seconds per row")
    ap.add_argument("--out", type=Path, help="results JSON (default benchmarks/peers/results/quant_peers[-quick].json)")
    ap.add_argument("--workdir", type=Path, help="GGUF files, tokenizers and logs (default in budgetlm's cache)")
    ap.add_argument("--fresh", action="store_true", help="discard earlier results in --out")
    ap.add_argument("--retry-errors", action="store_true", help="rerun rows that ended in an error")
    ap.add_argument("--dry-run", action="store_true", help="list the rows and exit")
    ap.add_argument("--table", action="store_true", help="print the table of the rows already in --out; run nothing")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--opts", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.opts, args.result)
        return

    import torch

    from budgetlm.models.sources import cache_dir

    t_start = time.perf_counter()
    models = [m for m in args.models.split(",") if m]
    selected = {m for m in args.methods.split(",") if m}
    unknown = selected - set(BUDGETLM + PEERS)
    if unknown:
        sys.exit(f"unknown --methods {sorted(unknown)}; choose from {', '.join(BUDGETLM + PEERS)}")
    mode = "quick" if args.quick else "full"
    limit_ppl = args.limit_ppl if args.limit_ppl is not None else LIMITS[mode][0]
    limit_cloze = args.limit_cloze if args.limit_cloze is not None else LIMITS[mode][1]
    ok, missing = available_methods(tuple(m for m in BUDGETLM if m in selected))
    for name, why in missing.items():
        print(f"skipping budgetlm method {name}: not available ({why})", flush=True)
    groups_arg = args.groups or ("g64" if args.quick else "g64,pc")
    groups = [None if g == "pc" else int(g.lstrip("g")) for g in groups_arg.split(",") if g]
    rows = plan(models, groups, selected, ok)
    if args.dry_run:
        for row in rows:
            print(row_key(row), json.dumps({k: v for k, v in row.items() if k in ("steps", "type", "bits")}))
        return
    threads = args.threads or torch.get_num_threads()
    out = args.out or HERE / "peers" / "results" / f"quant_peers{'-quick' if args.quick else ''}.json"
    workdir = args.workdir or cache_dir() / "bench" / "quant_peers"
    config = {"limit_ppl": limit_ppl, "limit_cloze": limit_cloze, "seed": args.seed}
    data = load_results(out, config, args.fresh)
    if args.fresh and out.is_file():
        out.unlink()
    opts = {**config, "threads": threads, "workdir": str(workdir)}
    print(f"{len(rows)} rows, results in {out}, work files in {workdir}, {threads} threads", flush=True)
    for i, row in enumerate(rows, 1):
        key = row_key(row)
        if out.is_file():  # another invocation may have finished rows meanwhile
            data["rows"] = json.loads(out.read_text())["rows"]
        done = data["rows"].get(key)
        if args.table or (done and (done.get("status") == "ok" or not args.retry_errors)):
            continue
        print(f"[{i}/{len(rows)}] {key} ...", end=" ", flush=True)
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in key)
        res = run_in_process(Path(__file__).resolve(), row, opts, Path(workdir) / "logs" / f"{safe}.log", args.timeout)
        res["row"] = row
        data["rows"] = save_row(out, config, key, res)
        if res.get("status") == "ok":
            m = res["metrics"]
            print(
                f"KL {m['kld']['value']:.4f}, ppl {m['perplexity']['value']:.3f}, cloze {m['cloze_acc']['value']:.3f}, "
                f"{res['size']['linear_bpw']:.3f} bpw ({res['wall_seconds']:.0f}s)",
                flush=True,
            )
        else:
            print(f"error: {res.get('error')}", flush=True)
    results = data["rows"]
    print()
    print(table(rows, results))
    print(
        f"\nKL: budgetlm text-ppl's KL(fp32 || row) per token, {results_kld_estimator(results)}; "
        f"{limit_ppl or 'all'} text-ppl chunks, {limit_cloze or 'all'} text-cloze items (seed {args.seed}); "
        "± is the standard error over items."
    )
    print("\nFacts:")
    for line in facts(models):
        print(line)
    extra = notes(rows, results)
    if extra:
        print("\nNotes:")
        for line in extra:
            print(line)
    print("\nTargets:")
    for line in checks(rows, results):
        print(line)
    print(f"\nwall time of this invocation: {time.perf_counter() - t_start:.0f} s")


def results_kld_estimator(results: dict) -> str:
    for r in results.values():
        est = (r.get("metrics") or {}).get("kld_estimator")
        if est:
            return est
    return "top-32 + tail mass"


if __name__ == "__main__":
    main()
