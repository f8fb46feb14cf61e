"""`fidelity`: how closely a compressed model's generations follow the base model's on fixed prompts.

The base model's greedy generations are the references. `write_reference` stores them as JSON in
`<reference path>.json` (the suffix is appended to the given path's name); `run` generates with the model
under test and scores each generation against the reference with ROUGE-L F1 and BERTScore F1 (computed
with the bundled MiniLM encoder, see data/tasks/scorers.py), and counts identical generations.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from budgetlm.data.tasks.base import (
    Item,
    Task,
    TaskContext,
    TaskData,
    TaskResult,
    aggregate,
    means,
    reference_file,
)
from budgetlm.data.tasks.scorers import BERTSCORE_BACKBONE, bertscore, rouge_l
from budgetlm.errors import DataError
from budgetlm.utils import atomic_write_text

REFERENCE_FORMAT = "budgetlm.fidelity/1"

PROMPTS = [
    # explain
    "Explain in two sentences why the sky is blue.",
    "Explain what a hash table is to a beginner programmer.",
    "Why do we have seasons on Earth? Answer briefly.",
    "Explain the difference between weather and climate.",
    "What is photosynthesis? Explain it simply.",
    "Explain what inflation means in economics.",
    "How does a vaccine help the body fight disease?",
    "Explain recursion with a short example.",
    # list
    "List five fruits that are rich in vitamin C.",
    "Give three tips for getting better sleep.",
    "Name four planets of the solar system and one fact about each.",
    "List three advantages of riding a bicycle to work.",
    "What are the primary colors? List them.",
    "Give me a short packing list for a weekend camping trip.",
    # summarise / rewrite
    "Summarise in one sentence: The meeting was moved from Monday to Wednesday because the manager was "
    "travelling, and everyone must bring the quarterly report.",
    "Summarise: Water boils at 100 degrees Celsius at sea level, but at higher altitudes the air pressure is "
    "lower, so water boils at a lower temperature.",
    "Rewrite this sentence in a formal tone: hey, can u send me the file asap?",
    "Summarise the story of Cinderella in three sentences.",
    "Turn this into a polite request: Close the door.",
    # short code
    "Write a Python function that returns the square of a number.",
    "Write a Python function that checks whether a string is a palindrome.",
    "Write a SQL query that selects all rows from a table named users.",
    "Write a Python loop that prints the numbers from 1 to 5.",
    "How do I reverse a list in Python?",
    # facts
    "What is the capital of France?",
    "Who wrote the play Romeo and Juliet?",
    "How many days are there in a leap year?",
    "What is the boiling point of water in Fahrenheit?",
    "What is the largest ocean on Earth?",
    # creative / advice
    "Write a two-line poem about the sea.",
    "Suggest a name for a small coffee shop and explain the choice.",
    "Give a friendly reply to a colleague who thanked you for your help.",
]


def _ref_file(path) -> Path:
    return reference_file(path, ".json")


class Fidelity(Task):
    name = "fidelity"
    kind = "generate"
    description = "generations on 32 fixed prompts vs the base model's: ROUGE-L and BERTScore (MiniLM)"
    needs_reference = True
    max_gen_toks = 64

    def load(self, ctx: TaskContext) -> TaskData:
        items = [Item(f"prompt-{i:02d}", {"prompt": p}) for i, p in enumerate(PROMPTS)]
        return TaskData(items, f"{len(PROMPTS)} fixed prompts written for budgetlm; references = base model greedy")

    def _generate(self, lm, items: list[Item]) -> list[str]:
        from budgetlm.models.lm import GenArgs

        args = GenArgs(until=[], max_gen_toks=self.max_gen_toks, chat=True)
        return lm.generate_until([(it.doc["prompt"], args) for it in items])

    def write_reference(self, lm, items: list[Item], path) -> None:
        """Store the base model's greedy generation for each item as JSON {"format", "generations": {id: text}}."""
        gens = self._generate(lm, items)
        generations = {it.id: g for it, g in zip(items, gens)}
        data = {"format": REFERENCE_FORMAT, "max_gen_toks": self.max_gen_toks, "generations": generations}
        atomic_write_text(_ref_file(path), json.dumps(data, indent=1, ensure_ascii=False))

    def _read_reference(self, path, items: list[Item]) -> list[str]:
        file = _ref_file(path)
        if not file.is_file():
            raise DataError(f"fidelity reference {file} not found; evaluate the base model first to write it")
        data = json.loads(file.read_text(encoding="utf-8"))
        if data.get("format") != REFERENCE_FORMAT or data.get("max_gen_toks") != self.max_gen_toks:
            raise DataError(f"fidelity reference {file} is of another format or length; delete it to rewrite it")
        missing = [it.id for it in items if it.id not in data["generations"]]
        if missing:
            raise DataError(f"fidelity reference {file} has no item {missing[0]!r}; delete it to rewrite it")
        return [data["generations"][it.id] for it in items]

    def run(self, lm, items: list[Item], ctx: TaskContext) -> TaskResult:
        ref_path = ctx.extra.get("reference")
        if ref_path is None:
            if not ctx.is_base:
                raise DataError("fidelity needs the base model's reference (ctx.extra['reference']); run it in a study")
            with tempfile.TemporaryDirectory(prefix="budgetlm-ref-") as tmp:
                self.write_reference(lm, items, Path(tmp) / "fidelity")
                refs = self._read_reference(Path(tmp) / "fidelity", items)
        else:
            refs = self._read_reference(ref_path, items)
        # the base model's greedy generations are the reference itself: generating them again would only
        # measure batching noise and double the base cell's slowest task
        gens = refs if ctx.is_base else self._generate(lm, items)
        rouge = rouge_l(gens, refs)
        bert = bertscore(gens, refs)
        records = []
        for it, g, ref, rl, bs in zip(items, gens, refs, rouge, bert):
            rec = {"id": it.id, "rouge_l": rl, "bertscore_f1_minilm": bs["f"], "bertscore_p": bs["p"]}
            rec |= {"bertscore_r": bs["r"], "identical": float(g == ref), "generation": g, "reference": ref}
            records.append(rec)
        metrics = aggregate(records, self.aggregations())
        metrics["bertscore_f1_minilm"].extra["backbone"] = BERTSCORE_BACKBONE
        metrics["rouge_l"].extra["variant"] = "ROUGE-L F1, rouge-score tokenizer, no stemming"
        return TaskResult(metrics, records)

    def aggregations(self):
        return means(["rouge_l", "bertscore_f1_minilm", "identical"])


fidelity = Fidelity()
