"""lobi (HOLA's Lo-Bi mixed precision): the knapsack allocation against a brute force written here, the bit
budget measured from the stored bytes, sensitivities against an independent RTN + Hessian / KL computation,
the SVD correction against Eckart–Young, and the one-line errors."""

import copy
import itertools
import math
import random

import pytest
import torch
import torch.nn.functional as F

from budgetlm.errors import ConfigError
from budgetlm.methods.base import StepContext, apply_steps, parse_config
from budgetlm.methods.quant.layers import QuantLinear
from budgetlm.methods.quant.lobi import allocate, fisher_diagonals
from budgetlm.models.sources import load

CANDS = [2, 3, 4, 8]


@pytest.fixture(scope="module")
def base():
    return load("tiny-random")


@pytest.fixture(scope="module")
def ctx(base):
    c = StepContext(n_calibration=4, calibration_len=48)
    c.calibration(base.tokenizer)
    return c


def fresh(base):
    h = copy.copy(base)
    h.model = copy.deepcopy(base.model)
    h.provenance = []
    return h


def linears(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")}


def ref_rtn(w, bits, group):
    """Asymmetric RTN from the formula (range includes 0), dequantised with the scale rounded to fp16 as the
    packed layer stores it."""
    out = torch.empty(w.shape, dtype=torch.float64)
    for r in range(w.shape[0]):
        for c0 in range(0, w.shape[1], group):
            x = w[r, c0 : c0 + group].float()
            lo, hi = x.min().clamp(max=0), x.max().clamp(min=0)
            s = (hi - lo) / (2**bits - 1)
            s = s if s > 0 else torch.tensor(1.0)
            z = torch.round(-lo / s)
            q = torch.clamp(torch.round(x / s) + z, 0, 2**bits - 1)
            out[r, c0 : c0 + group] = (q - z).double() * s.half().double()
    return out


def brute_force(sens, cost, budget):
    best, arg = math.inf, None
    for ks in itertools.product(*(range(len(c)) for c in cost)):
        if sum(cost[i][k] for i, k in enumerate(ks)) <= budget:
            s = sum(sens[i][k] for i, k in enumerate(ks))
            if s < best:
                best, arg = s, list(ks)
    return best, arg


# ------------------------------------------------------------------------------------------------ allocation


def test_allocation_equals_brute_force_optimum():
    rng = random.Random(0)
    for _trial in range(60):
        n, m = rng.randint(3, 5), rng.randint(2, 3)
        cost, sens = [], []
        for _ in range(n):
            c = sorted(rng.sample(range(10, 400), m))  # arbitrary integers: the gcd is usually 1
            s = sorted((rng.uniform(0, 10) for _ in range(m)), reverse=True)
            if rng.random() < 0.2:  # a non-monotone item now and then
                rng.shuffle(s)
            cost.append(c)
            sens.append(s)
        lo, hi = sum(c[0] for c in cost), sum(c[-1] for c in cost)
        budget = rng.randint(lo, hi)
        best, ref = brute_force(sens, cost, budget)
        got, _ = allocate(sens, cost, budget)
        total = sum(sens[i][k] for i, k in enumerate(got))
        assert sum(cost[i][k] for i, k in enumerate(got)) <= budget
        assert total == pytest.approx(best, rel=1e-12, abs=1e-12), (cost, sens, budget, got, ref)


def test_allocation_hand_made_instance():
    # 3 layers x 3 candidates; the optimum spends the budget on layer 1, whose error drops fastest
    cost = [[10, 20, 40], [10, 20, 40], [5, 10, 20]]
    sens = [[4.0, 2.5, 1.0], [40.0, 10.0, 1.0], [3.0, 1.0, 0.5]]
    budget = 65
    assert brute_force(sens, cost, budget)[1] == allocate(sens, cost, budget)[0] == [0, 2, 1]


def test_coarse_states_stay_feasible_and_fill_the_budget():
    rng = random.Random(1)
    cost = [sorted(rng.sample(range(1000, 90000), 3)) for _ in range(6)]
    sens = [[9.0, 3.0, 1.0] for _ in range(6)]
    budget = sum(c[1] for c in cost) + 777
    got, how = allocate(sens, cost, budget, max_states=50)
    assert "greedy" in how
    used = sum(cost[i][k] for i, k in enumerate(got))
    assert used <= budget
    for i, k in enumerate(got):  # no single upgrade still fits
        assert k == 2 or used - cost[i][k] + cost[i][k + 1] > budget


# ------------------------------------------------------------------------------------------------ budget


def achieved_bpw(model, names):
    mods = dict(model.named_modules())
    stored = sum(mods[n].storage_bytes() for n in names)
    weights = sum(mods[n].in_features * mods[n].out_features for n in names)
    return stored * 8 / weights, stored, weights


def steps_bytes(lin_shape, bits, rank):
    """Bytes of one stored layer written independently: packed codes + fp16 scales + uint8 zeros (g=64)
    + fp16 correction."""
    out_f, in_f = lin_shape
    return out_f * in_f * bits // 8 + out_f * (in_f // 64) * 3 + 2 * rank * (out_f + in_f)


@pytest.mark.parametrize(
    "target,rank,cands",
    [(2.5, 0, CANDS), (3.0, 0, CANDS), (3.6, 0, CANDS), (5.0, 0, CANDS), (8.375, 0, CANDS), (4.4, 4, [2, 3, 4])],
)
def test_budget_is_met_exactly(base, ctx, target, rank, cands):
    h = fresh(base)
    shapes = {n: tuple(m.weight.shape) for n, m in linears(h.model).items()}
    # the Linear-only budget (embeddings: false); tests/unit/test_quant_embedding.py covers the matrices in it
    cfg = {"method": "lobi", "target_bits": target, "rank": rank, "candidates": cands, "embeddings": False}
    rep = apply_steps(h, [cfg], ctx)[0]
    bpw, stored, weights = achieved_bpw(h.model, shapes)
    assert bpw <= target
    mods = dict(h.model.named_modules())
    assert stored == sum(steps_bytes(shapes[n], mods[n].bits, rank) for n in shapes)
    budget = target * weights / 8
    # as close as the candidates allow: no single Linear can move to its next candidate within the budget,
    # so the gap is below the smallest step still available
    steps = []
    for n, shape in shapes.items():
        b = mods[n].bits
        assert rep.stats[n]["bits"] == b
        if b != cands[-1]:
            step = steps_bytes(shape, cands[cands.index(b) + 1], rank) - steps_bytes(shape, b, rank)
            assert stored + step > budget
            steps.append(step * 8 / weights)
    if steps:
        assert target - bpw < min(steps)
    assert f"achieved {bpw:.4f}" in rep.notes[0]


def pc_bytes(shape, bits):
    """Bytes of a per-channel layer written independently: packed codes + one fp16 scale and uint8 zero a row."""
    out_f, in_f = shape
    return out_f * in_f * bits // 8 + out_f * 3


def test_candidate_groups_mix_grids_under_the_budget(base, ctx):
    """candidate_groups [64, null]: every Linear chooses a bit width and a grid. At exactly the bits of 3-bit
    per channel everywhere, the only feasible choice without 2-bit is 3-bit per channel (3-bit g64 costs 0.375
    bpw more), so with candidates [3, 4] every Linear must hold per-channel 3-bit rtn codes."""
    h = fresh(base)
    shapes = {n: tuple(m.weight.shape) for n, m in linears(h.model).items()}
    weights = {n: m.weight.detach().clone() for n, m in linears(h.model).items()}
    total = sum(pc_bytes(sh, 3) for sh in shapes.values())
    target = (total + 0.5) * 8 / sum(o * i for o, i in shapes.values())  # half a byte of slack for float rounding
    step = {
        "method": "lobi",
        "target_bits": target,
        "candidates": [3, 4],
        "candidate_groups": [64, None],
        "embeddings": False,
    }
    rep = apply_steps(h, [step], ctx)[0]
    mods = dict(h.model.named_modules())
    for n, shape in shapes.items():
        q = mods[n]
        assert (q.bits, q.group_size) == (3, shape[1]) and rep.stats[n]["group_size"] is None
        assert torch.equal(q.dequantized_weight().double(), ref_rtn(weights[n], 3, shape[1]))
        assert set(rep.stats[n]["sensitivity_by_bits"]) == {"3 g64", "4 g64", "3 per-channel", "4 per-channel"}
    assert achieved_bpw(h.model, shapes)[1] == total
    assert "3-bit per-channel × " in rep.notes[1]
    # a looser budget buys g64 or 4-bit grids for some Linears, never past the budget
    h = fresh(base)
    rep = apply_steps(h, [step | {"target_bits": 3.5, "candidates": [2, 3, 4]}], ctx)[0]
    bpw, stored, _ = achieved_bpw(h.model, shapes)
    assert bpw <= 3.5
    expect = 0
    for n, shape in shapes.items():
        q = h.model.get_submodule(n)
        expect += pc_bytes(shape, q.bits) if q.group_size == shape[1] else steps_bytes(shape, q.bits, 0)
    assert stored == expect
    assert len({(s["bits"], s["group_size"]) for s in rep.stats.values()}) > 1


def test_target_outside_the_range_is_one_line_and_changes_nothing(base, ctx):
    h = fresh(base)
    x = torch.randint(0, 250, (1, 8))
    before = h.model(x).logits
    for target, shown in [(2.0, "2.3750–8.3750"), (9.0, "2.3750–8.3750"), (3.0, "4.1528–10.1527")]:
        rank = 8 if target == 3.0 else 0
        with pytest.raises(ConfigError) as e:
            apply_steps(h, [{"method": "lobi", "target_bits": target, "rank": rank, "embeddings": False}], ctx)
        msg = str(e.value)
        assert "\n" not in msg and shown in msg and "target_bits" in msg, msg
    assert not any(isinstance(m, QuantLinear) for m in h.model.modules())
    assert torch.equal(h.model(x).logits, before)


def test_bad_settings_are_one_line(base, ctx):
    for bad in [
        {"candidates": [5]},
        {"candidates": []},
        {"target_bits": -1},
        {"rank": -2},
        {"sensitivity": "x"},
        {"candidate_groups": []},
        {"candidate_groups": [0]},
        {"fisher_sequences": 0},
    ]:
        with pytest.raises(ConfigError) as e:
            parse_config("lobi", bad)
        assert "\n" not in str(e.value)
    h = fresh(base)
    for bad, word in [({"group_size": 48}, "group_size 48"), ({"rank": 100}, "rank 100")]:
        with pytest.raises(ConfigError, match=word) as e:
            apply_steps(h, [{"method": "lobi", **bad}], ctx)
        assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="outside them"):
        apply_steps(
            h, [{"method": "lobi", "ignore": [], "embeddings": False}], ctx
        )  # the lm_head is not in a decoder layer
    assert not any(isinstance(m, QuantLinear) for m in h.model.modules())


