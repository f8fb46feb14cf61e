"""The LM protocol against a plain full-sequence forward pass computed independently here."""

import torch

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
