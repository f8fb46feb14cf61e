"""`gsm_symbolic`: grade-school math word problems from reasoning-gym's GSM-Symbolic generator
(``reasoning_gym.create_dataset("gsm_symbolic", size, seed)``): templates made from GSM8K *test* questions
(GSM-Symbolic, Mirzadeh et al. 2024) that draw fresh names and numbers, each with a worked answer in GSM8K's
style ending "#### N". Labelled as generated, never as GSM8K: every source names the generator, its version
and the seed. Because the templates are GSM8K's test questions, a model trained on these items must not be
scored on gsm8k: data/tasks/contamination.py holds that rule and training, recipes and evaluation apply it.

Items: seed s (the evaluation's --seed) draws the generator with seed s * 10,000 and keeps the first 1,000
distinct questions. Each seed is a fresh set: the generator seeds item i with s * 10,000 + i, so two seeds never
share a random stream (a few templates have few variants: 2-3 of 1,000 questions recur between seeds 0 and 1-3).
An item's id is its generator index, its label (for stratified --limit samples) its template. The question drops
the instruction reasoning-gym appends (" Give the result as your final answer. Do not include units.") so that
it reads as a GSM8K question.

Prompt and scoring: budgetlm's gsm8k (lm-eval's `gsm8k`), so the two scores sit side by side under one prompt
format and one extraction, the comparison GSM-Symbolic was made for (lm-eval's 8-shot `gsm8k-cot` uses fixed
exemplars and "The answer is N." instead; not used here): 5-shot "Question: ...\\nAnswer: <worked answer>"
blocks, greedy until "Question:", at most 256 new tokens, the answer taken by strict-match (the first
"#### N") and by flexible-extract (the last number). The shots are generated items from another stream
(seed s * 10,000 + 5,000), picked per item with seed 1234, each from a different template than the item's
and than each other (a shot from the item's own template would show its solution with other numbers); their
final line is "#### <answer>" with reasoning-gym's formatted answer (its worked answers write "#### 8.0" for
some whole results). Differences from gsm8k: the extracted answer and the reference are compared as numbers
after gsm8k's normalisation (commas, "$" and a trailing "." removed), so "8.0" matches "8"; lm-eval's gsm8k
compares the strings. reasoning-gym's own scorer (the first number in the text) is not used.

Training (train/data.py, `data: gsm_symbolic`): fresh problems from seed 1,000,000,007 + 10,000 * train seed,
minus every question of the evaluation set of `eval_seed`, prompted 0-shot as gsm8k trains and answered with
the worked answer.
"""

from __future__ import annotations

import random
from importlib.metadata import version

from budgetlm.data.tasks.base import GenerateTask, Item, TaskContext, TaskData
from budgetlm.data.tasks.reasoning import FLEXIBLE, STRICT, extract, gsm8k, normalise
from budgetlm.errors import ConfigError

GENERATOR = "gsm_symbolic"
SUFFIX = " Give the result as your final answer. Do not include units."  # what reasoning-gym appends
EVAL_SIZE = 1000
POOL_SIZE = 100  # generated items the shots are drawn from
STRIDE = 10_000  # generator seeds per evaluation seed: the eval items, then the shot pool at +5,000
POOL_OFFSET = 5_000
TRAIN_BASE = 1_000_000_007  # training streams start far from every evaluation seed's


def worked_answer(cot: str, answer: str) -> str:
    """The worked answer with its last line written "#### <answer>" (the formatted final number)."""
    lines = cot.rstrip().split("\n")
    if lines and lines[-1].startswith("####"):
        lines = lines[:-1]
    return "\n".join([*lines, f"#### {answer}"])


