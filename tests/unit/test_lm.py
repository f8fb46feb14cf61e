"""The LM protocol against a plain full-sequence forward pass computed independently here."""

import pytest
import torch

from budgetlm.decode import query
from budgetlm.models.lm import HFLM, GenArgs


def reference_loglik(model, ctx_ids, cont_ids):
    ids = torch.tensor([ctx_ids + cont_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].double(), -1)
    rows = [logp[len(ctx_ids) - 1 + j] for j in range(len(cont_ids))]
    total = sum(float(r[t]) for r, t in zip(rows, cont_ids))
    greedy = all(int(r.argmax()) == t for r, t in zip(rows, cont_ids))
    return total, greedy


REQS = [
    ("The cat sat on the", " mat"),
    ("The cat sat on the", " dog and then it ran far away"),
    ("The cat sat on the ", "mat"),  # trailing space moves to the continuation
    ("Hello", " world, how are you"),
    ("Question: 2+2?\nAnswer:", " 4"),
    ("", "Text with no context"),
    ("A long context that repeats itself. " * 6, " yes"),
]


def test_loglikelihood_matches_full_forward(tiny):
    lm = HFLM(tiny)
    out = lm.loglikelihood(REQS)
    for (ctx, cont), (ll, greedy) in zip(REQS, out):
        c, x = lm._split(ctx, cont)
        ref, ref_greedy = reference_loglik(tiny.model, c, x)
        assert abs(ll - ref) < 1e-3, (ctx, cont, ll, ref)
        assert greedy == ref_greedy


def test_loglikelihood_independent_of_batching(tiny):
    a = HFLM(tiny).loglikelihood(REQS)
    b = HFLM(tiny, batch_size=1).loglikelihood(REQS)
    for (x, _), (y, _) in zip(a, b):
        assert abs(x - y) < 1e-4


def test_split_follows_lm_eval(tiny):
    lm = HFLM(tiny)
    ctx, cont = lm._split("abc ", "def")
    assert lm.tokenizer.decode(ctx) == "abc" and lm.tokenizer.decode(cont) == " def"
    ctx, cont = lm._split("", "xyz")
    assert ctx == [lm.prefix_token]


def test_greedy_flag_true_for_argmax_continuation(tiny):
    lm = HFLM(tiny)
    ids = lm.encode("Some context")
    with torch.no_grad():
        nxt = int(tiny.model(torch.tensor([ids])).logits[0, -1].argmax())
    cont = lm.tokenizer.decode([nxt])
    ll, greedy = lm.loglikelihood([("Some context", cont)])[0]
    c, x = lm._split("Some context", cont)
    if x == [nxt]:
        assert greedy


def test_rolling_equals_sum_of_token_logprobs(tiny):
    lm = HFLM(tiny)
    text = "The quick brown fox jumps over the lazy dog. " * 4
    toks = lm.rolling_tokens(text)
    ref, _ = reference_loglik(tiny.model, toks[:1], toks[1:])
    assert abs(lm.loglikelihood_rolling([text])[0] - ref) < 1e-3
    assert lm.token_count(text) == len(toks) - 1


def test_rolling_windows_cover_each_token_once(tiny):
    lm = HFLM(tiny, max_length=16)
    toks = list(range(50))
    for stride in (4, 8, 15, 100):
        windows = lm._windows(toks, stride)
        scored = [t for w, first in windows for t in w[first:]]
        assert scored == toks[1:]
        assert all(len(w) <= 16 and first >= 1 for w, first in windows)
    # windowed scoring with overlap differs from disjoint windows but stays finite
    text = "The quick brown fox jumps over the lazy dog. " * 3
    a, b = lm.loglikelihood_rolling([text], stride=4)[0], lm.loglikelihood_rolling([text], stride=15)[0]
    assert a != b and a < 0 and b < 0


