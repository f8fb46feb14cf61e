"""Retrieval (rag/): the encoder against sentence-transformers, documents and chunking, the index (bitwise round trip,
numpy vs faiss, BM25 fusion, another encoder refused), the gates (gradient vs finite differences, entropy, calibration,
determinism) and compression (budget, order, choice)."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch

from budgetlm.errors import ConfigError, DataError
from budgetlm.models import encoder
from budgetlm.rag import gates
from budgetlm.rag.compress import compress
from budgetlm.rag.docs import chunk_text, read_documents, sentences
from budgetlm.rag.index import build_index, load_index, numpy_topk, save_index

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TEXTS = [
    "The sun is a star. It is very hot. Its light takes eight minutes to reach the Earth.",
    "Water boils at 100 degrees Celsius at sea level. Ice melts at zero degrees.",
    "Darwin proposed the theory of evolution by natural selection. He sailed on the Beagle.",
    "Mitochondria are the powerhouse of the cell. They make ATP.",
    "Plants make sugar from light, water and carbon dioxide. This is photosynthesis.",
]


@pytest.fixture(scope="module")
def index():
    return build_index([{"text": t, "source": f"doc {i}"} for i, t in enumerate(TEXTS)], chunk_tokens=16, bm25=True)


def test_embed_matches_sentence_transformers():
    from sentence_transformers import SentenceTransformer

    texts = ["A short one.", "A much longer sentence about the theory of evolution by natural selection. " * 3, "x"]
    st = SentenceTransformer(str(encoder.encoder_path()), device="cpu", local_files_only=True)
    want = st.encode(texts, normalize_embeddings=True, convert_to_numpy=True)
    got = encoder.embed(texts)
    assert got.dtype == np.float32 and got.shape == (3, 384)
    np.testing.assert_allclose(got, want, atol=2e-6)


def test_bertscore_and_retrieval_share_one_loader():
    from budgetlm.evaluation import scorers

    assert scorers.minilm is encoder.minilm


def test_chunks_respect_the_budget_and_keep_every_sentence():
    text = " ".join(TEXTS) + " " + " ".join(["word"] * 60) + "."
    chunks = chunk_text(text, 20)
    tok = encoder.minilm()[0]
    assert all(len(tok(c, add_special_tokens=False)["input_ids"]) <= 20 for c in chunks)
    assert " ".join(chunks).split() == text.split()  # in order, nothing lost, nothing added
    assert chunks[0] == "The sun is a star. It is very hot."  # whole sentences while they fit


def test_read_documents(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("First para.\n\nSecond para.\n\n\n", encoding="utf-8")
    (tmp_path / "d" / "b.md").write_text("# Title\n\nBody text.", encoding="utf-8")
    (tmp_path / "d" / "c.jsonl").write_text('{"text": "Row one.", "id": "r1"}\n\n{"text": "  "}\n', encoding="utf-8")
    (tmp_path / "d" / "bad.txt").write_bytes(b"caf\xe9 \xff")
    (tmp_path / "d" / "other.csv").write_text("a,b")
    docs = read_documents([str(tmp_path / "d")])
    assert [p["text"] for p in docs.passages] == ["First para.", "Second para.", "# Title", "Body text.", "Row one."]
    assert docs.passages[-1]["source"].endswith("c.jsonl r1")
    assert docs.skipped == [str(tmp_path / "d" / "bad.txt")] and docs.ignored == 1
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no .txt/.md/.markdown/.jsonl files"):
        read_documents([str(tmp_path / "empty")])
    (tmp_path / "only").mkdir()
    (tmp_path / "only" / "x.txt").write_bytes(b"\xff\xfe")
    with pytest.raises(DataError, match=r"hold no text \(1 files skipped: not UTF-8\)"):
        read_documents([str(tmp_path / "only")])
    with pytest.raises(DataError, match="bundled corpora: sciq-support, boolq-passages"):
        read_documents(["sciq-suport"])
    (tmp_path / "bad.jsonl").write_text('{"body": "x"}\n', encoding="utf-8")
    with pytest.raises(DataError, match='line 1 has no "text" field'):
        read_documents([str(tmp_path / "bad.jsonl")])


def test_index_round_trips_bitwise(index, tmp_path):
    save_index(index, tmp_path / "idx")
    back = load_index(tmp_path / "idx")
    assert back.vectors.tobytes() == index.vectors.tobytes()
    assert back.sentence_vectors.tobytes() == index.sentence_vectors.tobytes()
    assert back.passages == index.passages and back.manifest == index.manifest
    q = encoder.embed(["When does water boil?"])
    for a, b in zip(index.search(q, 3, "When does water boil?"), back.search(q, 3, "When does water boil?")):
        assert (a.id, a.score, a.text, a.sentences) == (b.id, b.score, b.text, b.sentences)
        assert a.sentence_vectors.tobytes() == b.sentence_vectors.tobytes()
    words = ["water", "boil", "sun"]
    assert np.array_equal(index.bm25.get_scores(words), back.bm25.get_scores(words))
    # each chunk's stored sentence vectors are the encoder's embeddings of its sentences
    hit = back.search(q, 1)[0]
    np.testing.assert_allclose(hit.sentence_vectors, encoder.embed(hit.sentences), atol=1e-6)
    assert hit.text.startswith("Water boils")


def test_index_from_another_encoder_is_refused(index, tmp_path):
    save_index(index, tmp_path / "idx")
    manifest = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    manifest["encoder"]["sha256"] = "0" * 64
    (tmp_path / "idx" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match="built with another encoder .* rebuild it with `budgetlm rag index"):
        load_index(tmp_path / "idx")


def test_numpy_and_faiss_search_agree(index):
    rng = np.random.default_rng(1)
    vecs = rng.standard_normal((500, 384)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    idx = build_index.__globals__["Index"]([{"text": str(i), "source": ""} for i in range(500)], vecs, {})
    queries = rng.standard_normal((4, 384)).astype(np.float32)
    s1, i1 = idx.dense(queries, 7, backend="numpy")
    s2, i2 = idx.dense(queries, 7, backend="faiss")
    want = np.argsort(-(queries.astype(np.float64) @ vecs.T.astype(np.float64)), axis=1)[:, :7]
    assert np.array_equal(i1, want) and np.array_equal(i2, want)
    np.testing.assert_allclose(s1, s2, atol=1e-5)
    s, i = numpy_topk(vecs[:3], queries, 5)  # k above the size: all of them, sorted
    assert i.shape == (4, 3) and (np.diff(s, axis=1) <= 0).all()


def test_hybrid_is_reciprocal_rank_fusion(index):
    question = "Who sailed on the Beagle?"
    q = encoder.embed([question])
    pool = len(index)
    _, dense = index.dense(q, pool)
    bm = index.bm25.get_scores(
        index.bm25.__class__.__module__
        and __import__("bm25s").tokenize([question], stopwords="en", show_progress=False, return_ids=False)[0]
    )
    fused = {}
    for ranking in (list(dense[0]), list(np.argsort(-bm, kind="stable"))):
        for rank, i in enumerate(ranking):
            fused[int(i)] = fused.get(int(i), 0) + 1 / (60 + rank + 1)
    want = sorted(fused, key=lambda i: (-fused[i], i))[:3]
    hits = index.search(q, 3, question)
    assert [h.id for h in hits] == want
    assert [h.score for h in hits] == pytest.approx([float(index.vectors[i] @ q[0]) for i in want], abs=1e-6)


# -- gates --------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    from budgetlm.models.sources import tiny_random

    return tiny_random(3)


def _rms_norm_in_float64(self, x):
    """LlamaRMSNorm without its cast to float32, so a float64 model computes in float64 throughout."""
    return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


def test_gradient_score_matches_finite_differences(tiny, monkeypatch):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    monkeypatch.setattr(LlamaRMSNorm, "forward", _rms_norm_in_float64)
    model = tiny.model.double()
    try:
        ids = tiny.tokenizer("Why is the sky blue?", add_special_tokens=False)["input_ids"]
        prefix = tiny.tokenizer.bos_token_id
        all_ids = torch.tensor([[prefix, *ids]])
        emb = model.get_input_embeddings()(all_ids).detach()
        score = gates.grad_score(model, prefix, ids)
        # the gradient, coordinate by coordinate on a few rows, and the directional derivative on random directions
        g = torch.zeros_like(emb)
        eps = 1e-6
        with torch.no_grad():
            for pos in (1, 5, len(ids)):
                for d in range(0, emb.shape[-1], 9):
                    e1, e2 = emb.clone(), emb.clone()
                    e1[0, pos, d] += eps
                    e2[0, pos, d] -= eps
                    g[0, pos, d] = (gates.lm_loss(model, prefix, ids, e1) - gates.lm_loss(model, prefix, ids, e2)) / (
                        2 * eps
                    )
        with torch.enable_grad():
            e = emb.clone().requires_grad_(True)
            (auto,) = torch.autograd.grad(gates.lm_loss(model, prefix, ids, e), e)
        mask = g != 0
        torch.testing.assert_close(auto[mask], g[mask], rtol=1e-5, atol=1e-8)
        gen = torch.Generator().manual_seed(0)
        for _ in range(3):
            v = torch.randn(emb.shape, generator=gen, dtype=emb.dtype)
            v[0, 0] = 0  # the prefix row is not the question's
            with torch.no_grad():
                fd = gates.lm_loss(model, prefix, ids, emb + eps * v) - gates.lm_loss(model, prefix, ids, emb - eps * v)
            assert float(fd / (2 * eps)) == pytest.approx(float((auto * v).sum()), rel=1e-5)
        assert score == pytest.approx(float(auto[0, 1:].norm()), rel=1e-9)
        assert float(auto[0, -1].abs().max()) == 0.0  # the last token predicts nothing the loss sees
    finally:
        model.float()


def test_gates_are_deterministic_and_entropy_is_the_next_token_entropy(tiny):
    from budgetlm.models.lm import HFLM

    lm = HFLM(tiny)
    ids = lm.encode("What do plants make from light?")
    assert gates.grad_score(lm.model, lm.prefix_token, ids) == gates.grad_score(lm.model, lm.prefix_token, ids)
    prompt = "\nQuestion: What do plants make from light?\nAnswer:"
    h = gates.entropy_score(lm, prompt)
    assert h == gates.entropy_score(lm, prompt)
    with torch.no_grad():
        logits = tiny.model(torch.tensor([lm.encode(prompt)])).logits[0, -1].double()
    p = torch.softmax(logits, -1)
    assert h == pytest.approx(float(-(p * p.log()).sum()), rel=1e-5)
    assert 0 < h <= math.log(len(p))
    assert gates.margin_score(np.array([0.9, 0.7, 0.1])) == pytest.approx(0.2)


def test_calibration_picks_the_most_accurate_threshold_with_fewest_retrievals():
    scores = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    without = [1, 1, 0, 0, 1, 0]
    with_ = [0, 1, 1, 1, 1, 1]
    c = gates.calibrate(scores, without, with_)
    # retrieving from 0.3 up: 1, 1, 1, 1, 1, 1 (the 0.2 item is right either way: 0.25 and 0.15 tie, fewer wins)
    assert (
        c["threshold"] == pytest.approx(0.25) and c["accuracy"] == 1.0 and c["retrieval_rate"] == pytest.approx(4 / 6)
    )
    assert (c["accuracy_never"], c["accuracy_always"]) == (0.5, 5 / 6)
    assert gates.calibrate([1, 2], [1, 1], [0, 0])["threshold"] == math.inf  # retrieval never helps: never
    assert gates.calibrate([1, 2], [0, 0], [1, 1])["threshold"] == -math.inf
    assert gates.decide("grad", 0.3, 0.25) and not gates.decide("grad", 0.2, 0.25)


# -- compression ----------------------------------------------------------------------------------------------------
def test_compression_respects_the_budget_and_keeps_order(tiny):
    tok = tiny.tokenizer  # byte-level: one token per byte, so the budgets bite

    def count(text: str) -> int:
        return len(tok(text, add_special_tokens=False)["input_ids"])

    q = encoder.embed(["How hot is the sun?"])[0]
    parts = [(sentences(t), None) for t in TEXTS]
    flat = [s for p, _ in parts for s in p]
    for budget in (1, 10, 20, 40, 80, 160, 10_000):
        c = compress(q, parts, budget, count)
        assert c.tokens == count(c.text) <= budget
        assert c.indices == sorted(c.indices) and c.kept == len(c.indices)  # original order
        assert c.text == " ".join(flat[i] for i in c.indices)
        # nothing left out would have fitted in the room left (greedy by similarity fills the budget)
        assert all(
            count(" ".join(flat[j] for j in sorted([*c.indices, i]))) > budget
            for i in range(len(flat))
            if i not in c.indices
        )
    assert compress(q, parts, 10_000, count).text == " ".join(flat)  # everything fits: all, in order
    # the most similar sentence that fits comes first
    sims = encoder.embed(flat) @ q
    best = flat[int(np.argmax(sims))]
    assert compress(q, parts, count(best), count).text == best


def test_compression_uses_the_given_sentence_vectors():
    parts = [(["alpha", "beta", "gamma"], np.eye(3, 384, dtype=np.float32))]
    q = np.zeros(384, dtype=np.float32)
    q[2], q[0] = 1.0, 0.5
    c = compress(q, parts, 11, len)  # "alpha gamma" is 11 characters: gamma first, then alpha, in original order
    assert (c.text, c.kept, c.total) == ("alpha gamma", 2, 3)


def test_a_querys_search_runs_blas_on_one_thread(monkeypatch):
    """A threaded BLAS call leaves spinning threads on the cores the model's next forward needs (rag/index.py)."""
    from threadpoolctl import threadpool_info, threadpool_limits

    from budgetlm.rag import index as index_mod

    seen = []
    real = np.ndarray.__matmul__

    class Probe(np.ndarray):
        def __matmul__(self, other):
            seen.append([i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"])
            return real(np.asarray(self), other)

    vecs = np.eye(4, dtype=np.float32)
    q = np.array([[0.1, 0.9, 0.0, 0.2]], dtype=np.float32).view(Probe)
    with threadpool_limits(limits=2, user_api="blas"):  # whatever OMP/OPENBLAS_NUM_THREADS the run was given
        scores, ids = index_mod.numpy_topk(vecs, q, 2)
        after = [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]
    assert ids.tolist() == [[1, 3]] and seen and all(n == 1 for n in seen[0]) and seen[0]
    assert after and all(n == 2 for n in after)  # the caller's setting again once the search is done
