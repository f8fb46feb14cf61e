"""The offline default suite: tasks built by the project itself, needing no download.

- `text-ppl`: perplexity, bits per byte, KL divergence to the base model and top-1 agreement with it, on
  chunks of the held-out split of `pydoc_data.topics` (see budgetlm.data.corpus); token-weighted over the
  chunks. A perplexity above the vocabulary size (worse than a uniform guess) gets extra["warning"].
- `text-cloze`: pick the true next sentence of a held-out prose passage among 4 (3 distractors are sentences
  of similar length from other topics of the held-out split); acc and acc_norm as lm-eval defines them.
- `arith`: arithmetic problems from reasoning-gym's generators, answered through the chat template and
  scored by exact match of the extracted final number.
- `fidelity` (in fidelity.py): fixed prompts, generations scored against the base model's.

text-ppl reference format (written by `write_reference`, read by `run` from ctx.extra["reference"]): the
file `<reference path>.safetensors` (the suffix is appended to the given path's name) holds, for every
scored position of every item, the base model's top-k next-token ids (int32) and log-probs (fp32), and the
log of the remaining tail mass; metadata lists the item ids, k and the token offsets of each item.
"""

from __future__ import annotations

import json
import math
import random
import re
import tempfile
from importlib.metadata import version
from pathlib import Path

import torch

from budgetlm.data import corpus
from budgetlm.data.tasks.base import (
    GenerateTask,
    Item,
    MultipleChoiceTask,
    Task,
    TaskContext,
    TaskData,
    TaskResult,
    reference_file,
)
from budgetlm.errors import DataError
from budgetlm.results import Aggregate, Metric
from budgetlm.utils import atomic_file

TOPK = 32
KLD_ESTIMATOR = f"top-{TOPK} + tail mass (lower bound)"
REFERENCE_FORMAT = "budgetlm.text-ppl.topk/1"


def register_offline_tasks(registry) -> None:
    registry.add("text-ppl", "budgetlm.data.tasks.offline:text_ppl")
    registry.add("text-cloze", "budgetlm.data.tasks.offline:text_cloze")
    registry.add("arith", "budgetlm.data.tasks.offline:arith")
    registry.add("fidelity", "budgetlm.data.tasks.fidelity:fidelity")


# --- KL divergence against a compact (top-k + tail) reference -----------------------------------------------


def topk_reference(logp: torch.Tensor, k: int = TOPK) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """From [T, V] log-probs: top-k ids (int32 [T, k]), their log-probs (fp32 [T, k], descending) and the
    log of the tail mass outside the top k (fp32 [T]; -inf when the top k hold all the mass)."""
    k = min(k, logp.shape[-1])
    lp, ids = torch.topk(logp, k, dim=-1)
    tail = torch.logsumexp(logp.scatter(-1, ids, float("-inf")), dim=-1)
    return ids.to(torch.int32), lp.float(), tail.float()


def kl_topk(ids: torch.Tensor, lp: torch.Tensor, tail: torch.Tensor, logp_model: torch.Tensor) -> torch.Tensor:
    """Per position KL(base || model) in nats, coarse-grained to the base's top-k tokens plus one tail bucket:
    sum_topk p_b (log p_b - log p_m) + p_tail_b (log p_tail_b - log p_tail_m). By the log-sum inequality this
    never exceeds the full KL; it is tight when the top k hold most of the base's mass."""
    ids = ids.long()
    lm_k = logp_model.gather(-1, ids)
    head = (lp.exp() * (lp - lm_k)).sum(-1)
    tail_m = torch.logsumexp(logp_model.scatter(-1, ids, float("-inf")), dim=-1)
    p_tail = tail.exp()
    tail_term = torch.where(p_tail > 0, p_tail * (tail - tail_m), torch.zeros_like(p_tail))
    return head + tail_term


def top1_agree(ids: torch.Tensor, logp_model: torch.Tensor) -> torch.Tensor:
    """Per position: 1 where the base's most likely token is also a most likely token of the model."""
    at_base = logp_model.gather(-1, ids[:, :1].long()).squeeze(-1)
    return (at_base >= logp_model.max(-1).values).float()


def _ref_file(path) -> Path:
    return reference_file(path, ".safetensors")


