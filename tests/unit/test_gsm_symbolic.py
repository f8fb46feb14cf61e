"""gsm_symbolic: reasoning-gym's generator behind gsm8k's prompt and extraction. The items are the generator's
(checked against reasoning-gym called directly), fresh per seed, labelled as generated; the shots come from
other templates; the prompt is gsm8k's format (a hand-written string); the score compares the extracted final
number, where reasoning-gym's own scorer reads the first number; training pairs never hold an evaluation item.
"""

from __future__ import annotations

import pytest

from budgetlm.data.tasks.base import Item, TaskContext
from budgetlm.data.tasks.gsm_symbolic import SUFFIX, generate, gsm_symbolic, training_pairs, worked_answer


@pytest.fixture(scope="module")
def seed0():
    return gsm_symbolic.load(TaskContext(seed=0))


def test_items_are_the_generators(seed0):
    import reasoning_gym

    ds = reasoning_gym.create_dataset("gsm_symbolic", size=1200, seed=0)
    assert len(seed0.items) == 1000
    for it in seed0.items[:50] + seed0.items[-5:]:
        x = ds[int(it.id)]
        assert x["question"] == it.doc["question"] + SUFFIX  # the instruction reasoning-gym appends is dropped
        assert it.doc["answer"] == x["answer"]
        assert it.label == it.doc["template"] == ds.task_indices[int(it.id)]
    assert len({it.doc["question"] for it in seed0.items}) == 1000  # distinct questions
    assert seed0.source.startswith(
        "generated: reasoning_gym 0.1.25 gsm_symbolic (templates from GSM8K test questions), seed 0, 1,000 items; "
        "5-shot from seed 5000 (other templates), picked with seed 1234"
    )


def test_seeds_give_fresh_items_and_the_same_seed_the_same(seed0):
    again = gsm_symbolic.load(TaskContext(seed=0))
    assert [it.doc for it in again.items] == [it.doc for it in seed0.items]
    other = gsm_symbolic.load(TaskContext(seed=1))
    assert "seed 10000, 1,000 items" in other.source
    shared = {it.doc["question"] for it in seed0.items} & {it.doc["question"] for it in other.items}
    assert len(shared) <= 10  # other random draws; a few templates have few variants (3 recur here)


def test_shots_come_from_other_templates(seed0):
    pool = {d["question"]: d for d in generate(5000, 100)}
    for it in seed0.items:
        shots = [pool[q] for q, _ in it.doc["fewshot"]]  # every shot is a pool item ...
        assert [s["worked"] for s in shots] == [w for _, w in it.doc["fewshot"]]
        templates = [s["template"] for s in shots]  # ... of five templates, none the item's
        assert len(set(templates)) == 5 and it.doc["template"] not in templates


def test_prompt_is_gsm8k_format():
    doc = {
        "question": "Ann has 3 pens and buys 4. How many pens?",
        "fewshot": [("Bo has 2 cats. He gets 1 more. How many?", "2 + 1 = 3\n#### 3")],
    }
    assert gsm_symbolic.doc_to_text(doc) == (
        "Question: Bo has 2 cats. He gets 1 more. How many?\nAnswer: 2 + 1 = 3\n#### 3\n\n"
        "Question: Ann has 3 pens and buys 4. How many pens?\nAnswer:"
    )
    assert gsm_symbolic.until == ("Question:", "</s>", "<|im_end|>") and gsm_symbolic.max_gen_toks == 256


def test_worked_answer_ends_with_the_formatted_answer():
    assert worked_answer("3 * 2.5 = 7.5\n5 + 3 = 8.0\n#### 8.0", "8") == "3 * 2.5 = 7.5\n5 + 3 = 8.0\n#### 8"
    assert worked_answer("12 / 4 = 3", "3") == "12 / 4 = 3\n#### 3"


@pytest.mark.parametrize(
    "generation, answer, strict, flexible",
    [
        ("She has 5 apples and 7 pears, 5 + 7 = 12\n#### 12", "12", 1.0, 1.0),
        ("#### 8.0", "8", 1.0, 1.0),  # numbers compare as numbers (gsm8k compares strings)
        ("#### 1,234.", "1234", 1.0, 1.0),  # gsm8k's normalisation first: commas and a trailing period
        ("It costs $2.50 in all.", "2.5", 0.0, 1.0),  # no "####": strict misses, the last number is right
        ("#### 3\nThen 4 more.", "3", 1.0, 0.0),
        ("no number here", "7", 0.0, 0.0),
    ],
)
def test_score(generation, answer, strict, flexible):
    s = gsm_symbolic.score({"answer": answer}, generation)
    assert (s["exact_match_strict"], s["exact_match_flexible"]) == (strict, flexible)


def test_reasoning_gyms_scorer_would_read_the_first_number():
    import reasoning_gym

    ds = reasoning_gym.create_dataset("gsm_symbolic", size=1, seed=0)
    generation = f"First 2 things, then 3.\n#### {ds[0]['answer']}"
    assert ds.score_answer(generation, ds[0]) < 1  # why it is not used
    assert gsm_symbolic.score({"answer": ds[0]["answer"]}, generation)["exact_match_strict"] == 1.0


def test_run_scores_generations():
    class LM:
        def generate_until(self, reqs):
            assert all(args.chat is False for _, args in reqs)  # gsm8k's prompt as lm-eval runs it
            return ["#### 7", "#### 8"]

    items = [Item("0", {"question": "q", "answer": "7"}), Item("1", {"question": "r", "answer": "9"})]
    res = gsm_symbolic.run(LM(), items, TaskContext())
    assert res.metrics["exact_match_strict"].value == pytest.approx(0.5)
    assert [r["target"] for r in res.records] == ["7", "9"]


def test_training_pairs_exclude_the_evaluation_set(seed0):
    pairs, where = training_pairs(300, seed=0, eval_seed=0)
    assert len(pairs) == 300
    held_out = {it.doc["question"] for it in seed0.items}
    for prompt, answer in pairs:
        question = prompt.removeprefix("Question: ").removesuffix("\nAnswer:")
        assert prompt == f"Question: {question}\nAnswer:" and question not in held_out
        assert answer.startswith(" ") and "\n#### " in answer
    assert where == (
        "reasoning_gym 0.1.25 gsm_symbolic (templates from GSM8K test questions), seed 1000000007, 300 items "
        "(gsm_symbolic's eval set, seed 0, excluded)"
    )


def test_build_data_trains_on_it_and_only_on_its_train_split():
    from budgetlm.errors import ConfigError
    from budgetlm.models.sources import tiny_tokenizer
    from budgetlm.train.config import DataConfig
    from budgetlm.train.data import IGNORE, build_data, check_data

    tok = tiny_tokenizer()
    data = build_data(tok, DataConfig(task="gsm_symbolic", limit=4), max_len=512, seed=0)
    assert len(data.examples) == 4 and data.source.startswith("reasoning_gym 0.1.25 gsm_symbolic")
    pairs, _ = training_pairs(4, seed=0, eval_seed=0)
    first = data.examples[0]
    answer = [t for t, lab in zip(first.input_ids, first.labels) if lab != IGNORE]
    assert tok.decode(answer).strip() == (pairs[0][1] + tok.eos_token).strip()  # the worked answer, then EOS
    with pytest.raises(ConfigError) as e:
        check_data(DataConfig(task="gsm_symbolic", split="test"))
    assert str(e.value) == "data: task 'gsm_symbolic' generates its training problems; use split 'train' (got 'test')"
