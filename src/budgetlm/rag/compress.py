"""AdaComp-RAG's context compression: keep the retrieved passages' sentences most similar to the question, within a
token budget of the *model's* tokenizer, in their original order.

Sentences are those of rag/docs.py (Punkt), taken from the passages in retrieval order; each is scored by the cosine
of its MiniLM embedding with the question's (an index stores its chunks' sentence embeddings, so compressing
retrieved passages runs no encoder; other text, an oracle passage, is embedded here). Greedy by decreasing
similarity (ties: earlier first): a sentence is kept when the context with it still encodes to at most `budget`
tokens (the joined text is encoded each time, so the budget holds exactly, whatever the tokenizer does at the
joins); a sentence that alone would break it is skipped, and the next one tried. Kept sentences are joined in
passage order, sentence order, by SEP.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SEP = " "


@dataclass
class Compressed:
    text: str
    kept: int  # sentences kept
    total: int  # sentences in the passages
    tokens: int  # model tokens of `text`
    indices: list[int]  # the kept sentences' positions among all the passages' sentences


def compress(
    question_vec: np.ndarray,
    parts: list[tuple[list[str], np.ndarray | None]],
    budget: int,
    count_tokens,
) -> Compressed:
    """`parts`: per passage, in order, its sentences and their embeddings (None: embedded here);
    `count_tokens(text) -> int`: the model tokenizer's token count (no special tokens)."""
    from budgetlm.models.encoder import DIM, embed

    sents, vecs = [], []
    for texts, emb in parts:
        if emb is None:
            emb = embed(texts) if texts else np.zeros((0, DIM), dtype=np.float32)
        for text, v in zip(texts, emb):
            if text.strip():
                sents.append(text.strip())
                vecs.append(v)
    if not sents or budget <= 0:
        return Compressed("", 0, len(sents), 0, [])
    sims = np.stack(vecs) @ np.asarray(question_vec, dtype=np.float32).reshape(-1)
    kept: list[int] = []
    tokens = 0
    for i in sorted(range(len(sents)), key=lambda i: (-float(sims[i]), i)):
        trial = sorted([*kept, i])
        n = count_tokens(SEP.join(sents[j] for j in trial))
        if n <= budget:
            kept, tokens = trial, n
    return Compressed(SEP.join(sents[j] for j in kept), len(kept), len(sents), tokens, kept)