# ------------------------------------------------------------------------------------------------ sensitivity


def test_output_sensitivity_matches_independent_hessian_error(base, ctx):
    h = fresh(base)
    tokens = ctx.calibration(h.tokenizer)
    name = "model.layers.1.mlp.down_proj"
    lin = dict(h.model.named_modules())[name]
    xs = []
    hook = lin.register_forward_pre_hook(lambda _m, a: xs.append(a[0].reshape(-1, a[0].shape[-1]).double()))
    with torch.no_grad():
        h.model(input_ids=tokens, use_cache=False)
    hook.remove()
    X = torch.cat(xs)
    H = 2 * X.T @ X / X.shape[0]
    w = lin.weight.detach().clone()
    rep = apply_steps(h, [{"method": "lobi", "sensitivity": "output"}], ctx)[0]
    for b in CANDS:
        dw = w.double() - ref_rtn(w, b, 64)
        ref = float(torch.trace(dw @ H @ dw.T))
        assert rep.stats[name]["sensitivity_by_bits"][str(b)] == pytest.approx(ref, rel=2e-3)


def test_kl_sensitivity_matches_a_full_forward_with_one_layer_quantised(base, ctx):
    h = fresh(base)
    seqs = ctx.calibration(h.tokenizer)[:2]
    name = "model.layers.0.self_attn.o_proj"
    lin = dict(h.model.named_modules())[name]
    w = lin.weight.detach().clone()
    with torch.no_grad():
        logp = F.log_softmax(h.model(input_ids=seqs).logits.double(), -1)
        refs = {}
        for b in (2, 3):
            lin.weight.data = ref_rtn(w, b, 64).float()
            logq = F.log_softmax(h.model(input_ids=seqs).logits.double(), -1)
            refs[b] = float((logp.exp() * (logp - logq)).sum(-1).mean())
        lin.weight.data = w
    rep = apply_steps(h, [{"method": "lobi", "sensitivity": "kl", "kl_sequences": 2}], ctx)[0]
    for b in (2, 3):
        assert rep.stats[name]["sensitivity_by_bits"][str(b)] == pytest.approx(refs[b], rel=1e-2, abs=1e-7)
    assert achieved_bpw(h.model, linears(base.model))[0] <= 3.0