class TextPerplexity(Task):
    name = "text-ppl"
    kind = "perplexity"
    description = "perplexity, bits/byte, KL divergence and top-1 agreement to the base model on held-out text"
    needs_reference = True
    max_chars = 1200  # ~300 tokens per chunk with a 49k-token BPE

    def load(self, ctx: TaskContext) -> TaskData:
        items = [Item(cid, {"text": text}) for cid, text in corpus.chunks("heldout", self.max_chars)]
        return TaskData(items, f"generated from {corpus.SOURCE} heldout split, chunks of <= {self.max_chars} chars")

    def _tokens(self, lm, text: str) -> tuple[list[int], list[int]]:
        """(prefix, text tokens): the prefix is BOS, else EOS (as lm-eval's rolling loglikelihood), else none."""
        tok = lm.tokenizer
        prefix = getattr(lm, "prefix_token", None)
        if prefix is None:
            prefix = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        return ([prefix] if prefix is not None else []), tok(text, add_special_tokens=False)["input_ids"]

    def _inputs(self, lm, items: list[Item]) -> list[list[int]]:
        """Token ids per item, truncated to the model's context (every token after the first is scored)."""
        out = []
        for it in items:
            prefix, ids = self._tokens(lm, it.doc["text"])
            out.append((prefix + ids)[: lm.max_length])
        return out

    def _scored_bytes(self, lm, text: str, seq: list[int]) -> int:
        """UTF-8 bytes of the scored text: the whole text, or the decoded scored tokens when the chunk was
        truncated to the model's context or the tokenizer has no BOS/EOS prefix."""
        prefix, ids = self._tokens(lm, text)
        if prefix and len(seq) == len(prefix) + len(ids):
            return len(text.encode("utf-8"))
        return len(lm.tokenizer.decode(seq[1:]).encode("utf-8"))

    def write_reference(self, lm, items: list[Item], path) -> None:
        """Store the base model's top-k next-token distribution of every position of these items."""
        from safetensors.torch import save_file

        seqs = self._inputs(lm, items)
        parts = [topk_reference(logp, TOPK) for logp in lm.token_logprobs(seqs)]
        offsets = [0]
        for ids, _, _ in parts:
            offsets.append(offsets[-1] + ids.shape[0])
        tensors = {
            "topk_ids": torch.cat([p[0] for p in parts]).contiguous(),
            "topk_logp": torch.cat([p[1] for p in parts]).contiguous(),
            "tail_logp": torch.cat([p[2] for p in parts]).contiguous(),
            "input_ids": torch.tensor([t for s in seqs for t in s], dtype=torch.int32),
            "offsets": torch.tensor(offsets, dtype=torch.int64),
        }
        meta = {"format": REFERENCE_FORMAT, "k": str(TOPK), "item_ids": json.dumps([it.id for it in items])}
        with atomic_file(_ref_file(path)) as tmp:
            save_file(tensors, str(tmp), metadata=meta)

    def _read_reference(self, path, items: list[Item], seqs: list[list[int]]) -> list[tuple]:
        from safetensors import safe_open

        file = _ref_file(path)
        if not file.is_file():
            raise DataError(f"text-ppl reference {file} not found; evaluate the base model first to write it")
        with safe_open(str(file), framework="pt") as f:
            meta = f.metadata() or {}
            t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no iterator
        if meta.get("format") != REFERENCE_FORMAT:
            raise DataError(f"text-ppl reference {file} has format {meta.get('format')!r}; delete it to rewrite it")
        index = {rid: i for i, rid in enumerate(json.loads(meta["item_ids"]))}
        off = t["offsets"].tolist()
        out = []
        for it, seq in zip(items, seqs):
            if it.id not in index:
                raise DataError(f"text-ppl reference {file} has no item {it.id!r}; delete it to rewrite it")
            i = index[it.id]
            a, b = off[i], off[i + 1]
            if t["input_ids"][a + i : b + i + 1].tolist() != seq:
                raise DataError(f"text-ppl reference {file} was written with another tokenizer; delete it")
            out.append((t["topk_ids"][a:b], t["topk_logp"][a:b], t["tail_logp"][a:b]))
        return out

    def run(self, lm, items: list[Item], ctx: TaskContext) -> TaskResult:
        ref_path = ctx.extra.get("reference")
        tmpdir = None
        if ref_path is None:
            if not ctx.is_base:
                raise DataError("text-ppl needs the base model's reference (ctx.extra['reference']); run it in a study")
            tmpdir = tempfile.TemporaryDirectory(prefix="budgetlm-ref-")
            ref_path = Path(tmpdir.name) / "text-ppl"
            self.write_reference(lm, items, ref_path)
        try:
            seqs = self._inputs(lm, items)
            refs = self._read_reference(ref_path, items, seqs)
        finally:
            if tmpdir is not None:
                tmpdir.cleanup()
        records, vocab_size = [], 0
        for it, seq, (ids, lp, tail), logp in zip(items, seqs, refs, lm.token_logprobs(seqs)):
            vocab_size = logp.shape[-1]
            target = torch.tensor(seq[1:]).unsqueeze(1)
            nll = -float(logp.gather(1, target).sum())
            kl = kl_topk(ids, lp, tail, logp)
            agree = top1_agree(ids, logp)
            n = len(seq) - 1
            rec = {"id": it.id, "nll": nll, "tokens": n, "bytes": self._scored_bytes(lm, it.doc["text"], seq)}
            rec |= {"kld_sum": float(kl.sum()), "agree_count": float(agree.sum()), "nll_per_token": nll / n}
            rec |= {"kld": float(kl.mean()), "top1_agreement": float(agree.mean())}
            records.append(rec)
        return TaskResult(self._metrics(records, vocab_size), records)

    def aggregations(self) -> dict[str, Aggregate]:
        """Token-weighted over the chunks (bits per byte byte-weighted): a long chunk counts for its tokens."""
        return {
            "perplexity": Aggregate("nll", "tokens", "exp"),
            "bits_per_byte": Aggregate("nll", "bytes", "bits"),
            "kld": Aggregate("kld_sum", "tokens"),
            "top1_agreement": Aggregate("agree_count", "tokens"),
        }

    def _metrics(self, records: list[dict], vocab_size: int) -> dict[str, Metric]:
        info = {"stderr_method": "delta method, items (text chunks) as the sampling unit"}
        info["tokens"] = sum(r["tokens"] for r in records)
        units = {"bits_per_byte": "bits/byte", "kld": "nats/token"}
        out = {}
        for name, agg in self.aggregations().items():
            extra = {**info, "kld_estimator": KLD_ESTIMATOR} if name == "kld" else info
            out[name] = agg.metric(records, units.get(name, ""), extra)
        warning = implausible_perplexity(out["perplexity"].value, vocab_size)
        if warning:
            out["perplexity"].extra["warning"] = warning
        return out


