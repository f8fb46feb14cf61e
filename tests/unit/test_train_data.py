"""Training data through the task layer: label masks cover exactly the answer tokens, prompts are the ones the
harness scores, chat formatting for instruct models, corpus windows, the seeded resumable data order, and the
one-line errors. Hub tasks read fixture files written here (rows invented for the test); nothing reaches the
network."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from budgetlm.data.tasks.base import TaskContext
from budgetlm.data.tasks.offline import arith
from budgetlm.errors import ConfigError, DataError
from budgetlm.models.sources import tiny_tokenizer
from budgetlm.train.config import DataConfig
from budgetlm.train.data import IGNORE, DataOrder, Example, arith_pairs, build_data, collate, encode_pair

CHAT = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


pytestmark = pytest.mark.usefixtures("offline_datasets")


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def arith_data(tok):
    return build_data(tok, DataConfig(task="arith", limit=12), max_len=512, seed=0)


def split_example(tok, ex: Example) -> tuple[str, str]:
    """(text of the unlabelled tokens, text of the labelled tokens); the labelled ones must be one suffix."""
    first = next(i for i, lab in enumerate(ex.labels) if lab != IGNORE)
    assert all(lab == IGNORE for lab in ex.labels[:first])
    assert ex.labels[first:] == ex.input_ids[first:]
    return tok.decode(ex.input_ids[:first]), tok.decode(ex.input_ids[first:])


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def test_arith_labels_cover_exactly_the_answer(tok, arith_data):
    pairs, _ = arith_pairs("train", 12, 0, 0)
    assert len(arith_data.examples) == 12
    for (prompt, answer), ex in zip(pairs, arith_data.examples):
        prompt_text, answer_text = split_example(tok, ex)
        assert prompt_text == prompt  # the harness's prompt: few-shot example, "Q: ...\nA:"
        assert prompt.startswith("Q: What is 7 + 5?") and prompt.endswith("\nA:")
        assert answer_text == answer + "</s>"  # no chat template: EOS closes the answer
        number = answer.rsplit("Answer: ", 1)[1]
        expr = answer.split(" = ")[0].strip()
        assert eval(expr) == int(number)  # the target is the right answer (2-term + and - only)


def test_arith_training_set_avoids_the_evaluation_set():
    pairs, where = arith_pairs("train", 200, 0, 0)
    evaluated = {arith.doc_to_text(it.doc) for it in arith.load(TaskContext(seed=0)).items}
    assert len(pairs) == 200 and not {p for p, _ in pairs} & evaluated
    assert "excluded" in where


def test_collate_pads_with_ignored_labels(tok, arith_data):
    exs = arith_data.examples[:3]
    batch = collate(exs, pad_id=tok.pad_token_id)
    for r, ex in enumerate(exs):
        n = len(ex.input_ids)
        assert batch["input_ids"][r, :n].tolist() == ex.input_ids
        assert batch["labels"][r, :n].tolist() == ex.labels
        assert (batch["labels"][r, n:] == IGNORE).all() and (batch["input_ids"][r, n:] == tok.pad_token_id).all()
        assert batch["attention_mask"][r].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)


def test_truncation_keeps_the_answer_and_cuts_the_prompt_from_the_left(tok):
    ex = encode_pair(tok, "abcdefghij", " XYZ", max_len=7)
    assert tok.decode(ex.input_ids) == "hij XYZ"
    assert ex.labels == [IGNORE] * 3 + tok(" XYZ")["input_ids"]
    long = encode_pair(tok, "ab", " " + "x" * 20, max_len=6)  # an answer longer than max_len keeps 1 prompt token
    assert tok.decode(long.input_ids) == "b xxxx" and long.labels[0] == IGNORE


def test_chat_template_for_generation_tasks(monkeypatch, arith_data):
    tok = tiny_tokenizer()
    tok.chat_template = CHAT
    data = build_data(tok, DataConfig(task="arith", limit=12), max_len=512, seed=0)
    pairs, _ = arith_pairs("train", 12, 0, 0)
    assert data.source.endswith("chat template")
    for (prompt, answer), ex in zip(pairs, data.examples):
        prompt_text, answer_text = split_example(tok, ex)
        assert prompt_text == f"<|user|>{prompt}<|end|><|assistant|>"  # what the harness feeds (chat=True)
        assert answer_text == answer.strip() + "<|end|>"  # the end-of-turn marker, no EOS
    plain = build_data(tok, DataConfig(task="arith", limit=12, chat=False), max_len=512, seed=0)
    assert [e.input_ids for e in plain.examples] == [e.input_ids for e in arith_data.examples]


ARC = [
    {
        "id": f"q{i}",
        "question": f"Which one is number {i}?",
        "choices": {"text": [f"alpha {i}", f"beta {i}", f"gamma {i}"], "label": ["A", "B", "C"]},
        "answerKey": "ABC"[i % 3],
    }
    for i in range(6)
]


def test_hub_multiple_choice_train_split_from_data_dir(tmp_path):
    tok = tiny_tokenizer()
    tok.chat_template = CHAT  # multiple choice is scored without the template, so trained without it too
    write_jsonl(tmp_path / "arc_easy" / "train.jsonl", ARC)
    cfg = DataConfig(task="arc_easy", split="train", data_dir=str(tmp_path))  # unset: ARC trains on validation
    data = build_data(tok, cfg, max_len=256, seed=0)
    assert data.source == f"local {tmp_path / 'arc_easy' / 'train.jsonl'}"
    got = sorted(split_example(tok, ex) for ex in data.examples)
    want = sorted(
        (f"Question: {r['question']}\nAnswer:", " " + r["choices"]["text"]["ABC".index(r["answerKey"])]) for r in ARC
    )
    assert got == want
    few = build_data(tok, cfg.model_copy(update={"limit": 3}), max_len=256, seed=0)
    assert len(few.examples) == 3


def test_gsm8k_train_split_zero_shot_with_worked_answer(tmp_path):
    tok = tiny_tokenizer()
    rows = [{"question": f"What is {i} + {i}?", "answer": f"{i} + {i} = {2 * i}\n#### {2 * i}"} for i in range(4)]
    write_jsonl(tmp_path / "gsm8k" / "train.jsonl", rows)
    data = build_data(tok, DataConfig(task="gsm8k", data_dir=str(tmp_path)), max_len=256, seed=0)
    got = sorted(split_example(tok, ex) for ex in data.examples)
    assert got == sorted((f"Question: {r['question']}\nAnswer:", f" {r['answer']}</s>") for r in rows)


def test_corpus_windows_train_on_every_token(tok):
    from budgetlm.data.corpus import calibration_tokens

    stream = calibration_tokens(tok)
    data = build_data(tok, DataConfig(task="corpus"), max_len=64, seed=0)
    assert len(data.examples) == len(stream) // 64
    assert data.examples[5].input_ids == stream[5 * 64 : 6 * 64] == data.examples[5].labels
    few = build_data(tok, DataConfig(task="corpus", limit=4), max_len=64, seed=1)
    assert len(few.examples) == 4 and all(any(f.input_ids == e.input_ids for e in data.examples) for f in few.examples)


def test_data_order_is_a_seeded_permutation_per_epoch():
    order = DataOrder(7, seed=3)
    stream = order.take(0, 21)
    for e in range(3):
        assert sorted(stream[7 * e : 7 * e + 7]) == list(range(7))
    assert stream[:7] != stream[7:14]  # a new shuffle each epoch
    assert DataOrder(7, seed=3).take(9, 5) == stream[9:14]  # any position, from a fresh instance
    assert DataOrder(7, seed=4).take(0, 7) != stream[:7]


def test_errors(tok, tmp_path):
    with pytest.raises(ConfigError, match="text-ppl.*no training split"):
        build_data(tok, DataConfig(task="text-ppl"), 64, 0)
    with pytest.raises(ConfigError, match="arith.*split 'train'"):
        build_data(tok, DataConfig(task="arith", split="test"), 64, 0)
    with pytest.raises(ConfigError, match="no chat template"):
        build_data(tok, DataConfig(task="arith", chat=True, limit=2), 64, 0)
    with pytest.raises(ConfigError, match="corpus.*calibration"):
        build_data(tok, DataConfig(task="corpus", split="heldout"), 64, 0)
    with pytest.raises(ValidationError, match="unknown task 'arithh' \\(did you mean: arith"):
        DataConfig(task="arithh")  # the config itself refuses it, before any run folder is written
    with pytest.raises(DataError, match="logiqa"):  # nothing local, not bundled, nothing cached, hub offline
        build_data(tok, DataConfig(task="logiqa", data_dir=str(tmp_path)), 64, 0)
    with pytest.raises(DataError, match="no training examples"):
        DataOrder(0, 0)
