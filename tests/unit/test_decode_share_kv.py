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


def test_draft_kv_bf16_halves_the_drafts_cache_and_keeps_the_output():
    """Chain.draft_kv: "auto" keeps a float32 draft's keys and values in bfloat16 in exact mode (the verifier's are
    copied into it rounded), "fp32" and gated mode keep them float32, "bf16" asks for it in either mode; the output
    is the verifier's greedy decoding every time, and the draft's guesses do change."""
    v = llama(3).float()
    d = noisy_copy(v, 0.05, 4)
    prompt = prompt_of(30, 2)
    want = greedy_reference(v, prompt, 16)
    runs = {kv: Generator([("d", d), ("v", v)], TOK, taus=[None], max_draft=4, draft_kv=kv)(prompt, 16)
            for kv in ("auto", "fp32", "bf16")}  # fmt: skip
    assert all(r.tokens == want for r in runs.values())
    assert [runs[kv].levels[0]["kv_dtype"] for kv in runs] == ["bfloat16", "float32", "bfloat16"]
    assert runs["auto"].levels[1]["kv_dtype"] == "float32" and runs["auto"].levels[0]["borrowed"] >= len(prompt)
    gated = {kv: Generator([("d", d), ("v", v)], TOK, taus=[None], mode="gated", max_draft=4, draft_kv=kv)(prompt, 16)
             for kv in ("auto", "bf16")}  # fmt: skip
    assert gated["auto"].levels[0]["kv_dtype"] == "float32" and gated["bf16"].levels[0]["kv_dtype"] == "bfloat16"
    # the draft's own logits over the two caches differ (what the option changes: only guesses)
    lms = {}
    for kv in ("fp32", "bf16"):
        ver, dra = CachedLM(v, "v"), CachedLM(d, "d")
        if kv == "bf16":
            dra.set_kv_dtype(torch.bfloat16)
        assert dra.lend(ver, 4)
        ver.logits(prompt, len(prompt) - 1)
        lms[kv] = dra.logits(prompt + [7], len(prompt))
    diff = float((lms["fp32"] - lms["bf16"]).abs().max() / lms["fp32"].abs().max())
    assert 1e-6 < diff < 0.05, diff


def test_draft_kv_refusals(monkeypatch):
    from budgetlm.decode.generate import check_settings
    from budgetlm.errors import ConfigError

    with pytest.raises(ConfigError, match="--draft-kv fp16: give one of auto, fp32, bf16"):
        check_settings(1, "exact", 8, 0.0, 1.0, 0, "fp16")
    v = llama(3).float()
    d = noisy_copy(v, 0.05, 4)
    prompt = prompt_of(20, 1)
    with pytest.raises(ConfigError, match="--draft-kv bf16: draft d does not run on budgetlm's lean runtime"):
        Generator([("d", copy.deepcopy(d).double()), ("v", v)], TOK, taus=[None], draft_kv="bf16")(prompt, 4)
    sampled = Generator([("d", d), ("v", v)], TOK, taus=[None], max_draft=4, temperature=1.0)(prompt, 4)
    assert sampled.levels[0]["kv_dtype"] == "float32"  # auto: sampling draws from the draft's q, so it stays fp32
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        CachedLM(d, "d").set_kv_dtype(torch.float16)
    monkeypatch.setenv("BUDGETLM_LEAN_C", "0")  # torch's glue: auto keeps float32 (it would widen every call)
    assert Generator([("d", d), ("v", v)], TOK, taus=[None])(prompt, 4).levels[0]["kv_dtype"] == "float32"
    monkeypatch.delenv("BUDGETLM_LEAN_C")
    monkeypatch.setenv("BUDGETLM_LEAN", "0")  # transformers' runtime: "auto" keeps the model's dtype
    out = Generator([("d", d), ("v", v)], TOK, taus=[None], max_draft=4)(prompt, 8)
    assert out.levels[0]["kv_dtype"] is None and out.tokens == greedy_reference(v, prompt, 8)


def test_the_cli_and_recipes_take_draft_kv(run_main, tmp_path):
    import json

    from budgetlm.errors import ConfigError
    from budgetlm.experiments.plan import plan
    from budgetlm.experiments.recipe import parse_recipe

    args = ("generate", "tiny-random", "The answer is the number of", "--max-new-tokens", "12", "--json")
    plain = json.loads(run_main(*args).stdout)
    for kv, dtype in (("fp32", "float32"), ("bf16", "bfloat16")):
        out = json.loads(run_main(*args, "--draft", "copy:rtn:bits=8", "--tau", "inf", "--draft-kv", kv).stdout)
        assert out["text"] == plain["text"] and out["levels"][0]["kv_dtype"] == dtype
    bad = run_main(*args, "--draft-kv", "bf16")
    assert bad.returncode != 0 and "--draft-kv needs --draft" in bad.stderr
    common = ("eval", "tiny-random", "--tasks", "arith", "--limit", "2", "--json", "--draft", "copy:rtn:bits=8")
    run_main(*common, "--draft-kv", "fp32", "--out", tmp_path / "e")
    doc = json.loads((tmp_path / "e" / "eval.json").read_text())
    assert doc["arith"]["exact_match"]["extra"]["decoding"].endswith("drafts' keys and values fp32")
    base = {"name": "r", "models": ["tiny-random"], "tasks": ["arith"], "limit": 2, "bench": {"enabled": False},
            "pipelines": {"q8": [{"method": "rtn", "bits": 8}]}}  # fmt: skip
    cells = {kv: plan(parse_recipe({**base, "decoding": {"drafts": ["layers:1"], "draft_kv": kv}}))[0]
             for kv in ("auto", "fp32")}  # fmt: skip
    assert "draft_kv" not in cells["auto"].config["decoding"]  # the default: the ids of existing studies stay
    assert cells["fp32"].config["decoding"]["draft_kv"] == "fp32" and cells["fp32"].id != cells["auto"].id
    with pytest.raises(ConfigError, match="--draft-kv fp8"):
        plan(parse_recipe({**base, "decoding": {"drafts": ["layers:1"], "draft_kv": "fp8"}}))


def test_a_three_level_chain_with_bf16_draft_caches_is_the_verifiers_greedy_decoding():
    """Both drafts of a 3-level chain (the middle one verifies the first) keep bf16 caches under auto; the output
    is still the verifier's greedy decoding, over several prompts."""
    v = llama(8).float()
    mid, low = noisy_copy(v, 0.03, 9), noisy_copy(v, 0.1, 10)
    for seed in range(3):
        prompt = prompt_of(25 + 9 * seed, seed)
        out = Generator([("low", low), ("mid", mid), ("v", v)], TOK, taus=[None, None], max_draft=4)(prompt, 14)
        assert out.tokens == greedy_reference(v, prompt, 14), seed
        assert [lv["kv_dtype"] for lv in out.levels] == ["bfloat16", "bfloat16", "float32"]
        assert out.levels[1]["proposed"] > 0 and out.levels[2]["proposed"] > 0
