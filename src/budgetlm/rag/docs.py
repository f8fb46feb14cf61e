"""Documents for retrieval: where passages come from, and how they are cut into sentences and chunks.

DOCS (`budgetlm rag index DOCS...`) are, each:
- a .txt or .md file: one passage per paragraph (blank-line separated);
- a .jsonl file: one JSON object per line with a "text" field (and optionally "id" or "title", kept as the source);
- a folder: every .txt/.md/.jsonl file under it, in sorted order (other files are ignored and counted);
- a bundled corpus name: `sciq-support` (the support passages of SciQ's validation split) or `boolq-passages`
  (BoolQ's validation passages), read through the tasks' own loading (data/tasks), so --data-dir files work too.
A file that is not UTF-8 is skipped and counted (never a crash); a folder with no document file, or documents with
no text at all, is a one-line DataError.

Sentences are nltk's Punkt boundaries (its untrained English parameters: no download); a chunk is a run of whole
sentences of at most `max_tokens` encoder wordpieces (a longer sentence is cut between words). WordPiece splits on
white space and punctuation first, so the wordpieces of a run of sentences are the sum of theirs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from budgetlm.errors import DataError

TEXT_SUFFIXES = (".txt", ".md", ".markdown")
DOC_SUFFIXES = (*TEXT_SUFFIXES, ".jsonl")
CORPORA = {  # name -> (task, document field, description)
    "sciq-support": ("sciq", "support", "the support passages of SciQ's validation split"),
    "boolq-passages": ("boolq", "passage", "the Wikipedia passages of BoolQ's validation split"),
}


@dataclass
class Documents:
    passages: list[dict]  # {"text", "source"}
    sources: list[str]  # what was read, one line each
    skipped: list[str] = field(default_factory=list)  # files that are not UTF-8
    ignored: int = 0  # files of other types inside folders


def corpus_passages(name: str, data_dir: Path | None = None) -> tuple[list[dict], str]:
    """The passages of a bundled corpus (empty ones dropped) and where they came from."""
    from budgetlm.data.tasks import tasks
    from budgetlm.data.tasks.base import TaskContext

    task_name, key, _ = CORPORA[name]
    data = tasks.get(task_name).load(TaskContext(data_dir=data_dir))
    passages = [
        {"text": it.doc[key].strip(), "source": f"{task_name} {it.id}"} for it in data.items if it.doc[key].strip()
    ]
    return passages, f"{name}: {len(passages):,} passages from {data.source}"


def _paragraphs(text: str, source: str) -> list[dict]:
    paras = [p.strip() for p in text.replace("\r\n", "\n").split("\n\n")]
    return [{"text": p, "source": f"{source} #{i}"} for i, p in enumerate(p for p in paras if p)]


def _jsonl(path: Path, text: str) -> list[dict]:
    out = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"document file {path} line {lineno} is not valid JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise DataError(f'document file {path} line {lineno} has no "text" field; write {{"text": ...}} rows')
        if row["text"].strip():
            label = row.get("id", row.get("title", lineno))
            out.append({"text": row["text"].strip(), "source": f"{path} {label}"})
    return out


def _read_file(path: Path, docs: Documents) -> None:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        docs.skipped.append(str(path))
        return
    found = _jsonl(path, text) if path.suffix == ".jsonl" else _paragraphs(text, str(path))
    docs.passages.extend(found)
    docs.sources.append(f"{path}: {len(found):,} passages")


def read_documents(specs: list[str], data_dir: Path | None = None) -> Documents:
    """Passages of every DOCS entry, in order."""
    docs = Documents([], [])
    for spec in specs:
        path = Path(spec)
        if spec in CORPORA and not path.exists():
            passages, where = corpus_passages(spec, data_dir)
            docs.passages.extend(passages)
            docs.sources.append(where)
        elif path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file())
            wanted = [p for p in files if p.suffix.lower() in DOC_SUFFIXES]
            docs.ignored += len(files) - len(wanted)
            if not wanted:
                raise DataError(
                    f"DOCS folder {path} holds no {'/'.join(DOC_SUFFIXES)} files; give a folder of documents"
                )
            for p in wanted:
                _read_file(p, docs)
        elif path.is_file():
            if path.suffix.lower() not in DOC_SUFFIXES:
                raise DataError(f"document {path} is not a {'/'.join(DOC_SUFFIXES)} file")
            _read_file(path, docs)
        else:
            names = ", ".join(CORPORA)
            raise DataError(f"no file, folder or bundled corpus named '{spec}' (bundled corpora: {names})")
    if not docs.passages:
        why = f" ({len(docs.skipped)} files skipped: not UTF-8)" if docs.skipped else ""
        raise DataError(f"the documents {' '.join(specs)} hold no text{why}; give documents with text in them")
    return docs


# -- sentences and chunks ----------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def _punkt():
    from nltk.tokenize.punkt import PunktSentenceTokenizer

    return PunktSentenceTokenizer()


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) character spans of the sentences of `text` (Punkt, untrained English parameters)."""
    return [(a, b) for a, b in _punkt().span_tokenize(text) if text[a:b].strip()]


def sentences(text: str) -> list[str]:
    return [text[a:b] for a, b in sentence_spans(text)]


def _word_pieces(text: str, span: tuple[int, int], max_tokens: int, count) -> list[tuple[int, int]]:
    """A sentence longer than the budget, cut between words into runs of at most max_tokens wordpieces (a single
    word longer than that stays whole: the encoder truncates it)."""
    import re

    words = [(span[0] + m.start(), span[0] + m.end()) for m in re.finditer(r"\S+", text[span[0] : span[1]])]
    sizes = count([text[a:b] for a, b in words])
    out, start, used, prev_end = [], None, 0, 0
    for (a, b), n in zip(words, sizes):
        if start is not None and used + n > max_tokens:
            out.append((start, prev_end))
            start, used = None, 0
        start = a if start is None else start
        used += n
        prev_end = b
    if start is not None:
        out.append((start, prev_end))
    return out


def chunk_text(text: str, max_tokens: int) -> list[str]:
    """`text` as consecutive runs of whole sentences of at most max_tokens encoder wordpieces each."""
    from budgetlm.models.encoder import minilm

    tok = minilm()[0]

    def count(parts: list[str]) -> list[int]:
        return [len(ids) for ids in tok(parts, add_special_tokens=False)["input_ids"]] if parts else []

    spans = sentence_spans(text)
    pieces: list[tuple[int, int]] = []
    for span, n in zip(spans, count([text[a:b] for a, b in spans])):
        pieces.extend([span] if n <= max_tokens else _word_pieces(text, span, max_tokens, count))
    sizes = count([text[a:b] for a, b in pieces])
    chunks, start, end, used = [], None, 0, 0
    for (a, b), n in zip(pieces, sizes):
        if start is not None and used + n > max_tokens:
            chunks.append(text[start:end])
            start, used = None, 0
        start = a if start is None else start
        end, used = b, used + n
    if start is not None:
        chunks.append(text[start:end])
    return chunks
