from __future__ import annotations

import copy
import math
import os
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from budgetlm.data import corpus
from budgetlm.data.tasks.base import TaskContext
from budgetlm.data.tasks.fidelity import fidelity
from budgetlm.data.tasks.offline import (
    arith,
    extract_answer,
    kl_topk,
    numbers_equal,
    register_offline_tasks,
    text_cloze,
    text_ppl,
    top1_agree,
    topk_reference,
)
from budgetlm.errors import DataError
from budgetlm.registry import Registry
from budgetlm.results import ratio_stderr

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def tiny():
    from budgetlm.models.lm import HFLM
    from budgetlm.models.sources import load

    h = load("tiny-random")
    return h, HFLM(h)


def full_kl(logp_b: torch.Tensor, logp_m: torch.Tensor) -> torch.Tensor:
    return (logp_b.exp() * (logp_b - logp_m)).sum(-1)


# --- KL estimator -------------------------------------------------------------------------------------------


def test_topk_kl_is_a_lower_bound_and_tight_when_topk_holds_the_mass():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(64, 500, generator=g) * 4  # peaked: top-32 holds most of the mass
    model = base + 0.5 * torch.randn(64, 500, generator=g)
    lb, lm = F.log_softmax(base, -1), F.log_softmax(model, -1)
    exact = full_kl(lb, lm)
    ids, lp, tail = topk_reference(lb, 32)
    est = kl_topk(ids, lp, tail, lm)
    assert (est <= exact + 1e-5).all()
    assert est.sum() / exact.sum() > 0.9
    # k = vocab: no tail, the estimator is the full KL
    ids_v, lp_v, tail_v = topk_reference(lb, 500)
    assert torch.isneginf(tail_v).all()
    assert torch.allclose(kl_topk(ids_v, lp_v, tail_v, lm), exact, atol=1e-5)
    # flat distributions: still a lower bound, but loose
    flat_b, flat_m = F.log_softmax(torch.randn(8, 500, generator=g), -1), F.log_softmax(torch.randn(8, 500), -1)
    i2, l2, t2 = topk_reference(flat_b, 32)
    assert (kl_topk(i2, l2, t2, flat_m) <= full_kl(flat_b, flat_m) + 1e-5).all()


def test_topk_reference_tail_mass_and_agreement():
    lb = F.log_softmax(torch.tensor([[3.0, 1.0, 0.0, -1.0], [0.0, 2.0, 1.0, 0.5]]), -1)
    ids, lp, tail = topk_reference(lb, 2)
    assert ids.dtype == torch.int32 and ids.tolist() == [[0, 1], [1, 2]]
    assert torch.allclose(lp.exp().sum(-1) + tail.exp(), torch.ones(2), atol=1e-6)
    assert torch.allclose(kl_topk(ids, lp, tail, lb), torch.zeros(2), atol=1e-6)
    other = F.log_softmax(torch.tensor([[0.0, 3.0, 0.0, 0.0], [0.0, 2.0, 1.0, 0.5]]), -1)
    assert top1_agree(ids, other).tolist() == [0.0, 1.0]


def test_ratio_stderr_against_hand_values():
    r, se = ratio_stderr([2.0, 4.0, 9.0], [1.0, 2.0, 3.0])
    assert r == pytest.approx(15 / 6)
    resid = [2 - 2.5, 4 - 5.0, 9 - 7.5]
    assert se == pytest.approx(math.sqrt(sum(x * x for x in resid) / 6) / 2)
    assert math.isnan(ratio_stderr([1.0], [2.0])[1])


# --- text-ppl on the tiny model ------------------------------------------------------------------------------


def _items(n=3, max_bytes=1000):
    """Chunks that fit tiny-random's 1024-token context (its tokenizer is byte-level)."""
    return [it for it in text_ppl.load(TaskContext()).items if len(it.doc["text"].encode()) < max_bytes][:n]


