"""AdaComp-RAG for people: build an index from documents, and ask a model a question through it
(`budgetlm rag index` / `budgetlm rag ask`; budgetlm.api.rag_index / rag_ask).

`ask` runs the gate, retrieval and compression of rag/pipeline.py, then generates the model's answer greedily
(its chat template where it has one) from
    "<context>\\n\\nQuestion: <question>\\nAnswer:"      ("Question: <question>\\nAnswer:" without context),
and reports the decision, the gate's score, the passages kept, the context and each part's latency. A question
that does not fit the model's context window with the answer's tokens is a one-line ConfigError; retrieved
context that does not fit loses its lowest-ranked passages until it does (the result says how many).
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from budgetlm.errors import ConfigError
from budgetlm.rag.pipeline import Setting, prepare, warm_up


def ask_prompt(context: str, question: str) -> str:
    question = question.strip()
    return f"{context}\n\nQuestion: {question}\nAnswer:" if context else f"Question: {question}\nAnswer:"


@dataclass
class Answer:
    question: str
    setting: str
    retrieved: bool
    score: float | None
    passages: list[dict]
    context: str
    answer: str
    prompt_tokens: int
    seconds: dict
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def build(
    docs: list[str],
    out: str | Path,
    chunk_tokens: int | None = None,
    bm25: bool = False,
    force: bool = False,
    progress: bool = False,
):
    """Read DOCS (rag/docs.py), chunk, embed and write the index folder `out` atomically; returns (Index, Documents).
    Files that are not UTF-8 are skipped and reported on stderr."""
    from budgetlm.rag.docs import read_documents
    from budgetlm.rag.index import DEFAULT_CHUNK_TOKENS, MARKER, build_index, save_index
    from budgetlm.utils import check_output

    check_output(out, "a retrieval index", marker=MARKER, force=force)
    chunk_tokens = DEFAULT_CHUNK_TOKENS if chunk_tokens is None else chunk_tokens
    if not 8 <= chunk_tokens <= 254:
        raise ConfigError(f"--chunk-tokens must be 8-254 (the encoder reads 256 tokens; got {chunk_tokens})")
    found = read_documents(docs)
    if found.skipped:
        shown = ", ".join(found.skipped[:5]) + (", ..." if len(found.skipped) > 5 else "")
        print(f"note: skipped {len(found.skipped)} files that are not UTF-8 text: {shown}", file=sys.stderr)
    sources = [*found.sources, *([f"skipped (not UTF-8): {s}" for s in found.skipped])]
    index = build_index(found.passages, chunk_tokens, bm25, sources, progress=progress, name=" ".join(docs))
    index.manifest["skipped_not_utf8"] = len(found.skipped)
    index.manifest["ignored_other_files"] = found.ignored
    save_index(index, Path(out), force=force)
    return index, found


def ask(
    index,
    handle,
    question: str,
    setting: Setting = Setting(),
    max_new_tokens: int = 64,
) -> Answer:
    """One question through the gate, retrieval and compression, answered by the model."""
    from budgetlm.models.lm import HFLM, GenArgs

    if not question.strip():
        raise ConfigError("the question is empty; give the question as text")
    if setting.gate == "oracle":
        raise ConfigError("gate 'oracle' exists only in the sciq-rag / boolq-rag tasks; choose another --gate")
    if setting.gate in ("grad", "entropy", "margin") and setting.threshold is None:
        raise ConfigError(
            f"--gate {setting.gate} needs --threshold T; calibrate one with `budgetlm eval MODEL --tasks "
            f"sciq-rag:gate={setting.gate}` (its result records the calibrated threshold)"
        )
    lm = HFLM(handle)
    max_new_tokens = max(1, max_new_tokens)
    args = GenArgs(until=["\n"], max_gen_toks=max_new_tokens)

    def tokens(prompt: str) -> int:
        return len(lm.encode(lm.format_prompt(prompt, args.chat)))

    bare = ask_prompt("", question)
    room = lm.max_length - max_new_tokens
    if tokens(bare) > room:
        raise ConfigError(
            f"the question is {tokens(bare):,} tokens with the prompt; with {max_new_tokens} answer tokens it does "
            f"not fit the model's context window of {lm.max_length:,} tokens; shorten it"
        )
    warm_up(lm)
    t0 = time.perf_counter()
    prep = prepare(lm, index, question, setting, lm.format_prompt(bare, args.chat))
    notes = []
    kept = list(prep.hits) if prep.retrieve else []
    context = prep.context
    if prep.compressed is None:
        while kept and tokens(ask_prompt(context, question)) > room:
            kept.pop()
            context = "\n".join(h.text for h in kept)
            notes.append("dropped the lowest-ranked passage: the context did not fit the model's window")
    prompt = ask_prompt(context, question)
    t1 = time.perf_counter()
    answer = lm.generate_until([(prompt, args)])[0].strip()
    seconds = {**prep.seconds, "generate_s": time.perf_counter() - t1, "total_s": time.perf_counter() - t0}
    if prep.compressed is not None:
        c = prep.compressed
        notes.append(f"compressed to {c.kept} of {c.total} sentences, {c.tokens} tokens (budget {setting.budget})")
    passages = [{"source": h.source, "score": h.score, "text": h.text} for h in kept]
    return Answer(
        question, setting.label(), prep.retrieve, prep.score, passages, context, answer, tokens(prompt), seconds, notes
    )
