"""The LM protocol over llama.cpp (llama-cpp-python): a GGUF file scored and run by llama.cpp's CPU kernels.

`LlamaCppLM` keeps HFLM's text side (the model's own Hugging Face tokenizer: encode, lm-eval's context/continuation
split, rolling windows, chat prompts) and feeds the resulting token ids to llama.cpp, so every request is
token-identical to the one torch scores; only the numbers come from llama.cpp:
  loglikelihood          each context + continuation but its last token, its logits at every position from the
                         context's last token on (a context shared by several continuations is fed once: the KV
                         cache keeps the longest prefix shared with the previous sequence, logits rows included)
  loglikelihood_rolling  HFLM's windows, each scored from its logits
  token_logprobs         [len-1, vocab] next-token log-probabilities per sequence (text-ppl's KL to the base)
  generate_until         greedy, batch 1: the argmax of the last logits, until the tokenizer's EOS, a stop string
                         in the decoded text or max_gen_toks; the text cut at the first stop string (HFLM's rules)
The KV cache holds F32 keys and values (llama.cpp's default F16 would round them) and every position's logits are
computed in one llama_decode per n_batch tokens. llama_cpp is imported only here, only when an LM is made.
"""

from __future__ import annotations

import atexit
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from budgetlm.models.handle import ModelHandle
from budgetlm.models.lm import HFLM, GenArgs, GenTally

RUNTIME = "llama.cpp"
N_BATCH = 512  # tokens per llama_decode call
GGML_TYPE_F32 = 0


class _Session:
    """One llama.cpp context on sequence 0: the tokens in its KV cache and the logits rows computed for them."""

    def __init__(self, path: Path, n_ctx: int, threads: int):
        import llama_cpp
        from llama_cpp import Llama

        self.lib = llama_cpp
        self.llm = Llama(
            model_path=str(path),
            n_ctx=n_ctx,
            n_batch=N_BATCH,
            n_ubatch=N_BATCH,
            n_threads=threads,
            n_threads_batch=threads,
            type_k=GGML_TYPE_F32,
            type_v=GGML_TYPE_F32,
            logits_all=False,  # llama-cpp-python's own n_ctx x vocab score buffer is not used
            verbose=False,
        )
        self.n_ctx = n_ctx
        self.n_vocab = self.llm.n_vocab()
        self.batch = llama_cpp.llama_batch_init(N_BATCH, 0, 1)
        self.memory = llama_cpp.llama_get_memory(self.llm.ctx)
        self.tokens: list[int] = []
        self.rows = np.zeros((0, self.n_vocab), dtype=np.float32)  # logits of self.tokens' positions (or fewer)
        atexit.register(self.close)  # an LM left open (an error mid-evaluation) closes before llama_cpp unloads

    def _decode(self, ids: list[int], start: int, all_logits: bool) -> np.ndarray:
        """Feed ids at positions start.. (one call per N_BATCH); their logits rows (all, or the last one)."""
        out = []
        for at in range(0, len(ids), N_BATCH):
            part = ids[at : at + N_BATCH]
            b = self.batch
            b.n_tokens = len(part)
            for i, tok in enumerate(part):
                b.token[i] = tok
                b.pos[i] = start + at + i
                b.n_seq_id[i] = 1
                b.seq_id[i][0] = 0
                b.logits[i] = all_logits or (at + i == len(ids) - 1)
            code = self.lib.llama_decode(self.llm.ctx, b)
            if code != 0:
                raise RuntimeError(f"llama_decode returned {code}")
            n_out = len(part) if all_logits else int(at + len(part) == len(ids))
            if n_out:
                ptr = self.lib.llama_get_logits(self.llm.ctx)
                out.append(np.ctypeslib.as_array(ptr, shape=(n_out, self.n_vocab)).copy())
        return np.concatenate(out) if out else np.zeros((0, self.n_vocab), dtype=np.float32)

    def logits(self, seq: list[int], all_rows: bool = True) -> np.ndarray:
        """Logits rows of seq's positions (all of them, or only the last), reusing the cached shared prefix."""
        if len(seq) > self.n_ctx:
            raise ValueError(f"{len(seq)} tokens exceed the llama.cpp context of {self.n_ctx}")
        keep = 0
        for a, b in zip(self.tokens, seq):
            if a != b:
                break
            keep += 1
        if all_rows:  # every kept position needs its row (rows cover self.tokens[: len(self.rows)])
            keep = min(keep, len(self.rows))
            if keep == len(seq):
                return self.rows[:keep]
        else:  # the last position is fed again for its logits
            keep = min(keep, len(seq) - 1)
        self.lib.llama_memory_seq_rm(self.memory, 0, keep, -1)
        new = self._decode(seq[keep:], keep, all_rows)
        self.rows = np.concatenate([self.rows[:keep], new]) if all_rows else self.rows[: min(keep, len(self.rows))]
        self.tokens = list(seq)
        return new if not all_rows else self.rows

    def reset(self) -> None:
        """Forget every cached position: the next call feeds its sequence from the start."""
        self.lib.llama_memory_seq_rm(self.memory, 0, 0, -1)
        self.tokens = []
        self.rows = self.rows[:0]

    def step(self, token: int) -> np.ndarray:
        """Feed one token after the cached ones (generation); its logits row."""
        row = self._decode([token], len(self.tokens), False)
        self.tokens.append(token)
        return row[0]

    def close(self) -> None:
        """Free the batch and the model (idempotent; registered with atexit, before the interpreter's teardown)."""
        if self.batch is not None:
            self.lib.llama_batch_free(self.batch)
            self.batch = None
            self.llm.close()


