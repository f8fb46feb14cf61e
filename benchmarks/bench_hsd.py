"""Hierarchical speculative decoding (budgetlm.decode) against the verifier's plain greedy decoding, transformers'
assisted generation with the same draft (its default schedule and its "heuristic" one) and its prompt-lookup
decoding, on GSM8K prompts, side by side in one run.

    .venv/bin/python benchmarks/bench_hsd.py [--prompts 100] [--threads 2] [--max-new 256] [--shots 8]
        [--variants hf,plain,hsd:layers:10,...] [--json out.json]

Variants (comma-separated; drafts named below):
- `hf`: transformers' generate(), greedy: the baseline every ratio is to; `plain`: budgetlm's own greedy loop;
- `hsd:D1>D2[:tau=T][:max=N][:win=W][:kv=K][:gated][:ownkv]`: budgetlm's HSD with the drafts D1 (cheapest) > D2 >
  the verifier; tau one value for every draft (inf: no gate, a fixed draft length of max), max the draft cap (default
  8), win a draft window (the drafts attend to 4 sinks and the last W positions: MagicDec's sparse-KV draft), kv the
  drafts' key/value caches (auto: bf16 in exact mode, fp32, bf16: Chain.draft_kv); a
  quantised copy (w8, w4, w2) reads the verifier's keys and values of the prompt and accepted tokens unless `ownkv`
  (then it prefills the prompt and keeps its own);
- `hf-assist:D[:heuristic]`: transformers' assisted generation with draft D; `hf-lookup`: its prompt lookup.
Drafts: `layers:K` (the verifier's first K layers, its norm and head: no copy), `w8`, `w4`, `w2` (RTN int8, 4-bit
g64, 2-bit g64 copies of the whole model with the embedding table, on budgetlm's kernels).

The verifier is SmolLM2-135M-Instruct in fp32 (or --model). Prompts: GSM8K test questions behind --shots worked
examples (chain of thought: the examples' worked answers; shots drawn from the test split itself as the bundled
data has no train split, never the question itself), seeded; no chat template (lm-eval's default). Generation stops
at "Question:" or EOS, or after --max-new tokens. For every prompt each variant runs in turn (the order rotating),
so the machine's noise falls on all alike. Tokens counted: up to and including the one that completes a stop string
(what any decoder must generate). Reported per variant: tok/s of the whole call and its ratio to `hf`; tok/s after
the verifier's prefill (the call's time less the verifier's prefill of the prompt: for plain and hsd the verifier's
first forward in that very call, for the hf variants transformers' forward of the prompt timed apart once per prompt,
as transformers' generate() does not report it; the part of the time decoding can change; a draft's own prefill stays
in), and its ratios to `hf` and to `plain`; prompts
whose output is identical to `hf`'s, GSM8K exact match (strict / flexible), and per level the acceptance, the mean
accepted length per verification, the forwards, tokens fed, and the share of time.

Why a chain wins or loses: the cost of one forward of each model of the run (verifier and drafts) on the KV cache of
a prompt, for 1, 2, 4, 8 and 9 new tokens (median of repeats over the first --cost-prompts prompts), and per HSD
variant the speed-up those costs predict from its own counters, (tokens per verification) x c_V(1) / (drafted tokens
per verification x c_D(1) + c_V(proposal + 1)): a draft pays only when it is much cheaper than the verifier and the
verifier's cost grows slowly with the tokens it checks at once.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import sys
import time

import torch

from budgetlm.api import apply, load
from budgetlm.data.tasks.base import TaskContext
from budgetlm.data.tasks.reasoning import GSM8K
from budgetlm.decode.drafts import first_layers
from budgetlm.decode.generate import Generator
from budgetlm.decode.lean import runtime_for
from budgetlm.evaluation.harness import sample_items
from budgetlm.progress import Progress

QUANT = {
    "w8": [{"method": "rtn", "bits": 8, "embeddings": True}],
    "w4": [{"method": "rtn", "bits": 4, "group_size": 64, "embeddings": True}],
    "w2": [{"method": "rtn", "bits": 2, "group_size": 64, "embeddings": True}],
}
DEFAULT = "hf,plain,hsd:w4,hsd:w4:tau=inf,hf-assist:w4,hf-assist:w4:heuristic,hf-lookup,hsd:layers:24,hsd:w2>w4"
STOP = ["Question:"]


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


class Drafts:
    """Draft modules by name, made once."""

    def __init__(self, verifier, model_spec: str):
        self.verifier, self.spec, self.made = verifier, model_spec, {}

    def __call__(self, name: str):
        if name not in self.made:
            if name.startswith("layers:"):
                self.made[name] = first_layers(self.verifier.model, int(name.split(":")[1]))
            elif name in QUANT:
                h = load(self.spec)
                apply(h, copy.deepcopy(QUANT[name]))
                self.made[name] = h.model.eval()
            else:
                raise SystemExit(f"unknown draft {name}; use layers:K, w8, w4 or w2")
        return self.made[name]


class StopOnText:
    """transformers stopping criterion: the text generated after the prompt holds a stop string."""

    def __init__(self, tok, prompt_len: int):
        self.tok, self.prompt_len = tok, prompt_len

    def __call__(self, input_ids, scores, **kwargs):
        text = self.tok.decode(input_ids[0, self.prompt_len :], skip_special_tokens=True)
        return torch.tensor([any(s in text for s in STOP)])


def cut_at_stop(tok, ids: list[int], eos: int | None) -> list[int]:
    """The generated tokens up to and including the one that completes a stop string (or EOS)."""
    for i in range(len(ids)):
        if ids[i] == eos:
            return ids[: i + 1]
        if any(s in tok.decode(ids[: i + 1], skip_special_tokens=True) for s in STOP):
            return ids[: i + 1]
    return ids


def text_of(tok, ids: list[int]) -> str:
    text = tok.decode(ids, skip_special_tokens=True)
    for s in STOP:
        text = text.split(s)[0]
    return text


COST_TOKENS = (1, 2, 4, 8, 9)
BF16_KV = " (bf16 kv)"  # a draft's forward costs with bfloat16 keys and values


@torch.inference_mode()
def forward_costs(model, prompts: list[list[int]], repeats: int = 3, kv_dtype=None) -> dict[int, float] | None:
    """Median seconds of one forward of k new tokens on the KV cache of each prompt, for k in COST_TOKENS, through
    the decode runtime budgetlm's decoding uses (decode/lean.py), every row's logits kept (as a verification); the
    keys and values in `kv_dtype` (None: the model's; a draft's bfloat16: Chain.draft_kv; None returned where the
    runtime has no such caches: transformers')."""
    rt = runtime_for(model)
    if kv_dtype is not None:
        if not hasattr(rt, "kv_dtype"):
            return None
        rt.kv_dtype = kv_dtype
    times: dict[int, list[float]] = {k: [] for k in COST_TOKENS}
    for ids in prompts:
        cache, n = rt.new_cache(), len(ids)
        rt(torch.tensor([ids]), 0, cache, 1)
        new = torch.tensor([ids[-max(COST_TOKENS) :]])
        for k in COST_TOKENS:
            for _ in range(repeats):
                t0 = time.perf_counter()
                rt(new[:, :k], n, cache, k)
                times[k].append(time.perf_counter() - t0)
                cache.crop(-k)
    return {k: statistics.median(v) for k, v in times.items()}


def predicted_speedup(levels: list[dict], costs: dict[str, dict[int, float]]) -> float | None:
    """The speed-up over plain decoding that the measured forward costs predict from a two-level run's counters."""
    if not levels or len(levels) != 2 or not levels[1].get("rounds"):
        return None
    draft, ver = levels
    rounds = ver["rounds"]
    proposal = max(0, round(ver["proposed"] / rounds))
    bf16 = draft.get("kv_dtype") == "bfloat16"  # the draft's cache in the run: its cost with such a cache
    c_v, c_d = costs.get("verifier"), costs.get(draft["model"] + (BF16_KV if bf16 else ""))
    if c_v is None or c_d is None:
        return None
    k = min(COST_TOKENS, key=lambda t: abs(t - (proposal + 1)))
    per_round = draft["drafted"] / rounds * c_d[1] + c_v[k]
    return (ver["emitted"] / rounds) * c_v[1] / per_round


def parse_variant(variant: str) -> tuple[list[str], list[str]]:
    """(draft names cheapest first, options) of an `hsd:` or `hf-assist:` variant; ([], []) for the others."""
    kind, _, rest = variant.partition(":")
    if kind not in ("hsd", "hf-assist"):
        return [], []
    names, opts = [], []
    for f in rest.split(":"):  # "layers:10" spans two fields
        (opts if ("=" in f or f in ("gated", "heuristic", "ownkv")) else names).append(f)
    return ":".join(names).split(">"), opts


def make_runner(variant: str, verifier, drafts: Drafts, max_new: int):
    """A function prompt ids -> (generated ids, seconds, levels) for one variant."""
    model, tok = verifier.model, verifier.tokenizer
    hf_args = {"do_sample": False, "pad_token_id": tok.eos_token_id, "eos_token_id": tok.eos_token_id}  # fmt: skip

    def hf_run(ids, n=max_new, **extra):
        from transformers import StoppingCriteriaList

        x = torch.tensor([ids])
        # the stop string by a criterion of our own: transformers' stop_strings need the tokenizer in the assistant's
        # own generate() too, which assisted generation does not pass on
        stop = StoppingCriteriaList([StopOnText(tok, len(ids))])
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                input_ids=x,
                attention_mask=torch.ones_like(x),
                stopping_criteria=stop,
                max_new_tokens=n,
                **hf_args,
                **extra,
            )
        return out[0, len(ids) :].tolist(), time.perf_counter() - t0, []

    if variant == "hf":
        return hf_run
    if variant == "hf-lookup":
        return lambda ids, n=max_new: hf_run(ids, n, prompt_lookup_num_tokens=10)
    if variant.startswith("hf-assist:"):
        names, opts = parse_variant(variant)
        heuristic = "heuristic" in opts
        assistant = copy.copy(drafts(names[0]))
        assistant.generation_config = copy.deepcopy(model.generation_config)
        if heuristic:
            assistant.generation_config.num_assistant_tokens_schedule = "heuristic"
        return lambda ids, n=max_new: hf_run(ids, n, assistant_model=assistant)
    if variant == "plain" or variant.startswith("hsd:"):
        chain, taus, max_draft, mode, window, kv = [], [], 8, "exact", 0, "auto"
        if variant.startswith("hsd:"):
            names, opts = parse_variant(variant)
            chain = [(d, drafts(d)) for d in names]
            tau: float | None = 2.0
            for o in opts:
                if o == "gated":
                    mode = "gated"
                elif o.startswith("tau="):
                    tau = None if o[4:] == "inf" else float(o[4:])
                elif o.startswith("max="):
                    max_draft = int(o[4:])
                elif o.startswith("win="):
                    window = int(o[4:])
                elif o.startswith("kv="):
                    kv = o[3:]
            taus = [tau] * len(chain)
        own = variant.startswith("hsd:") and "ownkv" in parse_variant(variant)[1]
        gen = Generator([*chain, ("verifier", model)], tok, taus, mode, max_draft, share_kv=not own,
                        draft_window=window, draft_kv=kv)  # fmt: skip

        def run(ids, n=max_new):
            out = gen(ids, n, STOP)
            return out.tokens, out.seconds, out.levels

        return run
    raise SystemExit(f"unknown variant {variant}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--prompts", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-new", type=int, default=256)
    ap.add_argument("--shots", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variants", default=DEFAULT)
    ap.add_argument("--cost-prompts", type=int, default=2, help="prompts the forward costs are timed on (0: none)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    verifier = load(args.model)
    verifier.model.eval()
    tok = verifier.tokenizer
    task = GSM8K()
    task.num_fewshot = args.shots
    data = task.load(TaskContext(seed=args.seed))
    items = sample_items(data.items, args.prompts, args.seed)
    prompts = [tok(task.doc_to_text(it.doc), add_special_tokens=False)["input_ids"] for it in items]
    print(f"{len(prompts)} prompts ({data.source}); mean {sum(map(len, prompts)) / len(prompts):.0f} tokens; "
          f"{args.threads} threads; load {loadavg()}", file=sys.stderr)  # fmt: skip
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    drafts = Drafts(verifier, args.model)
    runners = {v: make_runner(v, verifier, drafts, args.max_new) for v in variants}
    for v in variants:  # warm-up: kernel probes, first-call packing, allocator growth stay out of the timings
        runners[v](prompts[0][-64:], 8)
    costs: dict[str, dict[int, float]] = {}
    if args.cost_prompts > 0:  # every model of the run, the verifier first
        models = {"verifier": verifier.model}
        for v in variants:
            for name in parse_variant(v)[0]:
                models.setdefault(name, drafts(name))
        for name, m in models.items():
            for kv in (None, torch.bfloat16) if name != "verifier" else (None,):
                key = name + (BF16_KV if kv is not None else "")
                got = forward_costs(m, prompts[: args.cost_prompts], kv_dtype=kv)
                if got is None:
                    continue
                costs[key] = got
                print(f"forward costs of {key}: " + ", ".join(f"{k}: {t * 1e3:.1f} ms" for k, t in costs[key].items()),
                      file=sys.stderr)  # fmt: skip
    rec = {v: {"tokens": 0, "seconds": 0.0, "prefill": 0.0, "same": 0, "strict": 0.0, "flex": 0.0, "levels": None}
           for v in variants}  # fmt: skip
    hf_text: dict[int, str] = {}
    # the verifier's own prefill of every prompt, timed apart on each runtime (transformers' forward: subtracted from
    # the hf variants; budgetlm's decode runtime: printed beside it): what no decoder can save
    prefill = {"hf": 0.0, "lean": 0.0}
    lean_rt = runtime_for(verifier.model)
    with Progress("hsd", len(prompts), enabled=True) as bar:
        for i, (ids, it) in enumerate(zip(prompts, items)):
            order = variants[i % len(variants) :] + variants[: i % len(variants)]
            for kind in ("hf", "lean") if i % 2 else ("lean", "hf"):
                with torch.inference_mode():
                    t0 = time.perf_counter()
                    if kind == "hf":
                        verifier.model(input_ids=torch.tensor([ids]), logits_to_keep=1)
                    else:
                        lean_rt(torch.tensor([ids]), 0, lean_rt.new_cache(), 1)
                    prefill[kind] += time.perf_counter() - t0
            for v in order:
                gen, secs, levels = runners[v](ids)
                gen = cut_at_stop(tok, gen, tok.eos_token_id)
                text = text_of(tok, gen)
                r = rec[v]
                r["tokens"] += len(gen)
                r["seconds"] += secs
                score = task.score(it.doc, text)
                r["strict"] += score["exact_match_strict"]
                r["flex"] += score["exact_match_flexible"]
                r.setdefault("texts", {})[i] = text
                if levels:
                    r["prefill"] += levels[-1]["first_forward_seconds"]  # the verifier's prefill in this very call
                    if r["levels"] is None:
                        r["levels"] = [{"model": lv["model"], "kv_dtype": lv.get("kv_dtype")} for lv in levels]
                    for acc, lv in zip(r["levels"], levels):
                        counters = ("rounds", "proposed", "accepted", "emitted", "drafted", "forwards", "tokens_fed")
                        for k in (*counters, "seconds"):
                            acc[k] = acc.get(k, 0) + lv[k]
            if "hf" in rec:
                hf_text[i] = rec["hf"]["texts"][i]
            bar.advance(f"prompt {i + 1}: load {loadavg()}")
    base = rec["hf"]["tokens"] / rec["hf"]["seconds"] if "hf" in rec else None

    def after_prefill(v: str) -> float | None:  # None: the call took no longer than the prefill timed apart (noise)
        r = rec[v]
        p = prefill["hf"] if v.startswith("hf") else r["prefill"]
        return r["tokens"] / (r["seconds"] - p) if r["seconds"] > p else None

    base_decode = after_prefill("hf") if "hf" in rec else None
    plain_decode = after_prefill("plain") if "plain" in rec else None
    n = len(prompts)
    rows = []
    for v in variants:
        r = rec[v]
        tps = r["tokens"] / r["seconds"]
        same = sum(r["texts"][i] == hf_text[i] for i in hf_text) if hf_text else None
        same_plain = sum(r["texts"][i] == t for i, t in rec["plain"]["texts"].items()) if "plain" in rec else None
        decode_tps = after_prefill(v)
        row = {
            "variant": v,
            "tok_s": tps,
            "x_hf": tps / base if base else None,
            "decode_tok_s": decode_tps,
            "x_hf_decode": decode_tps / base_decode if base_decode and decode_tps else None,
            "x_plain_decode": decode_tps / plain_decode if plain_decode and decode_tps else None,
            "identical_to_hf": same,
            "identical_to_plain": same_plain,
            "prompts": n,
            "tokens": r["tokens"],
            "seconds": r["seconds"],
            "exact_match_strict": r["strict"] / n,
            "exact_match_flexible": r["flex"] / n,
            "levels": r["levels"],
            "predicted_x_plain": predicted_speedup(r["levels"], costs),
        }
        rows.append(row)
    print(
        f"\n{n} GSM8K prompts, {args.shots}-shot, {args.threads} threads, load at end {loadavg()}; the verifier's "
        f"prefill alone: {prefill['hf']:.1f} s (transformers) and {prefill['lean']:.1f} s (budgetlm's runtime) "
        "over all prompts"
    )
    print(
        "| variant | tok/s | x hf greedy | tok/s after prefill | x hf | x plain | identical to hf / plain | "
        "EM strict / flex | levels: acceptance, mean accepted, forwards, time share |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        lv = ""
        if row["levels"]:
            total = sum(x["seconds"] for x in row["levels"])
            parts = []
            for x in row["levels"]:
                acc = x["accepted"] / x["proposed"] if x.get("proposed") else math.nan
                mean = x["accepted"] / x["rounds"] if x.get("rounds") else math.nan
                share = x["seconds"] / total if total else math.nan
                parts.append(f"{x['model']}: {acc:.2f}, {mean:.2f}, {x['forwards']}, {share:.0%}")
            lv = "; ".join(parts)
        same = " / ".join("-" if row[k] is None else f"{row[k]}/{n}" for k in ("identical_to_hf", "identical_to_plain"))
        x = "-" if row["x_hf"] is None else f"{row['x_hf']:.2f}x"
        xd = "-" if row["x_hf_decode"] is None else f"{row['x_hf_decode']:.2f}x"
        xp = "-" if row["x_plain_decode"] is None else f"{row['x_plain_decode']:.2f}x"
        dec = "-" if row["decode_tok_s"] is None else f"{row['decode_tok_s']:.1f}"
        print(f"| {row['variant']} | {row['tok_s']:.1f} | {x} | {dec} | {xd} | {xp} | {same} | "
              f"{row['exact_match_strict']:.3f} / "
              f"{row['exact_match_flexible']:.3f} | {lv} |")  # fmt: skip
    if costs:
        print("\nOne forward on a prompt's KV cache, ms (x one token), by new tokens:")
        print("| model | " + " | ".join(str(k) for k in COST_TOKENS) + " |")
        print("|---|" + "---|" * len(COST_TOKENS))
        for name, c in costs.items():
            cells = [f"{c[k] * 1e3:.1f} ({c[k] / c[1]:.2f}x)" for k in COST_TOKENS]
            print(f"| {name} | " + " | ".join(cells) + " |")
        for row in rows:
            if row["predicted_x_plain"] is not None:
                print(f"{row['variant']}: the costs predict {row['predicted_x_plain']:.2f}x plain decoding")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows, "forward_costs_s": costs}, f, indent=2)


if __name__ == "__main__":
    main()