def _reference_fisher(model, seqs, name, seed=0):
    """mean_t g_ti² for one Linear, by another route: a zero offset added to the Linear's output is the leaf
    autograd.grad differentiates against; labels sampled as the method does (same generator, same order)."""
    lin = dict(model.named_modules())[name]
    gen = torch.Generator().manual_seed(seed)
    total = torch.zeros(lin.out_features, dtype=torch.float64)
    for seq in seqs:
        offset = torch.zeros(len(seq), lin.out_features, requires_grad=True)
        hook = lin.register_forward_hook(lambda _m, _a, out, offset=offset: out + offset)
        try:
            logp = F.log_softmax(model(input_ids=seq[None]).logits[0].float(), -1)
        finally:
            hook.remove()
        y = torch.multinomial(logp.detach().exp(), 1, generator=gen)
        (g,) = torch.autograd.grad(logp.gather(-1, y).sum(), offset)
        total += g.double().pow(2).sum(0)
    return total / seqs.numel()


def test_fisher_diagonals_match_gradients_taken_another_way(base, ctx):
    h = fresh(base)
    seqs = ctx.calibration(h.tokenizer)[:2]
    names = list(linears(h.model))
    got = fisher_diagonals(h.model, seqs, names, seed=0)
    assert all(p.requires_grad for p in h.model.parameters())  # restored
    for name in ("model.layers.0.self_attn.k_proj", "model.layers.1.mlp.down_proj", "model.layers.0.mlp.up_proj"):
        ref = _reference_fisher(h.model, seqs, name)
        assert got[name].double() == pytest.approx(ref, rel=1e-4, abs=1e-12)
        assert ref.sum() > 0


