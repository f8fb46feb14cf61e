"""MMLU as lm-evaluation-harness 0.4.13 defines it (tasks/mmlu/default): 57 subjects `mmlu_<subject>`, four
category groups (`mmlu_stem`, `mmlu_humanities`, `mmlu_social_sciences`, `mmlu_other`) and the `mmlu` group.

Prompt of one test question, 5-shot (run with lm-eval's --num_fewshot 5; its sampler `first_n` takes the
subject's dev rows in order, the same five for every question):

    The following are multiple choice questions (with answers) about <subject, "_" as spaces>.\\n\\n
    <shot question, stripped>\\nA. <choice>\\nB. ...\\nD. <choice>\\nAnswer: <gold letter>\\n\\n   (x5)
    <question, stripped>\\nA. <choice>\\nB. ...\\nD. <choice>\\nAnswer:

scored by the loglikelihood of " A" ... " D"; acc only. A group's acc is lm-eval's `weight_by_size: True`
aggregate: each subject's acc weighted by its number of items, which is the mean over all the group's items (and
the nested mmlu -> category -> subject weighting comes to the same); the `mmlu` group also reports each category's
acc (acc_stem, ...) over its items. A --limit sample of a group is stratified by subject, so each subject keeps its
share of the items.

Rows come in the hub's schema (question, subject, choices, answer: 0-3) from cais/mmlu (lm-eval's) or
hails/mmlu_no_train (the bundled copy: dev, validation and test per subject), through hub.load_rows.
"""

from __future__ import annotations

import functools
import re

from budgetlm.data.tasks.base import Item, TaskContext, TaskData, TaskResult, aggregate, means
from budgetlm.data.tasks.hub import HubMultipleChoice, HubSource, load_rows, make_items
from budgetlm.errors import DataError

CATEGORIES = ("stem", "humanities", "social_sciences", "other")
_BY_CATEGORY = {
    "stem": "abstract_algebra anatomy astronomy college_biology college_chemistry college_computer_science "
    "college_mathematics college_physics computer_security conceptual_physics electrical_engineering "
    "elementary_mathematics high_school_biology high_school_chemistry high_school_computer_science "
    "high_school_mathematics high_school_physics high_school_statistics machine_learning",
    "humanities": "formal_logic high_school_european_history high_school_us_history high_school_world_history "
    "international_law jurisprudence logical_fallacies moral_disputes moral_scenarios philosophy prehistory "
    "professional_law world_religions",
    "social_sciences": "econometrics high_school_geography high_school_government_and_politics "
    "high_school_macroeconomics high_school_microeconomics high_school_psychology human_sexuality "
    "professional_psychology public_relations security_studies sociology us_foreign_policy",
    "other": "business_ethics clinical_knowledge college_medicine global_facts human_aging management marketing "
    "medical_genetics miscellaneous nutrition professional_accounting professional_medicine virology",
}
SUBJECTS: dict[str, str] = {s: c for c, names in _BY_CATEGORY.items() for s in names.split()}  # subject -> category
LETTERS = ("A", "B", "C", "D")


class _MMLUPrompt(HubMultipleChoice):
    """lm-eval's MMLU prompt and scoring for a doc that carries its subject and its shots."""

    split = "test"
    train_split = "validation"  # fine-tuning reads the validation split (the test split is evaluated, dev gives shots)
    fewshot_split = "dev"
    num_fewshot = 5
    columns = ("question", "choices", "answer")
    reported = ("acc",)

    def process(self, row: dict) -> dict:
        choices = list(row["choices"])
        if len(choices) != len(LETTERS):
            raise ValueError(f"{len(choices)} choices; MMLU questions have four")
        answer = row["answer"]
        gold = LETTERS.index(answer.strip()) if isinstance(answer, str) else int(answer)
        if gold not in range(len(LETTERS)):
            raise ValueError(f"answer {answer!r} is not 0-3 (or A-D)")
        return {"question": row["question"], "choices": choices, "gold": gold}

    def doc_to_text(self, doc: dict) -> str:
        head = f"The following are multiple choice questions (with answers) about {doc['subject'].replace('_', ' ')}."
        shots = "".join(f"{question_text(q)} {LETTERS[q['gold']]}\n\n" for q in doc.get("fewshot", []))
        return f"{head}\n\n{shots}{question_text(doc)}"

    def doc_to_choices(self, doc: dict) -> list[str]:
        return list(LETTERS)


def question_text(doc: dict) -> str:
    """lm-eval's doc_to_text of one question: the question stripped, the four lettered choices, "Answer:"."""
    lines = [doc["question"].strip()] + [f"{letter}. {c}" for letter, c in zip(LETTERS, doc["choices"])]
    return "\n".join(lines) + "\nAnswer:"


