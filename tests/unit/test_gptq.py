"""gptq against references written here: a plain round-to-nearest grid, and a naive GPTQ that quantises one
column at a time and updates the inverse Hessian by the OBS formula (no Cholesky, no lazy blocks)."""

import copy

import pytest
import torch

from budgetlm.errors import ConfigError
from budgetlm.methods.base import StepContext, apply_steps
from budgetlm.methods.quant import gptq as gptq_mod
from budgetlm.methods.quant.gptq import gptq_layer, inverse_hessian_cholesky
from budgetlm.methods.quant.layers import QuantLinear
from budgetlm.models.sources import load

# --- references ------------------------------------------------------------------------------------------------


def ref_grid(cols, bits, symmetric):
    """Scale and zero per row of `cols` [out, g] as rtn defines them, scale rounded to fp16 (what is stored)."""
    c = cols.float()
    if symmetric:
        s = c.abs().amax(1) / (2 ** (bits - 1) - 1)
        s = torch.where(s > 0, s, torch.ones_like(s))
        return s.half().double(), None
    lo, hi = c.amin(1).clamp(max=0), c.amax(1).clamp(min=0)
    s = (hi - lo) / (2**bits - 1)
    s = torch.where(s > 0, s, torch.ones_like(s))
    z = torch.round(-lo / s)
    return s.half().double(), z.double()


def ref_code(x, s, z, bits):
    """Code of column x on the grid (s, z), computed in x's dtype."""
    s = s.to(x.dtype)
    if z is None:
        half = 2 ** (bits - 1)
        return torch.clamp(torch.round(x / s), -half, half - 1) + half
    return torch.clamp(torch.round(x / s) + z.to(x.dtype), 0, 2**bits - 1)


def ref_value(code, s, z, bits):
    return (code - (2 ** (bits - 1) if z is None else z)) * s


def ref_rtn(w, bits, g, symmetric):
    """(codes, dequantised weight) of plain round-to-nearest with one grid per g columns."""
    codes, deq = torch.empty_like(w), torch.empty_like(w)
    for c0 in range(0, w.shape[1], g):
        s, z = ref_grid(w[:, c0 : c0 + g], bits, symmetric)
        for c in range(c0, c0 + g):
            codes[:, c] = ref_code(w[:, c], s, z, bits)
            deq[:, c] = ref_value(codes[:, c], s.to(w.dtype), None if z is None else z.to(w.dtype), bits)
    return codes.to(torch.uint8), deq