def test_fisher_sensitivity_estimates_the_kl_each_linear_causes(base, ctx):
    """The estimate ¼ Σ_i F_i (ΔW H ΔWᵀ)_ii against the KL measured with the model's forward, one Linear
    quantised at 8 bits (a small error, where the second-order expansion holds): per Linear the two agree within
    a small factor although they span orders of magnitude across Linears (the raw output error does not)."""
    h = fresh(base)
    seqs = ctx.calibration(h.tokenizer)
    rep = apply_steps(h, [{"method": "lobi", "sensitivity": "fisher", "fisher_sequences": len(seqs)}], ctx)[0]
    model = fresh(base).model
    mods = linears(model)
    with torch.no_grad():
        logp = F.log_softmax(model(input_ids=seqs).logits.double(), -1)
        measured, estimated = [], []
        for name, lin in mods.items():
            w = lin.weight.detach().clone()
            lin.weight.data = ref_rtn(w, 8, 64).float()
            logq = F.log_softmax(model(input_ids=seqs).logits.double(), -1)
            lin.weight.data = w
            measured.append(float((logp.exp() * (logp - logq)).sum(-1).mean()))
            estimated.append(rep.stats[name]["sensitivity_by_bits"]["8"])
    m, e = torch.tensor(measured), torch.tensor(estimated)
    assert m.max() / m.min() > 100  # the Linears differ a lot
    ratio = e / m
    assert 0.5 < ratio.median() < 2 and ratio.min() > 0.1 and ratio.max() < 10, ratio
    # the raw output error tr(ΔW H ΔWᵀ) is no such estimate: its ratio to the KL varies far more across Linears
    out = apply_steps(fresh(base), [{"method": "lobi", "sensitivity": "output"}], ctx)[0]
    raw = torch.tensor([out.stats[n]["sensitivity_by_bits"]["8"] for n in mods]) / m
    assert raw.max() / raw.min() > 10 * ratio.max() / ratio.min()
    assert "estimated KL (nats/token)" in rep.notes[2] and "Fisher pass" in rep.notes[-1]


