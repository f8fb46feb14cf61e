"""Calibration and perplexity text from the standard library's `pydoc_data.topics`.

`pydoc_data.topics.topics` maps ~80 topic names of the Python reference manual to their plain-text
rendering (about 465k characters, ~100k tokens of English technical prose with code, grammar and tables).
It ships with every CPython, so it needs no download; its content differs slightly between Python
versions, which is why `SOURCE` names the version.

Split: topics are ordered by the sha256 of their name; walking that order, a topic goes to "heldout" when
adding it keeps the held-out part within 20% of all characters, else to "calibration". The split is
therefore deterministic, disjoint, and about 80/20 by characters (not by topic count).

- `calibration_text()` / `heldout_text()`: the raw text of each part (topics joined by blank lines), code
  and tables included; used for perplexity and calibration, where they are part of the language modelled.
- `passages(split, ...)`: prose only. Blocks that are indented (code, grammar productions, list-item
  bodies), tables, headings and list items are filtered out because they make sentence-level tasks (cloze)
  noisy; prose paragraphs are unwrapped and cut at sentence boundaries into passages.
- `calibration_batches(tokenizer, ...)`: seeded random windows of the calibration token stream (GPTQ/AWQ).
- `load_text_file(path)`: a user's text file, with one-line errors.
"""

from __future__ import annotations

import hashlib
import platform
import re
import weakref
from functools import lru_cache
from pathlib import Path

import torch

from budgetlm.errors import DataError, unknown

SPLITS = ("calibration", "heldout")
HELDOUT_FRACTION = 0.2
SOURCE = f"pydoc_data.topics (python {platform.python_version()})"

_ABBREVIATIONS = ("e.g.", "i.e.", "etc.", "vs.", "cf.", "approx.", "resp.", "Mr.", "Dr.", "No.")
_FOOTNOTE_REF = re.compile(r"\s*\[\d+\]")
_SENTENCE_BREAK = re.compile(r"(?<=[.!?])[\"')]?\s+(?=[A-Z\"*(\[])")
_SENTENCE_END = re.compile(r"[.!?][\"')]?$")


def _topics() -> dict[str, str]:
    from pydoc_data.topics import topics

    return topics


def _hash(name: str) -> str:
    return hashlib.sha256(name.encode("utf-8")).hexdigest()


@lru_cache(maxsize=1)
def split_topics() -> dict[str, tuple[str, ...]]:
    """{"calibration": topic names, "heldout": topic names}, each in sha256 order."""
    topics = _topics()
    total = sum(len(t) for t in topics.values())
    budget = HELDOUT_FRACTION * total
    held, cal, used = [], [], 0
    for name in sorted(topics, key=_hash):
        if used + len(topics[name]) <= budget:
            held.append(name)
            used += len(topics[name])
        else:
            cal.append(name)
    return {"calibration": tuple(cal), "heldout": tuple(held)}


def topic_texts(split: str) -> list[tuple[str, str]]:
    """[(topic name, raw text)] of one split."""
    if split not in SPLITS:
        raise unknown("corpus split", split, SPLITS)
    topics = _topics()
    return [(name, topics[name].strip()) for name in split_topics()[split]]


def calibration_text() -> str:
    return "\n\n".join(text for _, text in topic_texts("calibration"))


def heldout_text() -> str:
    return "\n\n".join(text for _, text in topic_texts("heldout"))


# --- prose extraction -------------------------------------------------------------------------------


def _blocks(text: str) -> list[str]:
    return [b for b in re.split(r"\n\s*\n", text) if b.strip()]


def _is_prose(block: str) -> bool:
    lines = block.split("\n")
    first = lines[0]
    if first[:1].isspace() or first[:1] in "+|*-=>" or re.match(r"^(\d+\.|#\.|\(\d+\))\s", first):
        return False  # code, grammar, table, bullet or numbered list item
    if len(lines) > 1 and re.fullmatch(r"[*=\-^~\"']+", lines[1].strip()):
        return False  # heading
    if any(line[:1].isspace() for line in lines[1:]):
        return False  # mixed prose/code block
    letters = sum(c.isalpha() or c.isspace() for c in block)
    return letters >= 0.85 * len(block)


def sentences(paragraph: str) -> list[str]:
    """Split unwrapped prose into sentences (a rule-based splitter, good enough for this corpus)."""
    pieces = _SENTENCE_BREAK.split(paragraph.strip())
    out: list[str] = []
    for piece in pieces:
        if out and out[-1].endswith(_ABBREVIATIONS):
            out[-1] = f"{out[-1]} {piece}"
        else:
            out.append(piece)
    return [s.strip() for s in out if s.strip()]


