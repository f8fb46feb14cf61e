"""LoRA-XS and MARS (written in budgetlm): factors, forward against formulas written here, counts, opt 1's
pre-scaling, gradients, merge, save/reload."""

import pytest
import torch
import torch.nn.functional as F
from test_adapters import R, X, attached, logits, perturb  # the helpers of the adapter tests (same folder)

from budgetlm.methods.adapt.base import merge
from budgetlm.models.sources import load

H = torch.randn(3, 5, 128, generator=torch.Generator().manual_seed(4))  # hidden states fed to one projection


def dims(model):
    c = model.config
    d, i = c.hidden_size, c.intermediate_size
    kv = c.num_key_value_heads * (d // c.num_attention_heads)
    return d, i, kv, c.num_hidden_layers


# --- LoRA-XS -----------------------------------------------------------------------------------------------------


def test_lora_xs_factors_are_the_truncated_svd():
    base = load("tiny-random").model.model.layers[0].mlp.up_proj.weight.detach().clone()
    h, _ = attached("lora_xs")
    d = h.model.model.layers[0].mlp.up_proj.delta
    A, B = d.A.weight, d.B.weight
    torch.testing.assert_close(A @ A.T, torch.eye(R), atol=1e-5, rtol=0)  # A = V_rᵀ: orthonormal rows
    sv = torch.linalg.svdvals(base.double())
    residual = (base.double() - (B @ A).double()).pow(2).sum()
    assert float(residual) == pytest.approx(float(sv[R:].pow(2).sum()), rel=1e-4)  # Eckart-Young: best rank r
    torch.testing.assert_close(B.norm(dim=0).double(), sv[:R], atol=1e-5, rtol=1e-5)  # B = U_r Σ_r


def test_lora_xs_starts_tiny_and_exactly_zero_with_r_zero():
    before = logits(load("tiny-random"))
    h, _ = attached("lora_xs")
    diff = (logits(h) - before).abs().max()
    assert 0 < diff < 1e-3
    assert abs(h.model.model.layers[0].self_attn.q_proj.delta.R.weight.std().item() - 1e-5) < 5e-6
    h0, _ = attached("lora_xs", r_init_std=0.0)
    assert torch.equal(logits(h0), before)


def test_lora_xs_forward_and_count():
    h, report = attached("lora_xs", alpha=4.0)
    perturb(h.model)
    layer = h.model.model.layers[1].self_attn.o_proj
    d = layer.delta
    W = layer.base_layer.weight
    expected = H @ W.T + (4.0 / R) * (H @ d.A.weight.T @ d.R.weight.T @ d.B.weight.T)
    torch.testing.assert_close(layer(H), expected, atol=1e-5, rtol=1e-5)
    *_, layers = dims(h.model)
    assert report.stats["total"]["trainable_params"] == layers * 7 * R * R
    names = {n for n, p in h.model.named_parameters() if p.requires_grad}
    assert names and all(n.endswith(".delta.R.weight") for n in names)


# --- MARS --------------------------------------------------------------------------------------------------------


def mars_count(model, opt, s):
    d, i, kv, layers = dims(model)
    ups = R * (d + kv + kv) + R * (i + i)  # U_q, U_k, U_v, U_gate, U_up
    mixes = 3 * R * s + 2 * R * s  # M_qkv, M_mlp
    if opt == 0:
        per = s * d + s * d + mixes + ups + R * (d + d) + R * (i + d)  # + D's + o_proj and down_proj pairs
    else:
        per = mixes + ups + R * d + R * d  # the pairs' B only
    return layers * per


@pytest.mark.parametrize(("opt", "s"), [(0, None), (1, None), (0, 4), (1, 4)])
def test_mars_trainable_counts_match_the_formulas(opt, s):
    h, report = attached("mars", opt=opt, s=s)
    expected = mars_count(h.model, opt, s or R)
    assert report.stats["total"]["trainable_params"] == expected
    assert sum(p.numel() for p in h.model.parameters() if p.requires_grad) == expected


def test_mars_forward_matches_the_formula():
    h, _ = attached("mars", alpha=4.0)
    perturb(h.model)
    attn = h.model.model.layers[0].self_attn
    D, M = attn.mars_qkv.down.weight, attn.mars_qkv.mix.weight
    z = H @ D.T @ M.T  # z = M D x, split into z_q, z_k, z_v
    for p, proj in enumerate([attn.q_proj, attn.k_proj, attn.v_proj]):
        zp = z[..., p * R : (p + 1) * R]
        expected = F.linear(H, proj.base_layer.weight) + (4.0 / R) * zp @ proj.delta.up.weight.T
        torch.testing.assert_close(proj(H), expected, atol=1e-5, rtol=1e-5)
    o = attn.o_proj.delta
    expected = F.linear(H, attn.o_proj.base_layer.weight) + (4.0 / R) * H @ o.A.weight.T @ o.B.weight.T
    torch.testing.assert_close(attn.o_proj(H), expected, atol=1e-5, rtol=1e-5)


def test_mars_zero_init_and_opt1_is_opt0_with_prescaled_frozen_downs():
    before = logits(load("tiny-random"))
    h0, _ = attached("mars", opt=0)
    h1, _ = attached("mars", opt=1)
    assert torch.equal(logits(h0), before) and torch.equal(logits(h1), before)
    scale = 16.0 / R
    l0, l1 = h0.model.model.layers[1], h1.model.model.layers[1]
    torch.testing.assert_close(l1.mlp.mars_gate_up.down.weight, scale * l0.mlp.mars_gate_up.down.weight)
    torch.testing.assert_close(l1.mlp.down_proj.delta.A.weight, scale * l0.mlp.down_proj.delta.A.weight)
    # same M and U in both: opt 1 (pre-scaled downs, no output scale) computes what opt 0 computes
    perturb(h1.model, seed=5)  # moves M, U and the pairs' B (opt 1's trainables); copy them into opt 0
    with torch.no_grad():
        p0 = dict(h0.model.named_parameters())
        for n, p in h1.model.named_parameters():
            if p.requires_grad:
                p0[n].copy_(p)
    assert (logits(h1) - before).abs().max() > 1e-3
    torch.testing.assert_close(logits(h1), logits(h0), atol=1e-5, rtol=1e-5)
    assert not l1.mlp.mars_gate_up.down.weight.requires_grad and not l1.self_attn.o_proj.delta.A.weight.requires_grad


@pytest.mark.parametrize("opt", [0, 1])
def test_mars_gradients_reach_only_trainable_parameters(opt):
    h, _ = attached("mars", opt=opt)
    out = h.model(X).logits
    (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(0))).sum().backward()
    allowed = (".mix.weight", ".up.weight", ".B.weight") if opt else (".mars_", ".delta.")
    for n, p in h.model.named_parameters():
        if p.requires_grad:
            assert any(a in n for a in allowed), n
            assert p.grad is not None, n
        else:
            assert p.grad is None, n
    ups = [p.grad for n, p in h.model.named_parameters() if n.endswith(".up.weight")]
    assert all(g.abs().sum() > 0 for g in ups)  # U starts at 0 but gets gradient through M D x


