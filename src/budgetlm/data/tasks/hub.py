"""Real benchmarks under lm-evaluation-harness's names, with its prompts and scoring, so numbers compare.

arc_easy, arc_challenge, hellaswag, boolq, winogrande, logiqa and piqa live here; gsm8k (generation with
few-shot examples) lives in reasoning.py, triviaqa and nq_open in openqa.py, and they share the loading code
below (gsm_symbolic, in gsm_symbolic.py, generates its items).

Where items come from, in this order:
1. ``--data-dir DIR`` holding a file for the task in the Hugging Face hub's schema (same column names):
       DIR/<task>/<split>.jsonl | .json | .parquet     e.g. DIR/arc_easy/test.jsonl, DIR/gsm8k/train.jsonl
       DIR/<task>.jsonl | .json | .parquet             the evaluation split
   logiqa also reads the original release's text format (DIR/logiqa/test.txt).
2. The Hugging Face ``datasets`` cache, looked up offline under the hub ids lm-eval uses.
3. The hub itself, when it is reachable.
Every TaskData.source says which one was used ("local /x/arc_easy/test.jsonl", "hub allenai/ai2_arc
ARC-Easy test (cache)").
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path

from budgetlm.data.tasks.base import Item, MultipleChoiceTask, TaskContext, TaskData, TaskResult, aggregate, means
from budgetlm.errors import DataError

FORMATS = (".jsonl", ".json", ".parquet")


@dataclass(frozen=True)
class HubSource:
    path: str
    name: str | None = None

    def __str__(self) -> str:
        return f"{self.path} {self.name}" if self.name else self.path


# -- finding and reading the rows ---------------------------------------------------------------------------
def find_local(data_dir: Path, task: str, split: str, extra_formats: tuple[str, ...] = ()) -> Path | None:
    """DIR/<task>/<split>.<fmt>, else DIR/<task>.<fmt> (the latter only stands for the evaluation split)."""
    formats = FORMATS + extra_formats
    for fmt in formats:
        if (p := data_dir / task / f"{split}{fmt}").is_file():
            return p
    return None


def find_local_main(data_dir: Path, task: str, split: str, extra_formats: tuple[str, ...] = ()) -> Path | None:
    found = find_local(data_dir, task, split, extra_formats)
    if found is None:
        for fmt in FORMATS + extra_formats:
            if (p := data_dir / f"{task}{fmt}").is_file():
                return p
    return found


@contextlib.contextmanager
def _quiet_datasets():
    import datasets

    was_disabled = datasets.utils.are_progress_bars_disabled()
    verbosity = datasets.logging.get_verbosity()
    datasets.utils.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its log lines would make a one-line error several
    try:
        yield datasets
    finally:
        datasets.logging.set_verbosity(verbosity)
        if not was_disabled:
            datasets.utils.enable_progress_bars()


def read_text(path: Path) -> str:
    """A data file's text; bytes that are not UTF-8 are a one-line DataError naming the file and the place."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"data file {path} is not UTF-8 text (byte {e.start}: {e.reason}); save it as UTF-8") from None


def check_json(path: Path, text: str) -> None:
    """A .jsonl file holds one JSON object per line, a .json file JSON: the first bad line is a one-line DataError
    (``datasets`` only says that generating the dataset failed)."""
    lines = enumerate(text.splitlines(), 1) if path.suffix == ".jsonl" else [(None, text)]
    for lineno, line in lines:
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            where = f" line {lineno}" if lineno else ""
            raise DataError(f"data file {path}{where} is not valid JSON ({e.msg} at column {e.colno})") from None
        if lineno and not isinstance(value, dict):
            raise DataError(f"data file {path} line {lineno} is not a JSON object; write one row object per line")


def read_local(path: Path) -> list[dict]:
    """Rows of a .jsonl/.json/.parquet file, read through ``datasets``; empty or unreadable -> DataError."""
    if path.stat().st_size == 0 or (path.suffix != ".parquet" and not read_text(path).strip()):
        raise DataError(f"data file {path} is empty; write the task's rows into it, one JSON object per line")
    if path.suffix != ".parquet":
        check_json(path, read_text(path))
    builder = "parquet" if path.suffix == ".parquet" else "json"
    try:
        with _quiet_datasets() as datasets:
            rows = datasets.load_dataset(builder, data_files=str(path), split="train").to_list()
    except Exception as e:  # any parse failure is the file's fault
        raise DataError(f"data file {path} cannot be read as {builder}: {_first_line(e)}") from None
    if not rows:
        raise DataError(f"data file {path} is empty; write the task's rows into it")
    return rows


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:200]


