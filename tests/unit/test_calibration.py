"""Layer-by-layer calibration against whole-model forwards, input statistics against direct formulas, and the
QuantLinear parts calibrating methods use (act-order permutation, low-rank correction)."""

import pytest
import torch

from budgetlm.errors import ConfigError
from budgetlm.methods.base import MethodConfig, select_linears
from budgetlm.methods.calibration import (
    HessianStat,
    LayerwiseCalibration,
    Lockstep,
    LockstepError,
    NormStat,
    decoder_layers,
    layer_prefix,
    linears_in,
)
from budgetlm.methods.quant.layers import QuantLinear
from budgetlm.methods.quant.quantizer import find_grid, quantize
from budgetlm.models.handle import ModelHandle
from budgetlm.models.sources import load


@pytest.fixture(scope="module")
def tiny():
    return load("tiny-random")


def test_layerwise_outputs_equal_the_whole_model_forward(tiny):
    torch.manual_seed(0)
    tokens = torch.randint(0, 250, (7, 24))  # 7 rows in batches of 3: a last batch of a different size
    cal = LayerwiseCalibration(tiny.model, tokens, batch_size=3)
    for _i, layer in cal.layers():
        cal.advance(layer)
    with torch.no_grad():
        ref = tiny.model(input_ids=tokens, output_hidden_states=True, use_cache=False).hidden_states[-1]
        mine = tiny.model.model.norm(torch.cat(cal.inputs))
    torch.testing.assert_close(mine, ref, rtol=0, atol=1e-5)


def test_changed_layer_feeds_its_outputs_forward(tiny):
    h = load("tiny-random")
    tokens = torch.randint(0, 250, (4, 16))
    cal = LayerwiseCalibration(h.model, tokens, batch_size=4)
    for i, layer in cal.layers():
        if i == 0:
            layer.mlp.down_proj.weight.data.zero_()  # the MLP of layer 0 now adds nothing
        cal.advance(layer)
    with torch.no_grad():
        ref = h.model(input_ids=tokens, output_hidden_states=True, use_cache=False).hidden_states[-1]
    torch.testing.assert_close(h.model.model.norm(torch.cat(cal.inputs)), ref, rtol=0, atol=1e-5)


def test_hessian_and_norm_stats_match_direct_formulas(tiny):
    tokens = torch.randint(0, 250, (5, 12))
    cal = LayerwiseCalibration(tiny.model, tokens, batch_size=2)
    layer = decoder_layers(tiny.model)[0]
    mods = linears_in(layer, layer_prefix(tiny.model, 0))
    name = "model.layers.0.mlp.down_proj"
    hs = cal.collect(layer, {name: mods[name]}, HessianStat)[name]
    ns = cal.collect(layer, {name: mods[name]}, NormStat)[name]
    xs, _ = cal.capture_inputs(layer, mods[name])
    x = torch.cat([t.reshape(-1, t.shape[-1]) for t in xs]).double()
    assert hs.n == ns.n == 60 == x.shape[0]
    torch.testing.assert_close(hs.H.double(), 2 * x.T @ x / x.shape[0], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ns.l2.double(), x.pow(2).sum(0).sqrt(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ns.mean_abs.double(), x.abs().mean(0), rtol=1e-5, atol=1e-6)


def test_no_calibration_is_a_one_line_error(tiny):
    with pytest.raises(ConfigError) as e:
        LayerwiseCalibration(tiny.model, torch.zeros(0, 16, dtype=torch.long), method="gptq")
    assert "gptq" in str(e.value) and "calibration" in str(e.value) and "\n" not in str(e.value)


def test_targets_matching_nothing_name_the_patterns_and_what_exists(tiny):
    with pytest.raises(ConfigError) as e:
        select_linears(tiny.model, MethodConfig(targets=["*.qproj"]))
    msg = str(e.value)
    assert "*.qproj" in msg and "model.layers.0.self_attn.q_proj" in msg and "\n" not in msg
    with pytest.raises(ConfigError, match="no nn.Linear"):
        select_linears(torch.nn.Sequential(torch.nn.ReLU()), MethodConfig())


def test_quant_linear_permutation_and_correction_round_trip(tmp_path):
    torch.manual_seed(1)
    w = torch.randn(24, 64)
    perm = torch.randperm(64)
    wp = w[:, perm]
    grid = find_grid(wp, 4, 32, False)
    codes = quantize(wp, grid)
    u, v = torch.randn(24, 3) * 0.01, torch.randn(3, 64) * 0.01
    layer = QuantLinear.from_codes(codes, grid, torch.randn(24), perm=perm, correction=(u, v))
    # reference, computed here: dequantise W[:, perm] by hand, undo the permutation, add U V
    s = grid.scales.half().float().repeat_interleave(32, 1)  # scales are stored fp16
    z = grid.zeros.repeat_interleave(32, 1)
    deq = torch.empty_like(w)
    deq[:, perm] = (codes.float() - z) * s
    eff = deq + u.half().float() @ v.half().float()
    torch.testing.assert_close(layer.dequantized_weight(), deq)
    x = torch.randn(5, 64)
    torch.testing.assert_close(layer(x), x @ eff.T + layer.bias, rtol=1e-5, atol=1e-5)
    # bytes: codes + scales + zeros + int32 perm + fp16 correction
    assert layer.storage_bytes() == 24 * 64 // 2 + 24 * 2 * 2 + 24 * 2 + 64 * 4 + (24 * 3 + 3 * 64) * 2
    model = torch.nn.Sequential(layer)
    handle = ModelHandle(model, None, "test")
    assert handle.replaced_modules()["0"]["permuted"] and handle.replaced_modules()["0"]["rank"] == 3


class _Pausing(torch.nn.Module):
    """Wraps a module: records (batch, tag) on arrival, pauses at `tag(x)` (a function of the input), then runs it."""

    def __init__(self, inner, lock_of, log, tag=lambda x: "here"):
        super().__init__()
        self.inner, self.lock_of, self.log, self.tag = inner, lock_of, log, tag

    def forward(self, x):
        lock = self.lock_of()
        t = self.tag(x)
        self.log.append(("arrive", lock.batch, t))
        lock.pause(t)
        self.log.append(("resume", lock.batch, t))
        return self.inner(x)


def test_lockstep_pauses_every_batch_then_resumes_and_advances(tiny):
    tokens = torch.randint(0, 250, (7, 24))  # batches of 3, 3, 1
    plain = LayerwiseCalibration(tiny.model, tokens, batch_size=3)
    cal = LayerwiseCalibration(tiny.model, tokens, batch_size=3)
    layer = decoder_layers(tiny.model)[0]
    ref = plain.run(layer)
    log, lock = [], None
    mlp = layer.mlp
    down, up = mlp.down_proj, mlp.up_proj
    mlp.up_proj = _Pausing(up, lambda: lock, log, tag=lambda x: "up")
    mlp.down_proj = _Pausing(down, lambda: lock, log, tag=lambda x: "down")
    try:
        lock = Lockstep(cal, layer)
        out = lock.run(lambda tag: log.append(("on_pause", None, tag)))
    finally:
        mlp.up_proj, mlp.down_proj = up, down
    # every batch arrives at "up" before on_pause("up"); then each resumes and runs on to "down", in order
    expect = [("arrive", b, "up") for b in range(3)] + [("on_pause", None, "up")]
    for b in range(3):
        expect += [("resume", b, "up"), ("arrive", b, "down")]
    expect += [("on_pause", None, "down")] + [("resume", b, "down") for b in range(3)]
    assert log == expect
    assert cal.inputs is out and len(out) == 3
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_lockstep_batches_pausing_apart_is_an_error_and_keeps_the_inputs(tiny):
    tokens = torch.randint(0, 250, (6, 16))
    cal = LayerwiseCalibration(tiny.model, tokens, batch_size=3)
    before = list(cal.inputs)
    layer = decoder_layers(tiny.model)[0]
    lock, log = None, []
    down = layer.mlp.down_proj
    layer.mlp.down_proj = _Pausing(down, lambda: lock, log, tag=lambda x: "a" if lock.batch == 0 else "b")
    try:
        lock = Lockstep(cal, layer)
        with pytest.raises(LockstepError, match="paused at different points"):
            lock.run(lambda tag: pytest.fail("on_pause must not run"))
    finally:
        layer.mlp.down_proj = down
    assert len(cal.inputs) == 2 and all(a is b for a, b in zip(cal.inputs, before))
    assert not [e for e in log if e[0] == "resume"]  # the paused batches were unwound, not resumed
    with pytest.raises(LockstepError, match="outside"):
        Lockstep(cal, layer).pause("x")


@pytest.mark.parametrize("block", [5, 13, 100])
def test_hessian_blocked_upper_triangle_equals_the_full_product(monkeypatch, block):
    """Wide inputs accumulate only the upper block triangle and mirror it: H must equal (2/n) XᵀX of all the
    batches (uneven widths: 13 = 5 + 5 + 3), be exactly symmetric, and stay right when read between batches."""
    monkeypatch.setattr(HessianStat, "block", block)
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(m, 13, generator=gen) * torch.linspace(0.1, 3, 13) for m in (7, 1, 20)]
    st = HessianStat()
    for k, x in enumerate(xs):
        st.add(x.reshape(1, -1, 13))
        X = torch.cat(xs[: k + 1]).double()
        torch.testing.assert_close(st.H.double(), 2 * X.T @ X / X.shape[0], rtol=1e-5, atol=1e-6)
        assert torch.equal(st.H, st.H.T) and st.n == X.shape[0]


def test_layerwise_outputs_equal_the_whole_model_forward_with_local_and_global_layers():
    """Gemma 3: layer types alternate local (sliding window 4 < 24 tokens) and global attention, with different
    masks and rotary tables per layer; the kwargs captured while the layers pass their inputs through must
    reproduce the whole-model forward."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    cfg = Gemma3TextConfig(
        vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32, sliding_window=4, max_position_embeddings=64,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
    )  # fmt: skip
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(cfg).eval()
    tokens = torch.randint(0, 256, (5, 24))
    cal = LayerwiseCalibration(model, tokens, batch_size=2)
    kinds = {(i, id(kw.get("attention_mask"))) for (i, bs), kw in cal._kwargs.items() if bs == 2}
    assert len({m for _, m in kinds}) >= 2  # local and global layers got different masks
    for _i, layer in cal.layers():
        cal.advance(layer)
    with torch.no_grad():
        ref = model(input_ids=tokens, output_hidden_states=True, use_cache=False).hidden_states[-1]
        mine = model.model.norm(torch.cat(cal.inputs))
    torch.testing.assert_close(mine, ref, rtol=0, atol=1e-5)
