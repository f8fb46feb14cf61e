"""The evaluation harness: load each task's items, sample --limit of them with the seed (stratified by
label), make sure the base model's reference outputs exist for tasks that compare against the base,
run the task through the LM protocol and write the per-item logs and the aggregate metrics.

Output folder: eval.json ({task: {metric: Metric}}) and items/<task>.jsonl (one record per item).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

from budgetlm.data.tasks import tasks as task_registry
from budgetlm.data.tasks.base import Item, Task, TaskContext
from budgetlm.errors import BudgetLMError, ConfigError, DataError
from budgetlm.models.handle import ModelHandle
from budgetlm.models.lm import HFLM, GenTally
from budgetlm.progress import PROGRESS_PREFIX, Progress, duration
from budgetlm.results import Metric
from budgetlm.utils import atomic_write_json, atomic_write_jsonl


def sample_items(items: list[Item], limit: int | None, seed: int) -> list[Item]:
    """`limit` items drawn with the seed, stratified by label (proportional, largest remainder)."""
    if limit is None or limit >= len(items):
        return list(items)
    rng = random.Random(seed)
    strata: dict[str, list[Item]] = defaultdict(list)
    for it in items:
        strata[repr(it.label)].append(it)
    keys = sorted(strata)
    quotas = {k: limit * len(strata[k]) / len(items) for k in keys}
    take = {k: int(q) for k, q in quotas.items()}
    for k in sorted(keys, key=lambda k: (-(quotas[k] - take[k]), k))[: limit - sum(take.values())]:
        take[k] += 1
    chosen = [it for k in keys for it in rng.sample(strata[k], take[k])]
    rng.shuffle(chosen)
    return chosen


def resolve_tasks(names: list[str]) -> list[Task]:
    """Look up every task before running any, so a typo fails at once."""
    if not names:
        raise BudgetLMError("no tasks given; pass --tasks with names from `budgetlm tasks`")
    return [task_registry.get(n) for n in names]


def sampling(limit: int | None, available: int, seed: int) -> str:
    """How the items were chosen, for the result: a seeded sample, or all (also when --limit asked for more)."""
    if limit is not None and limit < available:
        return f"seed {seed}, stratified by label"
    if limit is not None and limit > available:
        return f"all {available:,} items (fewer than the limit of {limit:,})"
    return "all"


def task_limit(limit: int | dict[str, int | None] | None, task: str) -> int | None:
    """The item limit of one task: one number for every task, or a recipe's {task: number} (absent: all)."""
    return limit.get(task) if isinstance(limit, dict) else limit


def default_reference_dir(base_id: str) -> Path:
    from budgetlm.models.sources import cache_dir

    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", base_id).strip("_")[-80:]
    digest = hashlib.sha256(base_id.encode()).hexdigest()[:8]
    return cache_dir() / "references" / f"{safe}-{digest}"


def reference_path(ref_dir: Path, task: Task, items: list[Item]) -> Path:
    digest = hashlib.sha256("\n".join(it.id for it in items).encode()).hexdigest()[:12]
    return ref_dir / f"{task.name}-{digest}"


def ensure_reference(
    task: Task, lm: HFLM, items: list[Item], ctx: TaskContext, path: Path, status: Callable[[str], None] | None = None
) -> None:
    """The base model's outputs for these items: written by this model if it is the base, otherwise by a
    separate process that loads the base, so two models never sit in memory together. `status` hears what is
    being done, including the separate process's progress lines."""
    status = status or (lambda _text: None)
    if path.exists() or any(path.parent.glob(path.name + ".*")):
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    if ctx.is_base:
        status(f"{task.name}: writing the base model's reference (this model is the base)")
        task.write_reference(lm, items, path)
        return
    status(f"{task.name}: computing the base model's reference with {ctx.base_id} (separate process)")
    ids_file = path.parent / f".{path.name}.ids.json"
    ids_file.write_text(json.dumps([it.id for it in items]))
    cmd = [sys.executable, "-m", "budgetlm.evaluation.reference", ctx.base_id, task.name, str(path), str(ids_file)]
    cmd += ["--seed", str(ctx.seed)] + (["--data-dir", str(ctx.data_dir)] if ctx.data_dir else [])
    tail: list[str] = []
    try:
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1) as proc:
            for line in proc.stdout:
                line = line.rstrip()
                if line.startswith(PROGRESS_PREFIX):
                    status(f"{task.name}: base-model reference: {line[len(PROGRESS_PREFIX) :]}")
                elif line.strip():
                    tail = [*tail[-4:], line]
    finally:
        ids_file.unlink(missing_ok=True)
    if proc.returncode != 0:
        last = tail[-1] if tail else "no output"
        raise BudgetLMError(f"could not compute the base model's reference for {task.name} ({ctx.base_id}): {last}")


