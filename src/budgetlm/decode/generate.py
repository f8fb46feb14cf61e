"""Generation from token ids: plain decoding or HSD over a chain of drafts, with stop strings, EOS, streaming and
a report per level.

`Generator` holds the models of one chain and decodes one prompt at a time (batch 1, as speculative decoding
does); each call starts from fresh caches. The result carries the new tokens, the text (cut at the first stop
string), why it stopped, the wall time and, for HSD, the per-level counters of `speculative.LevelStats`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from budgetlm.decode.cached import CachedLM
from budgetlm.decode.speculative import Chain, Sampler


@dataclass
class Output:
    tokens: list[int]
    text: str
    stop: str  # "eos", "stop string", "max tokens"
    prompt_tokens: int
    seconds: float
    levels: list[dict] = field(default_factory=list)

    @property
    def tokens_per_second(self) -> float:
        return len(self.tokens) / self.seconds if self.seconds > 0 else 0.0


@dataclass
class Generator:
    """models: cheapest first, the verifier last, as (name, module); taus: one per draft (None: no gate)."""

    models: list[tuple[str, torch.nn.Module]]
    tokenizer: object
    taus: list[float | None] = field(default_factory=list)
    mode: str = "exact"
    max_draft: int = 8
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    share_kv: bool = True  # drafts of the verifier's shape read its keys and values (decode/speculative.Chain)
    draft_window: int = 0  # > 0: drafts attend to the attention sinks and the last draft_window positions only
    draft_kv: str = "auto"  # the drafts' key/value caches: auto, fp32, bf16 (decode/speculative.Chain)

    def __post_init__(self) -> None:
        if not self.taus:
            self.taus = [None] * (len(self.models) - 1)
        eos = getattr(self.tokenizer, "eos_token_id", None)
        self.eos = {eos} if eos is not None else set()
        self._generator = torch.Generator().manual_seed(self.seed)

    def __call__(
        self,
        prompt: list[int],
        max_new_tokens: int,
        until: list[str] | None = None,
        on_text: Callable[[str], None] | None = None,
    ) -> Output:
        until = [s for s in (until or []) if s]
        lms = [CachedLM(model, name) for name, model in self.models]
        sampler = Sampler(self.temperature, self.top_p, self._generator)
        seq, new, shown, stop = list(prompt), [], "", "max tokens"

        def ends(proposal: list[int]) -> bool:  # the output would end within `proposal`, were it accepted
            if proposal[-1] in self.eos:
                return True
            if not until:
                return False
            text = self.tokenizer.decode(new + proposal, skip_special_tokens=True)
            return any(s in text for s in until)

        chain = Chain(lms, list(self.taus), self.mode, sampler, self.max_draft, self.share_kv, self.draft_window,
                      ends, draft_kv=self.draft_kv)  # fmt: skip
        t0 = time.perf_counter()
        while len(new) < max_new_tokens:
            toks = chain.step(seq, min(self.max_draft, max_new_tokens - len(new) - 1))
            for tok in toks:
                if len(new) >= max_new_tokens:
                    break
                new.append(tok)
                seq.append(tok)
                if tok in self.eos:
                    stop = "eos"
                    break
            chain.forget(len(seq) - 1)
            text = self.tokenizer.decode(new, skip_special_tokens=True)
            if until:
                hit = [text.index(s) for s in until if s in text]
                if hit:
                    text, stop = text[: min(hit)], "stop string"
            if stop != "max tokens":
                break
            if on_text is not None:  # hold back a possible stop string's start and a half-decoded character
                safe = text[: len(text) - _holdback(text, until)]
                if safe.startswith(shown) and len(safe) > len(shown):
                    on_text(safe[len(shown) :])
                    shown = safe
        seconds = time.perf_counter() - t0
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        hit = [text.index(s) for s in until if s in text]
        if hit:
            text = text[: min(hit)]
        if on_text is not None and text.startswith(shown) and len(text) > len(shown):
            on_text(text[len(shown) :])
        levels = [st.as_dict(lm, seconds) for st, lm in zip(chain.stats, lms)]
        return Output(new, text, stop, len(prompt), seconds, levels)


def _holdback(text: str, until: list[str]) -> int:
    """How many trailing characters of `text` may still change: an incomplete UTF-8 character decodes as U+FFFD,
    and a suffix that begins a stop string may become one."""
    n = len(text) - len(text.rstrip("\ufffd"))
    for s in until:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                n = max(n, k)
                break
    return n


def check_settings(
    max_new_tokens: int,
    mode: str,
    max_draft: int,
    temperature: float,
    top_p: float,
    draft_window: int = 0,
    draft_kv: str = "auto",
) -> None:
    """The one-line refusals of generation settings, before any model loads."""
    from budgetlm.decode.speculative import DRAFT_KV, MODES, SINKS
    from budgetlm.errors import ConfigError

    if draft_kv not in DRAFT_KV:
        raise ConfigError(f"--draft-kv {draft_kv}: give one of {', '.join(DRAFT_KV)}")

    if draft_window < 0 or 0 < draft_window <= SINKS:
        raise ConfigError(
            f"--draft-window {draft_window}: give a number of recent positions above {SINKS} (e.g. 256), or 0 for all"
        )

    if max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens {max_new_tokens}: generate at least 1 token")
    if mode not in MODES:
        raise ConfigError(f"--mode {mode} is not a decoding mode; use one of: {', '.join(MODES)}")
    if max_draft < 1:
        raise ConfigError(f"--max-draft {max_draft}: a draft proposes at least 1 token per round")
    if temperature < 0:
        raise ConfigError(f"--temperature {temperature}: give 0 (greedy) or a positive temperature")
    if not 0 < top_p <= 1:
        raise ConfigError(f"--top-p {top_p}: give a probability in (0, 1]")


def build(
    handle,
    drafts: list[str] | None = None,
    tau: str | None = None,
    mode: str = "exact",
    max_draft: int = 8,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    load: Callable | None = None,
    draft_window: int = 0,
    draft_kv: str = "auto",
) -> Generator:
    """A Generator for `handle` (the verifier) and its drafts (specs cheapest first: model names, folders, GGUF
    files, or layers:K), each checked against the verifier's tokenizer."""
    from budgetlm.decode.drafts import load_drafts, parse_taus

    specs = list(drafts or [])
    taus = parse_taus(tau, len(specs))
    if draft_window and not specs:
        from budgetlm.errors import ConfigError

        raise ConfigError("--draft-window needs --draft: the window is a draft model's view of the context")
    if load is None:
        from budgetlm.models.sources import load
    chain = load_drafts(handle, specs, load) + [(handle.source, handle.model.eval())]
    return Generator(chain, handle.tokenizer, taus, mode, max_draft, temperature, top_p, seed,
                     draft_window=draft_window, draft_kv=draft_kv)  # fmt: skip


def context_window(handle) -> int:
    cfg = handle.model.config
    return int(getattr(cfg, "max_position_embeddings", 2048) or 2048)


def encode_prompt(handle, text: str, chat: bool, max_new_tokens: int) -> list[int]:
    """The prompt's token ids (in the chat template with `chat`), refused in one line when it and the tokens to
    generate do not fit the model's context window."""
    from budgetlm.errors import ConfigError

    tok = handle.tokenizer
    if not text.strip():
        raise ConfigError("the prompt is empty; give a PROMPT argument or pipe text on stdin")
    if chat:
        if not handle.is_instruct:
            raise ConfigError(f"--chat: model {handle.source} has no chat template; drop --chat")
        text = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False)
    ids = tok(text, add_special_tokens=not chat)["input_ids"]  # the template writes its own special tokens
    window = context_window(handle)
    if len(ids) + max_new_tokens > window:
        room = window - len(ids)
        fix = f"give --max-new-tokens {room} or less" if room > 0 else "shorten the prompt"
        raise ConfigError(
            f"the prompt is {len(ids):,} tokens and {max_new_tokens:,} more do not fit the model's context window "
            f"of {window:,} tokens; {fix}"
        )
    return ids
