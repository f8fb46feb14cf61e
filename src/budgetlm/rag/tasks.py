"""`sciq-rag` and `boolq-rag`: SciQ and BoolQ with the question's own passage taken away, and the context the
RAG setting gives in its place, scored as lm-eval scores sciq (acc, acc_norm) and boolq (acc).

The prompt is the original task's (more_mc.SciQ / hub.BoolQ doc_to_text) with its passage field replaced by the
context, so `sciq-rag:gate=oracle` asks exactly what `sciq` asks, and `gate=never` leaves the passage empty.
The retrieval pool is every passage of the task's evaluation split (SciQ's support passages, BoolQ's Wikipedia
passages), chunked and indexed once per data source and cached under the budgetlm cache (or `index=PATH`, an index
built by `budgetlm rag index`).

The setting is part of the task's name (`budgetlm eval M --tasks sciq-rag:gate=grad:k=3:budget=128`, or in a
recipe): options `gate=always|never|grad|entropy|margin|oracle` (default always), `k=N` (3), `budget=N` (model
tokens of compressed context; default none), `threshold=T` (default: calibrated), `index=PATH`. A result is named
by the canonical form of its setting, so several settings sit side by side in one evaluation and `budgetlm
compare` pairs them item by item.

Items: the split is cut once into a calibration fold (CAL_PERCENT of the items, by a sha256 of each item's content
with a fixed seed, like folds.py) and an evaluation fold (the rest). Every setting evaluates the evaluation fold
only (so settings pair item by item); a scored gate's threshold is calibrated on up to CAL_ITEMS items of the
calibration fold, sampled with the run's seed. Each item is scored alone, as a server answers one query: through the
decode runtime with its KV cache (decode/query.py: the context fed once, each choice on top of it;
where the entropy gate said "no retrieval", its own forward on the prompt is that context), so that its latency is
a query's: retrieval + gate + compression + the model's scoring. Calibration scores its outcomes the same way.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
import weakref
from pathlib import Path

from budgetlm.data.tasks.base import Item, MultipleChoiceTask, TaskContext, TaskData, TaskResult, aggregate, means
from budgetlm.decode import query
from budgetlm.errors import ConfigError, UnknownNameError
from budgetlm.rag.pipeline import Setting, check_gate, prepare, warm_up

CAL_PERCENT = 30
CAL_ITEMS = 300
CAL_SEED = 0  # the fold is fixed: it must not move with a run's seed


def in_calibration(task_name: str, doc: dict) -> bool:
    content = json.dumps(doc, sort_keys=True, ensure_ascii=True)
    digest = hashlib.sha256(f"rag-calibration\0{CAL_SEED}\0{task_name}\0{content}".encode()).digest()
    return int.from_bytes(digest[:8], "big") < CAL_PERCENT * 2**64 // 100


def parse_options(task: str, option: str) -> tuple[Setting, str | None]:
    values: dict[str, str] = {}
    for part in option.split(":"):
        key, eq, value = part.partition("=")
        if not eq or key not in ("gate", "k", "budget", "threshold", "index") or not value:
            raise UnknownNameError(
                f"task '{task}:{option}': '{part}' is not an option; use gate=always|never|grad|entropy|margin|oracle, "
                f"k=N, budget=N, threshold=T, index=PATH, joined by ':' (e.g. {task}:gate=grad:k=3:budget=128)"
            )
        values[key] = value
    try:
        setting = Setting(
            gate=values.get("gate", "always"),
            k=int(values.get("k", 3)),
            budget=int(values["budget"]) if "budget" in values else None,
            threshold=float(values["threshold"]) if "threshold" in values else None,
        )
    except ValueError:
        raise ConfigError(f"task '{task}:{option}': k and budget are whole numbers, threshold a number") from None
    return setting, values.get("index")


class RagTask(MultipleChoiceTask):
    decode_runtime = True  # scored one query at a time through the decode runtime (decode/query.py)

    def __init__(self, base_name: str, key: str, corpus: str, setting: Setting | None = None, index: str | None = None):
        self.base_name, self.key, self.corpus = base_name, key, corpus
        self.setting = setting or Setting()
        self.index_path = index
        self.name = f"{base_name}-rag"
        if setting is not None:
            self.name += ":" + self.setting.label() + (f":index={index}" if index else "")
        self.description = (
            f"{base_name} without its passage; context retrieved from {corpus} (AdaComp-RAG); options "
            f"{base_name}-rag:gate=always|never|grad|entropy|margin|oracle:k=N:budget=N:threshold=T:index=PATH"
        )
        self._calibration: list[Item] = []

    @property
    def base(self):
        from budgetlm.data.tasks import tasks

        return tasks.get(self.base_name)

    def with_options(self, option: str) -> RagTask:
        setting, index = parse_options(self.name, option)
        return RagTask(self.base_name, self.key, self.corpus, setting, index)

    def aggregations(self):
        return means([*self.base.reported, "retrieved", "prompt_tokens", "latency_s"])

    def question(self, doc: dict) -> str:
        return doc["question"]

    def requests_with(self, doc: dict, context: str) -> list[tuple[str, str]]:
        return self.base.requests({**doc, self.key: context})

    # -- items ------------------------------------------------------------------------------------------------
    def load(self, ctx: TaskContext) -> TaskData:
        data = self.base.load(ctx)
        cal = [it for it in data.items if in_calibration(self.base_name, it.doc)]
        ev = [it for it in data.items if not in_calibration(self.base_name, it.doc)]
        self._calibration, self._all = cal, data.items
        note = (
            f"evaluation fold: {len(ev):,} of {len(data.items):,} items; the other {len(cal):,} ({CAL_PERCENT}% by a "
            f"sha256 of each item, seed {CAL_SEED}) calibrate gates; disjoint"
        )
        return TaskData(ev, f"{data.source}; {note}")

    def _index(self, ctx: TaskContext):
        from budgetlm.rag.index import load_index

        if self.index_path:
            return load_index(self.index_path)
        if not getattr(self, "_all", None):
            self.load(ctx)
        return task_index(self.corpus, [it.doc[self.key] for it in self._all], ctx.data_dir)

    # -- scoring ----------------------------------------------------------------------------------------------
    def run(self, lm, items: list[Item], ctx: TaskContext) -> TaskResult:
        from budgetlm.progress import Progress

        index = None if self.setting.gate in ("never", "oracle") else self._index(ctx)
        calibration = None
        if self.setting.gate in ("grad", "entropy", "margin") and self.setting.threshold is None:
            calibration = self.calibrate(lm, index, ctx)
        threshold = calibration["threshold"] if calibration else self.setting.threshold
        warm_up(lm)
        records = []
        with Progress(self.name, len(items), enabled=True, throttled=True) as bar:
            for it in items:
                records.append(self._score_item(lm, index, it, threshold))
                bar.advance()
        metrics = aggregate(records, self.aggregations())
        setting = Setting(self.setting.gate, self.setting.k, self.setting.budget, threshold)
        extra = {"rag": setting.label(), "index": index.label if index else "none"}
        if calibration:
            extra["calibration"] = calibration
        for m in metrics.values():
            m.extra.update(extra)
        metrics["latency_s"].unit = "s"
        return TaskResult(metrics, records)

    def _score_item(self, lm, index, it: Item, threshold: float | None) -> dict:
        doc = it.doc
        no_rag = self.base.doc_to_text({**doc, self.key: ""})
        query.reset(lm)  # an item's scores never depend on the items before it
        t0 = time.perf_counter()
        prep = prepare(lm, index, self.question(doc), self.setting, no_rag, threshold, oracle=doc[self.key])
        reqs = self.requests_with(doc, prep.context)
        t1 = time.perf_counter()
        lls = [ll for ll, _ in query.loglikelihood(lm, reqs)]
        t2 = time.perf_counter()
        rec = self._record(it, lls)
        rec.update(
            {
                "retrieved": float(prep.retrieve and self.setting.gate != "oracle"),
                "gate_score": prep.score,
                "prompt_tokens": len(lm.encode(reqs[0][0])),
                "latency_s": t2 - t0,
                "score_s": t2 - t1,
                **prep.seconds,
                "passages": [h.source for h in prep.hits] if prep.retrieve else [],
            }
        )
        return rec

    def _record(self, it: Item, lls: list[float]) -> dict:
        choices = self.base.doc_to_choices(it.doc)
        gold = self.base.doc_to_target(it.doc)
        k = len(lls)
        rec = {"id": it.id, "target": gold, "pred": max(range(k), key=lls.__getitem__), "loglikelihoods": lls}
        rec["acc"] = float(rec["pred"] == gold)
        if "acc_norm" in self.base.reported:
            norm = [ll / max(1, len(c)) for ll, c in zip(lls, choices)]
            rec["acc_norm"] = float(max(range(k), key=norm.__getitem__) == gold)
        return rec

    # -- calibration ------------------------------------------------------------------------------------------
    def calibration_items(self, ctx: TaskContext, n: int | None = None) -> tuple[list[Item], list[Item]]:
        """(a seeded sample of n items, default CAL_ITEMS, the whole calibration fold), each in id order."""
        if not self._calibration:
            self.load(ctx)
        pool = sorted(self._calibration, key=lambda it: it.id)
        return random.Random(ctx.seed).sample(pool, min(n or CAL_ITEMS, len(pool))), pool

    def calibrate(self, lm, index, ctx: TaskContext) -> dict:
        from budgetlm.rag.gates import calibrate

        check_gate(lm, self.setting.gate)
        chosen, pool = self.calibration_items(ctx)
        t = time.perf_counter()
        evidence = calibration_evidence(self, lm, index, chosen)
        result = calibrate(
            [e[self.setting.gate] for e in evidence],
            [e["correct_without"] for e in evidence],
            [e["correct_with"] for e in evidence],
        )
        result["seconds"] = round(time.perf_counter() - t, 1)
        result["items"] = (
            f"{len(chosen)} of the {len(pool)} calibration-fold items (seed {ctx.seed}), disjoint from the evaluated"
        )
        return result


_EVIDENCE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # lm -> {(task, k, budget, index, items): evidence}


def calibration_evidence(task: RagTask, lm, index, items: list[Item]) -> list[dict]:
    """Per calibration item: the three gate scores, and whether the model is right without retrieval and with the
    setting's k passages (compressed to its budget). Computed once per process for a model, task, k, budget and
    index, whichever gate asks first."""
    from budgetlm.rag.gates import entropy_score, grad_score, margin_score
    from budgetlm.rag.pipeline import query_vector

    s = task.setting
    # per LM (kept only while it lives, so a later LM never meets a freed one's id), its model (held by the LM)
    key = (id(getattr(lm, "model", None)), task.base_name, s.k, s.budget, index.label, tuple(it.id for it in items))
    known = _EVIDENCE.setdefault(lm, {})
    if key in known:
        return known[key]
    from budgetlm.progress import Progress

    always = Setting("always", s.k, s.budget)
    torch_model = getattr(lm, "model", None) is not None  # the grad score needs one (llama.cpp: none)
    out, reqs_without, reqs_with = [], [], []
    with Progress(f"{task.name} gate evidence", 3 * len(items), enabled=True, throttled=True) as bar:
        for it in items:
            q = task.question(it.doc)
            no_rag = task.base.doc_to_text({**it.doc, task.key: ""})
            query.reset(lm)
            prep = prepare(lm, index, q, always, no_rag)
            qvec = query_vector(q)
            out.append(
                {
                    "grad": grad_score(lm.model, lm.prefix_token, lm.encode(q)) if torch_model else None,
                    "entropy": entropy_score(lm, no_rag),
                    "margin": margin_score(index.dense(qvec, 2)[0][0]),
                }
            )
            reqs_without.append(task.requests_with(it.doc, ""))
            reqs_with.append(task.requests_with(it.doc, prep.context))
            bar.advance("gate scores")
        for name, reqs in (("correct_without", reqs_without), ("correct_with", reqs_with)):
            for e, it, rs in zip(out, items, reqs):  # scored as an evaluated item is (_score_item)
                query.reset(lm)
                e[name] = task._record(it, [ll for ll, _ in query.loglikelihood(lm, rs)])["acc"]
                bar.advance(f"outcomes {name.split('_')[1]} retrieval")
    known[key] = out
    return out


def task_index(corpus: str, texts: list[str], data_dir: Path | None):
    """The index of a task's passage pool, built once and cached under the budgetlm cache (keyed by the passages,
    the chunk size and the encoder's weights)."""
    from budgetlm.models.encoder import identity
    from budgetlm.models.sources import cache_dir
    from budgetlm.rag.index import DEFAULT_CHUNK_TOKENS, MARKER, build_index, load_index, save_index

    passages = [{"text": t.strip(), "source": f"{corpus} #{i}"} for i, t in enumerate(texts) if t.strip()]
    digest = hashlib.sha256(json.dumps([passages, DEFAULT_CHUNK_TOKENS, identity()["sha256"]]).encode()).hexdigest()
    path = cache_dir() / "rag" / f"{corpus}-{digest[:16]}"
    if path in _INDEXES:
        return _INDEXES[path]
    if (path / MARKER).is_file():
        _INDEXES[path] = load_index(path)
        return _INDEXES[path]
    where = f"{corpus} ({'--data-dir ' + str(data_dir) if data_dir else 'bundled'})"
    index = build_index(passages, DEFAULT_CHUNK_TOKENS, sources=[where], progress=True, name=corpus)
    save_index(index, path, force=True)
    _INDEXES[path] = index
    return index


_INDEXES: dict[Path, object] = {}  # the task indexes this process loaded


sciq_rag = RagTask("sciq", "support", "sciq-support")
boolq_rag = RagTask("boolq", "passage", "boolq-passages")