class MMLUSubject(_MMLUPrompt):
    def __init__(self, subject: str):
        self.subject, self.category = subject, SUBJECTS[subject]
        self.name = f"mmlu_{subject}"
        self.description = (
            f"MMLU {subject.replace('_', ' ')} ({self.category.replace('_', ' ')}): 4 lettered options, "
            "5-shot from dev (test split)"
        )
        self.sources = (HubSource("cais/mmlu", subject), HubSource("hails/mmlu_no_train", subject))

    def process(self, row: dict) -> dict:
        return {"subject": self.subject, **super().process(row)}

    def load(self, ctx: TaskContext) -> TaskData:
        rows, where = load_rows(self, ctx, self.split)
        items = make_items(self, rows, where)
        shots, shots_where = self.fewshot(ctx, where)
        for it in items:
            it.doc["fewshot"] = shots  # the same list for every question of the subject
        return TaskData(items, f"{where}; {len(shots)}-shot from {shots_where} (its first {len(shots)} rows)")

    def fewshot(self, ctx: TaskContext, where: str) -> tuple[list[dict], str]:
        """The first num_fewshot rows of the dev split, from beside the test split (the same local folder when
        the test split is a local file)."""
        local = where.startswith("local")
        try:
            rows, shots_where = load_rows(self, ctx, self.fewshot_split, local_only=local)
        except DataError as e:
            beside = f"no {self.name}/{self.fewshot_split}.jsonl beside {where.removeprefix('local ')}" if local else e
            raise DataError(
                f"task '{self.name}' takes its {self.num_fewshot} shots from the {self.fewshot_split} split: {beside}; "
                f"add the subject's {self.fewshot_split} rows in the hub's schema"
            ) from None
        if len(rows) < self.num_fewshot:
            raise DataError(
                f"task '{self.name}': {shots_where} has {len(rows)} rows; the {self.num_fewshot}-shot prompt needs "
                f"{self.num_fewshot}"
            )
        shots = [self.process(r) for r in rows[: self.num_fewshot]]
        return shots, shots_where.removeprefix("local ").removeprefix("hub ")


@functools.cache
def subject_task(subject: str) -> MMLUSubject:
    return MMLUSubject(subject)


class MMLUGroup(_MMLUPrompt):
    """Subjects scored together; acc is the mean over all their items (lm-eval's size-weighted group mean)."""

    def __init__(self, name: str, subjects: list[str], description: str):
        self.name, self.subjects, self.description = name, subjects, description

    def load(self, ctx: TaskContext) -> TaskData:
        items: list[Item] = []
        sources: dict[str, list[str]] = {}
        for subject in self.subjects:
            data = subject_task(subject).load(ctx)
            items += [Item(id=f"{subject}/{it.id}", doc=it.doc, label=subject) for it in data.items]
            pattern = re.sub(r"\b[\d,]+ items\b", "<n> items", data.source.replace(subject, "<subject>"))
            sources.setdefault(pattern, []).append(subject)
        origin = "; ".join(
            p if len(s) == len(self.subjects) else f"{p} ({len(s)} subjects)" for p, s in sources.items()
        )
        return TaskData(items, f"{len(self.subjects)} subjects, {len(items):,} items; each: {origin}")

    def run(self, lm, items: list[Item], ctx: TaskContext) -> TaskResult:
        records = super().run(lm, items, ctx).records
        for it, rec in zip(items, records):
            category = SUBJECTS[it.doc["subject"]]
            rec["subject"] = it.doc["subject"]
            if self.name == "mmlu":
                rec[f"acc_{category}"] = rec["acc"]
        present = {k: v for k, v in self.aggregations().items() if any(k in r for r in records)}
        return TaskResult(aggregate(records, present), records)

    def aggregations(self):
        return means(["acc"] + ([f"acc_{c}" for c in CATEGORIES] if self.name == "mmlu" else []))


mmlu = MMLUGroup("mmlu", list(SUBJECTS), "MMLU: 57 subjects, 5-shot from dev, acc over all test items (14,042)")
_GROUPS = {
    f"mmlu_{c}": MMLUGroup(
        f"mmlu_{c}",
        [s for s, cat in SUBJECTS.items() if cat == c],
        f"MMLU {c.replace('_', ' ')}: its {sum(cat == c for cat in SUBJECTS.values())} subjects together, 5-shot",
    )
    for c in CATEGORIES
}


def __getattr__(name: str):
    """mmlu_<subject> and mmlu_<category> as module attributes, for the registry's lazy entries."""
    if name in _GROUPS:
        return _GROUPS[name]
    if name.startswith("mmlu_") and name[5:] in SUBJECTS:
        return subject_task(name[5:])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def register_mmlu_tasks(registry) -> None:
    """The group, its four categories and the 57 subjects as lazy entries; `mmlu_` names form a family, so an
    unknown one is an unknown MMLU subject with the closest names."""
    registry.add("mmlu", "budgetlm.data.tasks.mmlu:mmlu")
    for name in [*_GROUPS, *(f"mmlu_{s}" for s in SUBJECTS)]:
        registry.add(name, f"budgetlm.data.tasks.mmlu:{name}")
    registry.add_family("mmlu_", "MMLU subject")
