from __future__ import annotations

import hashlib

import pytest
import torch

from budgetlm.data import corpus
from budgetlm.errors import DataError, UnknownNameError


def test_split_is_disjoint_complete_and_follows_the_sha256_rule():
    from pydoc_data.topics import topics

    split = corpus.split_topics()
    cal, held = set(split["calibration"]), set(split["heldout"])
    assert not cal & held
    assert cal | held == set(topics)
    # independent re-derivation of the documented rule
    total = sum(len(t) for t in topics.values())
    expect, used = [], 0
    for name in sorted(topics, key=lambda n: hashlib.sha256(n.encode()).hexdigest()):
        if used + len(topics[name]) <= 0.2 * total:
            expect.append(name)
            used += len(topics[name])
    assert list(split["heldout"]) == expect
    frac = len(corpus.heldout_text()) / (len(corpus.heldout_text()) + len(corpus.calibration_text()))
    assert 0.15 < frac <= 0.2


def test_texts_come_from_their_split():
    from pydoc_data.topics import topics

    held = corpus.heldout_text()
    for name in corpus.split_topics()["calibration"]:
        assert topics[name].strip()[:200] not in held


def test_unknown_split_names_choices():
    with pytest.raises(UnknownNameError, match="heldout"):
        corpus.passages("held")


def test_sentences_keep_abbreviations_and_split_at_capitals():
    text = 'Use a list, e.g. "x". It works. The end? Yes!'
    assert corpus.sentences(text) == ['Use a list, e.g. "x".', "It works.", "The end?", "Yes!"]


def test_unwrap_joins_hyphenated_words():
    runs = corpus.prose_runs("Unlike normal assignments, the left-\nhand side comes first.\n\n   code = 1\n")
    assert runs == [["Unlike normal assignments, the left-hand side comes first."]]


def test_passages_are_prose_of_bounded_length_from_heldout_topics():
    ps = corpus.passages("heldout", 200, 800)
    assert len(ps) > 30
    ids = [i for i, _ in ps]
    assert len(set(ids)) == len(ids)
    held = set(corpus.split_topics()["heldout"])
    for pid, text in ps:
        assert pid.split("/")[0] in held
        assert 200 <= len(text) <= 800
        assert ">>>" not in text and "::=" not in text and "+---" not in text and "\n" not in text
        assert text[-1] in ".!?\"')"


def test_chunks_cover_heldout_and_respect_max_chars():
    ch = corpus.chunks("heldout", 1200)
    assert len({i for i, _ in ch}) == len(ch)
    body = "".join(t for _, t in ch).replace("\n", "").replace(" ", "")
    assert body == corpus.heldout_text().replace("\n", "").replace(" ", "")
    long_lines = max(len(line) for _, t in ch for line in t.split("\n"))
    assert all(len(t) <= max(1200, long_lines) for _, t in ch)


def test_calibration_batches_are_seeded_windows_of_the_calibration_stream():
    from budgetlm.models.sources import load

    tok = load("tiny-random").tokenizer
    a = corpus.calibration_batches(tok, n_samples=4, seq_len=64, seed=1)
    b = corpus.calibration_batches(tok, n_samples=4, seq_len=64, seed=1)
    c = corpus.calibration_batches(tok, n_samples=4, seq_len=64, seed=2)
    assert a.shape == (4, 64) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    stream = []
    for _, text in corpus.topic_texts("calibration"):
        stream += tok(text + "\n\n", add_special_tokens=False)["input_ids"]
    s = torch.tensor(stream, dtype=torch.int32).numpy().tobytes()
    for row in a:
        pos = s.find(row.to(torch.int32).numpy().tobytes())
        assert pos >= 0 and pos % 4 == 0


def test_calibration_batches_too_long_seq_len():
    from budgetlm.models.sources import load

    with pytest.raises(DataError, match="seq_len"):
        corpus.calibration_batches(load("tiny-random").tokenizer, 1, 10**8)


def test_load_text_file(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("hello world\n", encoding="utf-8")
    assert corpus.load_text_file(f) == "hello world\n"
    with pytest.raises(DataError, match="not found") as e:
        corpus.load_text_file(tmp_path / "missing.txt")
    assert "\n" not in str(e.value) and "missing.txt" in str(e.value)
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(DataError, match="empty"):
        corpus.load_text_file(tmp_path / "empty.txt")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00abc")
    with pytest.raises(DataError, match="UTF-8"):
        corpus.load_text_file(tmp_path / "bin.txt")