def _independent_logp(model, tok, text):
    prefix = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    ids = torch.tensor([[prefix] + tok(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        return ids[0, 1:], F.log_softmax(model(ids).logits[0, :-1].float(), -1)


def test_text_ppl_base_model_against_independent_computation(tiny, tmp_path):
    h, lm = tiny
    items = _items()
    ref = tmp_path / "refs" / "text-ppl"
    text_ppl.write_reference(lm, items, ref)
    assert (tmp_path / "refs" / "text-ppl.safetensors").is_file()
    assert [p.name for p in (tmp_path / "refs").iterdir()] == ["text-ppl.safetensors"]  # no temp file left
    res = text_ppl.run(lm, items, TaskContext(is_base=True, extra={"reference": ref}))
    nll, toks = 0.0, 0
    for it, rec in zip(items, res.records):
        target, logp = _independent_logp(h.model, h.tokenizer, it.doc["text"])
        item_nll = -float(logp.gather(1, target[:, None]).sum())
        assert rec["nll"] == pytest.approx(item_nll, rel=1e-5) and rec["tokens"] == len(target)
        nll, toks = nll + item_nll, toks + len(target)
    m = res.metrics
    assert m["perplexity"].value == pytest.approx(math.exp(nll / toks), rel=1e-4)
    assert m["bits_per_byte"].value == pytest.approx(
        nll / math.log(2) / sum(len(it.doc["text"].encode()) for it in items), rel=1e-4
    )
    assert m["kld"].value == pytest.approx(0.0, abs=1e-5)
    assert m["top1_agreement"].value == 1.0
    assert m["kld"].extra["kld_estimator"] == "top-32 + tail mass (lower bound)"
    assert m["perplexity"].n == 3 and m["perplexity"].stderr > 0
    assert [r["id"] for r in res.records] == [it.id for it in items]
    assert sum(r["tokens"] for r in res.records) == toks
    # the base without a reference path computes it on the fly: same numbers
    res2 = text_ppl.run(lm, items, TaskContext(is_base=True))
    assert res2.metrics["perplexity"].value == pytest.approx(m["perplexity"].value, rel=1e-6)


def test_text_ppl_perturbed_model_kld_is_below_full_kl(tiny, tmp_path):
    from budgetlm.models.handle import ModelHandle
    from budgetlm.models.lm import HFLM

    h, lm = tiny
    items = _items(2)
    ref = tmp_path / "text-ppl"
    text_ppl.write_reference(lm, items, ref)
    model2 = copy.deepcopy(h.model)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model2.model.layers.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    lm2 = HFLM(ModelHandle(model2, h.tokenizer, "perturbed", base="tiny-random"))
    res = text_ppl.run(lm2, items, TaskContext(is_base=False, extra={"reference": ref}))
    kl_sum, agree, n = 0.0, 0.0, 0
    for it in items:
        _, lb = _independent_logp(h.model, h.tokenizer, it.doc["text"])
        _, lp = _independent_logp(model2, h.tokenizer, it.doc["text"])
        kl_sum += float(full_kl(lb, lp).sum())
        agree += float((lb.argmax(-1) == lp.argmax(-1)).sum())
        n += lb.shape[0]
    kld = res.metrics["kld"].value
    assert 0 < kld <= kl_sum / n + 1e-6
    assert res.metrics["top1_agreement"].value == pytest.approx(agree / n)
    assert res.metrics["top1_agreement"].value < 1.0


def test_text_ppl_truncates_long_chunks_to_the_context(tiny):
    h, lm = tiny
    long = [it for it in text_ppl.load(TaskContext()).items if len(it.doc["text"].encode()) > lm.max_length][:1]
    res = text_ppl.run(lm, long, TaskContext(is_base=True))
    rec = res.records[0]
    assert rec["tokens"] == lm.max_length - 1
    assert rec["bytes"] == lm.max_length - 1  # byte-level tokenizer: one token per byte, all ASCII here
    assert res.metrics["kld"].value == pytest.approx(0.0, abs=1e-5)


def test_text_ppl_reference_errors(tiny, tmp_path):
    _, lm = tiny
    items = _items(3)
    with pytest.raises(DataError, match="reference"):
        text_ppl.run(lm, items, TaskContext(is_base=False))
    with pytest.raises(DataError, match="not found"):
        text_ppl.run(lm, items, TaskContext(is_base=False, extra={"reference": tmp_path / "nope"}))
    text_ppl.write_reference(lm, items[:2], tmp_path / "r")
    with pytest.raises(DataError, match=items[2].id):
        text_ppl.run(lm, items, TaskContext(is_base=False, extra={"reference": tmp_path / "r"}))
    # a subset of the referenced items is fine
    res = text_ppl.run(lm, items[1:2], TaskContext(is_base=True, extra={"reference": tmp_path / "r"}))
    assert res.metrics["kld"].value == pytest.approx(0.0, abs=1e-5)


# --- text-cloze ---------------------------------------------------------------------------------------------


def test_cloze_items_deterministic_balanced_and_distractors_from_other_topics():
    a = text_cloze.load(TaskContext(seed=0))
    b = text_cloze.load(TaskContext(seed=0))
    c = text_cloze.load(TaskContext(seed=1))
    assert [(i.id, i.doc) for i in a.items] == [(i.id, i.doc) for i in b.items]
    assert [i.doc for i in a.items] != [i.doc for i in c.items]
    assert len(a.items) >= 100 and "heldout" in a.source
    counts = Counter(i.label for i in a.items)
    assert set(counts) == {0, 1, 2, 3} and max(counts.values()) - min(counts.values()) <= 1
    topic_sentences = {
        t: {s for run in corpus.prose_runs(text) for s in run} for t, text in corpus.topic_texts("heldout")
    }
    for it in a.items:
        doc = it.doc
        assert it.label == doc["gold"] and len(set(doc["choices"])) == 4
        topic, r, j = it.id.split("/")
        run = corpus.prose_runs(dict(corpus.topic_texts("heldout"))[topic])[int(r)]
        assert doc["choices"][doc["gold"]] == run[int(j)]
        assert doc["context"].endswith(run[int(j) - 1])
        for k, choice in enumerate(doc["choices"]):
            if k != doc["gold"]:
                assert choice not in topic_sentences[topic]
                assert 0.5 * len(run[int(j)]) <= len(choice) <= 2 * len(run[int(j)])


def test_cloze_runs_on_tiny_model(tiny):
    _, lm = tiny
    items = text_cloze.load(TaskContext()).items[:4]
    res = text_cloze.run(lm, items, TaskContext())
    assert res.metrics["acc"].n == 4 and set(res.metrics) == {"acc", "acc_norm"}
    assert all(len(r["loglikelihoods"]) == 4 for r in res.records)


# --- arith --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("Answer: 42", 42.0),
        ("7 + 5 = 12. Answer: -3", -3.0),
        ("the answer is 17, not 5", 17.0),
        ("... so it is -3.5.", -3.5),
        ("1,234", 1234.0),
        ("first 3, then 1,234,567.25 and 8", 8.0),
        ("Answer: 1,000 apples; later 7", 1000.0),
        ("no number here", None),
    ],
)
def test_extract_answer(text, value):
    assert extract_answer(text) == value


def test_numbers_equal():
    assert numbers_equal(3.0, 3.0) and numbers_equal(1e9 + 0.5, 1e9)
    assert not numbers_equal(None, 3.0) and not numbers_equal(2.0, 3.0)


def test_arith_items_are_seeded_and_scored():
    a, b = arith.load(TaskContext(seed=0)), arith.load(TaskContext(seed=0))
    assert [i.doc for i in a.items] == [i.doc for i in b.items]
    assert [i.doc for i in arith.load(TaskContext(seed=3)).items] != [i.doc for i in a.items]
    assert Counter(i.label for i in a.items) == {"basic_arithmetic": 100, "chain_sum": 100}
    assert "reasoning_gym 0.1.25" in a.source
    doc = a.items[0].doc
    ans = doc["answer"]
    assert arith.score(doc, f"x = 1. Answer: {ans}")["exact_match"] == 1.0
    assert arith.score(doc, f"{int(ans) + 1}")["exact_match"] == 0.0
    assert doc["question"] in arith.doc_to_text(doc) and arith.doc_to_text(doc).endswith("A:")


def test_arith_runs_on_tiny_model(tiny):
    _, lm = tiny
    items = arith.load(TaskContext()).items[:2]
    res = arith.run(lm, items, TaskContext())
    assert res.metrics["exact_match"].n == 2
    assert all("generation" in r for r in res.records)


# --- fidelity and registration ------------------------------------------------------------------------------


def test_fidelity_base_against_itself_and_reference_errors(tiny, tmp_path):
    _, lm = tiny
    assert len(fidelity.load(TaskContext()).items) == 32
    task = copy.copy(fidelity)
    task.max_gen_toks = 12  # keep the test fast
    items = task.load(TaskContext()).items[:3]
    ref = tmp_path / "fidelity"
    task.write_reference(lm, items, ref)
    assert (tmp_path / "fidelity.json").is_file()
    res = task.run(lm, items, TaskContext(is_base=True, extra={"reference": ref}))
    assert res.metrics["rouge_l"].value == 1.0 and res.metrics["identical"].value == 1.0
    assert res.metrics["bertscore_f1_minilm"].value == pytest.approx(1.0, abs=1e-4)
    assert "MiniLM" in res.metrics["bertscore_f1_minilm"].extra["backbone"]
    with pytest.raises(DataError, match="reference"):
        task.run(lm, items, TaskContext(is_base=False))
    task.write_reference(lm, items[:1], tmp_path / "small")
    with pytest.raises(DataError, match=items[1].id):
        task.run(lm, items, TaskContext(is_base=False, extra={"reference": tmp_path / "small"}))


def test_register_offline_tasks_is_lazy_and_resolves():
    reg: Registry = Registry("task")
    register_offline_tasks(reg)
    assert reg.names() == ["arith", "fidelity", "text-cloze", "text-ppl"]
    for name in reg.names():
        task = reg.get(name)
        assert task.name == name and task.kind and task.description
    assert reg.get("text-ppl").needs_reference and reg.get("fidelity").needs_reference
