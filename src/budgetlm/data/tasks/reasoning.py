"""GSM8K as lm-evaluation-harness's `gsm8k` task defines it: 5-shot "Question: ...\\nAnswer: ..." prompts
(the shots' full worked answers from the train split), greedy generation until "Question:", and two
answer extractions scored by exact match:

- strict-match: the first "#### N" in the generation;
- flexible-extract: the last number-like span in the generation.

Both the extracted answer and the reference (the text after "####") are normalised as lm-eval's metric
does: commas and dollar signs removed, a trailing period removed, case ignored.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

from budgetlm.data.tasks.base import GenerateTask, Item, TaskContext, TaskData
from budgetlm.data.tasks.hub import HubSource, load_rows, make_items, read_local
from budgetlm.errors import DataError

STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
IGNORE = (r",", r"\$", r"(?s).*#### ", r"\.$")  # applied in this order to prediction and reference
INVALID = "[invalid]"


def extract(pattern: re.Pattern, text: str, which: int) -> str:
    """The `which`-th match of the pattern (the first non-empty group when it has several), stripped."""
    found = pattern.findall(text)
    if not found:
        return INVALID
    match = found[which]
    if isinstance(match, tuple):
        match = next(g for g in match if g)
    return match.strip()


def normalise(text: str) -> str:
    for pattern in IGNORE:
        text = re.sub(pattern, "", text)
    return text.lower()


def score_generation(generation: str, reference: str) -> dict:
    strict = extract(STRICT, generation, 0)
    flexible = extract(FLEXIBLE, generation, -1)
    target = normalise(reference)
    return {
        "exact_match_strict": float(normalise(strict) == target),
        "exact_match_flexible": float(normalise(flexible) == target),
        "answer_strict": strict,
        "answer_flexible": flexible,
        "target": target,
    }


class GSM8K(GenerateTask):
    chat = False  # lm-eval's default: the few-shot prompt as it is, no chat template
    name = "gsm8k"
    description = "GSM8K: grade-school math word problems, 5-shot, exact match of the final number (strict/flexible)"
    sources = (HubSource("openai/gsm8k", "main"), HubSource("gsm8k", "main"))
    split = "test"
    fewshot_split = "train"
    columns = ("question", "answer")
    id_field = None
    extra_formats: tuple[str, ...] = ()
    lm_eval_split: str | None = None  # lm-eval's gsm8k evaluates test too
    train_split = "train"  # not bundled: --data-dir, the datasets cache or the hub
    num_fewshot = 5
    fewshot_seed = 1234  # the shots of an item depend on this seed and the item's id only
    until = ("Question:", "</s>", "<|im_end|>")
    max_gen_toks = 256
    metric_names = ("exact_match_strict", "exact_match_flexible")

    def read_file(self, path: Path) -> list[dict]:
        return read_local(path)

    def process(self, row: dict) -> dict:
        question, answer = row["question"], row["answer"]
        if not isinstance(question, str) or not isinstance(answer, str):
            raise TypeError("question and answer must be text")
        return {"question": question, "answer": answer}

    def load(self, ctx: TaskContext) -> TaskData:
        rows, where = load_rows(self, ctx, self.split)
        items = make_items(self, rows, where)
        if self.num_fewshot <= 0:
            return TaskData(items, where)
        pool, pool_where = self._fewshot_pool(ctx, where, rows)
        for it in items:
            it.doc["fewshot"] = self._pick_shots(it, pool)
        k = min(len(it.doc["fewshot"]) for it in items) if items else 0
        return TaskData(items, f"{where}; {k}-shot from {pool_where}, seed {self.fewshot_seed}")

    def _fewshot_pool(self, ctx: TaskContext, where: str, rows: list[dict]) -> tuple[list[dict], str]:
        """The train split from where the test split came from: offline (a --data-dir file or the bundled package,
        which has no gsm8k train split) or the hub (its cache or itself); else the test split."""
        try:
            offline = not where.startswith("hub ")
            pool, pool_where = load_rows(self, ctx, self.fewshot_split, offline_only=offline)
        except DataError:
            return rows, "the test split itself (no train split found; an item is never its own shot)"
        return pool, pool_where.removeprefix("local ").removeprefix("hub ")

    def _pick_shots(self, item: Item, pool: list[dict]) -> list[tuple[str, str]]:
        rng = random.Random(f"{self.fewshot_seed}:{item.id}")
        picked = rng.sample(range(len(pool)), min(self.num_fewshot + 1, len(pool)))
        shots = [pool[i] for i in picked if pool[i]["question"] != item.doc["question"]][: self.num_fewshot]
        return [(s["question"], s["answer"]) for s in shots]

    def doc_to_text(self, doc: dict) -> str:
        shots = "".join(f"Question: {q}\nAnswer: {a}\n\n" for q, a in doc.get("fewshot", []))
        return f"{shots}Question: {doc['question']}\nAnswer:"

    def score(self, doc: dict, generation: str) -> dict:
        return score_generation(generation, doc["answer"])


gsm8k = GSM8K()
