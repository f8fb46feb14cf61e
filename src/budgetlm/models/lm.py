"""The LM protocol over a torch causal LM: loglikelihood, loglikelihood_rolling, generate_until.

loglikelihood feeds each distinct context once, followed by all its continuations (each but its last token), in
one stretch of a packed row: a block mask lets a continuation's tokens see their own context and the earlier tokens
of their own continuation only, and their position ids restart after the context, so every score equals the one of
context + continuation fed alone; several stretches share a row, so almost nothing is padding. Where one block mask
cannot serve every layer (a sliding window shorter than the sequence, other attention kernels) the context is fed
first with a KV cache and the continuations in padded rows on its cache rows. Padded positions never change a result
(explicit position ids, masks on the key side only).
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from budgetlm.models.handle import ModelHandle

TOKEN_BUDGET = 1024  # tokens per forward pass when no batch size is given (fastest measured on 2 cores)
PAD_SLACK = 0.25  # at most this fraction of a chunk's padded tokens are padding (GEMMs of 256+ rows run as fast)
ROW_TOKENS = 128  # length of a packed loglikelihood row (a longer stretch gets a row of its own)


@dataclass
class GenArgs:
    until: list[str] = field(default_factory=list)
    max_gen_toks: int = 256
    chat: bool = True  # wrap the prompt in the chat template when the model has one


def _chunks_by_budget(lengths: list[int], batch_size: int | None, budget: int) -> Iterator[list[int]]:
    """Consecutive index chunks whose padded size (rows x longest) stays within the budget and wastes at most
    PAD_SLACK of it on padding (lengths sorted longest first: a short row joins a chunk of long ones only while the
    padding stays small). With a batch size, chunks of that many rows."""
    chunk: list[int] = []
    longest = real = 0
    for i, n in enumerate(lengths):
        new_longest = max(longest, n)
        padded = new_longest * (len(chunk) + 1)
        full = batch_size is not None and len(chunk) >= batch_size
        over = batch_size is None and chunk and (padded > budget or padded > (1 + PAD_SLACK) * (real + n))
        if full or over:
            yield chunk
            chunk, new_longest, real = [], n, 0
        chunk.append(i)
        longest, real = new_longest, real + n
    if chunk:
        yield chunk


def _pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices grouped into rows of at most `capacity` tokens (a longer item alone): each row takes the longest
    item left, then repeatedly the longest that still fits."""
    left = sorted(range(len(lengths)), key=lambda i: lengths[i])
    sizes = [lengths[i] for i in left]
    rows = []
    while left:
        row, room = [left.pop()], capacity - sizes.pop()
        while (j := bisect.bisect_right(sizes, room) - 1) >= 0:
            row.append(left.pop(j))
            room -= sizes.pop(j)
        rows.append(row)
    return rows


@dataclass
class GenTally:
    """What generation cost since the last reset: tokens generated, seconds, and with speculative decoding the sums
    of each level's counters (decode.speculative.LevelStats)."""

    tokens: int = 0
    seconds: float = 0.0
    levels: list[dict] = field(default_factory=list)

    def add_levels(self, levels: list[dict]) -> None:
        if not self.levels:
            self.levels = [{k: v for k, v in lv.items() if k in ("model",)} for lv in levels]
        for acc, lv in zip(self.levels, levels):
            for k in ("rounds", "proposed", "accepted", "drafted", "forwards", "tokens_fed", "seconds"):
                acc[k] = acc.get(k, 0) + lv[k]