def implausible_perplexity(ppl: float, vocab_size: int) -> str | None:
    """A warning when a perplexity is no model's: not a number, or above the vocabulary size (a uniform guess
    over the vocabulary scores exactly the vocabulary size, so the model is worse than no model at all)."""
    if math.isnan(ppl):
        return "perplexity is not a number: the model produced non-finite log-probabilities; check its weights"
    if ppl > vocab_size:
        return (
            f"perplexity {ppl:.4g} is above the vocabulary size ({vocab_size}), worse than a uniform guess: "
            "the model's weights are likely corrupt or broken by compression"
        )
    return None


# --- text-cloze -------------------------------------------------------------------------------------------


class TextCloze(MultipleChoiceTask):
    name = "text-cloze"
    description = "choose the true next sentence of a held-out passage among 4 (distractors from other topics)"
    context_sentences = 3  # at most this many sentences of context (at least 2)
    min_len, max_len = 30, 250  # characters of a continuation sentence

    def load(self, ctx: TaskContext) -> TaskData:
        rng = random.Random(f"text-cloze/{ctx.seed}")
        cands: list[tuple[str, str, str, str]] = []  # (id, topic, context, continuation)
        for topic, text in corpus.topic_texts("heldout"):
            for r, run in enumerate(corpus.prose_runs(text)):
                for j in range(2, len(run)):
                    gold = run[j]
                    if self.min_len <= len(gold) <= self.max_len:
                        context = " ".join(run[max(0, j - self.context_sentences) : j])
                        cands.append((f"{topic}/{r}/{j}", topic, context, gold))
        pool = [(topic, gold) for _, topic, _, gold in cands]
        golds = [i % 4 for i in range(len(cands))]
        rng.shuffle(golds)
        items = []
        for (cid, topic, context, gold), g in zip(cands, golds):
            others = self._distractors(rng, topic, gold, pool)
            choices = others[:g] + [gold] + others[g:]
            doc = {"context": context, "choices": choices, "gold": g, "topic": topic}
            items.append(Item(cid, doc, label=g))
        source = f"generated from {corpus.SOURCE} heldout split, seed {ctx.seed}"
        return TaskData(items, source)

    def _distractors(self, rng: random.Random, topic: str, gold: str, pool) -> list[str]:
        """3 sentences from other topics whose length is within 0.7-1.4x the gold's (nearest lengths if fewer)."""
        others = sorted({s for t, s in pool if t != topic and s != gold})
        close = [s for s in others if 0.7 * len(gold) <= len(s) <= 1.4 * len(gold)]
        if len(close) < 3:
            close = sorted(others, key=lambda s: (abs(len(s) - len(gold)), s))[:3]
        return rng.sample(close, 3)

    def doc_to_text(self, doc: dict) -> str:
        return doc["context"]

    def doc_to_choices(self, doc: dict) -> list[str]:
        return doc["choices"]

    def doc_to_target(self, doc: dict) -> int:
        return doc["gold"]