def evaluate(
    handle: ModelHandle,
    tasks: list[str],
    *,
    limit: int | dict[str, int | None] | None = None,
    seed: int = 0,
    data_dir: str | Path | None = None,
    reference_dir: str | Path | None = None,
    out_dir: str | Path | None = None,
    batch_size: int | None = None,
    progress: bool = False,
    allow_contamination: bool = False,
    decoding: dict | None = None,
    lm: HFLM | None = None,
) -> dict[str, dict[str, Metric]]:
    """`decoding`: generation tasks decode by speculative decoding, {"drafts": [spec, ...], "tau": str | None,
    "mode": "exact" | "gated", "max_draft": int} (decode.generate.build); every generation task then reports its
    tokens per second and each level's acceptance, and names the decoding in its metrics. `lm`: the LM that scores
    (another runtime's, evaluation/llamacpp_lm.py); the base model's references then always come from torch."""
    resolved = resolve_tasks(tasks)
    is_base = not handle.provenance and handle.base_id == handle.source and lm is None
    ref_dir = Path(reference_dir) if reference_dir else default_reference_dir(handle.base_id)
    ctx = TaskContext(
        seed=seed,
        data_dir=Path(data_dir) if data_dir else None,
        reference_dir=ref_dir,
        is_base=is_base,
        base_id=handle.base_id,
        batch_size=batch_size,
    )
    # training recorded in the provenance on a task's items or on data made from them: refused, or allowed and marked
    contamination = _contamination(handle, [t.name for t in resolved], allow_contamination)
    decoder, decoding_note = _decoder(handle, decoding, resolved)
    if lm is not None and decoder is not None:
        raise ConfigError("speculative decoding (--draft, a recipe's decoding) runs in torch only")
    lm = lm or HFLM(handle, batch_size=batch_size, decoder=decoder)
    decoding_note = decoding_note or getattr(lm, "decoding_note", "")
    results: dict[str, dict[str, Metric]] = {}
    records: dict[str, list[dict]] = {}
    # tasks scored through the decode runtime last: building it may switch quantised layers to budgetlm's own kernels
    # for the process (decode/lean_step.py own_kernels_pay), which must not change the other tasks' numbers
    decodes = [getattr(t, "decode_runtime", False) or (decoder is not None and t.kind == "generate") for t in resolved]
    order = sorted(range(len(resolved)), key=decodes.__getitem__)
    with Progress("eval", len(resolved), enabled=progress) as bar:
        for asked, task in ((tasks[i], resolved[i]) for i in order):
            bar.status(f"{task.name}: loading the items", line=False)  # a bad data file: its error, no line
            t0 = time.perf_counter()
            data = task.load(ctx)
            if not data.items:
                raise DataError(f"task '{task.name}' has no items ({data.source}); check the data file")
            # a recipe's limit names the task as written (sciq-rag:gate=grad), the result its canonical form (:k=3)
            n = task_limit(limit, task.name if isinstance(limit, dict) and task.name in limit else asked)
            items = sample_items(data.items, n, seed)
            task_ctx = TaskContext(**{**ctx.__dict__, "extra": {}})
            if getattr(task, "needs_reference", False):
                path = reference_path(ref_dir, task, items)
                ensure_reference(task, lm, items, task_ctx, path, bar.status)
                task_ctx.extra["reference"] = path
            bar.status(f"{task.name}: scoring {len(items)} items")
            lm.tally = GenTally()
            res = task.run(lm, items, task_ctx)
            seconds = time.perf_counter() - t0
            _generation_metrics(res.metrics, lm.tally, len(items), decoding_note)
            for m in res.metrics.values():
                m.extra = {
                    **m.extra,
                    "data": data.source,
                    "items_used": len(items),
                    "items_available": len(data.items),
                    "sampling": sampling(n, len(data.items), seed),
                }
            res.metrics["seconds"] = Metric(seconds, None, len(items), "s")
            results[task.name] = res.metrics
            for m in res.metrics.values() if task.name in contamination else ():
                m.extra["contamination"] = contamination[task.name]
            records[task.name] = res.records
            bar.advance(f"{task.name} done in {duration(seconds)}")
    results = {t.name: results[t.name] for t in resolved}  # the order asked for
    records = {t.name: records[t.name] for t in resolved}
    if out_dir is not None:
        write_outputs(Path(out_dir), results, records)
    return results