def _unwrap(block: str) -> str:
    """Join hard-wrapped lines; a word hyphenated at a line end ("left-" + "hand") is joined without a space."""
    out = ""
    for line in block.split("\n"):
        line = line.strip()
        if out.endswith("-") and line[:1].islower():
            out += line
        else:
            out = f"{out} {line}" if out else line
    return out


def prose_runs(text: str) -> list[list[str]]:
    """Runs of consecutive complete prose sentences; a non-prose block or a sentence fragment (a line ending
    in ':' before a removed code block, say) ends the run."""
    runs: list[list[str]] = [[]]
    for block in _blocks(text):
        if not _is_prose(block):
            runs.append([])
            continue
        para = _FOOTNOTE_REF.sub("", _unwrap(block))
        for sent in sentences(para):
            if _SENTENCE_END.search(sent):
                runs[-1].append(sent)
            else:
                runs.append([])
    return [r for r in runs if r]


@lru_cache(maxsize=16)
def _passages(split: str, min_chars: int, max_chars: int) -> tuple[tuple[str, str], ...]:
    out = []
    for name, text in topic_texts(split):
        k = 0
        for run in prose_runs(text):
            cur: list[str] = []
            for sent in run:
                if cur and len(" ".join([*cur, sent])) > max_chars:
                    if len(" ".join(cur)) >= min_chars:
                        out.append((f"{name}/{k}", " ".join(cur)))
                        k += 1
                    cur = []
                cur.append(sent)
            if cur and min_chars <= len(" ".join(cur)) <= max_chars:
                out.append((f"{name}/{k}", " ".join(cur)))
                k += 1
    return tuple(out)


def passages(split: str = "heldout", min_chars: int = 200, max_chars: int = 800) -> list[tuple[str, str]]:
    """[(id, text)] prose passages of whole sentences, min_chars <= len <= max_chars (a single sentence
    longer than max_chars is dropped). Ids are "topic/k", stable for a given Python version."""
    if split not in SPLITS:
        raise unknown("corpus split", split, SPLITS)
    return list(_passages(split, min_chars, max_chars))


def chunks(split: str = "heldout", max_chars: int = 1200) -> list[tuple[str, str]]:
    """[(id, text)] of the raw text (code and tables included) cut at blank lines into chunks of at most
    max_chars (a longer block is cut at line ends). Ids are "topic/k"."""
    out = []
    for name, text in topic_texts(split):
        pieces: list[str] = []
        for block in _blocks(text):
            if len(block) <= max_chars:
                pieces.append(block)
                continue
            cur = ""
            for line in block.split("\n"):
                if cur and len(cur) + 1 + len(line) > max_chars:
                    pieces.append(cur)
                    cur = ""
                cur = f"{cur}\n{line}" if cur else line
            if cur:
                pieces.append(cur)
        cur, k = "", 0
        for p in pieces:
            if cur and len(cur) + 2 + len(p) > max_chars:
                out.append((f"{name}/{k}", cur))
                cur, k = "", k + 1
            cur = f"{cur}\n\n{p}" if cur else p
        if cur.strip():
            out.append((f"{name}/{k}", cur))
    return out


# --- tokens -------------------------------------------------------------------------------------------


_TOKEN_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def calibration_tokens(tokenizer) -> list[int]:
    """The calibration split as one token stream (topics tokenised one by one, each followed by a blank line,
    no special tokens); cached per tokenizer object."""
    if tokenizer not in _TOKEN_CACHE:
        stream: list[int] = []
        for _, text in topic_texts("calibration"):
            stream.extend(tokenizer(text + "\n\n", add_special_tokens=False, verbose=False)["input_ids"])
        _TOKEN_CACHE[tokenizer] = stream
    return _TOKEN_CACHE[tokenizer]


def calibration_batches(tokenizer, n_samples: int = 128, seq_len: int = 512, seed: int = 0) -> torch.Tensor:
    """LongTensor [n_samples, seq_len] of windows at seeded random offsets in the calibration token stream
    (see calibration_tokens)."""
    stream = calibration_tokens(tokenizer)
    if len(stream) <= seq_len:
        raise DataError(
            f"calibration text has {len(stream)} tokens, fewer than seq_len={seq_len}; use a shorter seq_len"
        )
    ids = torch.tensor(stream, dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(stream) - seq_len + 1, (n_samples,), generator=gen)
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()]) if n_samples else ids.new_empty(0, seq_len)


def load_text_file(path) -> str:
    """The UTF-8 text of a user's file; a one-line DataError if it is missing, unreadable or empty."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"text file {p} not found; pass the path of an existing UTF-8 text file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"text file {p} is not valid UTF-8; convert it to UTF-8 text") from None
    if not text.strip():
        raise DataError(f"text file {p} is empty; pass a file with some text in it")
    return text