def test_token_logprobs_shape_and_values(tiny):
    lm = HFLM(tiny)
    seqs = [lm.encode("hello there"), lm.encode("a much longer sequence of text here")]
    outs = list(lm.token_logprobs(seqs))
    for s, lp in zip(seqs, outs):
        assert lp.shape == (len(s) - 1, tiny.model.config.vocab_size)
        with torch.no_grad():
            ref = torch.log_softmax(tiny.model(torch.tensor([s])).logits[0, :-1].float(), -1)
        assert torch.allclose(lp, ref, atol=1e-4)


def test_generate_until_matches_unbatched_greedy_and_stops(tiny):
    lm = HFLM(tiny)
    prompts = ["abc", "a longer prompt here", "x"]
    outs = lm.generate_until([(p, GenArgs(until=[], max_gen_toks=8)) for p in prompts])
    for p, o in zip(prompts, outs):
        ids = torch.tensor([lm.encode(p)])
        with torch.no_grad():
            ref = tiny.model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=lm.pad_id)
        assert o == lm.tokenizer.decode(ref[0, ids.shape[1] :], skip_special_tokens=True)
    full = outs[1]
    if len(full) > 2:
        stop = full[1]
        cut = lm.generate_until([(prompts[1], GenArgs(until=[stop], max_gen_toks=8))])[0]
        assert cut == full[: full.index(stop)]


def test_chunks_bound_padding_and_budget():
    """Rows sorted longest first: every chunk stays within the token budget and wastes at most PAD_SLACK of its
    padded size on padding (or is a single row); every row appears once, in order; a batch size is a row count."""
    import random

    from budgetlm.models.lm import PAD_SLACK, _chunks_by_budget

    rng = random.Random(0)
    lengths = sorted((rng.choice([1, 2, 3, 5, 8, 14, 30, 95]) for _ in range(400)), reverse=True)
    chunks = list(_chunks_by_budget(lengths, None, 256))
    assert [i for c in chunks for i in c] == list(range(len(lengths)))
    for c in chunks:
        padded, real = max(lengths[i] for i in c) * len(c), sum(lengths[i] for i in c)
        assert len(c) == 1 or (padded <= 256 and padded <= (1 + PAD_SLACK) * real)
    assert [len(c) for c in _chunks_by_budget(lengths, 7, 256)] == [7] * 57 + [1]


# -- the packed loglikelihood pass ---------------------------------------------------------------------------------
# Contexts shared by continuations of unequal lengths (1 token: nothing fed after the context), a continuation shared
# by two contexts, a repeated request, contexts and continuations long enough to cross a small sliding window.
SHARED = [
    ("Question: what colour is the sky?\nAnswer:", " blue"),
    ("Question: what colour is the sky?\nAnswer:", " a pale shade of grey on most winter days"),
    ("Question: what colour is the sky?\nAnswer:", "!"),
    ("Question: what colour is the sky?\nAnswer:", " green"),
    ("Q: 1+1?\nA:", " green"),
    ("Q: 1+1?\nA:", " 2"),
    ("Q: 1+1?\nA:", " two, because one and one make two"),
    ("Q: 1+1?\nA:", " 2"),
    ("A much longer shared context that runs on and on. " * 3, " yes"),
    ("A much longer shared context that runs on and on. " * 3, " no, not at all, never"),
    ("x", " y"),
    ("", "no context at all"),
]


def reference_each(lm, reqs):
    """Every request alone: context + continuation in one unpadded full forward pass."""
    return [reference_loglik(lm.model, *lm._split(ctx, cont)) for ctx, cont in reqs]


def assert_matches(out, ref, tol=1e-4):
    for (ll, greedy), (r, r_greedy), req in zip(out, ref, SHARED):
        assert abs(ll - r) < tol, (req, ll, r)
        assert greedy == r_greedy, req


