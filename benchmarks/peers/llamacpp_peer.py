"""llama.cpp through llama-cpp-python: quantise an F16 GGUF with `llama_cpp.llama_model_quantize` and evaluate the
result with llama.cpp's own CPU kernels on exactly the token windows budgetlm's tasks use.

F16 source: budgetlm's GGUF exporter (`budgetlm.api.export(handle, path, "F16")`, else
`budgetlm.export.gguf.export_gguf`), writing the model as budgetlm loaded it (the bundled GGUF dequantised to
fp32) in fp16. When the exporter is missing or fails, llama.cpp itself requantises the bundled GGUF to F16
(`allow_requantize`): the same dequantised values, rounded to fp16. The source used is recorded per row.

Evaluation (`LlamaCppLM`) implements the two calls budgetlm's tasks make of an LM, with the model's Hugging Face
tokenizer (saved by the base row), so items, token ids and windows are budgetlm's own:
- `token_logprobs(seqs)` (text-ppl): each sequence (BOS + chunk tokens, as `TextPerplexity._inputs` makes it) is
  fed to llama.cpp with `logits_all`; row t of the returned [len-1, vocab] log-softmax predicts token t+1, as in
  HFLM. text-ppl's reference check compares the token ids with the stored reference, so a window mismatch fails.
- `loglikelihood(reqs)` (text-cloze): HFLM's context/continuation split (lm-eval's), each context evaluated once
  and its KV cache reused for every continuation (n_tokens rewound to the context length).
Differences from HFLM that remain: llama.cpp's kernels (fp16 weights; F16 matmuls convert activations to fp16;
quantised types multiply with activations quantised to 8 bits) and its attention implementation. The
"llama.cpp F16" row measures exactly this evaluation-path difference against the fp32 reference.
"""

from __future__ import annotations

import os
import re
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

LINEAR_TENSOR = re.compile(r"^blk\.\d+\.(attn_(q|k|v|output)|ffn_(gate|up|down))\.weight$")
LEGACY = ("Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0")


def ftype(name: str) -> int:
    import llama_cpp

    attr = "LLAMA_FTYPE_ALL_F32" if name == "F32" else f"LLAMA_FTYPE_MOSTLY_{name}"
    if not hasattr(llama_cpp, attr):
        raise ValueError(f"llama-cpp-python {llama_cpp.__version__} has no {attr}")
    return int(getattr(llama_cpp, attr))


