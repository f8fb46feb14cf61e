"""lobi_lora (HOLA's Lo-Bi adapter path) on the tiny model: at step 0 every adapted layer's error equals the
Eckart–Young optimum computed here from singular values; only A and B train; save/reload is bit-identical;
merging keeps the codes and stores B A as the fp16 correction; bad settings are one-line errors."""

import pytest
import torch

from budgetlm.errors import ConfigError
from budgetlm.methods.adapt.base import AdaptedLinear, merge
from budgetlm.methods.base import StepContext, apply_steps, parse_config
from budgetlm.methods.quant.layers import QuantLinear
from budgetlm.models.sources import load
from budgetlm.train import fit

R = 4
X = torch.randint(0, 250, (2, 12), generator=torch.Generator().manual_seed(5))
TRAIN = {"steps": 2, "batch_size": 2, "max_len": 48, "lr": 1e-2, "data": {"task": "arith", "limit": 8}}


def ctx():
    return StepContext(n_calibration=4, calibration_len=48)


def adapted(**cfg):
    h = load("tiny-random")
    report = apply_steps(h, [{"method": "lobi_lora", "r": R, **cfg}], ctx())[0]
    return h, report


def effective_weight(layer: torch.nn.Module) -> torch.Tensor:
    """The [out, in] weight a layer computes with, read off its outputs on the unit vectors (bias removed)."""
    eye = torch.eye(layer.in_features)
    with torch.no_grad():
        y = layer(eye) - layer(torch.zeros(1, layer.in_features))
    return y.T.double()


def logits(h):
    with torch.no_grad():
        return h.model(X).logits


def test_step0_error_is_the_eckart_young_optimum():
    ref = dict(load("tiny-random").model.named_modules())
    h, report = adapted()
    layers = {n: m for n, m in h.model.named_modules() if isinstance(m, AdaptedLinear)}
    assert len(layers) == 14 and report.stats["total"]["trainable_params"] > 0
    for name, layer in layers.items():
        w = ref[name].weight.detach().double()
        q = layer.base_layer.dequantized_weight().double()
        sv = torch.linalg.svdvals(w - q)
        optimum = sv[R:].square().sum().sqrt()
        got = torch.linalg.matrix_norm(w - effective_weight(layer))
        assert got == pytest.approx(float(optimum), rel=1e-4), name
        assert got < 0.99 * torch.linalg.matrix_norm(w - q)  # the correction does something (random W: a little)
        # the balanced split: column i of B and row i of A both have norm sqrt(sigma_i)
        b, a = layer.delta.B.weight.double(), layer.delta.A.weight.double()
        torch.testing.assert_close(b.norm(dim=0), sv[:R].sqrt(), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(a.norm(dim=1), sv[:R].sqrt(), rtol=1e-4, atol=1e-6)


def test_only_a_and_b_train():
    h, _ = adapted()
    want = {n for n, _ in h.model.named_parameters() if n.endswith((".delta.A.weight", ".delta.B.weight"))}
    assert {n for n, p in h.model.named_parameters() if p.requires_grad} == want and len(want) == 28
    before = {k: v.clone() for k, v in h.model.state_dict().items()}
    fit(h, TRAIN, progress=False)
    after = h.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == want  # every A and B moved; codes, scales, zeros, norms and embeddings did not


def test_train_config_trains_inside_the_step():
    h, report = adapted(train=TRAIN)
    assert len(report.stats["train"]["losses"]) == 2
    assert report.stats["train"]["trainable_params"] == report.stats["total"]["trainable_params"]


def test_save_reload_is_identical(tmp_path):
    h, _ = adapted()
    fit(h, TRAIN, progress=False)
    h.save(tmp_path / "m")
    again = load(tmp_path / "m")
    assert torch.equal(logits(again), logits(h))
    sd_a, sd_b = h.model.state_dict(), again.model.state_dict()
    assert sd_a.keys() == sd_b.keys() and all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    layer = again.model.model.layers[1].mlp.down_proj
    assert type(layer.delta).__name__ == "LoBiPair" and isinstance(layer.base_layer, QuantLinear)
    assert {n for n, p in again.model.named_parameters() if p.requires_grad} == {
        n for n, p in h.model.named_parameters() if p.requires_grad
    }


def test_merge_keeps_the_codes_and_stores_ba_as_the_correction():
    h, _ = adapted()
    fit(h, TRAIN, progress=False)
    name = "model.layers.0.self_attn.v_proj"
    layer = h.model.get_submodule(name)
    codes = layer.base_layer.codes().clone()
    ba = layer.delta.B.weight.detach() @ layer.delta.A.weight.detach()
    expected = logits(h)
    report = merge(h)
    merged = h.model.get_submodule(name)
    assert isinstance(merged, QuantLinear) and merged.rank == R
    assert torch.equal(merged.codes(), codes)
    torch.testing.assert_close(merged.lr_u.float() @ merged.lr_v.float(), ba, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(logits(h), expected, atol=5e-3, rtol=0)  # fp16 rounding of B and A only
    assert not any("re-quantised" in n for n in report.notes)


def test_bad_settings_are_one_line_and_change_nothing():
    for cfg, msg in [
        ({"alpha": 16}, "remove alpha"),
        ({"rank": 4}, "remove rank"),
        ({"target_bits": -1}, "target_bits must be a positive"),
    ]:
        with pytest.raises(ConfigError, match=msg) as e:
            parse_config("lobi_lora", cfg)
        assert "\n" not in str(e.value)
    for cfg, msg in [({"r": 65}, "r=65 exceeds"), ({"target_bits": 1.5}, "outside the achievable range")]:
        h = load("tiny-random")
        with pytest.raises(ConfigError, match=msg):
            apply_steps(h, [{"method": "lobi_lora", **cfg}], ctx())
        assert not any(isinstance(m, (QuantLinear, AdaptedLinear)) for m in h.model.modules())
        assert all(p.requires_grad for p in h.model.parameters())
