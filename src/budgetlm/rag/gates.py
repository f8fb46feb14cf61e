"""AdaComp-RAG's gate: per query, retrieve (k passages) or not, from one score and a threshold.

Scores (each: retrieve when score >= threshold):
- `grad`: HOLA's query complexity C(q) = ||dL/dE||_2. L is the model's language-modelling loss on the question
  text: the mean token cross-entropy of predicting each question token from the ones before it, the sequence
  being [prefix token] + tokens(question) (the prefix is the LM protocol's: BOS, or EOS where there is none), as
  Hugging Face's `labels=` loss computes it. E is the input embedding rows of the question's tokens (the prefix's
  row excluded); the norm is the Frobenius norm of their gradient. A question the model finds surprising in a
  way that moves with its tokens scores high: retrieve.
- `entropy`: H = -sum p log p (nats) of the model's next-token distribution right after the prompt without
  retrieval (the first token of the answer). An unsure model scores high: retrieve.
- `margin`: top-1 minus top-2 cosine similarity of the query against the index. A clear best passage scores
  high: retrieve (a flat top of the ranking means no passage stands out, and the model is better left alone).
- `always` / `never`: k passages for every query / none.

Calibration (`calibrate`): on held-out items with both outcomes known (correct with and without retrieval), the
threshold is the one that maximises the gated accuracy there; among equally accurate thresholds the one that
retrieves least. Candidates: every midpoint between consecutive distinct scores, and +-inf (never / always).
"""

from __future__ import annotations

import math

import numpy as np
import torch

GATES = ("always", "never", "grad", "entropy", "margin")
SCORED = ("grad", "entropy", "margin")


def grad_score(model, prefix_token: int, question_ids: list[int]) -> float:
    """||d L / d E||_2 over the question's input embedding rows (see the module docstring for L)."""
    ids = torch.tensor([[prefix_token, *question_ids]])
    with torch.enable_grad():
        emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(lm_loss(model, prefix_token, question_ids, emb), emb)
    return float(grad[0, 1:].double().norm())


def lm_loss(model, prefix_token: int, question_ids: list[int], emb: torch.Tensor | None = None) -> torch.Tensor:
    """The loss grad_score differentiates, for given input embeddings (the finite-difference check uses it)."""
    ids = torch.tensor([[prefix_token, *question_ids]])
    if emb is None:
        emb = model.get_input_embeddings()(ids)
    logits = model(inputs_embeds=emb, use_cache=False).logits
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # fp32 at least (float64 stays)
    return torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])


def entropy_score(lm, prompt: str) -> float:
    """Entropy (nats) of the next token after `prompt`, encoded as the LM protocol encodes a context. It runs on the
    LM's query cache (decode/query.py), so when the gate says "no retrieval" the scoring of the prompt's choices
    (query.loglikelihood) starts from this forward instead of feeding the prompt again."""
    from budgetlm.decode import query

    logp = query.next_token_logprobs(lm, prompt).double()
    return float(-(logp.exp() * logp).sum())


def margin_score(scores: np.ndarray) -> float:
    """Top-1 minus top-2 retrieval similarity (scores sorted best first); with a single passage, its score."""
    return float(scores[0] - scores[1]) if len(scores) > 1 else float(scores[0])


def decide(gate: str, score: float | None, threshold: float | None) -> bool:
    """Whether to retrieve."""
    if gate == "always":
        return True
    if gate == "never":
        return False
    return score >= threshold


def candidate_thresholds(scores) -> list[float]:
    """+inf (never retrieve), every midpoint between consecutive distinct scores from the top, -inf (always)."""
    distinct = np.unique(np.asarray(scores, dtype=float))
    return [math.inf, *((distinct[1:] + distinct[:-1]) / 2)[::-1].tolist(), -math.inf]


def calibrate(scores, correct_without, correct_with) -> dict:
    """The threshold of highest gated accuracy on these items (ties: the fewest retrievals), with its accuracy,
    retrieval rate and the accuracies of never / always retrieving on the same items."""
    s = np.asarray(scores, dtype=float)
    a0, a1 = np.asarray(correct_without, dtype=float), np.asarray(correct_with, dtype=float)
    if not (len(s) == len(a0) == len(a1)) or len(s) == 0:
        raise ValueError("calibration needs the same number (> 0) of scores and outcomes")
    best = None
    # from retrieving nothing to retrieving everything: a tie keeps the earlier (fewer retrievals)
    for t in candidate_thresholds(s):
        on = s >= t
        acc = float(np.where(on, a1, a0).mean())
        if best is None or acc > best["accuracy"] + 1e-12:
            best = {"threshold": float(t), "accuracy": acc, "retrieval_rate": float(on.mean())}
    return {**best, "n": len(s), "accuracy_never": float(a0.mean()), "accuracy_always": float(a1.mean())}