def count_paths(monkeypatch, lm):
    """How many continuations each pass scored."""
    seen = {"packed": 0, "cached": 0}
    packed, cached = lm._score_packed, lm._score_groups

    def spy_packed(contexts, groups, scores):
        seen["packed"] += sum(len(groups[c]) for c in contexts)
        packed(contexts, groups, scores)

    def spy_cached(contexts, groups, scores):
        seen["cached"] += sum(len(groups[c]) for c in contexts)
        cached(contexts, groups, scores)

    monkeypatch.setattr(lm, "_score_packed", spy_packed)
    monkeypatch.setattr(lm, "_score_groups", spy_cached)
    return seen


def test_packed_rows_match_each_request_fed_alone(tiny, monkeypatch):
    """Several stretches per row (short rows force padding at row ends and stretches longer than a row), any batch
    size: every request equals its own full forward pass."""
    import budgetlm.models.lm as lm_module

    ref = reference_each(HFLM(tiny), SHARED)
    for row_tokens in (16, 64, 1024):
        monkeypatch.setattr(lm_module, "ROW_TOKENS", row_tokens)
        for batch_size in (None, 1, 3):
            lm = HFLM(tiny, batch_size=batch_size)
            seen = count_paths(monkeypatch, lm)
            assert_matches(lm.loglikelihood(SHARED), ref)
            assert seen == {"packed": 11, "cached": 0}  # 11 distinct requests, all packed


def test_packed_stretch_split_beyond_max_length(tiny):
    """A context whose continuations together exceed max_length + 1 tokens is split over several stretches."""
    lm = HFLM(tiny, max_length=60)
    ctx = "Shared context of some length. "
    reqs = [(ctx, f" continuation number {i} is here") for i in range(5)]
    for (ll, _), (r, _) in zip(lm.loglikelihood(reqs), reference_each(lm, reqs)):
        assert abs(ll - r) < 1e-4


def test_pack_rows_fill_rows_and_keep_every_item_once():
    from budgetlm.models.lm import _pack_rows

    lengths = [90, 5, 40, 300, 60, 30, 64, 1, 128, 70]
    rows = _pack_rows(lengths, 128)
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in r) <= 128 or len(r) == 1 for r in rows)
    assert rows[0] == [3] and rows[1] == [8]  # longer than a row: alone
    assert len(rows) == 5  # 300 and 128 alone, the other 360 tokens in 3 rows