def test_more_sensitive_layers_get_more_bits(base, ctx):
    """up_proj := 10 x gate_proj (same inputs): every error and every error drop is 100x gate's, so an optimal
    allocation never gives up fewer bits than gate, and gives it more at some budget."""
    strictly = False
    for target in (2.7, 3.0, 3.4):
        h = fresh(base)
        mlp = h.model.model.layers[1].mlp
        mlp.up_proj.weight.data = 10 * mlp.gate_proj.weight.data
        rep = apply_steps(h, [{"method": "lobi", "target_bits": target, "sensitivity": "output"}], ctx)[0]
        up, gate = rep.stats["model.layers.1.mlp.up_proj"], rep.stats["model.layers.1.mlp.gate_proj"]
        for b in CANDS:
            ratio = up["sensitivity_by_bits"][str(b)] / gate["sensitivity_by_bits"][str(b)]
            assert ratio == pytest.approx(100, rel=0.02)
        assert up["bits"] >= gate["bits"]
        strictly |= up["bits"] > gate["bits"]
    assert strictly


# ------------------------------------------------------------------------------------------------ correction


def test_svd_correction_is_the_best_rank_r_approximation(base, ctx, tmp_path):
    h = fresh(base)
    weights = {n: m.weight.detach().clone() for n, m in linears(h.model).items()}
    r = 4
    apply_steps(h, [{"method": "lobi", "target_bits": 4.0, "rank": r, "candidates": [2, 4]}], ctx)
    mods = dict(h.model.named_modules())
    for n, w in weights.items():
        q = mods[n]
        assert q.rank == r and q.lr_u.dtype == q.lr_v.dtype == torch.float16
        assert q.lr_u.shape == (w.shape[0], r) and q.lr_v.shape == (r, w.shape[1])
        E = w.double() - q.dequantized_weight().double()
        sv = torch.linalg.svdvals(E)
        eckart_young = float(sv[r:].pow(2).sum().sqrt())
        top = float(sv[:r].pow(2).sum().sqrt())
        err = float((w.double() - q.effective_weight().double()).norm())
        assert err < float(E.norm())
        assert eckart_young - 1e-6 * top <= err <= eckart_young + 2e-3 * top  # fp16 factors
    x = torch.randint(0, 250, (2, 10))
    out = h.model(x).logits
    h.save(tmp_path / "m")
    assert torch.equal(load(tmp_path / "m").model(x).logits, out)


def test_gptq_quantizer_meets_budget_with_lower_error_than_rtn(base, ctx):
    pytest.importorskip("budgetlm.methods.quant.gptq")
    reps = {}
    for qz in ("rtn", "gptq"):
        h = fresh(base)
        step = {"method": "lobi", "quantizer": qz, "target_bits": 3.0, "sensitivity": "output"}
        reps[qz] = apply_steps(h, [step], ctx)[0]
        assert achieved_bpw(h.model, linears(base.model))[0] <= 3.0
    for b in ("2", "3"):
        tot = {qz: sum(s["sensitivity_by_bits"][b] for s in r.stats.values()) for qz, r in reps.items()}
        assert tot["gptq"] < tot["rtn"]
