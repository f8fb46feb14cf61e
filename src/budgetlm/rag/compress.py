"""AdaComp-RAG's context compression: keep the retrieved passages' sentences most similar to the question, within a
token budget of the *model's* tokenizer, in their original order.

Sentences are those of rag/docs.py (Punkt), taken from the passages in retrieval order; each is scored by the cosine
of its MiniLM embedding with the question's. Greedy by decreasing similarity (ties: earlier first): a sentence is
kept when the context with it still encodes to at most `budget` tokens (the joined text is encoded each time, so
the budget holds exactly, whatever the tokenizer does at the joins); a sentence that alone would break it is
skipped, and the next one tried. Kept sentences are joined in passage order, sentence order, by SEP.
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


def compress(question_vec: np.ndarray, passages: list[str], budget: int, count_tokens) -> Compressed:
    """`count_tokens(text) -> int`: the model tokenizer's token count (no special tokens)."""
    from budgetlm.models.encoder import embed
    from budgetlm.rag.docs import sentences

    sents = [s.strip() for p in passages for s in sentences(p)]
    sents = [s for s in sents if s]
    if not sents or budget <= 0:
        return Compressed("", 0, len(sents), 0)
    sims = embed(sents) @ np.asarray(question_vec, dtype=np.float32).reshape(-1)
    kept: list[int] = []
    tokens = 0
    for i in sorted(range(len(sents)), key=lambda i: (-float(sims[i]), i)):
        trial = sorted([*kept, i])
        n = count_tokens(SEP.join(sents[j] for j in trial))
        if n <= budget:
            kept, tokens = trial, n
    return Compressed(SEP.join(sents[j] for j in kept), len(kept), len(sents), tokens)
