"""Train and eval folds: deterministic, disjoint, complete, independent of order and of the other items; training
on a task's train fold and evaluating `<task>:eval-fold` never share an item; every way of scoring trained items
(train eval_tasks, a recipe, `eval` of a fine-tuned model) is refused with one line. Fixture rows are invented
here and read through --data-dir; nothing reaches the network."""

from __future__ import annotations

import hashlib
import json

import pytest
from pydantic import ValidationError

from budgetlm.data.tasks import tasks
from budgetlm.data.tasks.base import Item, TaskContext
from budgetlm.data.tasks.contamination import check, trained_on
from budgetlm.data.tasks.folds import EVAL_FOLD, FOLD_SEED, TRAIN_FOLD, fold_items, in_eval_fold, overlap
from budgetlm.errors import ConfigError, UnknownNameError
from budgetlm.models.sources import tiny_tokenizer
from budgetlm.train.config import DataConfig, TrainConfig
from budgetlm.train.data import build_data, check_data

pytestmark = pytest.mark.usefixtures("offline_datasets")


def items(n: int) -> list[Item]:
    return [Item(id=str(i), doc={"goal": f"goal number {i}", "choices": ["a", "b"], "gold": i % 2}) for i in range(n)]


def test_fold_rule_is_pinned():
    """The rule, written out here: eval iff the first 8 bytes of sha256("0\\0task\\0<doc as sorted JSON>") < 20% of
    2^64. Changing it would move items between folds of runs already made."""
    for it in items(200):
        content = json.dumps(it.doc, sort_keys=True)
        digest = hashlib.sha256(f"{FOLD_SEED}\0piqa\0{content}".encode()).digest()
        assert in_eval_fold("piqa", it.doc) == (int.from_bytes(digest[:8], "big") < 0.2 * 2**64)


def test_folds_are_disjoint_complete_deterministic_and_order_free():
    all_items = items(5000)
    train, train_note = fold_items("piqa", all_items, TRAIN_FOLD)
    evals, eval_note = fold_items("piqa", all_items, EVAL_FOLD)
    ids_t, ids_e = {it.id for it in train}, {it.id for it in evals}
    assert not ids_t & ids_e and ids_t | ids_e == {it.id for it in all_items}
    assert 0.18 < len(evals) / 5000 < 0.22  # 20% by hash: 1,000 expected, sd 28
    assert eval_note == (
        f"eval-fold: {len(evals):,} of the 5,000 items (20% by a sha256 of each item, fold seed 0; "
        "disjoint from the train-fold)"
    )
    assert train_note.startswith(f"train-fold: {len(train):,} of the 5,000 items (80% by")
    assert fold_items("piqa", all_items, EVAL_FOLD)[0] == evals  # the same every time
    assert {it.id for it in fold_items("piqa", all_items[::-1], EVAL_FOLD)[0]} == ids_e  # any order
    some = all_items[1000:1500]  # any subset: each item keeps its fold
    assert {it.id for it in fold_items("piqa", some, EVAL_FOLD)[0]} == ids_e & {it.id for it in some}
    assert {it.id for it in fold_items("hellaswag", all_items, EVAL_FOLD)[0]} != ids_e  # the task is in the hash
    with_shots = [Item(it.id, {**it.doc, "fewshot": [("q", "a")]}) for it in all_items[:300]]
    assert [in_eval_fold("piqa", it.doc) for it in with_shots] == [
        in_eval_fold("piqa", it.doc) for it in all_items[:300]
    ]


PIQA_ROWS = [{"goal": f"How do I do thing {i}?", "sol1": f"way one {i}", "sol2": f"way two {i}", "label": i % 2}
             for i in range(120)]  # fmt: skip


def write_piqa(tmp_path):
    path = tmp_path / "piqa" / "validation.jsonl"
    path.parent.mkdir(parents=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in PIQA_ROWS))
    return path


