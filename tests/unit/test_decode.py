"""Generation and hierarchical speculative decoding (budgetlm.decode) on tiny float64 models.

References are written here independently: plain greedy decoding without a cache (one full forward per token),
transformers' own generate(), and a toy sampler whose output distribution is known."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import chisquare

from budgetlm.decode.cached import CachedLM
from budgetlm.decode.drafts import first_layers
from budgetlm.decode.generate import Generator
from budgetlm.decode.lean import cached_kv
from budgetlm.decode.speculative import Chain, Sampler, entropy
from budgetlm.models.sources import tiny_config, tiny_tokenizer

TOK = tiny_tokenizer()


def llama(seed: int, layers: int = 4, std: float = 0.2):
    """A tiny Llama whose greedy output varies (the default init repeats one token)."""
    from transformers import LlamaForCausalLM

    cfg = tiny_config()
    cfg.num_hidden_layers, cfg.initializer_range = layers, std
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval().double()


def gemma(seed: int, window: int = 8):
    """A tiny Gemma 3 with sliding-window layers shorter than the sequences and a logit soft-cap."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    kinds = ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"]
    ids = {"bos_token_id": TOK.bos_token_id, "eos_token_id": TOK.eos_token_id, "pad_token_id": TOK.pad_token_id}
    cfg = Gemma3TextConfig(
        vocab_size=len(TOK), hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32, sliding_window=window, layer_types=kinds, max_position_embeddings=512,
        initializer_range=0.05, final_logit_softcapping=30.0, **ids,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = Gemma3ForCausalLM(cfg).eval().double()
    with torch.no_grad():
        model.model.embed_tokens.weight.normal_(0, 0.02)
    return model


def greedy_reference(model, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding without any cache: the whole sequence through the model for every token."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(prompt) :]


def prompt_of(length: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (length,), generator=g).tolist()


class Shifted(torch.nn.Module):
    """A draft whose greedy token is never the model's: the model's logits rolled by one vocabulary entry."""

    def __init__(self, model):
        super().__init__()
        self.inner = model
        self.config = model.config

    def forward(self, **kw):
        out = self.inner(**kw)
        out.logits = out.logits.roll(1, dims=-1)
        return out


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("length", [1, 30])
def test_exact_mode_equals_greedy_for_every_chain(seed, length):
    v = llama(seed)
    prompt = prompt_of(length, seed)
    want = greedy_reference(v, prompt, 24)
    hf = v.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert hf[0, length:].tolist() == want  # the reference itself agrees with transformers
    other = llama(seed + 10)
    chains = {
        "plain": [],
        "layers:1": [("l1", first_layers(v, 1))],
        "layers:3": [("l3", first_layers(v, 3))],
        "other model": [("o", other)],
        "three levels": [("l1", first_layers(v, 1)), ("l3", first_layers(v, 3))],
        "three levels, other first": [("o", other), ("l2", first_layers(v, 2))],
    }
    for name, drafts in chains.items():
        for max_draft in (1, 4):
            gen = Generator(drafts + [("v", v)], TOK, taus=[None] * len(drafts), max_draft=max_draft)
            out = gen(prompt, 24)
            assert out.tokens == want, (name, max_draft)


def test_exact_mode_with_sliding_window_layers_and_softcap():
    v = gemma(0)
    prompt = prompt_of(12, 3)
    want = greedy_reference(v, prompt, 30)
    assert len(set(want)) > 5  # the model does not just repeat a token
    for drafts in ([("l1", first_layers(v, 1))], [("l3", first_layers(v, 3))], [("o", gemma(5))]):
        out = Generator(drafts + [("v", v)], TOK, taus=[None], max_draft=5)(prompt, 30)
        assert out.tokens == want


def test_first_drafted_token_always_rejected_and_whole_proposals_accepted():
    v = llama(0)
    prompt = prompt_of(9, 0)
    want = greedy_reference(v, prompt, 20)
    out = Generator([("bad", Shifted(v)), ("v", v)], TOK, taus=[None], max_draft=4)(prompt, 20)
    assert out.tokens == want
    top = out.levels[1]
    assert top["proposed"] > 0 and top["accepted"] == 0 and top["rounds"] == 20  # one token per round
    out = Generator([("self", v), ("v", v)], TOK, taus=[None], max_draft=4)(prompt, 20)
    assert out.tokens == want
    top = out.levels[1]
    assert top["acceptance"] == 1.0 and top["rounds"] == 4  # 4 rounds of 4 accepted + 1 bonus token = 20


def test_entropy_gate_stops_the_draft():
    v = llama(0)
    prompt = prompt_of(9, 0)
    want = greedy_reference(v, prompt, 16)
    # below every entropy of a 259-token vocabulary's distributions here: the draft never proposes
    out = Generator([("l1", first_layers(v, 1)), ("v", v)], TOK, taus=[1e-6], max_draft=4)(prompt, 16)
    assert out.tokens == want and out.levels[0]["drafted"] == 0
    assert out.levels[1]["rounds"] == 15  # the first token comes from the verifier's prefill, which the draft copies
    # the draft copies the prompt and feeds each round's first token, but for the last round (no budget left)
    assert out.levels[0]["borrowed"] == len(prompt) and out.levels[0]["tokens_fed"] == 14
    # the verifier's first forward is its prompt's prefill, one of its forwards; the draft's first is a decode step
    top = out.levels[1]
    assert 0 < top["first_forward_seconds"] < top["seconds"] and out.levels[0]["first_forward_seconds"] > 0
    # a gate at the median entropy of the draft's distributions stops some drafts early, output unchanged
    lm = CachedLM(first_layers(v, 1), "l1")
    hs = entropy(lm.logits(prompt + want, 0))
    tau = float(hs.median())
    gated = Generator([("l1", first_layers(v, 1)), ("v", v)], TOK, taus=[tau], max_draft=4)(prompt, 16)
    free = Generator([("l1", first_layers(v, 1)), ("v", v)], TOK, taus=[None], max_draft=4)(prompt, 16)
    assert gated.tokens == want == free.tokens
    assert 0 < gated.levels[0]["drafted"] < free.levels[0]["drafted"]


def test_the_draft_stops_at_a_stop_string_or_eos_and_the_output_does_not_change():
    v = llama(0)
    prompt = prompt_of(9, 0)
    want = greedy_reference(v, prompt, 24)
    text = TOK.decode(want, skip_special_tokens=True)
    stop = text[len(TOK.decode(want[:10], skip_special_tokens=True)) :][:2]  # text of (about) the 11th token
    assert stop and stop in text
    plain = Generator([("v", v)], TOK)(prompt, 24, [stop])
    assert plain.stop == "stop string" and len(plain.tokens) < 24
    out = Generator([("self", v), ("v", v)], TOK, taus=[None], max_draft=8)(prompt, 24, [stop])
    assert out.text == plain.text and out.stop == "stop string" and out.tokens[: len(plain.tokens)] == plain.tokens
    # the draft (the verifier itself: every proposal accepted) drafted nothing past the token that completes the
    # stop string: every token to it but the prefill's and the first round's bonus token (rounds of 8 + 1, the
    # stop in the second); without that check the second round drafts 8 whatever the stop (16 in all)
    assert out.levels[1]["rounds"] == 2 and len(plain.tokens) < 18
    assert out.levels[0]["drafted"] == out.levels[1]["accepted"] == len(plain.tokens) - 2
    # EOS: a draft that proposed it drafts no further (an EOS token's text is empty: the stop strings never see it)
    lm = Generator([("self", v), ("v", v)], TOK, taus=[None], max_draft=8)
    lm.eos = {want[4]}  # the 5th greedy token plays EOS
    out = lm(prompt, 24)
    assert out.stop == "eos" and out.tokens == want[:5] and out.levels[0]["drafted"] == 4


def test_gated_mode_accepts_drafted_tokens_unverified():
    v, d = llama(0), llama(7)
    prompt = prompt_of(5, 1)
    n, k = 22, 3
    # reference: the draft's greedy k tokens, then the verifier's greedy token after them, repeated
    seq, ref = list(prompt), []
    while len(ref) < n:
        drafted = greedy_reference(d, seq, min(k, n - len(ref) - 1))
        seq += drafted
        seq += greedy_reference(v, seq, 1)
        ref = seq[len(prompt) :]
    out = Generator([("d", d), ("v", v)], TOK, taus=[None], mode="gated", max_draft=k)(prompt, n)
    assert out.tokens == ref[:n]
    assert out.tokens != greedy_reference(v, prompt, n)  # lossy: not the verifier's own output
    again = Generator([("d", d), ("v", v)], TOK, taus=[None], mode="gated", max_draft=k)(prompt, n)
    assert again.tokens == out.tokens  # deterministic


def test_rollback_leaves_the_cache_as_a_fresh_run_would():
    for model in (llama(0), gemma(0, window=6)):
        prefix = prompt_of(10, 2)
        a, b = prefix + [5, 6, 7, 8], prefix + [9, 10]
        lm = CachedLM(model, "m")
        lm.logits(a, len(a) - 1)
        lm.logits(a + [11], len(a))  # a second forward without a crop in between
        rows = lm.logits(b, len(prefix) - 1)  # rolls back to the prefix and feeds [9, 10]
        fresh = CachedLM(model, "fresh")
        want = fresh.logits(b, len(prefix) - 1)
        torch.testing.assert_close(rows, want, rtol=1e-10, atol=1e-10)
        lm.logits(b + [12], len(b))
        fresh.logits(b + [12], len(b))
        for i in range(model.config.num_hidden_layers):
            (ka, va), (kb, vb) = cached_kv(lm.cache, i), cached_kv(fresh.cache, i)
            assert ka.shape == kb.shape == (1, model.config.num_key_value_heads, len(b) + 1, ka.shape[-1])
            torch.testing.assert_close(ka, kb, rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(va, vb, rtol=1e-10, atol=1e-10)
        assert lm.tokens == b + [12]


class Toy:
    """A CachedLM stand-in with one fixed next-token distribution whatever the context."""

    def __init__(self, probs: list[float], name: str):
        self.row = torch.tensor(probs, dtype=torch.float64).log()
        self.name = name
        self.forwards = self.fed = 0
        self.seconds = 0.0

    def logits(self, seq, start):
        return self.row.expand(len(seq) - start, -1)

    def forget(self, before):
        pass


@pytest.mark.parametrize("levels", [2, 3])
def test_sampling_rule_gives_the_verifier_distribution(levels):
    p = [0.05, 0.4, 0.1, 0.3, 0.15]
    drafts = [[0.5, 0.1, 0.2, 0.1, 0.1], [0.1, 0.1, 0.1, 0.6, 0.1]][: levels - 1]
    gen = torch.Generator().manual_seed(0)
    chain = Chain([Toy(q, f"d{i}") for i, q in enumerate(drafts)] + [Toy(p, "v")], [None] * (levels - 1),
                  sampler=Sampler(1.0, 1.0, gen), max_draft=3)  # fmt: skip
    counts = torch.zeros(5)
    for _ in range(3000):
        for t in chain.step([0], 3):  # every emitted token is a draw of the verifier's distribution
            counts[t] += 1
    n = counts.sum()
    assert chisquare(counts.numpy(), (torch.tensor(p) * n).numpy()).pvalue > 1e-3
    # the test can fail: the cheapest draft's own distribution is rejected by the same test
    q = torch.tensor(drafts[0])
    assert chisquare(counts.numpy(), (q * n).numpy()).pvalue < 1e-6
    assert 0 < chain.stats[-1].accepted < chain.stats[-1].proposed  # some accepted, some rejected


def test_top_p_keeps_the_smallest_nucleus():
    s = Sampler(1.0, 0.7)
    p = s.probs(torch.tensor([0.5, 0.3, 0.15, 0.05]).log())
    torch.testing.assert_close(p, torch.tensor([0.625, 0.375, 0.0, 0.0]))


def test_first_layers_shares_weights_and_leaves_the_model_whole():
    from transformers import LlamaForCausalLM

    v = llama(0)
    ids = torch.tensor([prompt_of(12, 4)])
    before = v(ids).logits
    d = first_layers(v, 2)
    assert len(v.model.layers) == 4 and v.config.num_hidden_layers == 4
    assert d.model.layers[1] is v.model.layers[1] and d.lm_head is v.lm_head
    cfg = tiny_config()
    cfg.num_hidden_layers = 2
    ref = LlamaForCausalLM(cfg).double().eval()
    ref.load_state_dict(
        {k: t for k, t in v.state_dict().items() if not k.startswith(("model.layers.2", "model.layers.3"))}
    )
    torch.testing.assert_close(d(ids).logits, ref(ids).logits)
    torch.testing.assert_close(v(ids).logits, before)


def test_generate_command_streams_and_reports(run_main, tmp_path):
    import json

    from budgetlm.models.sources import tiny_random

    h = tiny_random()
    ids = h.tokenizer("The answer is", return_tensors="pt")["input_ids"]
    ref = h.model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)
    want = h.tokenizer.decode(ref[0, ids.shape[1] :], skip_special_tokens=True)
    doc = json.loads(run_main("generate", "tiny-random", "The answer is", "--max-new-tokens", "12", "--json").stdout)
    assert doc["text"] == want and doc["new_tokens"] == 12 and doc["mode"] == "plain" and doc["stop"] == "max tokens"
    assert doc["tokens_per_second"] > 0 and doc["prompt_tokens"] == ids.shape[1]
    plain = run_main("generate", "tiny-random", "The answer is", "--max-new-tokens", "12")
    assert plain.returncode == 0 and plain.stdout == want + "\n" and "tok/s" in plain.stderr
    hsd = run_main("generate", "tiny-random", "The answer is", "--max-new-tokens", "12", "--draft", "layers:1",
                   "--tau", "inf", "--max-draft", "3")  # fmt: skip
    assert hsd.stdout == want + "\n"
    # the prefill's token, then rounds of 3 drafted + 1 of its own (the last round's budget is 2): 1 + 4 + 4 + 3
    assert "tiny-random: 3 rounds, 8 proposed" in hsd.stderr
    doc = json.loads(run_main("generate", "tiny-random", "The answer is", "--max-new-tokens", "12", "--draft",
                              "layers:1", "--tau", "inf", "--max-draft", "3", "--json").stdout)  # fmt: skip
    assert doc["levels"][1]["acceptance"] == 1.0 and doc["levels"][0]["drafted"] == 8


def test_eval_generation_tasks_by_speculative_decoding(run_main, tmp_path):
    import json

    common = ("eval", "tiny-random", "--tasks", "arith", "--limit", "3", "--json")
    plain = json.loads(run_main(*common, "--out", tmp_path / "a").stdout)
    hsd = json.loads(run_main(*common, "--draft", "layers:1", "--tau", "inf", "--out", tmp_path / "b").stdout)
    assert plain["arith"]["exact_match"] == hsd["arith"]["exact_match"]
    assert plain["arith"]["gen_tok_s"] > 0 and "hsd_acceptance" not in plain["arith"]
    assert 0 <= hsd["arith"]["hsd_acceptance"] <= 1
    gens = [
        [json.loads(line)["generation"] for line in (tmp_path / d / "items" / "arith.jsonl").read_text().splitlines()]
        for d in "ab"
    ]
    assert gens[0] == gens[1]
    doc = json.loads((tmp_path / "b" / "eval.json").read_text())
    assert doc["arith"]["exact_match"]["extra"]["decoding"].startswith("HSD exact, drafts layers:1 -> tiny-random")


def test_common_prefix_against_a_loop():
    import random

    from budgetlm.decode.cached import _common_prefix

    rng = random.Random(0)
    for _ in range(3000):
        a = [rng.randint(0, 2) for _ in range(rng.randint(0, 12))]
        b = a[: rng.randint(0, len(a))] + [rng.randint(0, 2) for _ in range(rng.randint(0, 5))]
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        assert _common_prefix(a, b) == n