def generate(seed: int, size: int) -> list[dict]:
    """The first `size` distinct questions of the generator seeded `seed`, as documents: question (without
    reasoning-gym's appended instruction), answer (its formatted final number), worked answer, template, index."""
    import reasoning_gym

    ds = reasoning_gym.create_dataset(GENERATOR, size=size + size // 10 + 10, seed=seed)
    docs, seen = [], set()
    for i in range(len(ds)):
        x = ds[i]
        question = x["question"].removesuffix(SUFFIX)
        if question in seen:
            continue
        seen.add(question)
        answer = str(x["answer"])
        docs.append(
            {
                "question": question,
                "answer": answer,
                "worked": worked_answer(x["metadata"]["answer_cot"], answer),
                "template": int(ds.task_indices[i]),
                "index": i,
            }
        )
        if len(docs) == size:
            break
    return docs


def same_number(extracted: str, reference: str) -> bool:
    """gsm8k's normalisation of both, then equal as numbers (equal as text when either is not a number)."""
    a, b = normalise(extracted), normalise(reference)
    try:
        return float(a) == float(b)
    except ValueError:
        return a == b


def source_label(seed: int, n: int) -> str:
    generator = f"reasoning_gym {version('reasoning_gym')} {GENERATOR} (templates from GSM8K test questions)"
    return f"generated: {generator}, seed {seed}, {n:,} items"


class GSMSymbolic(GenerateTask):
    chat = False  # gsm8k's prompt as lm-eval runs it: no chat template
    name = "gsm_symbolic"
    description = (
        "GSM-Symbolic: reasoning-gym's generated variants of GSM8K test questions (1,000 per seed), 5-shot like "
        "gsm8k, exact match (strict/flexible); training on it bars gsm8k"
    )
    num_fewshot = 5
    fewshot_seed = 1234
    until = gsm8k.until
    max_gen_toks = gsm8k.max_gen_toks
    metric_names = gsm8k.metric_names

    def load(self, ctx: TaskContext) -> TaskData:
        base = ctx.seed * STRIDE
        docs = generate(base, EVAL_SIZE)
        pool = generate(base + POOL_OFFSET, POOL_SIZE)
        items = [Item(f"{d['index']:04d}", d, label=d["template"]) for d in docs]
        for it in items:
            it.doc["fewshot"] = self.pick_shots(it, pool)
        shots = f"{self.num_fewshot}-shot from seed {base + POOL_OFFSET} (other templates)"
        shots += f", picked with seed {self.fewshot_seed}"
        return TaskData(items, f"{source_label(base, len(items))}; {shots}")

    def pick_shots(self, item: Item, pool: list[dict]) -> list[tuple[str, str]]:
        """num_fewshot pool items of distinct templates, none the item's, in a per-item seeded order."""
        order = list(range(len(pool)))
        random.Random(f"{self.fewshot_seed}:{item.id}").shuffle(order)
        shots, used = [], {item.doc["template"]}
        for i in order:
            if pool[i]["template"] not in used:
                used.add(pool[i]["template"])
                shots.append((pool[i]["question"], pool[i]["worked"]))
                if len(shots) == self.num_fewshot:
                    break
        return shots

    def doc_to_text(self, doc: dict) -> str:
        return gsm8k.doc_to_text(doc)

    def score(self, doc: dict, generation: str) -> dict:
        strict = extract(STRICT, generation, 0)
        flexible = extract(FLEXIBLE, generation, -1)
        return {
            "exact_match_strict": float(same_number(strict, doc["answer"])),
            "exact_match_flexible": float(same_number(flexible, doc["answer"])),
            "answer_strict": strict,
            "answer_flexible": flexible,
            "target": doc["answer"],
        }


def check_train_split(split: str | None) -> None:
    """Training problems are generated: the split is 'train' (or unset)."""
    if split not in (None, "train"):
        raise ConfigError(
            f"data: task '{GENERATOR}' generates its training problems; use split 'train' (got '{split}')"
        )


def training_pairs(limit: int | None, seed: int, eval_seed: int) -> tuple[list[tuple[str, str]], str]:
    """(prompt, worked answer) pairs of fresh problems, none in the evaluation set of `eval_seed`; prompts are
    0-shot "Question: ...\\nAnswer:", as gsm8k trains."""
    held_out = {d["question"] for d in generate(eval_seed * STRIDE, EVAL_SIZE)}
    n = limit or EVAL_SIZE
    base = TRAIN_BASE + seed * STRIDE
    docs = [d for d in generate(base, n + len(held_out)) if d["question"] not in held_out][:n]
    pairs = [(gsm8k.doc_to_text({"question": d["question"]}), " " + d["worked"]) for d in docs]
    label = source_label(base, len(pairs)).removeprefix("generated: ")
    return pairs, f"{label} ({GENERATOR}'s eval set, seed {eval_seed * STRIDE}, excluded)"


gsm_symbolic = GSMSymbolic()
