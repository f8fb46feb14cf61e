"""Hierarchical speculative decoding (HSD, HOLA arXiv 2506.18952) with an entropy gate, over any chain of models.

Levels are ordered cheapest first; the last one is the verifier whose output counts. Level 0 drafts tokens one at
a time while the entropy of its next-token distribution, H(p_t) = -sum p log p (nats, at temperature 1), stays
below its τ, up to a length cap. Every higher level i verifies the proposal of level i-1 in one forward (its KV
cache kept, rolled back past a rejection) and emits the accepted prefix plus one token of its own (the correction
at the first rejection, or a bonus token when all were accepted). A middle level hands the next level a proposal
made of such rounds, gated the same way by its own entropy at each emitted position.

Modes:
- `exact`: greedy decoding accepts a drafted token when it equals the level's argmax, so the verifier's output is
  token for token its own greedy decoding. With sampling, the standard rejection rule (Leviathan et al. 2023; Chen
  et al. 2023): accept x ~ q with probability min(1, p(x)/q(x)), else draw from norm(max(0, p - q)); a bonus token is
  drawn from p. Each level's emitted tokens are then distributed as that level's own sampling distribution, which is
  therefore the q of the level above.
- `gated`: HOLA's gate as the paper states it: drafted tokens (each drafted with H < τ) are accepted without
  verification; the level above only decides the token where the draft stopped. Faster and lossy.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from budgetlm.decode.cached import CachedLM
from budgetlm.errors import ConfigError

MODES = ("exact", "gated")
DRAFT_KV = ("auto", "fp32", "bf16")  # the drafts' key/value cache dtypes (Chain.draft_kv)
SINKS = 4  # attention sinks a windowed draft keeps (StreamingLLM, arXiv 2309.17453: four initial tokens suffice)


def is_copy_of(draft: CachedLM, verifier: CachedLM) -> bool:
    """A draft of the verifier's own architecture and shape (every layer's keys and values laid out alike), of
    the same vocabulary: a compressed copy of the same model, whose keys and values approximate the verifier's."""
    a, b = (getattr(getattr(lm, "model", None), "config", None) for lm in (draft, verifier))
    keys = ("model_type", "num_hidden_layers", "hidden_size", "num_key_value_heads", "vocab_size")
    return a is not None and b is not None and all(getattr(a, k, None) == getattr(b, k, None) for k in keys)