# what a task's run cost rather than a score of its items: no per-item records, nothing for `compare` to test
RUN_METRICS = ("seconds", "gen_tok_s", "hsd_acceptance")


def _decoder(handle: ModelHandle, decoding: dict | None, tasks: list) -> tuple[object | None, str]:
    """The speculative decoder of `decoding` and how results name it (plain: transformers' batched generate)."""
    if not decoding or not decoding.get("drafts"):
        return None, ""
    if not any(t.kind == "generate" for t in tasks):
        raise ConfigError("--draft speeds up generation only, and none of these tasks generates (e.g. gsm8k does)")
    from budgetlm.decode.generate import build
    from budgetlm.decode.speculative import SINKS
    from budgetlm.models.sources import load

    decoder = build(handle, decoding["drafts"], decoding.get("tau"), decoding.get("mode", "exact"),
                    decoding.get("max_draft", 8), load=load, draft_window=decoding.get("draft_window", 0),
                    draft_kv=decoding.get("draft_kv", "auto"))  # fmt: skip
    taus = ["inf" if t is None else f"{t:g}" for t in decoder.taus]
    note = (
        f"HSD {decoder.mode}, drafts {' -> '.join(decoder_names(decoder))} -> {handle.source}, tau {','.join(taus)}, "
        f"max draft {decoder.max_draft}, batch 1"
    )
    if decoder.draft_window:
        note += f", drafts attend to {SINKS} sinks + the last {decoder.draft_window} positions"
    if decoder.draft_kv != "auto":
        note += f", drafts' keys and values {decoder.draft_kv}"
    return decoder, note


def decoder_names(decoder) -> list[str]:
    return [name for name, _ in decoder.models[:-1]]


def _generation_metrics(metrics: dict[str, Metric], tally: GenTally, n: int, note: str) -> None:
    """Tokens per second of a task's generation and, with speculative decoding, the verifier's acceptance."""
    if not tally.tokens:
        return
    decoding = note or "transformers generate(), batched"
    for m in metrics.values():
        m.extra = {**m.extra, "decoding": decoding}
    extra = {"decoding": decoding, "tokens": tally.tokens, "seconds": tally.seconds}
    if tally.levels:
        extra["levels"] = tally.levels
    metrics["gen_tok_s"] = Metric(tally.tokens / tally.seconds, None, n, "tok/s", extra=extra)
    if tally.levels:
        top = tally.levels[-1]
        rate = top["accepted"] / top["proposed"] if top["proposed"] else 0.0
        metrics["hsd_acceptance"] = Metric(rate, None, n, "", extra={"decoding": decoding, "levels": tally.levels})


def _contamination(handle: ModelHandle, names: list[str], allowed: bool) -> dict[str, str]:
    """{task: note} for the tasks the model's recorded training contaminates (data/tasks/contamination.py) when
    allowed; otherwise the first such task is refused."""
    from budgetlm.data.tasks import contamination

    trained = contamination.trained_on(handle.provenance)
    if not allowed:
        fix = "leave {eval} out, or pass --allow-contamination to score it marked as contaminated"
        where = "eval (from the model's provenance)"
        contamination.check(trained, names, where, fix)
        return {}
    notes = {}
    for name in names:
        if found := contamination.first(trained, [name]):
            notes[name] = f"{found[2]}; allowed by --allow-contamination"
    return notes


def write_outputs(out: Path, results: dict[str, dict[str, Metric]], records: dict[str, list[dict]]) -> None:
    for name, recs in records.items():
        atomic_write_jsonl(out / "items" / f"{name}.jsonl", recs)
    atomic_write_json(out / "eval.json", {t: {m: v.to_dict() for m, v in ms.items()} for t, ms in results.items()})