class HFLM:
    def __init__(self, handle: ModelHandle, batch_size: int | None = None, max_length: int | None = None, decoder=None):
        """`decoder`: a decode.generate.Generator that generate_until uses one request at a time (speculative
        decoding with drafts); without it, transformers' batched generate()."""
        self.handle = handle
        self.decoder = decoder
        self.tally = GenTally()
        self.model = handle.model
        self.tokenizer = handle.tokenizer
        self.batch_size = batch_size
        cfg = self.model.config
        self.max_length = max_length or min(2048, getattr(cfg, "max_position_embeddings", 2048) or 2048)
        self.softcap = getattr(cfg, "final_logit_softcapping", None)
        tok = self.tokenizer
        self.prefix_token = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)

    # -- helpers -------------------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _decoder(self):
        return self.model.get_decoder()

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.model.get_output_embeddings()(hidden).float()
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def _pad(self, seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        longest = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), longest), dtype=torch.long)
        for r, s in enumerate(seqs):
            ids[r, : len(s)] = torch.tensor(s, dtype=torch.long)
            mask[r, : len(s)] = 1
        return ids, mask

    def _hidden(self, seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = self._pad(seqs)
        pos = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)
        out = self._decoder()(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False)
        return out.last_hidden_state, mask

    # -- loglikelihood -------------------------------------------------------------------------------------
    def _split(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """lm-eval's split: trailing spaces of the context move to the continuation, the pair is encoded
        whole and the continuation is what follows the context's own encoding."""
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            continuation = context[-n_spaces:] + continuation
            context = context[:-n_spaces]
        if not context:
            return [self.prefix_token], self.encode(continuation)
        whole = self.encode(context + continuation)
        ctx = self.encode(context)
        return whole[: len(ctx)], whole[len(ctx) :]

    def fit_requests(self, reqs: list[tuple[str, str]]) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
        """Each request split (_split) and truncated from the left so that context + continuation fits (the last
        token is never fed)."""
        fitted = []
        for ctx, cont in (self._split(c, x) for c, x in reqs):
            cont = cont[-self.max_length :]
            room = self.max_length + 1 - len(cont)
            fitted.append((tuple(ctx[-room:]) if room > 0 else tuple(ctx[-1:]), tuple(cont)))
        return fitted

    @torch.inference_mode()
    def loglikelihood(self, reqs: list[tuple[str, str]]) -> list[tuple[float, bool]]:
        fitted = self.fit_requests(reqs)
        groups: dict[tuple[int, ...], list[tuple[int, ...]]] = {}
        for ctx, cont in fitted:
            conts = groups.setdefault(ctx, [])
            if cont not in conts:
                conts.append(cont)
        scores: dict[tuple, tuple[float, bool]] = {}
        window = self._pack_window()
        packed = [c for c in groups if len(c) + max(len(x) for x in groups[c]) - 1 <= window]
        self._score_packed(packed, groups, scores)
        cached = sorted(set(groups).difference(packed), key=lambda c: -len(c))  # similar lengths share a batch
        # a sliding window counts cache slots: padding a shorter context to a batch's width would put slots between
        # it and its continuations, so where a layer slides each context gets a batch of its own
        per_batch = 1 if self._slides() else self.batch_size
        for chunk in _chunks_by_budget([len(c) for c in cached], per_batch, TOKEN_BUDGET):
            self._score_groups([cached[i] for i in chunk], groups, scores)
        return [scores[(ctx, cont)] for ctx, cont in fitted]

    def _pack_window(self) -> float:
        """The longest sequence (context + continuation but its last token) the packed pass scores exactly: no limit
        under causal attention, a sliding window's length where layers slide (one block mask serves every layer only
        while no window cuts a sequence), 0 (never packed) where the model takes no 4D mask of ours: attention
        kernels other than sdpa/eager, chunked, linear or bidirectional attention layers."""
        cfg = self.model.config
        kinds = set(getattr(cfg, "layer_types", None) or ["full_attention"])
        if (
            cfg._attn_implementation not in ("sdpa", "eager")
            or not kinds <= {"full_attention", "sliding_attention"}
            or getattr(cfg, "attention_chunk_size", None)
            or getattr(cfg, "use_bidirectional_attention", False)
            or not getattr(cfg, "is_causal", True)
        ):
            return 0
        return cfg.sliding_window if self._slides() else float("inf")

    def _slides(self) -> bool:
        """Whether some layer attends to a sliding window only."""
        cfg = self.model.config
        kinds = set(getattr(cfg, "layer_types", None) or ["full_attention"])
        every = not getattr(cfg, "layer_types", None)  # Mistral: a sliding_window applies to every layer
        return bool(getattr(cfg, "sliding_window", None)) and ("sliding_attention" in kinds or every)

    def _score_packed(self, contexts, groups, scores) -> None:
        """Stretches (a context and its continuations; split only where they exceed max_length + 1 tokens) packed
        into rows of ROW_TOKENS, rows batched by the token budget."""
        stretches = []
        for ctx in contexts:
            conts, n = [], len(ctx)
            for cont in groups[ctx]:
                if conts and n + len(cont) - 1 > self.max_length + 1:
                    stretches.append((ctx, conts, n))
                    conts, n = [], len(ctx)
                conts.append(cont)
                n += len(cont) - 1
            stretches.append((ctx, conts, n))
        rows = [[stretches[i] for i in row] for row in _pack_rows([n for *_, n in stretches], ROW_TOKENS)]
        rows.sort(key=lambda row: -sum(n for *_, n in row))
        lengths = [sum(n for *_, n in row) for row in rows]
        for chunk in _chunks_by_budget(lengths, self.batch_size, TOKEN_BUDGET):
            self._score_rows([rows[i] for i in chunk], scores)

    def _score_rows(self, rows, scores) -> None:
        width = max(sum(n for *_, n in row) for row in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        pos = torch.zeros_like(ids)
        stretch = torch.full_like(ids, -1)  # which stretch of its row a token is in (-1: padding)
        part = torch.zeros_like(ids)  # 0: the context, k: the stretch's k-th continuation
        index: list[int] = []  # flat positions whose hidden states are projected onto the vocabulary
        spans = []  # per continuation: its rows of `index` (the context's last position, then its own)
        for r, row in enumerate(rows):
            at = 0
            for s, (ctx, conts, n) in enumerate(row):
                segments = [ctx] + [cont[:-1] for cont in conts]
                ids[r, at : at + n] = torch.tensor([t for seg in segments for t in seg])
                stretch[r, at : at + n] = s
                pos[r, at : at + n] = torch.cat(
                    [torch.arange(len(ctx))] + [len(ctx) + torch.arange(len(seg)) for seg in segments[1:]]
                )
                part[r, at : at + n] = torch.cat([torch.full((len(seg),), k) for k, seg in enumerate(segments)])
                first = len(index)
                index.append(r * width + at + len(ctx) - 1)
                at += len(ctx)
                for cont, seg in zip(conts, segments[1:]):
                    spans.append((ctx, cont, [first, *range(len(index), len(index) + len(seg))]))
                    index += range(r * width + at, r * width + at + len(seg))
                    at += len(seg)
        q, k = (slice(None), slice(None), None), (slice(None), None, slice(None))
        mask = (stretch[q] == stretch[k]) & (pos[q] >= pos[k]) & ((part[k] == 0) | (part[q] == part[k]))
        mask = mask.unsqueeze(1)
        if self.model.config._attn_implementation == "eager":  # an additive mask
            mask = torch.zeros(mask.shape).masked_fill_(~mask, torch.finfo(torch.float32).min)
        out = self._decoder()(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False)
        hidden = out.last_hidden_state.flatten(0, 1)[torch.tensor(index)]
        logp = F.log_softmax(self._logits(hidden), dim=-1)
        at = torch.tensor([i for *_, rows_ in spans for i in rows_])
        target = torch.tensor([t for _, cont, _ in spans for t in cont])
        sizes = [len(cont) for _, cont, _ in spans]
        picked, hit = logp[at, target].split(sizes), (logp.argmax(-1)[at] == target).split(sizes)
        for (ctx, cont, _), p, h in zip(spans, picked, hit):
            scores[(ctx, cont)] = (float(p.sum()), bool(h.all()))

    def _score_groups(self, contexts, groups, scores) -> None:
        """Contexts in padded rows with a KV cache, then each continuation but its last token on its context's
        cache rows (for models the packed pass cannot serve)."""
        from transformers import DynamicCache

        ids, mask = self._pad([list(c) for c in contexts])
        pos = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)
        cache = DynamicCache(config=self.model.config)
        out = self._decoder()(
            input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True
        )
        ctx_len = mask.sum(1)
        last_hidden = out.last_hidden_state[torch.arange(len(contexts)), ctx_len - 1]
        first_logp = F.log_softmax(self._logits(last_hidden), dim=-1)  # predicts each continuation's first token
        rows = [(g, cont) for g, c in enumerate(contexts) for cont in groups[c]]
        rows.sort(key=lambda r: -len(r[1]))  # continuations of similar length share a batch: little padding
        for chunk in _chunks_by_budget([len(c) for _, c in rows], self.batch_size, TOKEN_BUDGET):
            part = [rows[i] for i in chunk]
            hidden = None
            if len(part[0][1]) > 1:  # feed each continuation but its last token on top of its context's cache
                index = torch.tensor([g for g, _ in part])
                sub = DynamicCache(config=self.model.config)
                for layer_idx, layer in enumerate(cache.layers):
                    sub.update(layer.keys[index], layer.values[index], layer_idx)
                fids, fmask = self._pad([list(cont[:-1]) or [self.pad_id] for _, cont in part])
                full_mask = torch.cat([mask[index], fmask], dim=1)
                fpos = ctx_len[index].unsqueeze(1) + torch.arange(fids.shape[1]).unsqueeze(0)
                hidden = self._decoder()(
                    input_ids=fids, attention_mask=full_mask, position_ids=fpos, past_key_values=sub, use_cache=True
                ).last_hidden_state
            # one vocabulary projection for every scored position of the batch
            spans, rows_h = [], []
            for r, (_, cont) in enumerate(part):
                spans.append(len(cont) - 1)
                if hidden is not None and len(cont) > 1:
                    rows_h.append(hidden[r, : len(cont) - 1])
            rest = F.log_softmax(self._logits(torch.cat(rows_h)), dim=-1) if rows_h else None
            offset = 0
            for (g, cont), n in zip(part, spans):
                target = torch.tensor(cont)
                logp = first_logp[g : g + 1]
                if n:
                    logp = torch.cat([logp, rest[offset : offset + n]])
                    offset += n
                picked = logp.gather(1, target.unsqueeze(1)).squeeze(1)
                greedy = bool((logp.argmax(-1) == target).all())
                scores[(contexts[g], cont)] = (float(picked.sum()), greedy)

    # -- rolling loglikelihood (perplexity) ----------------------------------------------------------------
    def rolling_tokens(self, text: str) -> list[int]:
        return [self.prefix_token] + self.encode(text)

    def token_count(self, text: str) -> int:
        return len(self.encode(text))

    def _windows(self, tokens: list[int], stride: int) -> list[tuple[list[int], int]]:
        """(window tokens, index of the first scored position) covering every target token exactly once."""
        stride = max(1, min(stride, self.max_length - 1))  # every window keeps at least one context token
        out: list[tuple[list[int], int]] = []
        scored_to, n = 1, len(tokens)
        while scored_to < n:
            end = min(n, scored_to + stride if out else self.max_length)
            begin = max(0, end - self.max_length)
            out.append((tokens[begin:end], scored_to - begin))
            scored_to = end
        return out

    @torch.inference_mode()
    def loglikelihood_rolling(self, texts: list[str], stride: int | None = None) -> list[float]:
        stride = stride or self.max_length
        windows = []  # (text index, tokens, first scored position)
        for t, text in enumerate(texts):
            windows += [(t, w, s) for w, s in self._windows(self.rolling_tokens(text), stride)]
        order = sorted(range(len(windows)), key=lambda i: -len(windows[i][1]))
        totals = [0.0] * len(texts)
        for chunk in _chunks_by_budget([len(windows[i][1]) for i in order], self.batch_size, TOKEN_BUDGET):
            idx = [order[i] for i in chunk]
            hidden, _ = self._hidden([windows[i][1] for i in idx])
            for r, i in enumerate(idx):
                t, toks, first = windows[i]
                logp = F.log_softmax(self._logits(hidden[r, first - 1 : len(toks) - 1]), dim=-1)
                target = torch.tensor(toks[first:])
                totals[t] += float(logp.gather(1, target.unsqueeze(1)).sum())
        return totals

    @torch.inference_mode()
    def token_logprobs(self, token_ids: list[list[int]]) -> Iterator[torch.Tensor]:
        """Per sequence, in input order: [len-1, vocab] next-token log-probabilities (fp32)."""
        lengths = [len(s) for s in token_ids]
        for chunk in _chunks_by_budget(lengths, self.batch_size, TOKEN_BUDGET // 2):
            hidden, _ = self._hidden([token_ids[i][: self.max_length] for i in chunk])
            for r, i in enumerate(chunk):
                n = min(lengths[i], self.max_length)
                yield F.log_softmax(self._logits(hidden[r, : n - 1]), dim=-1)

    # -- generation ----------------------------------------------------------------------------------------
    def format_prompt(self, prompt: str, chat: bool) -> str:
        if chat and self.handle.is_instruct:
            msgs = [{"role": "user", "content": prompt}]
            return self.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        return prompt

    @torch.inference_mode()
    def generate_until(self, reqs: list[tuple[str, GenArgs]]) -> list[str]:
        results: list[str | None] = [None] * len(reqs)
        prompts = [self.encode(self.format_prompt(p, a.chat)) for p, a in reqs]
        if self.decoder is not None:
            return [self._decode_one(ids, a) for ids, (_, a) in zip(prompts, reqs)]
        by_args: dict[tuple, list[int]] = {}
        for i, (_, a) in enumerate(reqs):
            by_args.setdefault((tuple(a.until), a.max_gen_toks), []).append(i)
        for (until, max_new), idx in by_args.items():
            idx.sort(key=lambda i: -len(prompts[i]))
            budget = max(1, TOKEN_BUDGET // 2)
            lengths = [len(prompts[i]) + max_new for i in idx]
            for chunk in _chunks_by_budget(lengths, self.batch_size or 16, budget * 16):
                rows = [idx[c] for c in chunk]
                texts = self._generate([prompts[i] for i in rows], list(until), max_new)
                for i, text in zip(rows, texts):
                    results[i] = text
        return [r or "" for r in results]

    def _decode_one(self, ids: list[int], args: GenArgs) -> str:
        room = self.max_length - args.max_gen_toks
        out = self.decoder(ids[-room:] if room > 0 else ids[-1:], args.max_gen_toks, list(args.until))
        self.tally.tokens += len(out.tokens)
        self.tally.seconds += out.seconds
        self.tally.add_levels(out.levels)
        return out.text

    def _generate(self, prompts: list[list[int]], until: list[str], max_new: int) -> list[str]:
        t0 = time.perf_counter()
        room = self.max_length - max_new
        prompts = [p[-room:] if room > 0 else p[-1:] for p in prompts]
        longest = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, p in enumerate(prompts):  # left padding for generation
            ids[r, longest - len(p) :] = torch.tensor(p)
            mask[r, longest - len(p) :] = 1
        kwargs = {"stop_strings": until, "tokenizer": self.tokenizer} if until else {}
        out = self.model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new,
            do_sample=False,
            pad_token_id=self.pad_id,
            eos_token_id=self.tokenizer.eos_token_id,
            **kwargs,
        )
        new = out[:, longest:]
        ends = {self.pad_id, self.tokenizer.eos_token_id}
        for row in new.tolist():  # tokens generated before a row's end (eos, then padding)
            self.tally.tokens += next((i + 1 for i, t in enumerate(row) if t in ends), len(row))
        self.tally.seconds += time.perf_counter() - t0
        texts = []
        for row in new:
            text = self.tokenizer.decode(row, skip_special_tokens=True)
            for stop in until:
                if stop and stop in text:
                    text = text[: text.index(stop)]
            texts.append(text)
        return texts