@contextlib.contextmanager
def _hub_offline():
    """Make ``datasets`` look only in its cache (no network, no retries) for the duration."""
    import datasets.config
    import huggingface_hub.constants as hub_constants

    saved = datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE = saved


@functools.cache
def hub_reachable(timeout: float = 3.0) -> bool:
    """One TCP connection to the hub's host (once per process): without it, ``datasets`` spends ~30 s in retries
    before it gives up on a machine with no network."""
    import socket
    from urllib.parse import urlparse

    import huggingface_hub.constants as hub_constants

    url = urlparse(hub_constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _hub_is_offline() -> bool:
    import datasets.config

    return bool(datasets.config.HF_HUB_OFFLINE)


def read_hub(task: str, sources: tuple[HubSource, ...], split: str, hint: str) -> tuple[list[dict], str]:
    """Rows of `split` from the first source found in the cache, else from the hub; DataError otherwise."""
    with _quiet_datasets() as datasets:
        with _hub_offline():
            for s in sources:
                try:
                    rows = datasets.load_dataset(s.path, s.name, split=split).to_list()
                    return rows, f"hub {s} {split} (cache)"
                except Exception:  # not cached under this id: try the next
                    continue
        problem = "not cached and the hub is unreachable"
        if not _hub_is_offline() and hub_reachable():
            for s in sources:
                try:
                    rows = datasets.load_dataset(s.path, s.name, split=split).to_list()
                    return rows, f"hub {s} {split}"
                except ConnectionError:
                    break
                except Exception as e:  # wrong id, script dataset...: try the next id
                    problem = f"not cached, and the hub refused it ({_first_line(e)})"
    raise DataError(f"task '{task}' needs the dataset {sources[0]}: {problem}; {hint}")


def check_columns(rows: list[dict], columns: tuple[str, ...], task: str, where: str) -> None:
    for col in columns:
        if col not in rows[0]:
            raise DataError(
                f"{where} has no column '{col}'; task '{task}' needs the hub's columns {', '.join(columns)}"
            )


def load_rows(task, ctx: TaskContext, split: str, local_only: bool = False) -> tuple[list[dict], str]:
    """Rows of the task's split and where they came from (local file, cache or hub), columns checked."""
    name = task.name
    if ctx.data_dir is not None:
        finder = find_local_main if split == task.split else find_local
        path = finder(Path(ctx.data_dir), name, split, task.extra_formats)
        if path is not None:
            rows = task.read_file(path)
            where = f"local {path}"
            check_columns(rows, task.columns, name, where)
            return rows, where
    if local_only:
        raise DataError(f"task '{name}': no local file for the {split} split")
    hint = f"pass --data-dir DIR with {name}/{split}.jsonl in the hub's schema"
    if ctx.data_dir is not None:
        hint = f"no {name}/{split}.jsonl (or .json, .parquet) under {ctx.data_dir} either; " + hint
    rows, where = read_hub(name, task.sources, split, hint)
    if not rows:
        raise DataError(f"task '{name}': the dataset {task.sources[0]} has no rows in its {split} split")
    check_columns(rows, task.columns, name, where)
    return rows, where


def make_items(task, rows: list[dict], where: str) -> list[Item]:
    """Items with the dataset's id (or the row index when it has none or it repeats) and gold label."""
    ids = [str(r.get(task.id_field)) for r in rows] if task.id_field else []
    if not ids or len(set(ids)) != len(ids):
        ids = [str(i) for i in range(len(rows))]
    items = []
    for i, (row, item_id) in enumerate(zip(rows, ids)):
        try:
            doc = task.process(row)
        except (KeyError, ValueError, TypeError, IndexError, AttributeError) as e:
            raise DataError(f"{where}: row {i} does not fit task '{task.name}' ({_first_line(e)})") from None
        items.append(Item(id=item_id, doc=doc, label=doc.get("gold")))
    return items


# -- the multiple-choice tasks --------------------------------------------------------------------------------
class HubMultipleChoice(MultipleChoiceTask):
    """A multiple-choice benchmark from the hub: process(row) builds lm-eval's document (with 'gold')."""

    sources: tuple[HubSource, ...] = ()
    split: str = "test"
    columns: tuple[str, ...] = ()
    id_field: str | None = None
    reported: tuple[str, ...] = ("acc", "acc_norm")  # the metrics lm-eval's task reports
    extra_formats: tuple[str, ...] = ()

    def read_file(self, path: Path) -> list[dict]:
        return read_local(path)

    def process(self, row: dict) -> dict:
        raise NotImplementedError

    def load(self, ctx: TaskContext) -> TaskData:
        rows, where = load_rows(self, ctx, self.split)
        return TaskData(make_items(self, rows, where), where)

    def doc_to_target(self, doc: dict) -> int:
        return doc["gold"]

    def run(self, lm, items: list[Item], ctx: TaskContext) -> TaskResult:
        """The base scoring, with acc_norm as lm-eval computes it (loglikelihood divided by the choice's
        length in characters, without the leading space) and only the metrics lm-eval reports."""
        records = []
        for it, rec in zip(items, super().run(lm, items, ctx).records):
            rec = {k: v for k, v in rec.items() if k != "acc_norm"}
            if "acc_norm" in self.reported:
                lens = [max(1, len(c)) for c in self.doc_to_choices(it.doc)]
                norm = [ll / n for ll, n in zip(rec["loglikelihoods"], lens)]
                rec["acc_norm"] = float(max(range(len(norm)), key=norm.__getitem__) == rec["target"])
            records.append(rec)
        return TaskResult(aggregate(records, self.aggregations()), records)

    def aggregations(self):
        return means(self.reported)


class Arc(HubMultipleChoice):
    columns = ("question", "choices", "answerKey")
    id_field = "id"

    def __init__(self, name: str, subset: str, description: str):
        self.name, self.description = name, description
        self.sources = (HubSource("allenai/ai2_arc", subset), HubSource("ai2_arc", subset))

    def process(self, row: dict) -> dict:
        labels = [str(x) for x in row["choices"]["label"]]
        return {
            "question": row["question"],
            "choices": list(row["choices"]["text"]),
            "gold": labels.index(str(row["answerKey"]).strip()),
        }

    def doc_to_text(self, doc: dict) -> str:
        return f"Question: {doc['question']}\nAnswer:"

    def doc_to_choices(self, doc: dict) -> list[str]:
        return doc["choices"]


def hellaswag_clean(text: str) -> str:
    """lm-eval's HellaSwag clean-up of WikiHow artefacts: ' [title]' -> '. ', bracketed tags dropped."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


class HellaSwag(HubMultipleChoice):
    name = "hellaswag"
    description = "HellaSwag: pick the plausible ending of an everyday scene (4-way, validation split)"
    sources = (HubSource("Rowan/hellaswag"), HubSource("hellaswag"))
    split = "validation"
    columns = ("activity_label", "ctx_a", "ctx_b", "endings", "label")
    id_field = "ind"

    def process(self, row: dict) -> dict:
        ctx = row["ctx_a"] + " " + row["ctx_b"].capitalize()
        return {
            "query": hellaswag_clean(row["activity_label"] + ": " + ctx),
            "choices": [hellaswag_clean(e) for e in row["endings"]],
            "gold": int(row["label"]),
        }

    def doc_to_text(self, doc: dict) -> str:
        return doc["query"]

    def doc_to_choices(self, doc: dict) -> list[str]:
        return doc["choices"]


class BoolQ(HubMultipleChoice):
    name = "boolq"
    description = "BoolQ (SuperGLUE): answer a yes/no question about a Wikipedia passage (validation split)"
    sources = (HubSource("aps/super_glue", "boolq"), HubSource("super_glue", "boolq"))
    split = "validation"
    columns = ("passage", "question", "label")
    id_field = "idx"
    reported = ("acc",)

    def process(self, row: dict) -> dict:
        gold = int(row["label"])
        if gold not in (0, 1):
            raise ValueError(f"label {gold} is not 0 (no) or 1 (yes)")
        return {"passage": row["passage"], "question": row["question"], "gold": gold}

    def doc_to_text(self, doc: dict) -> str:
        return f"{doc['passage']}\nQuestion: {doc['question']}?\nAnswer:"

    def doc_to_choices(self, doc: dict) -> list[str]:
        return ["no", "yes"]


class Winogrande(HubMultipleChoice):
    """Partial evaluation, as lm-eval does it: the context is the sentence up to the blank filled with each
    option, the continuation is the shared rest of the sentence; the option whose context makes that rest
    most likely wins."""

    name = "winogrande"
    description = "WinoGrande (xl): fill the blank with the right one of two names, scored by partial evaluation"
    sources = (HubSource("allenai/winogrande", "winogrande_xl"), HubSource("winogrande", "winogrande_xl"))
    split = "validation"
    columns = ("sentence", "option1", "option2", "answer")
    reported = ("acc",)

    def process(self, row: dict) -> dict:
        sentence = row["sentence"]
        blank = sentence.index("_")
        return {
            "contexts": [sentence[:blank] + row["option1"], sentence[:blank] + row["option2"]],
            "suffix": sentence[blank + 1 :].strip(),
            "gold": {"1": 0, "2": 1}[str(row["answer"]).strip()],
        }

    def doc_to_text(self, doc: dict) -> str:
        return doc["contexts"][doc["gold"]]

    def doc_to_choices(self, doc: dict) -> list[str]:
        return doc["contexts"]

    def requests(self, doc: dict) -> list[tuple[str, str]]:
        return [(c, " " + doc["suffix"]) for c in doc["contexts"]]


def parse_logiqa_txt(path: Path) -> list[dict]:
    """The original LogiQA release (Train/Eval/Test.txt): blank-line separated records of an answer letter,
    the passage, the question and four 'A.'-prefixed options; text normalised as the hub copy is."""
    text = read_text(path).strip()
    if not text:
        raise DataError(f"data file {path} is empty; write the LogiQA records into it")

    def norm(s: str) -> str:
        return s.replace(".", ". ").strip()

    rows = []
    for i, record in enumerate(r for r in re.split(r"\n\s*\n", text) if r.strip()):
        lines = record.strip().split("\n")
        if len(lines) < 4:
            raise DataError(
                f"{path}: record {i} has {len(lines)} lines; LogiQA records have label, passage, question and options"
            )
        rows.append(
            {
                "label": lines[0].strip(),
                "context": norm(lines[1]),
                "question": norm(lines[2]),
                "options": [norm(o[2:]) for o in lines[3:]],
            }
        )
    return rows


class LogiQA(HubMultipleChoice):
    name = "logiqa"
    description = "LogiQA: logical reasoning over a passage, 4 options (test split)"
    sources = (HubSource("EleutherAI/logiqa", "logiqa"),)
    split = "test"
    columns = ("label", "context", "question", "options")
    extra_formats = (".txt",)

    def read_file(self, path: Path) -> list[dict]:
        return parse_logiqa_txt(path) if path.suffix == ".txt" else read_local(path)

    def process(self, row: dict) -> dict:
        options = list(row["options"])
        return {
            "context": row["context"],
            "question": row["question"],
            "options": options,
            "gold": "abcd".index(str(row["label"]).strip().lower()),
        }

    def doc_to_text(self, doc: dict) -> str:
        lines = [f"Passage: {doc['context']}", f"Question: {doc['question']}", "Choices:"]
        lines += [f"{letter}. {option}" for letter, option in zip("ABCD", doc["options"])]
        return "\n".join(lines) + "\nAnswer:"

    def doc_to_choices(self, doc: dict) -> list[str]:
        return doc["options"]


class PIQA(HubMultipleChoice):
    name = "piqa"
    description = "PIQA: choose the physically sensible of two solutions to a goal (validation split)"
    sources = (HubSource("baber/piqa"), HubSource("ybisk/piqa"), HubSource("piqa"))
    split = "validation"
    columns = ("goal", "sol1", "sol2", "label")

    def process(self, row: dict) -> dict:
        gold = int(row["label"])
        if gold not in (0, 1):
            raise ValueError(f"label {gold} is not 0 or 1")
        return {"goal": row["goal"], "choices": [row["sol1"], row["sol2"]], "gold": gold}

    def doc_to_text(self, doc: dict) -> str:
        return f"Question: {doc['goal']}\nAnswer:"

    def doc_to_choices(self, doc: dict) -> list[str]:
        return doc["choices"]


arc_easy = Arc("arc_easy", "ARC-Easy", "ARC-Easy: grade-school science questions, 3-5 options (test split)")
arc_challenge = Arc(
    "arc_challenge", "ARC-Challenge", "ARC-Challenge: the harder grade-school science questions (test split)"
)
hellaswag = HellaSwag()
boolq = BoolQ()
winogrande = Winogrande()
logiqa = LogiQA()
piqa = PIQA()

HUB_TASKS = {
    "arc_easy": "budgetlm.data.tasks.hub:arc_easy",
    "arc_challenge": "budgetlm.data.tasks.hub:arc_challenge",
    "hellaswag": "budgetlm.data.tasks.hub:hellaswag",
    "boolq": "budgetlm.data.tasks.hub:boolq",
    "winogrande": "budgetlm.data.tasks.hub:winogrande",
    "logiqa": "budgetlm.data.tasks.hub:logiqa",
    "piqa": "budgetlm.data.tasks.hub:piqa",
    "gsm8k": "budgetlm.data.tasks.reasoning:gsm8k",
    "gsm_symbolic": "budgetlm.data.tasks.gsm_symbolic:gsm_symbolic",
    "triviaqa": "budgetlm.data.tasks.openqa:triviaqa",
    "nq_open": "budgetlm.data.tasks.openqa:nq_open",
}


def register_hub_tasks(registry) -> None:
    """Add the benchmark tasks to a task registry as lazy entries (nothing is imported until used)."""
    for name, target in HUB_TASKS.items():
        registry.add(name, target)