# --- arith ------------------------------------------------------------------------------------------------

# (generator, its config): small two-term sums and differences; smollm2-135m solves about a third of them
ARITH_GENERATORS = {
    "basic_arithmetic": dict(
        min_terms=2,
        max_terms=2,
        min_digits=1,
        max_digits=2,
        operators=("+", "-"),
        allow_parentheses=False,
        allow_negation=False,
        format_style="natural",
    ),
    "chain_sum": dict(min_terms=2, max_terms=2, min_digits=1, max_digits=2),
}
ARITH_EXAMPLE = "Q: What is 7 + 5?\nA: 7 + 5 = 12. Answer: 12\n\n"
_ANSWER = re.compile(r"answer\s*(?:is)?\s*[:=]?\s*\$?\s*(-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?)", re.I)
_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?")


def extract_answer(text: str) -> float | None:
    """The number after the last 'Answer:' (or 'answer is'), else the last number in the text, else None."""
    found = _ANSWER.findall(text) or _NUMBER.findall(text)
    return float(found[-1].replace(",", "")) if found else None


def numbers_equal(pred: float | None, gold: float) -> bool:
    return pred is not None and abs(pred - gold) <= 1e-6 * max(1.0, abs(gold))


class Arith(GenerateTask):
    name = "arith"
    description = "arithmetic problems from reasoning-gym (basic_arithmetic, chain_sum), exact match of the answer"
    until = ("\n\n", "\nQ:")
    max_gen_toks = 32
    per_generator = 100

    def load(self, ctx: TaskContext) -> TaskData:
        import reasoning_gym

        items = []
        for name, cfg in ARITH_GENERATORS.items():
            ds = reasoning_gym.create_dataset(name, size=self.per_generator, seed=ctx.seed, **cfg)
            for i, x in enumerate(ds):
                items.append(Item(f"{name}/{i:03d}", {"question": x["question"], "answer": x["answer"]}, label=name))
        src = f"reasoning_gym {version('reasoning_gym')} " + ", ".join(ARITH_GENERATORS) + f" seed {ctx.seed}"
        return TaskData(items, f"{src} ({self.per_generator} each, 2 terms of 1-2 digits)")

    def doc_to_text(self, doc: dict) -> str:
        return f"{ARITH_EXAMPLE}Q: {doc['question']}\nA:"

    def score(self, doc: dict, generation: str) -> dict[str, float]:
        pred = extract_answer(generation)
        return {"exact_match": float(numbers_equal(pred, float(doc["answer"]))), "pred": pred, "target": doc["answer"]}


text_ppl = TextPerplexity()
text_cloze = TextCloze()
arith = Arith()