def ref_gptq(w, H, bits, g, symmetric, damp=0.01, act_order=False, static_groups=False):
    """Naive GPTQ in float64: one column at a time, error e = (w - q) / Hinv_jj spread over the later columns
    with row j of the current inverse Hessian, which is then updated by OBS: Hinv -= Hinv[:, j] Hinv[j, :] /
    Hinv_jj. Grids: per group, from the error-updated weights when the group's first column is reached (static:
    from the original weights in natural order). Returns (codes in natural order, dequantised W, perm)."""
    W, H = w.double().clone(), H.double().clone()
    n = W.shape[1]
    for c in range(n):
        if H[c, c] == 0:
            H[c, c] = 1
            W[:, c] = 0
    static = [ref_grid(W[:, c0 : c0 + g], bits, symmetric) for c0 in range(0, n, g)] if static_groups else None
    order = torch.argsort(torch.diagonal(H), descending=True, stable=True) if act_order else torch.arange(n)
    W, H = W[:, order], H[order][:, order]
    Hinv = torch.linalg.inv(H + damp * torch.diagonal(H).mean() * torch.eye(n, dtype=H.dtype))
    codes, deq = torch.empty_like(W), torch.empty_like(W)
    for j in range(n):
        if static is not None:
            s, z = static[int(order[j]) // g]
        elif j % g == 0:
            s, z = ref_grid(W[:, j : j + g], bits, symmetric)
        codes[:, j] = ref_code(W[:, j], s, z, bits)
        deq[:, j] = ref_value(codes[:, j], s, z, bits)
        err = (W[:, j] - deq[:, j]) / Hinv[j, j]
        W[:, j + 1 :] -= torch.outer(err, Hinv[j, j + 1 :])
        Hinv = Hinv - torch.outer(Hinv[:, j], Hinv[j, :]) / Hinv[j, j]
    inv = torch.argsort(order)
    return codes[:, inv].to(torch.uint8), deq[:, inv], order


def correlated(n_tokens, in_f, seed, dtype=torch.float32):
    """Inputs X = Z A with a random mixing A (strongly correlated features) and H = (2/n) XᵀX."""
    gen = torch.Generator().manual_seed(seed)
    Z = torch.randn(n_tokens, in_f, generator=gen, dtype=torch.float64)
    A = torch.randn(in_f, in_f, generator=gen, dtype=torch.float64) + 0.5 * torch.randn(1, in_f, generator=gen)
    X = Z @ A
    return X.to(dtype), (2 / n_tokens * X.T @ X).to(dtype)


def layer_weight(codes, grid, perm):
    """The weight a layer holds, rebuilt here from codes and grid (codes for W[:, perm] when perm is given)."""
    g = grid.group_size
    w = torch.empty(codes.shape, dtype=torch.float64)
    for p in range(codes.shape[1]):
        col = int(perm[p]) if perm is not None else p
        s = grid.scales[:, p // g].double()
        z = None if grid.zeros is None else grid.zeros[:, p // g].double()
        w[:, col] = ref_value(codes[:, p].double(), s, z, grid.bits)
    return w


# --- gptq_layer ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [3, 4])
def test_gptq_beats_rtn_on_correlated_inputs(bits):
    X, H = correlated(1024, 128, seed=bits)
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(10 + bits))
    codes, grid, perm, stats = gptq_layer(w, H, bits, 32, False)
    assert perm is None and codes.dtype == torch.uint8 and codes.shape == w.shape
    q = QuantLinear.from_codes(codes, grid, None).dequantized_weight()
    _, q_rtn = ref_rtn(w, bits, 32, False)
    err_gptq = ((w - q) @ X.T).norm()
    err_rtn = ((w - q_rtn) @ X.T).norm()
    assert err_gptq < 0.8 * err_rtn, (float(err_gptq), float(err_rtn))
    # the reported relative output error is tr(dW H dWᵀ)/tr(W H Wᵀ), i.e. ‖dW Xᵀ‖² / ‖W Xᵀ‖²
    rel = (err_gptq / (w @ X.T).norm()) ** 2
    assert stats["rel_output_error"] == pytest.approx(float(rel), rel=1e-3)


@pytest.mark.parametrize("group,sym", [(16, False), (16, True), (None, False), (48, False)])
def test_identity_hessian_gives_rtn_codes(group, sym):
    """With uncorrelated inputs (H = I) the error feedback moves nothing, so GPTQ is round-to-nearest exactly."""
    w = torch.randn(40, 96, generator=torch.Generator().manual_seed(1)) * 0.1
    codes, grid, perm, stats = gptq_layer(w, torch.eye(96) * 2.0, 4, group, sym, block_size=32)
    ref_codes, ref_deq = ref_rtn(w, 4, group or 96, sym)
    assert perm is None
    assert torch.equal(codes, ref_codes)
    assert torch.allclose(QuantLinear.from_codes(codes, grid, None).dequantized_weight(), ref_deq.float())
    assert stats["damp"] == 0.01 and stats["damp_retries"] == 0


@pytest.mark.parametrize(
    "bits,group,sym,block,act_order,static",
    [
        (4, 12, False, 16, False, False),  # groups straddle lazy blocks
        (3, 12, True, 16, False, False),
        (2, None, False, 8, False, False),
        (4, 12, False, 16, True, False),  # act-order: codes and groups of W[:, perm]
        (4, 12, False, 16, True, True),  # act-order with static groups: natural order, no perm
        (3, 24, False, 10, False, True),
        (4, 24, False, 8, True, False),  # groups longer than a block, act-order
    ],
)
def test_lazy_blocks_match_naive_column_at_a_time(bits, group, sym, block, act_order, static):
    _, H = correlated(200, 48, seed=3, dtype=torch.float64)
    H[5, :] = H[:, 5] = 0  # a dead input
    w = torch.randn(20, 48, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    codes, grid, perm, stats = gptq_layer(
        w, H, bits, group, sym, block_size=block, act_order=act_order, static_groups=static
    )
    ref_codes, ref_deq, order = ref_gptq(w, H, bits, group or 48, sym, act_order=act_order, static_groups=static)
    assert stats["dead_inputs"] == 1
    if act_order and group and not static:
        assert perm is not None and torch.equal(perm, order)
        natural = codes[:, torch.argsort(perm)]
    else:
        assert perm is None
        natural = codes
    assert torch.equal(natural, ref_codes)
    deq = layer_weight(codes, grid, perm)
    assert torch.allclose(deq, ref_deq, atol=1e-6)
    assert torch.all(deq[:, 5] == 0), "a dead input's weights are quantised as zeros"


def test_act_order_perm_and_layer_weight():
    _, H = correlated(500, 64, seed=5)
    H = H * torch.linspace(0.2, 3, 64).outer(torch.linspace(0.2, 3, 64))  # varied diagonal
    w = torch.randn(24, 64, generator=torch.Generator().manual_seed(6))
    codes, grid, perm, _ = gptq_layer(w, H, 4, 16, False, act_order=True)
    assert perm is not None and perm.shape == (64,)
    assert torch.equal(torch.sort(perm).values, torch.arange(64)), "a permutation of the input columns"
    assert torch.equal(perm, torch.argsort(torch.diagonal(H), descending=True, stable=True))
    layer = QuantLinear.from_codes(codes, grid, None, perm=perm)
    expected = layer_weight(codes, grid, perm).float()
    assert torch.allclose(layer.dequantized_weight(), expected, atol=1e-6)
    x = torch.randn(3, 64)
    assert torch.allclose(layer(x), x @ expected.T, atol=1e-4)


def test_static_groups_and_per_channel_act_order_need_no_perm():
    _, H = correlated(300, 64, seed=7)
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(8))
    for group, static in [(16, True), (None, False)]:
        codes, grid, perm, _ = gptq_layer(w, H, 4, group, False, act_order=True, static_groups=static)
        assert perm is None
        if static:  # grids come from the original weights in natural order
            for k in range(4):
                s, z = ref_grid(w[:, 16 * k : 16 * k + 16], 4, False)
                assert torch.equal(grid.scales[:, k].double(), s) and torch.equal(grid.zeros[:, k].double(), z)


def test_indefinite_hessian_retries_with_more_damping():
    H = torch.eye(32)
    H[0, 1] = H[1, 0] = 3.0  # eigenvalue -2: needs damping > 2 x mean diag
    w = torch.randn(8, 32, generator=torch.Generator().manual_seed(9))
    codes, _, _, stats = gptq_layer(w, H, 4, 16, False, damp=0.01)
    assert stats["damp_retries"] >= 1 and stats["damp"] > 2
    assert codes.shape == w.shape


def test_inverse_hessian_cholesky_is_upper_factor_of_damped_inverse():
    _, H = correlated(300, 40, seed=11, dtype=torch.float64)
    U, frac, retries = inverse_hessian_cholesky(H, 0.05)
    assert frac == 0.05 and retries == 0
    assert torch.equal(U, torch.triu(U)) and (U.diagonal() > 0).all()
    damped = H + 0.05 * H.diagonal().mean() * torch.eye(40, dtype=H.dtype)
    assert torch.allclose(U.T @ U, torch.linalg.inv(damped), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("dead", [False, True])
def test_the_callers_hessian_is_never_written(act_order, dead):
    """The sweeps take the caller's H without copying it unless it must change (dead inputs): neither GPTQ nor
    SparseGPT may write into it, with or without dead inputs, act-order or damping retries."""
    from budgetlm.methods.prune.sparsegpt import sparsegpt_layer

    _, H = correlated(200, 32, seed=5)
    if dead:
        H[3, :] = H[:, 3] = 0  # a dead input
    H[0, 1] += 1e4  # a huge off-diagonal pair: indefinite, the damping is retried
    H[1, 0] += 1e4
    before = H.clone()
    w = torch.randn(8, 32, generator=torch.Generator().manual_seed(2))
    assert gptq_layer(w, H, 4, 16, False, act_order=act_order)[3]["damp_retries"] >= 1
    sparsegpt_layer(w, H, 0.5)
    assert torch.equal(H, before)


def test_shared_hessians_follow_the_tensor_not_the_module():
    """Modules fed the very same tensor share one H; a module whose sharing changes between batches is
    flagged for a separate pass; `last_called` tells whether some modules were always fed after the others."""
    pool = gptq_mod._SharedInputs()
    a, b, c = pool.stat(), pool.stat(), pool.stat()
    xs = [torch.randn(5, 6), torch.randn(7, 6)]
    ys = [torch.randn(5, 6), torch.randn(7, 6)]
    for x, y in zip(xs, ys):
        a.add(x), b.add(x), c.add(y)
    X, Y = torch.cat(xs), torch.cat(ys)
    assert torch.allclose(a.hessian, 2 / 12 * X.T @ X, atol=1e-5) and b.hessian is a.hessian and b.H is None
    assert torch.allclose(c.hessian, 2 / 12 * Y.T @ Y, atol=1e-5)
    assert not b.broken and pool.last_called({id(c)}) and not pool.last_called({id(b)})
    assert [s is s.leader for s in pool.order] == [True, False, True]
    pool = gptq_mod._SharedInputs()
    a, b = pool.stat(), pool.stat()
    a.add(xs[0]), b.add(xs[0]), a.add(xs[1]), b.add(xs[1].clone())  # b's input is a copy in batch 1
    assert b.broken and not a.broken


def test_bad_group_size_is_one_line():
    with pytest.raises(ConfigError) as e:
        gptq_layer(torch.randn(4, 48), torch.eye(48), 4, 32, False)
    assert "48" in str(e.value) and "\n" not in str(e.value)


# --- the method on tiny-random ---------------------------------------------------------------------------------


def test_method_matches_reference_layer_by_layer(tiny, monkeypatch, input_hessian):
    """Layer 0's q/k (quantised stacked, one shared H) match the naive reference on the inputs the test
    captures; layer 1's k_proj matches it on the inputs after layer 0 was quantised (the calibration advances
    through the changed model), and so does its down_proj (stubbed in its Hessian pass) on the inputs the
    original layer 1 gives it."""
    ctx = StepContext(n_calibration=4, calibration_len=32)
    tokens = ctx.calibration(tiny.tokenizer)
    layers = tiny.model.model.layers
    w = {
        n: getattr(layers[i].self_attn, p).weight.detach().clone()
        for n, i, p in [("q0", 0, "q_proj"), ("k0", 0, "k_proj"), ("k1", 1, "k_proj")]
    }
    w["down1"] = layers[1].mlp.down_proj.weight.detach().clone()
    original1 = copy.deepcopy(layers[1])
    H0 = input_hessian(tiny.model, layers[0].self_attn.q_proj, tokens)
    stub_calls = []
    forward = gptq_mod._Stub.forward
    monkeypatch.setattr(gptq_mod._Stub, "forward", lambda self, x: stub_calls.append(1) or forward(self, x))
    reports = apply_steps(tiny, [{"method": "gptq", "true_sequential": False}], ctx)
    assert stub_calls, "layer 1's Hessian pass skipped down_proj (learnt from layer 0)"
    H1 = input_hessian(tiny.model, layers[1].self_attn.k_proj, tokens)  # layer 0 is quantised now
    quantised1, layers[1] = layers[1], original1  # the inputs of layer 1's down_proj in its original form
    H1_down = input_hessian(tiny.model, original1.mlp.down_proj, tokens)
    layers[1] = quantised1
    for key, mod, H in [
        ("q0", layers[0].self_attn.q_proj, H0),
        ("k0", layers[0].self_attn.k_proj, H0),
        ("k1", layers[1].self_attn.k_proj, H1),
        ("down1", layers[1].mlp.down_proj, H1_down),
    ]:
        assert isinstance(mod, QuantLinear) and mod.bits == 4 and mod.group_size == 64
        ref_codes, _, _ = ref_gptq(w[key], H, 4, 64, False)
        agree = (mod.codes() == ref_codes).float().mean()
        assert agree > 0.99, f"{key}: {float(agree):.4f} of codes agree"  # float32 vs float64 Hessians
    stats = reports[0].stats
    assert len(stats) == 14  # 7 Linears x 2 layers, lm_head ignored
    s = stats["model.layers.0.self_attn.q_proj"]
    assert s["bits_per_weight"] == pytest.approx(4 + 24 / 64)  # fp16 scale + uint8 zero per 64 weights
    assert 0 < s["rel_output_error"] < 0.1 and s["damp"] == 0.01
    assert s["shared_hessian"] == "q_proj+k_proj+v_proj"
    assert stats["model.layers.0.mlp.gate_proj"]["shared_hessian"] == "gate_proj+up_proj"


GROUPS = [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"]]
GROUPS += [["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]


def check_true_sequential(h, input_hessian, tokens, bits=4, g=64):
    """Every input group of every layer, in call order, against the naive reference on the Hessian a fresh copy
    of the model gives it when every module before it holds the weights the method gave it."""
    ref = load("tiny-random")
    for i, layer in enumerate(ref.model.model.layers):
        for group in GROUPS:
            mods = [layer.get_submodule(n) for n in group]
            H = input_hessian(ref.model, mods[0], tokens)
            codes, _, _ = ref_gptq(torch.cat([m.weight.detach() for m in mods]), H, bits, g, False)
            row = 0
            for n, m in zip(group, mods):
                q = h.model.model.layers[i].get_submodule(n)
                assert isinstance(q, QuantLinear)
                agree = (q.codes() == codes[row : row + m.out_features]).float().mean()
                assert agree > 0.99, f"layer {i} {n}: {float(agree):.4f} of codes agree"
                row += m.out_features
                m.weight.data = q.dequantized_weight().to(m.weight.dtype)


def test_true_sequential_one_pass_matches_reference_group_by_group(monkeypatch, input_hessian):
    """true_sequential (one lockstep pass per layer): o_proj's Hessian comes from the quantised
    q/k/v, gate/up's from the quantised attention, down's from the quantised gate/up. 20 sequences make 3
    batches (8, 8, 4); each decoder layer runs once per batch (plus one probe batch on the first layer)."""
    h = load("tiny-random")
    ctx = StepContext(n_calibration=20, calibration_len=32)
    tokens = ctx.calibration(h.tokenizer)
    calls = [0, 0]
    for i, layer in enumerate(h.model.model.layers):
        layer.register_forward_pre_hook(lambda _m, _a, i=i: calls.__setitem__(i, calls[i] + 1))
    reports = apply_steps(h, [{"method": "gptq", "true_sequential": True}], ctx)
    # capture (3 batches reach layer 0, the first of each size (8, 4) layer 1), then layer 0: a probe batch and
    # one pass of 3 batches; layer 1: one pass (two-pass scheme: a Hessian pass and an advance pass, 9 and 5)
    assert calls == [3 + 1 + 3, 2 + 3]
    check_true_sequential(h, input_hessian, tokens)
    stats = reports[0].stats
    assert stats["model.layers.0.self_attn.q_proj"]["shared_hessian"] == "q_proj+k_proj+v_proj"
    assert stats["model.layers.1.mlp.gate_proj"]["shared_hessian"] == "gate_proj+up_proj"
    assert stats["model.layers.1.mlp.down_proj"]["shared_hessian"] is None


def test_true_sequential_wrong_prediction_redoes_the_layer(monkeypatch, input_hessian):
    """A wrong prediction of which targets share an input (o_proj grouped with q) is caught when o_proj is fed
    its own tensor: the layer is restored and redone, each target compressed as it is reached; the result is
    the reference's."""
    h = load("tiny-random")
    ctx = StepContext(n_calibration=12, calibration_len=32)
    wrong = {"self_attn.q_proj": ["self_attn.q_proj", "self_attn.o_proj"]}
    monkeypatch.setattr(gptq_mod._OnePass, "probe", lambda self: wrong)
    reports = apply_steps(h, [{"method": "gptq", "true_sequential": True}], ctx)
    check_true_sequential(h, input_hessian, ctx.calibration(h.tokenizer))
    assert not any("separate passes" in n for n in reports[0].notes)
    stats = reports[0].stats  # layer 0 redone target by target; layer 1 predicted from what layer 0 showed
    assert stats["model.layers.0.self_attn.k_proj"]["shared_hessian"] is None
    assert stats["model.layers.1.self_attn.q_proj"]["shared_hessian"] == "q_proj+k_proj+v_proj"


def test_true_sequential_falls_back_to_separate_passes(monkeypatch, input_hessian):
    """Batches that do not pause alike (simulated) make the layer fall back to one pass per input group, with
    the same true-sequential result and a note."""
    h = load("tiny-random")
    ctx = StepContext(n_calibration=12, calibration_len=32)

    def refuse(self, on_pause):
        raise gptq_mod.LockstepError("calibration batches paused at different points (simulated)")

    monkeypatch.setattr(gptq_mod.Lockstep, "run", refuse)
    reports = apply_steps(h, [{"method": "gptq", "true_sequential": True}], ctx)
    check_true_sequential(h, input_hessian, ctx.calibration(h.tokenizer))
    assert sum("separate passes" in n for n in reports[0].notes) == 2


def test_act_order_static_and_true_sequential_variants_run(tiny):
    ctx = StepContext(n_calibration=2, calibration_len=32)
    apply_steps(tiny, [{"method": "gptq", "act_order": True, "group_size": 32, "bits": 3}], ctx)
    q = tiny.model.model.layers[1].mlp.down_proj
    assert isinstance(q, QuantLinear) and q.perm is not None and q.bits == 3
    h = load("tiny-random")
    reports = apply_steps(
        h, [{"method": "gptq", "act_order": True, "static_groups": True, "true_sequential": True}], ctx
    )
    assert all(isinstance(m, QuantLinear) and m.perm is None for n, m in h.model.named_modules() if "proj" in n)
    assert all(0 <= s["rel_output_error"] < 0.2 for s in reports[0].stats.values())
    assert reports[0].stats["model.layers.0.self_attn.q_proj"]["shared_hessian"] == "q_proj+k_proj+v_proj"


def _no_quant(h):
    return not any(isinstance(m, QuantLinear) for m in h.model.modules())


@pytest.mark.parametrize(
    "step,ctx,words",
    [
        ({"method": "gptq"}, StepContext(n_calibration=0), ["calibration", "n_calibration"]),
        ({"method": "gptq", "group_size": 96}, StepContext(n_calibration=2, calibration_len=16), ["96", "divide"]),
        ({"method": "gptq", "targets": ["lm_head"], "ignore": []}, StepContext(n_calibration=2), ["lm_head"]),
        ({"method": "gptq", "bits": 5}, StepContext(n_calibration=2), ["bits"]),
    ],
)
def test_bad_input_is_one_line_and_changes_nothing(tiny, step, ctx, words):
    with pytest.raises(ConfigError) as e:
        apply_steps(tiny, [step], ctx)
    msg = str(e.value)
    assert "\n" not in msg and all(w in msg for w in words), msg
    assert _no_quant(tiny) and not tiny.provenance


@pytest.mark.parametrize("speedup", [5.8, 2.0, 1.9, 0.15])
def test_auto_calibration_dtype_is_bf16_only_where_bf16_matmuls_measure_fast(monkeypatch, speedup):
    """calibration_dtype auto (the default): the layer passes run under bf16 autocast exactly when a bf16 matmul
    measured at least 2x faster than float32 here, and the step's notes say which dtype ran and why."""
    bf16 = speedup >= 2.0
    monkeypatch.setattr(gptq_mod, "bf16_matmul_speedup", lambda: speedup)
    seen = []
    original = gptq_mod.LayerwiseCalibration.layer_output

    def spy(self, layer, x, index=None):
        seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
        return original(self, layer, x, index)

    monkeypatch.setattr(gptq_mod.LayerwiseCalibration, "layer_output", spy)
    h = load("tiny-random")
    rep = apply_steps(h, [{"method": "gptq"}], StepContext(n_calibration=4, calibration_len=16))[0]
    want = torch.bfloat16 if bf16 else None
    assert seen and all(s == want for s in seen), seen
    note = rep.notes[1]
    assert note.startswith(f"calibration passes in {'bfloat16' if bf16 else 'float32'} (auto: "), note
    assert f"measured {speedup:.1f}x faster" in note if bf16 else f"measured {speedup:.2f}x the speed" in note


@pytest.mark.parametrize("true_sequential", [True, False])
def test_bf16_calibration_passes_track_float32_and_keep_the_sweep_in_float32(monkeypatch, true_sequential):
    """calibration_dtype bfloat16: the layer passes run under autocast, but the Hessians and the column sweep
    must not (they are checked to see float32 inputs); the result is as close to the original as a float32
    calibration's."""
    ctx = StepContext(n_calibration=12, calibration_len=32)
    seen = []
    sweep = gptq_mod._gptq

    def spy(w, H, *a, **k):
        seen.append((w.dtype, H.dtype, torch.is_autocast_enabled("cpu")))
        return sweep(w, H, *a, **k)

    monkeypatch.setattr(gptq_mod, "_gptq", spy)
    step = {"method": "gptq", "true_sequential": true_sequential}
    ref, h = load("tiny-random"), load("tiny-random")
    apply_steps(ref, [step], ctx)
    seen.clear()
    apply_steps(h, [step | {"calibration_dtype": "bfloat16"}], ctx)
    assert seen and all(s == (torch.float32, torch.float32, False) for s in seen), seen
    agree = {
        n: float((a.codes() == b.codes()).float().mean())
        for (n, a), b in zip(ref.model.named_modules(), h.model.modules())
        if isinstance(a, QuantLinear)
    }
    tokens = torch.randint(0, 250, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        orig, a, b = (m.model(input_ids=tokens).logits for m in (load("tiny-random"), ref, h))
    # as good as a float32 calibration: the quantised model's distance to the original within 15% of it
    assert (b - orig).norm() < 1.15 * (a - orig).norm()
    first = {f"model.layers.0.self_attn.{p}_proj" for p in "qkv"}  # fed the (float32) normed layer inputs
    assert all(agree[n] == 1 for n in first)
    assert any(v < 1 for n, v in agree.items() if n not in first)  # the others saw bf16 activations
