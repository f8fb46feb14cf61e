"""awq against references written here: the scale formula, the α search and the clipping search re-derived with an
independent quantiser, scale folding checked on whole-model logits (Llama RMSNorm x·w, Gemma RMSNorm x·(1+w)),
and the error paths."""

import pytest
import torch
from torch import nn

from budgetlm.errors import ConfigError, ModelError
from budgetlm.methods.base import StepContext, apply_steps, parse_config
from budgetlm.methods.quant import awq
from budgetlm.methods.quant.layers import QuantLinear
from budgetlm.models.handle import ModelHandle
from budgetlm.models.sources import load, tiny_tokenizer

SMALL = StepContext(n_calibration=4, calibration_len=64)


def ref_quant(w, bits, group):
    """Asymmetric per-group round-to-nearest, written out directly (range always includes 0; the zero point comes
    from the exact step, the codes from the step rounded to fp16 as QuantLinear stores it; float32 arithmetic)."""
    out_f, in_f = w.shape
    wg = w.float().reshape(out_f, in_f // group, group)
    lo = wg.amin(-1, keepdim=True).clamp(max=0)
    hi = wg.amax(-1, keepdim=True).clamp(min=0)
    step = (hi - lo) / (2**bits - 1)
    step = torch.where(step > 0, step, torch.ones_like(step))
    zero = torch.round(-lo / step)
    step = step.half().float()
    q = torch.clamp(torch.round(wg / step) + zero, 0, 2**bits - 1)
    return ((q - zero) * step).reshape(out_f, in_f)


def ref_scales(s_x, alpha):
    s = s_x.double() ** alpha
    return (s / torch.sqrt(s.max() * s.min())).float()


def outlier_case(seed=0, n=1024, d_in=128, d_out=64, outliers=(3, 40, 77, 100), gain=25.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g)
    x[:, list(outliers)] *= gain
    lin = nn.Linear(d_in, d_out, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(d_out, d_in, generator=g) * 0.05)
    return x, lin


def test_scales_follow_the_formula_and_equal_channels_give_exactly_one():
    s_x = torch.rand(50, generator=torch.Generator().manual_seed(1)) * 3 + 0.01
    for alpha in (0.0, 0.35, 0.95):
        torch.testing.assert_close(awq.awq_scales(s_x, alpha), ref_scales(s_x, alpha), rtol=1e-5, atol=0)
    for alpha in (0.05, 0.5, 0.95):
        assert torch.equal(awq.awq_scales(torch.full((32,), 0.37), alpha), torch.ones(32))


def test_fake_quantize_is_the_stored_grid():
    from budgetlm.methods.quant.quantizer import dequantize, quantize

    w = torch.randn(24, 128, generator=torch.Generator().manual_seed(12))
    torch.testing.assert_close(
        awq.fake_quantize(w, awq.AWQ(bits=3, group_size=32)), ref_quant(w, 3, 32), rtol=0, atol=0
    )
    for cfg in (awq.AWQ(bits=4, group_size=None, symmetric=True), awq.AWQ(bits=2, group_size=64)):
        grid = awq.awq_grid(w, cfg)
        assert torch.equal(awq.fake_quantize(w, cfg), dequantize(quantize(w, grid), grid))


def test_alpha_zero_is_picked_when_every_channel_has_the_same_scale():
    g = torch.Generator().manual_seed(2)
    x = torch.randint(0, 2, (512, 128), generator=g).float() * 2 - 1  # ±1: mean|x| = 1 in every channel
    x = x * 0.7
    lin = nn.Linear(128, 48, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(48, 128, generator=g))
    w0 = lin.weight.detach().clone()
    cfg = awq.AWQ(bits=3, group_size=32)
    res = awq.search_alpha([lin], x.abs().mean(0), lambda: [lin(x)], cfg)
    assert len(res.losses) == 20
    assert len(set(res.losses)) == 1, "every α gives s = 1, so every loss ties"
    assert res.alpha == 0.0 and torch.equal(res.scales, torch.ones(128))
    expected = float((x @ ref_quant(w0, 3, 32).T - x @ w0.T).pow(2).mean())
    assert res.losses[0] == pytest.approx(expected, rel=1e-4)
    assert torch.equal(lin.weight, w0), "the search restores the weights"


def test_alpha_search_matches_an_independent_search():
    x, lin = outlier_case(seed=3)
    w0 = lin.weight.detach().clone()
    cfg = awq.AWQ(bits=3, group_size=32)
    s_x = x.abs().mean(0)
    res = awq.search_alpha([lin], s_x, lambda: [lin(x)], cfg)
    ref_losses = []
    for k in range(20):
        s = ref_scales(s_x, k / 20)
        w = ref_quant(w0 * s, 3, 32) / s
        ref_losses.append(float((x @ w.T - x @ w0.T).pow(2).mean()))
    torch.testing.assert_close(torch.tensor(res.losses), torch.tensor(ref_losses), rtol=1e-3, atol=0)
    assert ref_losses[round(res.alpha * 20)] <= min(ref_losses) * (1 + 1e-4)
    assert res.alpha > 0


def test_awq_has_lower_block_error_than_rtn_at_3_bits():
    x, lin = outlier_case(seed=4)
    w0 = lin.weight.detach().clone()
    res = awq.search_alpha([lin], x.abs().mean(0), lambda: [lin(x)], awq.AWQ(bits=3, group_size=64))
    ref = x @ w0.T
    rtn_err = float((x @ ref_quant(w0, 3, 64).T - ref).pow(2).mean())
    s = res.scales
    awq_err = float(((x / s) @ ref_quant(w0 * s, 3, 64).T - ref).pow(2).mean())  # folded form
    assert awq_err < 0.6 * rtn_err, (awq_err, rtn_err)


def test_clip_search_matches_a_brute_force_token_sum():
    x, lin = outlier_case(seed=5, n=256, d_in=64, d_out=8, outliers=(3, 40), gain=3.0)
    w = lin.weight.detach().clone()
    cfg = awq.AWQ(bits=3, group_size=32)
    shrink = awq.search_clip(w, awq.group_gram(x, 32), cfg)
    assert shrink.shape == (8, 2)
    for r in range(8):
        for gi in range(2):
            cols = slice(32 * gi, 32 * gi + 32)
            errs = []
            for i in range(10):
                m = w[r, cols].abs().max() * (1 - i / 20)
                q = ref_quant(w[r : r + 1, cols].clamp(-m, m), 3, 32)[0]
                errs.append(float((x[:, cols] @ (w[r, cols] - q)).pow(2).sum()))
            best = min(range(10), key=lambda i: errs[i])
            # the chosen shrink is the brute-force best (or ties with it up to float summation order)
            chosen = round((1 - float(shrink[r, gi])) * 20)
            assert errs[chosen] <= errs[best] * (1 + 1e-4), (r, gi, chosen, best)


def _random_scales(width, gen):
    return torch.exp(torch.rand(width, generator=gen) * 1.6 - 0.8)


def _fold_everything(model, gen):
    for layer in model.model.layers:
        lay = awq.layout(layer, model.config.model_type)
        for group, members in awq.GROUPS.items():
            if group == "o" and not lay.scale_o:
                continue
            lay.fold(group, _random_scales(lay.linears[members[0]].in_features, gen))


@torch.no_grad()
def test_folding_into_llama_rmsnorm_leaves_logits_unchanged(tiny):
    x = torch.randint(0, 250, (2, 20))
    before = tiny.model(x).logits
    norm_before = tiny.model.model.layers[0].input_layernorm.weight.clone()
    _fold_everything(tiny.model, torch.Generator().manual_seed(6))
    assert not torch.allclose(tiny.model.model.layers[0].input_layernorm.weight, norm_before)
    torch.testing.assert_close(tiny.model(x).logits, before, rtol=0, atol=1e-5)


@torch.no_grad()
def test_folding_o_into_v_without_gqa_leaves_logits_unchanged():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(7)
    cfg = LlamaConfig(
        vocab_size=260, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4,
    )  # fmt: skip
    model = LlamaForCausalLM(cfg).eval()
    lay = awq.layout(model.model.layers[0], "llama")
    assert lay.scale_o
    x = torch.randint(0, 250, (2, 16))
    before = model(x).logits
    v_before = lay.linears["v"].weight.clone()
    _fold_everything(model, torch.Generator().manual_seed(8))
    assert not torch.allclose(lay.linears["v"].weight, v_before)
    torch.testing.assert_close(model(x).logits, before, rtol=0, atol=1e-5)


@torch.no_grad()
def test_gemma_one_plus_w_norm_fold_by_hand():
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    g = torch.Generator().manual_seed(9)
    norm = Gemma3RMSNorm(16, eps=1e-6)
    norm.weight.copy_(torch.randn(16, generator=g) * 0.5)
    lin = nn.Linear(16, 5, bias=False)
    lin.weight.copy_(torch.randn(5, 16, generator=g))
    assert awq.norm_kind(norm) == "one_plus"
    assert awq.norm_kind(LlamaRMSNorm(16)) == "mul" and awq.norm_kind(nn.LayerNorm(16)) == "mul"
    x = torch.randn(7, 16, generator=g)
    xhat = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    w, W = norm.weight.clone(), lin.weight.clone()
    ref = (xhat * (1 + w)) @ W.T
    s = _random_scales(16, g)
    awq.fold_into_norm(norm, s, "one_plus")
    awq.scale_columns(lin, s)
    torch.testing.assert_close(norm.weight, (1 + w) / s - 1, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lin(norm(x)), ref, rtol=1e-5, atol=1e-5)
    # folding the plain form x·w into a Gemma norm would be wrong: the numeric detection is what prevents it
    wrong = Gemma3RMSNorm(16, eps=1e-6)
    wrong.weight.copy_(w / s)
    assert (lin(wrong(x)) - ref).abs().max() > 1e-2


def tiny_gemma3(seed=10):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    tok = tiny_tokenizer()
    cfg = Gemma3TextConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32, sliding_window=8, max_position_embeddings=256,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = Gemma3ForCausalLM(cfg).eval()
    with torch.no_grad():  # Gemma initialises its norm weights to 0 (a factor of 1): make them non-trivial
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(torch.randn_like(p) * 0.3)
    return ModelHandle(model, tok, "tiny-gemma3", [], "tiny-gemma3")


@torch.no_grad()
def test_tiny_gemma3_fold_and_quantise():
    h = tiny_gemma3()
    x = torch.randint(0, 250, (2, 20))
    before = h.model(x).logits
    lay = awq.layout(h.model.model.layers[0], "gemma3_text")
    assert lay.input_kind == lay.mlp_kind == "one_plus"
    assert lay.mlp_norm is h.model.model.layers[0].pre_feedforward_layernorm
    _fold_everything(h.model, torch.Generator().manual_seed(11))
    torch.testing.assert_close(h.model(x).logits, before, rtol=0, atol=1e-5)
    h = tiny_gemma3()
    norm0 = h.model.model.layers[0].input_layernorm.weight.clone()
    report = apply_steps(h, [{"method": "awq", "bits": 4, "group_size": 32}], SMALL)[0]
    assert all(isinstance(m, QuantLinear) for n, m in h.model.named_modules() if n.endswith("_proj"))
    after = h.model(x).logits
    assert torch.isfinite(after).all()
    assert (after - before).pow(2).mean() < 0.1 * before.pow(2).mean()  # random weights: 4 bits cost ~4%
    qkv_alpha = report.stats["model.layers.0.self_attn.q_proj"]["alpha"]
    assert (qkv_alpha > 0) == (not torch.equal(h.model.model.layers[0].input_layernorm.weight, norm0))
    assert report.stats["model.layers.0.self_attn.o_proj"]["alpha"] is None  # GQA: no o ← v scales


@torch.no_grad()
def test_tiny_random_end_to_end_folds_scales_into_the_norms():
    h = load("tiny-random")
    layer = h.model.model.layers[1]
    norm_before = layer.post_attention_layernorm.weight.clone()
    report = apply_steps(h, [{"method": "awq", "bits": 3}], SMALL)[0]
    assert sum(isinstance(m, QuantLinear) for m in h.model.modules()) == 14
    for name, st in report.stats.items():
        assert st["bits_per_weight"] == pytest.approx(3 + 24 / 64)  # codes + fp16 scale + uint8 zero per 64
        if name.endswith(("q_proj", "k_proj")):
            assert st["mean_shrink"] == 1.0  # no clipping for q/k
        if st["alpha"] is not None:
            assert st["block_mse"] <= st["block_mse_rtn"]
    alpha = report.stats["model.layers.1.mlp.gate_proj"]["alpha"]
    assert (alpha > 0) == (not torch.equal(layer.post_attention_layernorm.weight, norm_before))


def test_no_calibration_is_a_one_line_config_error(tiny):
    with pytest.raises(ConfigError) as e:
        apply_steps(tiny, [{"method": "awq"}], StepContext(n_calibration=0))
    assert "calibration" in str(e.value) and "\n" not in str(e.value)
    assert not any(isinstance(m, QuantLinear) for m in tiny.model.modules())


def test_group_size_that_does_not_divide_is_rejected_before_any_change(tiny):
    w = tiny.model.model.layers[0].self_attn.q_proj.weight.clone()
    with pytest.raises(ConfigError, match="does not divide"):
        apply_steps(tiny, [{"method": "awq", "group_size": 48}], SMALL)
    assert torch.equal(tiny.model.model.layers[0].self_attn.q_proj.weight, w)


def test_unsupported_model_type_is_a_one_line_model_error():
    from transformers import OPTConfig, OPTForCausalLM

    tok = tiny_tokenizer()
    cfg = OPTConfig(
        vocab_size=len(tok), hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
        word_embed_proj_dim=64, max_position_embeddings=128,
    )  # fmt: skip
    h = ModelHandle(OPTForCausalLM(cfg).eval(), tok, "tiny-opt", [], "tiny-opt")
    with pytest.raises(ModelError) as e:
        apply_steps(h, [{"method": "awq"}], SMALL)
    assert "'opt'" in str(e.value) and "\n" not in str(e.value)
    assert not any(isinstance(m, QuantLinear) for m in h.model.modules())


def test_a_norm_that_is_not_on_the_mlp_path_fails_the_folding_check():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    h = load("tiny-random")
    for layer in h.model.model.layers:  # looks Gemma-like, but the forward never uses this norm
        layer.pre_feedforward_layernorm = LlamaRMSNorm(128)
    w = h.model.model.layers[0].mlp.gate_proj.weight.clone()
    with pytest.raises(ModelError, match="changes the float layer's output") as e:
        apply_steps(h, [{"method": "awq"}], SMALL)
    assert "\n" not in str(e.value)
    assert torch.equal(h.model.model.layers[0].mlp.gate_proj.weight, w)
    assert not any(isinstance(m, QuantLinear) for m in h.model.modules())


@pytest.mark.parametrize(
    "values,word", [({"bits": 5}, "bits"), ({"max_shrink": 1.0}, "max_shrink"), ({"n_grid": 0}, "n_grid")]
)
def test_bad_settings_are_one_line_config_errors(values, word):
    with pytest.raises(ConfigError) as e:
        parse_config("awq", values)
    assert word in str(e.value) and "\n" not in str(e.value)