# --- merge and save ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "cfg"), [("lora_xs", {}), ("mars", {"opt": 0}), ("mars", {"opt": 1})])
def test_merged_forward_equals_unmerged(name, cfg, tmp_path):
    h, _ = attached(name, **cfg)
    perturb(h.model)
    unmerged = logits(h)
    assert (unmerged - logits(load("tiny-random"))).abs().max() > 1e-3
    merge(h)
    torch.testing.assert_close(logits(h), unmerged, atol=1e-5, rtol=0)
    names = [n for n, _ in h.model.named_modules()]
    assert not any("mars_" in n or ".delta" in n for n in names)
    h.save(tmp_path / "m")
    torch.testing.assert_close(logits(load(tmp_path / "m")), unmerged, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["lora_xs", "mars", "qmars"])
def test_saved_adapters_reload_with_their_trainable_parameters(name, tmp_path):
    h, _ = attached(name)
    perturb(h.model)
    h.save(tmp_path / "m")
    again = load(tmp_path / "m")
    assert torch.equal(logits(again), logits(h))
    trainable = {n for n, p in h.model.named_parameters() if p.requires_grad}
    assert {n for n, p in again.model.named_parameters() if p.requires_grad} == trainable
    keys = [k for k in again.model.state_dict() if k.endswith("mars_qkv.down.weight")]
    assert len(keys) == (dims(h.model)[3] if "mars" in name else 0)  # the shared D once per block