def tiny_gemma3(sliding_window: int, attn: str = "sdpa"):
    """Gemma 3 with local (sliding) and global layers and a final logit softcap."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from budgetlm.models.handle import ModelHandle
    from budgetlm.models.sources import tiny_tokenizer

    tok = tiny_tokenizer()
    cfg = Gemma3TextConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32, sliding_window=sliding_window, max_position_embeddings=512,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        final_logit_softcapping=5.0, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    cfg._attn_implementation = attn
    torch.manual_seed(3)
    model = Gemma3ForCausalLM(cfg).eval()
    with torch.no_grad():  # Gemma norms start at 0 (scale 1 + w): make them matter
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(torch.randn_like(p) * 0.3)
    return ModelHandle(model, tok, "tiny-gemma3", [], "tiny-gemma3")


def test_gemma3_sliding_window_packs_short_and_falls_back_for_long(monkeypatch):
    """A window of 48 tokens: stretches whose sequences fit it are packed (one block mask is right for local and
    global layers alike), longer ones take the KV-cache pass, whose masks transformers builds per layer kind; both
    equal each request fed alone through the whole model (softcap included)."""
    handle = tiny_gemma3(sliding_window=48)
    lm = HFLM(handle)
    lengths = [sum(map(len, lm._split(c, x))) - 1 for c, x in SHARED]
    assert min(lengths) <= 48 < max(lengths)
    ref = reference_each(lm, SHARED)
    # the window matters here: the same weights with global attention everywhere score the long requests otherwise
    wide = tiny_gemma3(sliding_window=512)
    long_req = SHARED[lengths.index(max(lengths))]
    assert abs(reference_each(lm, [long_req])[0][0] - reference_each(HFLM(wide), [long_req])[0][0]) > 1e-3
    seen = count_paths(monkeypatch, lm)
    assert_matches(lm.loglikelihood(SHARED), ref)
    assert seen == {"packed": 5, "cached": 6}  # the contexts "Q: 1+1?", "x" and "" fit the window


def test_gemma3_cached_pass_never_pads_between_a_context_and_its_continuations(monkeypatch):
    """Contexts longer than the window, of different lengths: were they padded to one width in a batch, the padding
    would sit between a shorter context and its continuations and count against the sliding window (it counts cache
    slots). Each context is fed in a batch of its own; every request equals its own full forward pass."""
    handle = tiny_gemma3(sliding_window=8)
    lm = HFLM(handle)
    base = "The quick brown fox jumps over the lazy dog. "
    reqs = [(base, " and then" * 3), (base + "more words", " words" * 8), (base, " x"), (base + "z", " y y")]
    seen = count_paths(monkeypatch, lm)
    batches, spied = [], lm._score_groups
    monkeypatch.setattr(lm, "_score_groups", lambda c, g, s: (batches.append(len(c)), spied(c, g, s)))
    assert_matches(lm.loglikelihood(reqs), reference_each(lm, reqs))
    assert seen == {"packed": 0, "cached": 4} and batches == [1, 1, 1]  # three distinct contexts, a batch each


def test_gemma3_eager_attention_takes_an_additive_mask(monkeypatch):
    handle = tiny_gemma3(sliding_window=512, attn="eager")
    lm = HFLM(handle)
    seen = count_paths(monkeypatch, lm)
    assert_matches(lm.loglikelihood(SHARED), reference_each(lm, SHARED))
    assert seen == {"packed": 11, "cached": 0}


def test_other_attention_kernels_take_the_cached_pass(tiny, monkeypatch):
    monkeypatch.setattr(tiny.model.config, "_attn_implementation", "flex_attention")
    lm = HFLM(tiny)
    assert lm._pack_window() == 0


def test_query_loglikelihood_matches_full_forward_and_the_batched_pass(tiny):
    lm = HFLM(tiny)
    batched = lm.loglikelihood(REQS)
    for (ctx, cont), (ll, greedy), (b, _) in zip(REQS, query.loglikelihood(lm, REQS), batched):
        ref, ref_greedy = reference_loglik(tiny.model, *lm._split(ctx, cont))
        assert abs(ll - ref) < 1e-3 and greedy == ref_greedy, (ctx, cont, ll, ref)
        assert abs(ll - b) < 1e-4


def test_query_feeds_a_context_once_and_reuses_the_gates_forward(tiny):
    lm = HFLM(tiny)
    prompt = "Question: is the sky blue?\nAnswer:"
    one = [(prompt, "y"), (prompt, "n")]  # one token each (the tiny model's tokenizer is byte-level)
    many = [(prompt, " yes it is blue"), (prompt, " no, it is red"), (prompt, " yes")]
    fresh = query.loglikelihood(lm, one)
    query.reset(lm)
    logp = query.next_token_logprobs(lm, prompt)
    cached = query._cached(lm)
    fed = cached.fed
    assert query.loglikelihood(lm, one) == fresh  # the same scores, bitwise, from the gate's forward ...
    assert cached.fed == fed  # ... which fed nothing more: single-token choices read the prompt's last row
    ids = lm.encode(prompt)
    assert all(len(lm._split(c, x)[1]) == 1 for c, x in one)
    assert [float(logp[lm._split(c, x)[1][0]]) for c, x in one] == pytest.approx([ll for ll, _ in fresh], abs=1e-6)
    before = cached.fed
    out = query.loglikelihood(lm, many)
    conts = [lm._split(c, x)[1] for c, x in many]
    assert lm._split(prompt, " yes")[0] == ids
    assert cached.fed - before == sum(len(c) - 1 for c in conts)  # the context is not fed again
    query.reset(lm)
    query.loglikelihood(lm, [("Something else entirely", " first")])  # an earlier query ...
    query.reset(lm)
    assert query.loglikelihood(lm, many) == out  # ... leaves no trace after query_reset