class LlamaCppLM(HFLM):
    """HFLM's protocol with llama.cpp computing every number (see the module docstring). `handle` gives the
    tokenizer, provenance and source (its torch module is not run); `gguf` is the file llama.cpp loads."""

    runtime = RUNTIME
    decoding_note = "llama.cpp greedy, batch 1"

    def __init__(
        self, handle: ModelHandle, gguf: str | Path, threads: int | None = None, max_length: int | None = None
    ):
        super().__init__(handle, max_length=max_length)
        self.gguf = Path(gguf)
        self.threads = threads or torch.get_num_threads()
        self.session = _Session(self.gguf, self.max_length, self.threads)

    def close(self) -> None:
        self.session.close()

    def _logprobs(self, seq: list[int], first: int = 0) -> torch.Tensor:
        rows = self.session.logits(seq)
        return F.log_softmax(torch.from_numpy(np.ascontiguousarray(rows[first:])), dim=-1)

    # -- scoring -------------------------------------------------------------------------------------------
    def loglikelihood(self, reqs: list[tuple[str, str]]) -> list[tuple[float, bool]]:
        fitted = self.fit_requests(reqs)  # HFLM's split and left truncation to max_length
        scores: dict[tuple, tuple[float, bool]] = {}
        for ctx, cont in sorted(set(fitted)):  # a context's continuations one after another: its cache is kept
            seq = list(ctx) + list(cont[:-1])
            logp = self._logprobs(seq, len(ctx) - 1)
            target = torch.tensor(cont)
            picked = logp.gather(1, target.unsqueeze(1)).squeeze(1)
            scores[(ctx, cont)] = (float(picked.sum()), bool((logp.argmax(-1) == target).all()))
        return [scores[r] for r in fitted]

    # one query at a time (decode/query.py calls these): llama.cpp computes them too, not the torch module
    def query_loglikelihood(self, reqs: list[tuple[str, str]]) -> list[tuple[float, bool]]:
        """One query's requests: loglikelihood already feeds a context once and keeps llama.cpp's cache."""
        return self.loglikelihood(reqs)

    def next_token_logprobs(self, prompt: str) -> torch.Tensor:
        ids = self.encode(prompt)[-self.max_length :] or [self.prefix_token]
        return self._logprobs(ids, len(ids) - 1)[-1]

    def query_reset(self) -> None:
        """The next query is fed from its first token (a shared prefix with the previous one is not reused)."""
        self.session.reset()

    def loglikelihood_rolling(self, texts: list[str], stride: int | None = None) -> list[float]:
        stride = stride or self.max_length
        totals = []
        for text in texts:
            total = 0.0
            for toks, first in self._windows(self.rolling_tokens(text), stride):
                logp = self._logprobs(toks[:-1], first - 1)
                target = torch.tensor(toks[first:])
                total += float(logp.gather(1, target.unsqueeze(1)).sum())
            totals.append(total)
        return totals

    def token_logprobs(self, token_ids: list[list[int]]):
        for seq in token_ids:
            seq = seq[: self.max_length]
            yield self._logprobs(seq[:-1])

    # -- generation ----------------------------------------------------------------------------------------
    def generate_until(self, reqs: list[tuple[str, GenArgs]]) -> list[str]:
        return [self._greedy(self.encode(self.format_prompt(p, a.chat)), a) for p, a in reqs]

    def _greedy(self, prompt: list[int], args: GenArgs) -> str:
        t0 = time.perf_counter()
        room = self.max_length - args.max_gen_toks
        prompt = prompt[-room:] if room > 0 else prompt[-1:]
        until = [s for s in args.until if s]
        eos = self.tokenizer.eos_token_id
        row = self.session.logits(prompt, all_rows=False)[-1]
        new: list[int] = []
        while len(new) < args.max_gen_toks:
            tok = int(row.argmax())
            new.append(tok)
            if tok == eos:
                break
            text = self.tokenizer.decode(new, skip_special_tokens=True)
            if any(s in text for s in until) or len(prompt) + len(new) >= self.max_length:
                break
            row = self.session.step(tok)
        self.tally.tokens += len(new)
        self.tally.seconds += time.perf_counter() - t0
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        for stop in until:
            if stop in text:
                text = text[: text.index(stop)]
        return text


__all__ = ["RUNTIME", "LlamaCppLM", "GenTally"]
