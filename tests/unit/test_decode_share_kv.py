"""A draft of the verifier's own shape (a quantised copy) reads the verifier's keys and values of the prompt and of
the verified tokens instead of computing its own (decode/speculative.Chain `share_kv`): the draft's logits equal
its forward over the verifier's cache (transformers' forward, written independently here), the output stays the
verifier's greedy decoding, and the draft never prefills the prompt. Drafts of another shape, gated mode and
share_kv=False keep their own keys and values."""

from __future__ import annotations

import copy

import pytest
import torch
from test_decode import greedy_reference, llama, prompt_of  # the tiny models and the cache-free greedy reference

from budgetlm.decode.cached import CachedLM
from budgetlm.decode.drafts import first_layers
from budgetlm.decode.generate import Generator
from budgetlm.models.sources import tiny_tokenizer

TOK = tiny_tokenizer()


def noisy_copy(model, scale: float, seed: int):
    """The model with every weight perturbed (a stand-in for a quantised copy: same shape, close function)."""
    out = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale * p.std())
    return out


def test_a_lent_draft_computes_its_forward_over_the_verifiers_keys_and_values():
    v = llama(0)
    d = noisy_copy(v, 0.3, 1)
    prompt, nxt = prompt_of(13, 2), [7, 99]
    ver, dra = CachedLM(v, "v"), CachedLM(d, "d")
    assert dra.lend(ver, 4)
    ver.logits(prompt, len(prompt) - 1)  # the verifier's prefill
    got = dra.logits(prompt + nxt, len(prompt))  # rows after nxt[0] and nxt[1]
    assert dra.borrowed == len(prompt) and dra.fed == len(nxt)  # the prompt copied, only the new tokens fed
    with torch.no_grad():  # reference: transformers' forward of the draft on the verifier's own cache
        cache = v(torch.tensor([prompt]), use_cache=True).past_key_values
        want = d(torch.tensor([nxt]), past_key_values=cache, use_cache=True).logits[0]
        own = d(torch.tensor([prompt + nxt])).logits[0, len(prompt) :]
    torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-5)
    assert (got - own.float()).abs().max() > 1e-3  # and that is not the draft's own forward: the test can fail


def test_exact_output_is_the_verifiers_and_the_draft_never_prefills():
    v = llama(3)
    d = noisy_copy(v, 0.05, 4)
    for seed in range(3):
        prompt = prompt_of(20 + 7 * seed, seed)
        want = greedy_reference(v, prompt, 18)
        shared = Generator([("d", d), ("v", v)], TOK, taus=[None], max_draft=4)(prompt, 18)
        own = Generator([("d", d), ("v", v)], TOK, taus=[None], max_draft=4, share_kv=False)(prompt, 18)
        assert shared.tokens == want == own.tokens
        ds, do = shared.levels[0], own.levels[0]
        # shared: the prompt copied, then only the tokens it drafted and the verifier's corrections are fed
        assert ds["borrowed"] >= len(prompt) and ds["tokens_fed"] <= ds["drafted"] + 18
        assert do["borrowed"] == 0 and do["tokens_fed"] > len(prompt)


def test_a_quantised_copy_on_the_kernels_shares_the_fp32_verifiers_cache():
    from budgetlm.methods.base import apply_steps
    from budgetlm.models.sources import tiny_random

    base = tiny_random(2)
    quant = copy.deepcopy(base)
    apply_steps(quant, [{"method": "rtn", "bits": 4, "group_size": 32, "embeddings": True}])
    v, d = base.model.eval(), quant.model.eval()
    prompt = prompt_of(40, 5)
    plain = Generator([("v", v)], TOK)(prompt, 16)
    out = Generator([("w4", d), ("v", v)], TOK, taus=[None], max_draft=4)(prompt, 16)
    assert out.tokens == plain.tokens
    assert out.levels[0]["borrowed"] >= len(prompt) and out.levels[0]["tokens_fed"] <= out.levels[0]["drafted"] + 16


def test_other_shapes_gated_mode_and_share_kv_off_keep_their_own_cache():
    v = llama(5)
    prompt = prompt_of(16, 6)
    other = llama(6, layers=3)  # another layer count: not a copy of the verifier
    out = Generator([("o", other), ("v", v)], TOK, taus=[None], max_draft=3)(prompt, 10)
    assert out.levels[0]["borrowed"] == 0 and out.tokens == greedy_reference(v, prompt, 10)
    d = noisy_copy(v, 0.05, 7)
    gated = Generator([("d", d), ("v", v)], TOK, taus=[None], mode="gated", max_draft=3)(prompt, 10)
    assert gated.levels[0]["borrowed"] == 0  # gated mode emits the draft's own tokens: its own model's
    # a layers:K draft still copies exactly its K layers
    cut = Generator([("l2", first_layers(v, 2)), ("v", v)], TOK, taus=[None], max_draft=3)(prompt, 10)
    assert cut.levels[0]["borrowed"] == len(prompt) and cut.tokens == greedy_reference(v, prompt, 10)