@dataclass
class Sampler:
    """Greedy when temperature is 0, else sampling at the temperature within the top-p nucleus."""

    temperature: float = 0.0
    top_p: float = 1.0
    generator: torch.Generator | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """The distribution a token is drawn from (one-hot at the argmax when greedy)."""
        if self.greedy:
            out = torch.zeros_like(logits)
            out[logits.argmax()] = 1.0
            return out
        p = F.softmax(logits / self.temperature, dim=-1)
        if self.top_p < 1.0:
            sorted_p, order = p.sort(descending=True)
            outside = sorted_p.cumsum(0) - sorted_p >= self.top_p  # keep the smallest prefix reaching top_p
            p = p.scatter(0, order[outside], 0.0)
            p = p / p.sum()
        return p

    def draw(self, p: torch.Tensor) -> int:
        return int(torch.multinomial(p, 1, generator=self.generator))

    def uniform(self) -> float:
        return float(torch.rand((), generator=self.generator))

    def pick(self, logits: torch.Tensor) -> tuple[int, torch.Tensor | None]:
        """(token, its distribution; None when greedy)."""
        if self.greedy:
            return int(logits.argmax()), None
        p = self.probs(logits)
        return self.draw(p), p


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """H = -sum p log p in nats of softmax(logits), per row."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


@dataclass
class LevelStats:
    name: str
    rounds: int = 0  # verifications this level ran (proposals it received)
    proposed: int = 0  # drafted tokens it was asked to verify
    accepted: int = 0  # of those, accepted
    emitted: int = 0  # tokens this level emitted (accepted + its own)
    drafted: int = 0  # level 0 only: tokens it drafted

    def as_dict(self, lm: CachedLM, total_seconds: float) -> dict:
        return {
            "model": self.name,
            "rounds": self.rounds,
            "proposed": self.proposed,
            "accepted": self.accepted,
            "acceptance": self.accepted / self.proposed if self.proposed else None,
            "mean_accepted": self.accepted / self.rounds if self.rounds else None,
            "emitted": self.emitted,
            "drafted": self.drafted,
            "borrowed": lm.borrowed,
            "forwards": lm.forwards,
            "tokens_fed": lm.fed,
            "seconds": lm.seconds,
            "first_forward_seconds": lm.first_seconds,  # the verifier's: the prompt's prefill
            "kv_dtype": lm.kv_dtype(),
            "time_share": lm.seconds / total_seconds if total_seconds > 0 else None,
        }


@dataclass
class Chain:
    """Models cheapest first, the verifier last; one τ per draft level (None: no gate, draft to the cap)."""

    lms: list[CachedLM]
    taus: list[float | None]
    mode: str = "exact"
    sampler: Sampler = field(default_factory=Sampler)
    max_draft: int = 8
    share_kv: bool = True
    draft_window: int = 0  # > 0: every draft attends to the first SINKS and the last draft_window positions only
    # the output ends after a proposal that makes this true (EOS, a stop string: Generator's): level 0 drafts no
    # further, since nothing after it is ever kept (a proposal's length changes, never the output)
    ends: Callable[[list[int]], bool] | None = None
    # the drafts' key/value caches: "bf16" (half the bytes a draft step's attention reads; keys and values rounded),
    # "fp32" (the model's dtype), "auto": bf16 in exact greedy decoding where the draft runs on the lean runtime's C
    # glue in float32 (its guesses change a little, the output never), else the model's
    draft_kv: str = "auto"
    stats: list[LevelStats] = field(default_factory=list)

    def __post_init__(self) -> None:
        assert len(self.taus) == len(self.lms) - 1 and self.mode in MODES
        self.stats = [LevelStats(lm.name) for lm in self.lms]
        verifier = self.lms[-1]
        for lm in self.lms[:-1]:
            # a layers:K draft copies the keys and values a model of the chain already computed: exactly its own
            whole, k = getattr(getattr(lm, "model", None), "budgetlm_first_layers_of", (None, 0))
            lender = next((other for other in self.lms if whole is not None and other.model is whole), None)
            if lender is not None:
                lm.lend(lender, k)
            elif self.share_kv and self.mode == "exact" and is_copy_of(lm, verifier):
                # a draft of the verifier's own shape (a quantised copy) reads the verifier's keys and values of the
                # positions the verifier computed (the prompt, accepted tokens) instead of computing its own, as
                # QSpec (arXiv 2410.11305) shares one cache between its draft and verifier: the prompt's prefill is
                # the verifier's alone. The output does not change in exact mode; only the draft's guesses do.
                lm.lend(verifier, verifier.model.config.num_hidden_layers)
            self._draft_kv(lm)
            if self.draft_window:
                # MagicDec (arXiv 2408.11049): at long contexts a step's cost is its keys and values, and a draft that
                # attends to StreamingLLM's view of them (the first SINKS positions, the attention sinks, and the
                # last `draft_window`) guesses nearly as well at a fraction of that cost. Only guesses change.
                if not hasattr(lm.runtime, "sparse"):
                    raise ConfigError(
                        f"--draft-window: draft {lm.name} runs on transformers' runtime, which attends to every "
                        "position; drop --draft-window or give a Llama or Gemma 3 draft (budgetlm's lean runtime)"
                    )
                lm.runtime.sparse = (self.draft_window, SINKS)

    def _draft_kv(self, lm: CachedLM) -> None:
        """The draft's cache dtype (`draft_kv`)."""
        from budgetlm.decode.lean import CGlue

        runtime = getattr(lm, "runtime", None)
        lean = getattr(runtime, "kv_dtype", False) is not False and getattr(runtime, "dtype", None) == torch.float32
        if self.draft_kv == "bf16" and not lean:
            raise ConfigError(
                f"--draft-kv bf16: draft {lm.name} does not run on budgetlm's lean runtime in float32, whose caches "
                "can be bfloat16; drop --draft-kv or give a float32 Llama or Gemma 3 draft"
            )
        # auto: where the output cannot change (exact greedy decoding: a sampled draft's q enters the acceptance rule,
        # so the same seed would draw other tokens) and the C attention reads the bfloat16 cache as it is (torch's
        # glue would widen the whole cache at every call)
        auto = self.mode == "exact" and self.sampler.greedy and lean and isinstance(runtime.glue, CGlue)
        if self.draft_kv == "bf16" or (self.draft_kv == "auto" and auto):
            lm.set_kv_dtype(torch.bfloat16)

    # -- one level's work ------------------------------------------------------------------------------------
    def _open(self, i: int) -> float:
        tau = self.taus[i]
        return math.inf if tau is None else tau

    def _draft(self, seq: list[int], budget: int) -> tuple[list[int], list]:
        """Level 0: tokens while its entropy stays below τ (at most `budget`), with their distributions."""
        lm, tau, out, dists = self.lms[0], self._open(0), [], []
        while len(out) < budget:
            row = lm.logits(seq + out, len(seq) + len(out) - 1)[-1]
            if tau != math.inf and float(entropy(row)) >= tau:  # no gate: no softmax over the vocabulary either
                break
            tok, p = self.sampler.pick(row)
            out.append(tok)
            dists.append(p)
            if self.ends is not None and self.ends(out):
                break
        self.stats[0].drafted += len(out)
        return out, dists

    def _propose(self, i: int, seq: list[int], budget: int) -> tuple[list[int], list]:
        """What level i hands level i+1: its emitted tokens while its entropy at each stays below its τ."""
        if i == 0:
            return self._draft(seq, budget)
        tau, out, dists = self._open(i), [], []
        while len(out) < budget:
            toks, ps, hs = self._round(i, seq + out, budget - len(out))
            for tok, p, h in zip(toks, ps, hs):
                if h >= tau or len(out) >= budget:
                    return out, dists
                out.append(tok)
                dists.append(p)
        return out, dists

    def _round(self, i: int, seq: list[int], budget: int) -> tuple[list[int], list, list[float]]:
        """Level i verifies one proposal of level i-1: (emitted tokens, their distributions under level i, level
        i's entropy at each)."""
        prop, qs = self._propose(i - 1, seq, budget)
        rows = self.lms[i].logits(seq + prop, len(seq) - 1)  # len(prop) + 1 rows
        st = self.stats[i]
        st.rounds += 1
        st.proposed += len(prop)
        out: list[int] = []
        dists: list = []
        sampler = self.sampler
        for j, tok in enumerate(prop):
            if self.mode == "gated":
                ok = True
            elif sampler.greedy:
                ok = int(rows[j].argmax()) == tok
            else:
                p, q = sampler.probs(rows[j]), qs[j]
                ok = sampler.uniform() * float(q[tok]) < float(p[tok])  # u < p(x)/q(x)
            if not ok:
                st.accepted += len(out)
                if sampler.greedy:
                    fix, p = int(rows[j].argmax()), None
                else:
                    residual = (p - q).clamp_min(0)
                    fix = sampler.draw(residual / residual.sum())
                out.append(fix)
                dists.append(p)
                break
            out.append(tok)
            dists.append(None if sampler.greedy else sampler.probs(rows[j]))
        else:
            st.accepted += len(out)
            tok, p = sampler.pick(rows[len(prop)])
            out.append(tok)
            dists.append(p)
        st.emitted += len(out)
        hs = [float(h) for h in entropy(rows[: len(out)])] if i < len(self.lms) - 1 else []
        return out, dists, hs

    # -- the verifier's step ---------------------------------------------------------------------------------
    def step(self, seq: list[int], budget: int) -> list[int]:
        """The verifier's next tokens after `seq` (at least one; at most budget + 1)."""
        top = len(self.lms) - 1
        if top == 0:  # plain decoding
            tok, _ = self.sampler.pick(self.lms[0].logits(seq, len(seq) - 1)[-1])
            self.stats[0].emitted += 1
            return [tok]
        lent = any(getattr(lm, "lender", None) is self.lms[top] for lm in self.lms[:top])
        if lent and not self.lms[top].tokens:
            # the prompt's prefill by the verifier first, so that its layer drafts copy it instead of computing it
            tok, _ = self.sampler.pick(self.lms[top].logits(seq, len(seq) - 1)[-1])
            self.stats[top].emitted += 1
            return [tok]
        toks, _, _ = self._round(top, seq, max(0, budget))
        return toks

    def forget(self, before: int) -> None:
        for lm in self.lms:
            lm.forget(before)