def quantize(src: Path, dst: Path, type_name: str, threads: int, allow_requantize: bool = False) -> None:
    """llama.cpp's llama_model_quantize (what the llama-quantize tool calls), default params otherwise."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype(type_name)
    params.nthread = threads
    params.allow_requantize = allow_requantize
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".tmp")
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params)
    if rc != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"llama_model_quantize({src.name} -> {type_name}) returned {rc}")
    os.replace(tmp, dst)


def export_f16(handle, dst: Path, bundled: Path | None, threads: int) -> str:
    """Write the F16 GGUF; returns how it was made."""
    try:
        import budgetlm.api as api

        if hasattr(api, "export"):
            api.export(handle, dst, "F16")
            return "budgetlm.api.export(handle, path, 'F16')"
        from budgetlm.export.gguf import export_gguf

        export_gguf(handle, dst, "F16")
        return "budgetlm.export.gguf.export_gguf(handle, path, 'F16')"
    except Exception as exc:  # noqa: BLE001 - the exporter is being written; fall back and say why
        if bundled is None:
            raise
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        quantize(bundled, dst, "F16", threads, allow_requantize=True)
        return f"llama.cpp requantised the bundled {bundled.name} to F16 (budgetlm exporter failed: {first})"


def gguf_sizes(path: Path) -> dict:
    """Bytes of the tensors a GGUF file stores (payload, header excluded), of its decoder Linear weights, their
    bits per weight, and the tensor types used."""
    import gguf

    r = gguf.GGUFReader(str(path))
    total = params = lin_bytes = lin_weights = 0
    lin_types: Counter = Counter()
    other_types = {}
    kquant_fallback = 0
    for t in r.tensors:
        nb, ne = int(t.n_bytes), int(t.n_elements)
        total += nb
        params += ne
        if LINEAR_TENSOR.match(t.name):
            lin_bytes += nb
            lin_weights += ne
            lin_types[t.tensor_type.name] += 1
            kquant_fallback += int(int(t.shape[0]) % 256 != 0)
        elif len(t.shape) > 1 or t.tensor_type.name not in ("F32",):
            other_types[t.name] = t.tensor_type.name
    return {
        "stored_bytes": total,
        "file_bytes": path.stat().st_size,
        "params": params,
        "bpw": total * 8 / params,
        "linear_bytes": lin_bytes,
        "linear_weights": lin_weights,
        "linear_bpw": lin_bytes * 8 / lin_weights if lin_weights else float("nan"),
        "linear_types": dict(lin_types),
        "other_types": other_types,
        "linear_rows_not_256": kquant_fallback,
    }


class LlamaCppLM:
    """The LM calls budgetlm's text-ppl and text-cloze make, answered by llama.cpp."""

    def __init__(self, gguf_path: Path, tokenizer, max_length: int, threads: int, n_ctx: int = 2048):
        from llama_cpp import Llama

        from budgetlm.models.lm import HFLM

        self.tokenizer = tokenizer
        self.max_length = max_length
        self.prefix_token = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        self._hflm = HFLM  # its split/encode helpers only use .tokenizer and .prefix_token
        self.n_ctx = min(n_ctx, max_length + 1)
        t0 = time.perf_counter()
        self.llm = Llama(
            model_path=str(gguf_path),
            n_ctx=self.n_ctx,
            n_batch=512,
            n_threads=threads,
            n_threads_batch=threads,
            logits_all=True,
            verbose=False,
        )
        self.load_seconds = time.perf_counter() - t0
        self.n_vocab = self.llm.n_vocab()

    # budgetlm's HFLM helpers (lm-eval's context/continuation split)
    def encode(self, text: str) -> list[int]:
        return self._hflm.encode(self, text)

    def _split(self, context: str, continuation: str):
        return self._hflm._split(self, context, continuation)

    def _run(self, tokens: list[int], n_past: int = 0) -> np.ndarray:
        """Feed `tokens` after the first n_past tokens already in the cache; the logits of their positions."""
        if n_past + len(tokens) > self.n_ctx:
            raise ValueError(f"{n_past + len(tokens)} tokens exceed llama.cpp's context of {self.n_ctx}")
        if n_past == 0:
            self.llm.reset()
        else:
            self.llm.n_tokens = n_past
        self.llm.eval(tokens)
        return np.array(self.llm.scores[n_past : n_past + len(tokens)], dtype=np.float32)

    def token_logprobs(self, token_ids: list[list[int]]):
        for seq in token_ids:
            seq = seq[: self.max_length]
            logits = torch.from_numpy(self._run(list(seq[:-1])))
            yield F.log_softmax(logits.float(), dim=-1)

    def loglikelihood(self, reqs: list[tuple[str, str]]) -> list[tuple[float, bool]]:
        pairs = [self._split(c, x) for c, x in reqs]
        fitted = []
        for ctx, cont in pairs:  # HFLM's truncation, kept for equal behaviour (never triggers at these lengths)
            cont = cont[-self.max_length :]
            room = self.max_length + 1 - len(cont)
            fitted.append((tuple(ctx[-room:]) if room > 0 else tuple(ctx[-1:]), tuple(cont)))
        groups: dict[tuple, list[tuple]] = {}
        for ctx, cont in fitted:
            conts = groups.setdefault(ctx, [])
            if cont not in conts:
                conts.append(cont)
        scores: dict[tuple, tuple[float, bool]] = {}
        for ctx, conts in groups.items():
            first = F.log_softmax(torch.from_numpy(self._run(list(ctx))[-1:]), dim=-1)
            for cont in conts:
                logp = first
                if len(cont) > 1:
                    rest = torch.from_numpy(self._run(list(cont[:-1]), n_past=len(ctx)))
                    logp = torch.cat([first, F.log_softmax(rest, dim=-1)])
                target = torch.tensor(cont)
                picked = logp.gather(1, target.unsqueeze(1)).squeeze(1)
                greedy = bool((logp.argmax(-1) == target).all())
                scores[(ctx, cont)] = (float(picked.sum()), greedy)
        return [scores[(ctx, cont)] for ctx, cont in fitted]

    def close(self) -> None:
        self.llm.close()

    def tokenizer_check(self, text: str) -> dict:
        """Does llama.cpp's own tokenizer agree with the Hugging Face one on this text? (Informational: the
        evaluation feeds the Hugging Face token ids to llama.cpp, so it never depends on this.)"""
        hf = self.encode(text)
        ll = self.llm.tokenize(text.encode(), add_bos=False, special=False)
        return {"same_ids": hf == list(ll), "hf_tokens": len(hf), "llama_tokens": len(ll)}


def type_histogram(path: Path) -> dict[str, int]:
    import gguf

    return dict(Counter(t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors if LINEAR_TENSOR.match(t.name)))