def test_a_gemma_layers_draft_borrows_its_sliding_and_full_layers():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    kinds = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
    ids = {"bos_token_id": TOK.bos_token_id, "eos_token_id": TOK.eos_token_id, "pad_token_id": TOK.pad_token_id}
    cfg = Gemma3TextConfig(
        vocab_size=len(TOK), hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32, sliding_window=8, layer_types=kinds, max_position_embeddings=512,
        initializer_range=0.05, **ids,
    )  # fmt: skip
    torch.manual_seed(0)
    g = Gemma3ForCausalLM(cfg).eval().double()
    prompt = prompt_of(20, 8)
    out = Generator([("l2", first_layers(g, 2)), ("g", g)], TOK, taus=[None], max_draft=3)(prompt, 8)
    assert out.levels[0]["borrowed"] == len(prompt)  # the layer types of a cut model are its first ones
    assert out.tokens == Generator([("g", g)], TOK)(prompt, 8).tokens


def test_a_copy_draft_is_the_verifier_quantised_here_and_shares_its_cache():
    from budgetlm.decode.drafts import load_drafts, parse_specs
    from budgetlm.methods.quant.layers import QuantLinear
    from budgetlm.models.sources import tiny_random

    handle = tiny_random(4)
    before = {k: v.clone() for k, v in handle.model.state_dict().items()}
    spec = "copy:rtn:bits=8:embeddings=true"
    assert parse_specs(spec) == [spec]
    ((name, draft),) = load_drafts(handle, [spec], load=None)
    assert name == spec and draft is not handle.model
    layers = handle.model.config.num_hidden_layers
    assert sum(isinstance(m, QuantLinear) for m in draft.modules()) == layers * 7 + 1  # every projection, lm_head
    assert all(torch.equal(v, before[k]) for k, v in handle.model.state_dict().items())  # the verifier untouched
    prompt = prompt_of(30, 9)
    plain = Generator([("v", handle.model)], TOK)(prompt, 12)
    out = Generator([(spec, draft), ("v", handle.model)], TOK, taus=[None], max_draft=4)(prompt, 12)
    assert out.tokens == plain.tokens and out.levels[0]["borrowed"] >= len(prompt)


@pytest.mark.parametrize(
    "spec,message",
    [
        ("copy:", "write copy:METHOD"),
        ("copy:rtnx:bits=8", "draft copy:rtnx:bits=8: unknown method 'rtnx'"),
        ("copy:rtn:bits", "'bits' is not key=value"),
        ("copy:rtn:bitz=8", "unknown setting 'bitz'"),
        ("copy:rtn:bits=9", "bits must be one of"),
    ],
)
def test_a_bad_copy_draft_is_one_line(spec, message):
    from budgetlm.decode.drafts import parse_specs
    from budgetlm.errors import ConfigError

    with pytest.raises(ConfigError, match=message) as err:
        parse_specs(f"layers:2,{spec}")
    assert "\n" not in str(err.value)


def test_a_three_level_chain_of_copies_reads_the_verifiers_cache_at_both_levels():
    v = llama(9)
    far, near = noisy_copy(v, 0.3, 10), noisy_copy(v, 0.05, 11)
    for seed in range(3):
        prompt = prompt_of(12 + 9 * seed, 20 + seed)
        want = greedy_reference(v, prompt, 16)
        out = Generator([("far", far), ("near", near), ("v", v)], TOK, taus=[None, None], max_draft=4)(prompt, 16)
        assert out.tokens == want
        assert out.levels[0]["borrowed"] >= len(prompt) and out.levels[1]["borrowed"] >= len(prompt)


def test_a_layers_draft_borrows_on_transformers_runtime_too(monkeypatch):
    monkeypatch.setenv("BUDGETLM_LEAN", "0")  # every model on transformers' forward with a DynamicCache
    v = llama(12)
    prompt = prompt_of(15, 13)
    out = Generator([("l2", first_layers(v, 2)), ("v", v)], TOK, taus=[None], max_draft=3)(prompt, 8)
    assert out.levels[0]["borrowed"] == len(prompt) and out.tokens == greedy_reference(v, prompt, 8)
