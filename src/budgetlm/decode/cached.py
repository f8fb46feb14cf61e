"""A causal LM with its KV cache and the tokens the cache holds: the unit every decoding strategy steps.

`CachedLM.logits(seq, start)` returns the next-token logits after every position from `start` to the end of `seq`.
It keeps the longest prefix its cache shares with `seq`, rolls the cache back to it (`crop`) and feeds only the
tokens after it, through budgetlm's decode runtime (decode/lean.py: the lean forward with a static key/value cache
for Llama-architecture models, transformers' forward with a DynamicCache for the others). The logits of the
positions it fed are kept until they are rolled back, so asking again for a position already computed costs nothing:
a speculative level that verified a proposal reads the rows of the tokens it accepted without another forward. A
prompt's prefill keeps only its last row (the head over a 49k-token vocabulary costs as much as a layer).
"""

from __future__ import annotations

import time

import torch


class CachedLM:
    def __init__(self, model: torch.nn.Module, name: str):
        from budgetlm.decode.lean import runtime_for

        self.model = model
        self.name = name
        self.runtime = runtime_for(model)
        self.cache = self.runtime.new_cache()  # every layer keeps all its keys and values (rollback to any position)
        self.tokens: list[int] = []  # tokens whose keys and values are in the cache
        self.rows: list[torch.Tensor | None] = []  # fp32 logits after each cached position (None: not kept)
        self._forgotten = 0  # rows before this position are None
        # a CachedLM whose first `lent_layers` layers are this model's (decode.drafts.first_layers): see _borrow
        self.lender: CachedLM | None = None
        self.lent_layers = 0
        self.borrowed = 0  # positions whose keys and values were copied from the lender
        # counters for the report
        self.forwards = 0
        self.fed = 0
        self.seconds = 0.0
        self.first_seconds = 0.0  # the first forward's: a prompt's prefill, unless its keys and values were borrowed

    def _rollback(self, keep: int) -> None:
        drop = len(self.tokens) - keep
        if drop:
            self.cache.crop(-drop)
        del self.tokens[keep:], self.rows[keep:]
        self._forgotten = min(self._forgotten, keep)

    def clear(self) -> None:
        """Forget every cached position (the next call feeds its sequence from the start)."""
        self._rollback(0)

    @torch.inference_mode()
    def logits(self, seq: list[int], start: int) -> torch.Tensor:
        """[len(seq) - start, vocab] fp32 logits; row i is the distribution of the token after seq[start + i]."""
        shared = _common_prefix(self.tokens, seq)
        if shared == len(seq) and any(r is None for r in self.rows[start : len(seq)]):
            shared -= 1  # a position whose row was not kept is fed again (rare: a prefill row asked for later)
        if any(r is None for r in self.rows[start:shared]):
            shared = start
        self._rollback(shared)
        shared = self._borrow(seq, shared, start)
        new = seq[shared:]
        if new:
            t0 = time.perf_counter()
            ids = torch.tensor([new], dtype=torch.long)
            keep = len(seq) - max(start, shared)  # the rows asked for, never a prompt's others
            rows = self.runtime(ids, shared, self.cache, keep)[0].float()
            kept: list[torch.Tensor | None] = [None] * (len(new) - rows.shape[0]) + list(rows)
            self.tokens += new
            self.rows += kept
            took = time.perf_counter() - t0
            if not self.forwards:
                self.first_seconds = took
            self.forwards += 1
            self.fed += len(new)
            self.seconds += took
        return torch.stack(self.rows[start : len(seq)])  # type: ignore[arg-type]

    def set_kv_dtype(self, dtype: torch.dtype) -> None:
        """Keep keys and values in `dtype` from now on (a lean runtime's bfloat16 caches: decode/lean.py
        LeanLlama.kv_dtype); the cache starts again empty."""
        if dtype not in (torch.float32, torch.bfloat16) or getattr(self.runtime, "dtype", None) != torch.float32:
            raise ValueError(f"{self.name}: keys and values in {dtype} (a float32 model's caches: float32 or bfloat16)")
        self.runtime.kv_dtype = dtype
        self.cache = self.runtime.new_cache()
        self._rollback(0)

    def kv_dtype(self) -> str | None:
        """The dtype its keys and values are kept in ("float32", "bfloat16"; None: transformers' cache)."""
        keys = getattr(self.cache, "keys", None)
        return str(keys[0].dtype).removeprefix("torch.") if isinstance(keys, list) and keys else None

    def lend(self, lender: CachedLM, layers: int) -> bool:
        """Take the keys and values of `lender`'s first `layers` layers from its cache from now on (see _borrow);
        False, and nothing changes, where the two caches are not of the same layout (kv_layout)."""
        mine, theirs = (getattr(lm.runtime, "kv_layout", None) for lm in (self, lender))
        if mine is None or theirs is None:  # transformers' runtime (DynamicCache): the same runtime on both sides
            if type(self.runtime) is not type(lender.runtime) or not hasattr(self.runtime, "copy_layers"):
                return False
        elif mine()[1:] != theirs()[1:] or layers > min(mine()[0], theirs()[0]):
            return False
        kinds = [list(getattr(lm.model.config, "layer_types", None) or [])[:layers] for lm in (self, lender)]
        if kinds[0] != kinds[1]:  # sliding-window and full layers must line up
            return False
        self.lender, self.lent_layers = lender, layers
        return True

    def _borrow(self, seq: list[int], shared: int, start: int) -> int:
        """A draft made of the verifier's first K layers (`lender`) computes the same keys and values as the
        verifier's first K layers: copy those the verifier already holds (a prompt's prefill) instead of computing
        them, up to the positions whose logits are asked for. A quantised copy of the verifier (every layer lent,
        Chain's `share_kv`) attends to the verifier's keys and values instead of its own there: close to its own,
        and its prompt's prefill is skipped."""
        if self.lender is None:
            return shared
        upto = min(_common_prefix(self.lender.tokens, seq), start, len(seq) - 1)
        if upto <= shared:
            return shared
        self.runtime.copy_layers(self.cache, self.lender.cache, self.lent_layers, shared, upto)
        self.tokens += seq[shared:upto]
        self.rows += [None] * (upto - shared)
        self.borrowed += upto - shared
        return upto

    def forget(self, before: int) -> None:
        """Drop the kept rows of positions before `before` (committed output nobody asks for again)."""
        for i in range(self._forgotten, min(before, len(self.rows))):
            self.rows[i] = None
        self._forgotten = max(self._forgotten, min(before, len(self.rows)))

    def reset_counters(self) -> None:
        self.forwards = self.fed = 0
        self.seconds = self.first_seconds = 0.0


def _common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix, by bisection over list slices compared in C (a decode step compares
    prompts of thousands of tokens: a Python loop over them would cost more than the small models' forward)."""
    lo, hi = 0, min(len(a), len(b))
    if a[:hi] == b[:hi]:
        return hi
    while lo < hi:  # a[:lo] == b[:lo] holds, a[:hi + 1] != b[:hi + 1]
        mid = (lo + hi + 1) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo
