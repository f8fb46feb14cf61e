"""One query at a time: the loglikelihood requests of a single query (a few choices, usually one context) scored the
way a server answers it, through the decode runtime with a KV cache (decode/cached.py CachedLM: the lean forward for
Llama / Gemma 3 models, transformers' otherwise), one CachedLM kept per LM.

`loglikelihood(lm, reqs)` feeds each context alone first (its last row scores every continuation's first token), then
each continuation but its last token on top of its cache, so single-token choices (boolq's " yes" / " no") cost no
forward beyond the context's. `next_token_logprobs(lm, prompt)` runs on the same cache: a later `loglikelihood` whose
context is that prompt (the entropy gate's, rag/gates.py) does not feed it again, and its scores are bitwise the
same either way. `reset(lm)` empties the cache, so a query's scores never depend on the ones before it. Requests are
split and truncated as the LM protocol's `loglikelihood` does them (models/lm.py HFLM.fit_requests); the sums agree
with its batched pass to float32 rounding (other kernels), not bitwise.

An LM that answers single queries itself (evaluation/llamacpp_lm.py LlamaCppLM: llama.cpp computes every number)
has its own `query_loglikelihood`, `next_token_logprobs` and `query_reset`, and these functions call them.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

_CACHED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # lm -> its CachedLM


def _cached(lm):
    from budgetlm.decode.cached import CachedLM

    cached = _CACHED.get(lm)
    if cached is None or cached.model is not lm.model:
        cached = _CACHED[lm] = CachedLM(lm.model, "query")
    return cached


def reset(lm) -> None:
    """Empty the LM's query cache: the next query is fed from its first token."""
    own = getattr(lm, "query_reset", None)
    if own is not None:
        return own()
    cached = _CACHED.get(lm)
    if cached is not None:
        cached.clear()


@torch.inference_mode()
def next_token_logprobs(lm, prompt: str) -> torch.Tensor:
    """log p [vocab] fp32 of the token after `prompt`, encoded as the LM protocol encodes a context."""
    own = getattr(lm, "next_token_logprobs", None)
    if own is not None:
        return own(prompt)
    ids = lm.encode(prompt)[-lm.max_length :] or [lm.prefix_token]
    return F.log_softmax(_cached(lm).logits(ids, len(ids) - 1)[-1], dim=-1)


@torch.inference_mode()
def loglikelihood(lm, reqs: list[tuple[str, str]]) -> list[tuple[float, bool]]:
    """(log p of the continuation, whether it is the greedy one) per request of one query."""
    own = getattr(lm, "query_loglikelihood", None)
    if own is not None:
        return own(reqs)
    cached = _cached(lm)
    out = []
    for ctx, cont in lm.fit_requests(reqs):
        first = cached.logits(list(ctx), len(ctx) - 1)
        rows = cached.logits(list(ctx) + list(cont[:-1]), len(ctx)) if len(cont) > 1 else first[:0]
        logp = F.log_softmax(torch.cat([first, rows]), dim=-1)
        target = torch.tensor(cont)
        picked = logp.gather(1, target.unsqueeze(1)).squeeze(1)
        out.append((float(picked.sum()), bool((logp.argmax(-1) == target).all())))
    return out