def test_training_reads_the_train_fold_and_eval_fold_the_rest(tmp_path):
    path = write_piqa(tmp_path)
    tok = tiny_tokenizer()
    data = build_data(tok, DataConfig(task="piqa", data_dir=str(tmp_path)), max_len=128, seed=0)
    ev = tasks.get("piqa:eval-fold").load(TaskContext(data_dir=tmp_path))
    assert data.source.startswith(f"local {path}; train-fold: {len(data.examples)} of the 120 items (80%")
    assert ev.source.startswith(f"local {path}; eval-fold: {len(ev.items)} of the 120 items (20%")
    trained = {tok.decode(ex.input_ids) for ex in data.examples}
    goals_trained = {g for g in (r["goal"] for r in PIQA_ROWS) if any(f"Question: {g}\n" in t for t in trained)}
    goals_eval = {it.doc["goal"] for it in ev.items}
    assert len(data.examples) + len(ev.items) == 120 and goals_trained | goals_eval == {r["goal"] for r in PIQA_ROWS}
    assert not goals_trained & goals_eval
    task = tasks.get("piqa:eval-fold")
    assert task.name == "piqa:eval-fold" and task.kind == "multiple_choice"
    assert task.requests(ev.items[0].doc) == tasks.get("piqa").requests(ev.items[0].doc)


def test_names_and_splits_that_do_not_fit():
    assert "piqa:eval-fold" in tasks and "arc_easy:eval-fold" not in tasks and "piqa:test" not in tasks
    with pytest.raises(UnknownNameError, match="arc_easy has no eval fold .* evaluate 'arc_easy'"):
        tasks.get("arc_easy:eval-fold")
    with pytest.raises(UnknownNameError, match="the only option after a task's name is ':eval-fold'"):
        tasks.get("piqa:eval")
    with pytest.raises(UnknownNameError, match="text-ppl has no eval fold .*no train source"):
        tasks.get("text-ppl:eval-fold")
    with pytest.raises(ValidationError, match="train on 'boolq' .* 'boolq:eval-fold' names an evaluation"):
        DataConfig(task="boolq:eval-fold")
    with pytest.raises(ConfigError, match="task 'arc_easy' has no folds"):
        check_data(DataConfig(task="arc_easy", split=TRAIN_FOLD))
    check_data(DataConfig(task="boolq", split=TRAIN_FOLD))


@pytest.mark.parametrize(
    "train, split, evaluate, refused",
    [
        ("boolq", None, "boolq", True),  # train fold vs all of validation
        ("boolq", TRAIN_FOLD, "boolq", True),
        ("boolq", None, "boolq:eval-fold", False),
        ("boolq", "validation", "boolq:eval-fold", True),  # all of validation, then its eval fold
        ("boolq", EVAL_FOLD, "boolq:eval-fold", True),
        ("boolq", "train", "boolq", False),  # a real train split (--data-dir or hub)
        ("arc_easy", None, "arc_easy", False),  # validation vs test
        ("arc_easy", "test", "arc_easy", True),
        ("boolq", None, "piqa", False),
        ("arith", None, "arith", False),  # arith's training problems exclude its evaluation set
    ],
)
def test_overlap_rule(train, split, evaluate, refused):
    assert (overlap(train, split, evaluate) is not None) == refused


def test_refused_in_train_config_recipe_and_eval():
    with pytest.raises(ConfigError) as e:
        TrainConfig(data={"task": "boolq"}, eval_tasks=["boolq"])
    assert str(e.value).startswith("train: training on boolq reads")
    assert "training on boolq reads its train-fold (validation) and evaluating boolq scores all of its validation " in (
        str(e.value)
    )
    assert "evaluate 'boolq:eval-fold' instead" in str(e.value)
    TrainConfig(data={"task": "boolq"}, eval_tasks=["boolq:eval-fold"])

    from budgetlm.experiments.recipe import parse_recipe

    recipe = {"models": ["tiny-random"], "tasks": ["boolq"], "bench": {"enabled": False}}
    recipe["pipelines"] = {"lora": [{"method": "lora", "r": 2, "train": {"steps": 1, "data": {"task": "boolq"}}}]}
    with pytest.raises(ConfigError, match=r"recipe: pipelines.lora: training on boolq reads its train-fold"):
        parse_recipe(recipe)
    parse_recipe({**recipe, "tasks": ["boolq:eval-fold"]})

    # a model's provenance (eval reads it through the same check; the corpus runs `budgetlm eval` on such a model)
    provenance = [{"method": "lora", "config": recipe["pipelines"]["lora"][0]}]
    assert trained_on(provenance) == [("boolq", None)]
    with pytest.raises(ConfigError, match="^eval: training on boolq reads"):
        check(trained_on(provenance), ["text-ppl", "boolq"], "eval", "unused: the reason names its fix")
    check(trained_on(provenance), ["boolq:eval-fold"], "eval", "")
    run = [{"method": "train", "config": {"data": {"task": "arc_easy", "split": "test"}}}]
    with pytest.raises(ConfigError, match="train on its train source, the validation split"):
        check(trained_on(run), ["arc_easy"], "eval", "")
