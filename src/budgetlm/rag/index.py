"""The retrieval index: passages chunked by sentences, embedded with the bundled MiniLM, searched exactly by inner
product (cosine: the embeddings are L2-normalised), optionally fused with BM25.

An index folder (written whole or not at all, utils.atomic_dir):
    manifest.json     format, version, encoder {name, sha256 of its weights}, chunk tokens, counts, sources
    passages.jsonl    one {"text", "source", "sentences": [[start, end], ...]} per chunk, row i = vector i
    vectors.faiss     faiss IndexFlatIP holding the float32 vectors (exact search)
    sentences.npy     float32 MiniLM embeddings of every chunk's sentences, in order: compression reads them
                      instead of running the encoder per query
    bm25/             bm25s' own files, with --bm25
Loading refuses, in one line, an index whose manifest names another encoder (another name or other weights).

Search: faiss's IndexFlatIP, or below NUMPY_BELOW vectors a numpy matrix-vector product and argpartition, which was
measured as fast there (benchmarks/bench_rag.py --crossover, one query, k = 5, loaded 2-core machine: numpy / faiss 0.08
/ 0.04 ms at 1,000 vectors, 2.1 / 2.5 ms at 10,000, 20 / 8 ms at 30,000, 172 / 79 ms at 300,000 on one thread; faiss on
two OpenMP threads was 2-3x *slower* than numpy from 10,000 up there, so faiss searches one query on one thread).
numpy's product runs on one BLAS thread (`one_blas_thread`: a threaded call's spinning threads slowed the model's next
forward by ~30%); so, idle machine: numpy / faiss 0.06-0.15 / 0.02-0.07 ms below 3,000 vectors, 1.4 / 1.2 ms at 10,000,
4.2 / 4.4 at 30,000, 13 / 14 at 100,000 (a query's encoding takes ~10 ms). Both are exact and return the same passages
(ties aside). Hybrid search (an index with BM25) fuses the dense and the BM25 rankings of the top candidates by
reciprocal rank fusion, score = sum 1 / (60 + rank) (Cormack et al., 2009); the scores it returns are still the dense
cosines of the passages it returns.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from budgetlm.errors import ConfigError, DataError

FORMAT = "budgetlm-rag-index"
VERSION = 1
MARKER = "manifest.json"
NUMPY_BELOW = 10_000  # vectors under which numpy's exact search is as fast as faiss's (bench_rag.py --crossover)
RRF_K = 60
DEFAULT_CHUNK_TOKENS = 128


@dataclass
class Hit:
    id: int
    score: float  # cosine similarity of passage and query
    text: str
    source: str
    sentences: list[str] = field(default_factory=list)
    sentence_vectors: np.ndarray | None = None


@dataclass
class Index:
    passages: list[dict]
    vectors: np.ndarray  # [n, 384] float32, L2-normalised rows
    manifest: dict
    sentence_vectors: np.ndarray | None = None  # [sum of sentences, 384]
    bm25: object | None = None
    path: Path | None = None
    _faiss: object | None = field(default=None, repr=False)
    _offsets: np.ndarray | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.passages)

    @property
    def label(self) -> str:
        """What results name the index by: its folder (or corpus) and size."""
        where = str(self.path) if self.path else self.manifest.get("name", "in memory")
        return f"{where} ({len(self):,} chunks of <= {self.manifest['chunk_tokens']} tokens, {self.manifest['kind']})"

    def faiss_index(self):
        if self._faiss is None:
            self._faiss = _flat_ip(self.vectors)
        return self._faiss

    def dense(self, queries: np.ndarray, k: int, backend: str = "auto") -> tuple[np.ndarray, np.ndarray]:
        """(scores [q, k], ids [q, k]) of the k passages of highest inner product per query row, best first."""
        queries = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, self.vectors.shape[1])
        k = min(k, len(self))
        if backend == "numpy" or (backend == "auto" and len(self) < NUMPY_BELOW):
            return numpy_topk(self.vectors, queries, k)
        import faiss

        faiss.omp_set_num_threads(1)  # one query: its threads only contend (measured above)
        scores, ids = self.faiss_index().search(queries, k)
        return scores, ids

    def search(self, query_vec: np.ndarray, k: int, query_text: str | None = None) -> list[Hit]:
        """The k best passages for one query (dense, or fused with BM25 when the index has it and the query text
        is given)."""
        if self.bm25 is None or query_text is None:
            scores, ids = self.dense(query_vec, k)
            return [self._hit(int(i), float(s)) for s, i in zip(scores[0], ids[0])]
        pool = max(50, 4 * k)
        _, dense_ids = self.dense(query_vec, pool)
        bm25_scores = self.bm25.get_scores(_bm25_tokens([query_text])[0])
        bm25_ids = np.argsort(-bm25_scores, kind="stable")[:pool]
        fused: dict[int, float] = {}
        for ranking in (dense_ids[0], bm25_ids):
            for rank, i in enumerate(ranking):
                fused[int(i)] = fused.get(int(i), 0.0) + 1.0 / (RRF_K + rank + 1)
        best = sorted(fused, key=lambda i: (-fused[i], i))[:k]
        cos = self.vectors[best] @ np.asarray(query_vec, dtype=np.float32).reshape(-1)
        return [self._hit(i, float(s)) for i, s in zip(best, cos)]

    def _hit(self, i: int, score: float) -> Hit:
        p = self.passages[i]
        spans = p.get("sentences", [])
        vecs = None
        if self.sentence_vectors is not None:
            if self._offsets is None:
                self._offsets = np.cumsum([0] + [len(q.get("sentences", [])) for q in self.passages])
            vecs = self.sentence_vectors[self._offsets[i] : self._offsets[i + 1]]
        return Hit(i, score, p["text"], p["source"], [p["text"][a:b] for a, b in spans], vecs)


_BLAS = None


def one_blas_thread():
    """A context in which numpy's BLAS runs on one thread. A threaded OpenBLAS call leaves its threads spinning for
    ~0.1 s after it returns, on the cores the model's next forward needs: after a search of 4,246 vectors on two
    threads the next 113-token forward of SmolLM2-135M took 224 ms instead of 174 (2 cores); one query's product is
    too small to gain from threads (0.10 ms on one thread)."""
    global _BLAS
    if _BLAS is None:
        from threadpoolctl import ThreadpoolController

        _BLAS = ThreadpoolController().select(user_api="blas")
    return _BLAS.limit(limits=1)


def numpy_topk(vectors: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    with one_blas_thread() if len(queries) <= 8 else contextlib.nullcontext():  # a batch of queries: threads pay
        scores = queries @ vectors.T
    part = (
        np.argpartition(-scores, k - 1, axis=1)[:, :k]
        if k < scores.shape[1]
        else np.tile(np.arange(scores.shape[1]), (len(scores), 1))
    )
    top = np.take_along_axis(scores, part, axis=1)
    order = np.argsort(-top, axis=1, kind="stable")
    return np.take_along_axis(top, order, axis=1), np.take_along_axis(part, order, axis=1).astype(np.int64)


def _flat_ip(vectors: np.ndarray):
    import faiss

    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    return index


def _bm25_tokens(texts: list[str]) -> list[list[str]]:
    import bm25s

    return bm25s.tokenize(texts, stopwords="en", show_progress=False, return_ids=False)


# -- building, saving, loading -----------------------------------------------------------------------------------
def build_index(
    passages: list[dict],
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    bm25: bool = False,
    sources: list[str] | None = None,
    progress: bool = False,
    name: str = "",
) -> Index:
    """Chunk every passage to at most `chunk_tokens` encoder wordpieces (by sentences), drop exact duplicate chunks
    (the first one kept), embed them and index them."""
    from budgetlm.models import encoder
    from budgetlm.progress import Progress
    from budgetlm.rag.docs import chunk_text

    if not 8 <= chunk_tokens <= encoder.MAX_TOKENS - 2:
        raise ConfigError(f"--chunk-tokens must be 8-{encoder.MAX_TOKENS - 2} (the encoder reads 256 tokens)")
    from budgetlm.rag.docs import sentence_spans

    chunks, seen, duplicates = [], set(), 0
    with Progress("rag index", len(passages), enabled=progress, throttled=True) as bar:
        bar.status("chunking")
        for p in passages:
            for text in chunk_text(p["text"], chunk_tokens):
                if text in seen:
                    duplicates += 1
                    continue
                seen.add(text)
                spans = [list(span) for span in sentence_spans(text)]
                chunks.append({"text": text, "source": p["source"], "sentences": spans})
        vectors = _embed_all([c["text"] for c in chunks], "chunks", bar)
        sentence_vectors = _embed_all([c["text"][a:b] for c in chunks for a, b in c["sentences"]], "sentences", bar)
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "name": name,
            "encoder": encoder.identity(),
            "dim": encoder.DIM,
            "chunk_tokens": chunk_tokens,
            "passages_read": len(passages),
            "chunks": len(chunks),
            "sentences": len(sentence_vectors),
            "duplicate_chunks_dropped": duplicates,
            "kind": "dense + bm25 (reciprocal rank fusion)" if bm25 else "dense",
            "sources": sources or [],
        }
        retriever = None
        if bm25:
            import bm25s

            bar.status("BM25")
            retriever = bm25s.BM25()
            retriever.index(
                bm25s.tokenize([c["text"] for c in chunks], stopwords="en", show_progress=False), show_progress=False
            )
    return Index(chunks, vectors, manifest, sentence_vectors, retriever)


def _embed_all(texts: list[str], what: str, bar, step: int = 256) -> np.ndarray:
    from budgetlm.models import encoder

    out = np.zeros((len(texts), encoder.DIM), dtype=np.float32)
    for start in range(0, len(texts), step):
        bar.status(f"embedding {what} {start:,}-{min(start + step, len(texts)):,} of {len(texts):,}")
        out[start : start + step] = encoder.embed(texts[start : start + step])
    return out


def save_index(index: Index, out: Path, force: bool = False) -> Path:
    """Write the index folder atomically (utils.check_output was called by the caller before the work)."""
    import faiss

    from budgetlm.utils import atomic_dir

    with atomic_dir(out, marker=MARKER, aside=force) as tmp:
        with open(tmp / "passages.jsonl", "w", encoding="utf-8") as f:
            for p in index.passages:
                f.write(json.dumps(p, ensure_ascii=False) + "\n")
        faiss.write_index(_flat_ip(index.vectors), str(tmp / "vectors.faiss"))
        np.save(tmp / "sentences.npy", index.sentence_vectors, allow_pickle=False)
        if index.bm25 is not None:
            index.bm25.save(str(tmp / "bm25"))
        (tmp / MARKER).write_text(json.dumps(index.manifest, indent=2), encoding="utf-8")
    index.path = Path(out)
    return Path(out)


def check_encoder(manifest: dict, where: str) -> None:
    """A one-line ConfigError when the index was embedded by another encoder than the bundled one."""
    from budgetlm.models.encoder import identity

    mine, theirs = identity(), manifest.get("encoder") or {}
    if theirs != mine:
        name = theirs.get("name", "an unnamed encoder")
        digest = str(theirs.get("sha256", "?"))[:12]
        raise ConfigError(
            f"index {where} was built with another encoder ({name}, weights sha256 {digest}...), not the bundled "
            f"{mine['name']} ({mine['sha256'][:12]}...); rebuild it with `budgetlm rag index DOCS --out {where}`"
        )


def load_index(path: str | Path) -> Index:
    import faiss

    path = Path(path)
    if not (path / MARKER).is_file():
        what = "does not exist" if not path.exists() else f"has no {MARKER}"
        raise DataError(f"index {path} {what}; build one with `budgetlm rag index DOCS --out {path}`")
    try:
        manifest = json.loads((path / MARKER).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise DataError(f"index {path}: {MARKER} is not JSON; rebuild the index") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise DataError(f"index {path} is not a budgetlm index of version {VERSION}; rebuild it")
    check_encoder(manifest, str(path))
    try:
        lines = (path / "passages.jsonl").read_text(encoding="utf-8").splitlines()
        passages = [json.loads(line) for line in lines if line.strip()]
        flat = faiss.read_index(str(path / "vectors.faiss"))
        sentence_vectors = np.load(path / "sentences.npy", allow_pickle=False)
    except (OSError, ValueError, RuntimeError) as e:
        raise DataError(f"index {path} is damaged ({type(e).__name__}); rebuild it") from None
    n_sentences = sum(len(p.get("sentences", [])) for p in passages)
    if (
        flat.ntotal != len(passages)
        or flat.d != manifest["dim"]
        or len(passages) != manifest["chunks"]
        or sentence_vectors.shape != (n_sentences, manifest["dim"])
    ):
        raise DataError(f"index {path} is damaged (vectors and passages disagree); rebuild it")
    vectors = faiss.rev_swig_ptr(faiss.downcast_index(flat).get_xb(), flat.ntotal * flat.d)
    vectors = np.array(vectors, dtype=np.float32).reshape(flat.ntotal, flat.d)
    bm25 = None
    if (path / "bm25").is_dir():
        import bm25s

        bm25 = bm25s.BM25.load(str(path / "bm25"))
    return Index(passages, vectors, manifest, sentence_vectors, bm25, path, flat)
