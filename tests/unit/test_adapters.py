"""The adapter interface (methods/adapt/base.py), the peft-backed adapters and qlora: identity at attach, gradients
only on adapter parameters, trainable counts against formulas written here, merge, peft's save format, errors."""

import pytest
import torch

from budgetlm.errors import ConfigError
from budgetlm.methods.adapt.base import AdaptedLinear, merge, merge_and_compare
from budgetlm.methods.adapt.peft_adapters import load_peft_adapter, save_peft_adapter
from budgetlm.methods.base import apply_steps, parse_config
from budgetlm.methods.quant.layers import QuantLinear
from budgetlm.methods.quant.nf4 import NF4_CODEBOOK, NF4Linear
from budgetlm.models.sources import load

X = torch.randint(0, 250, (2, 12), generator=torch.Generator().manual_seed(3))
R = 8


def shapes(model):
    """(in, out) of the seven projections of one decoder layer, from the config; and the layer count."""
    c = model.config
    d, i, hd = c.hidden_size, c.intermediate_size, c.hidden_size // c.num_attention_heads
    kv = c.num_key_value_heads * hd
    proj = {"q": (d, d), "k": (d, kv), "v": (d, kv), "o": (d, d), "gate": (d, i), "up": (d, i), "down": (i, d)}
    return proj, c.num_hidden_layers


def perturb(model, seed=1, std=0.05):
    """Move every trainable parameter away from its initialisation (so ΔW != 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * std)


def logits(h):
    with torch.no_grad():
        return h.model(X).logits


def attached(name, **cfg):
    h = load("tiny-random")
    reports = apply_steps(h, [{"method": name, **cfg}])
    return h, reports[0]


# --- identity at attach ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["lora", "dora", "loha"])
def test_zero_initialised_peft_adapters_leave_the_output_unchanged(name):
    h = load("tiny-random")
    before = logits(h)
    apply_steps(h, [{"method": name}])
    torch.testing.assert_close(logits(h), before, atol=1e-6, rtol=0)


def test_vblora_is_not_zero_initialised():
    h = load("tiny-random")
    before = logits(h)
    apply_steps(h, [{"method": "vblora"}])
    assert (logits(h) - before).abs().max() > 1e-4


def test_qlora_starts_as_the_nf4_model():
    ref = load("tiny-random")
    apply_steps(ref, [{"method": "nf4"}])
    h, _ = attached("qlora")
    assert torch.equal(logits(h), logits(ref))
    q = h.model.model.layers[0].self_attn.q_proj
    assert isinstance(q, AdaptedLinear) and isinstance(q.base_layer, NF4Linear) and q.base_layer.double_quant


# --- gradients and counts ----------------------------------------------------------------------------------------

TRAINABLE_MARK = {"lora": "lora_", "dora": "lora_", "loha": "hada_", "vblora": "vblora_", "qlora": ".delta."}


@pytest.mark.parametrize("name", list(TRAINABLE_MARK))
def test_gradients_reach_only_the_adapter(name):
    h, _ = attached(name)
    h.model.train()
    out = h.model(X).logits
    (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(0))).sum().backward()
    trainable = {n for n, p in h.model.named_parameters() if p.requires_grad}
    assert trainable and all(TRAINABLE_MARK[name] in n for n in trainable), sorted(trainable)[:3]
    nonzero = 0
    for n, p in h.model.named_parameters():
        if n in trainable:
            assert p.grad is not None, n
            nonzero += int(p.grad.abs().sum() > 0)
        else:
            assert p.grad is None, n
    assert nonzero > 0


def expected_count(name, model):
    proj, layers = shapes(model)
    if name in ("lora", "qlora"):
        per = sum(R * (i + o) for i, o in proj.values())
    elif name == "dora":
        per = sum(R * (i + o) + o for i, o in proj.values())  # + the magnitude vector
    elif name == "loha":
        per = sum(2 * R * (i + o) for i, o in proj.values())
    else:  # vblora: logits of A [r, in/len, n] and B [out/len, r, n] per module, one bank [n, len]
        n, vl = 256, 64
        return n * vl + layers * sum((R * i // vl + o // vl * R) * n for i, o in proj.values())
    return layers * per


@pytest.mark.parametrize("name", ["lora", "dora", "loha", "vblora", "qlora"])
def test_trainable_parameter_counts_match_the_formulas(name):
    h, report = attached(name)
    expected = expected_count(name, h.model)
    assert report.stats["total"]["trainable_params"] == expected
    assert sum(p.numel() for p in h.model.parameters() if p.requires_grad) == expected
    per_module = sum(s["trainable_params"] for k, s in report.stats.items() if k != "total")
    assert per_module == expected


# --- merge -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["lora", "dora", "loha", "vblora"])
def test_merged_forward_equals_unmerged(name, tmp_path):
    h, _ = attached(name)
    perturb(h.model)
    unmerged = logits(h)
    assert (unmerged - logits(load("tiny-random"))).abs().max() > 1e-3  # the adapter does something
    merge(h)
    torch.testing.assert_close(logits(h), unmerged, atol=1e-5, rtol=0)
    assert type(h.model.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert not getattr(h.model, "budgetlm_parts", {})
    h.save(tmp_path / "m")
    torch.testing.assert_close(logits(load(tmp_path / "m")), unmerged, atol=1e-5, rtol=0)


def nearest_on(values: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Distance from each target entry to the nearest of its candidate values ([..., k])."""
    return (values - target[..., None]).abs().amin(-1)


def test_qlora_merge_requantises_on_the_same_nf4_constants():
    h, _ = attached("qlora")
    perturb(h.model)
    layer = h.model.model.layers[1].mlp.down_proj
    base = layer.base_layer
    absmax = base.block_absmax().clone()
    target = base.dequantized_weight() + layer.delta.delta_weight()
    result = merge_and_compare(h, score=lambda hh: {"logit_sum": float(logits(hh).sum())})
    assert "must be measured" in " ".join(result["merge"].notes)
    assert result["before"] != result["after"]
    new = h.model.model.layers[1].mlp.down_proj
    assert isinstance(new, NF4Linear) and torch.equal(new.block_absmax(), absmax)
    # every merged weight is the nearest NF4 value of its block (same constants) to W_nf4 + ΔW
    flat_t = target.reshape(-1)
    scale = absmax.repeat_interleave(base.block_size)[: flat_t.numel()]
    best = nearest_on(NF4_CODEBOOK[None, :] * scale[:, None], flat_t)
    got = (new.dequantized_weight().reshape(-1) - flat_t).abs()
    assert torch.all(got <= best + 1e-6)
    assert result["after"]["logit_sum"] == pytest.approx(float(logits(h).sum()))


def test_merge_on_a_quantlinear_base_keeps_its_grid():
    h = load("tiny-random")
    apply_steps(h, [{"method": "rtn", "bits": 4, "group_size": 32, "symmetric": False}, {"method": "lora_xs"}])
    perturb(h.model, std=0.5)
    layer = h.model.model.layers[0].self_attn.v_proj
    base = layer.base_layer
    target = base.dequantized_weight() + layer.delta.delta_weight()
    scales, zeros = base.scales.clone(), base.zeros.clone()
    merge(h)
    new = h.model.model.layers[0].self_attn.v_proj
    assert isinstance(new, QuantLinear) and torch.equal(new.scales, scales) and torch.equal(new.zeros, zeros)
    s = scales.float().repeat_interleave(32, 1)
    z = zeros.float().repeat_interleave(32, 1)
    grid = (torch.arange(16.0)[None, None, :] - z[..., None]) * s[..., None]  # every value of each weight's grid
    best = nearest_on(grid, target)
    assert torch.all((new.dequantized_weight() - target).abs() <= best + 1e-6)


# --- peft's format -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["lora", "dora", "loha", "vblora"])
def test_peft_adapters_round_trip_through_peft(name, tmp_path):
    from peft import PeftModel

    h, _ = attached(name)
    perturb(h.model)
    expected = logits(h)
    save_peft_adapter(h, tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    fresh = PeftModel.from_pretrained(load("tiny-random").model, str(tmp_path / "adapter"))
    with torch.no_grad():
        torch.testing.assert_close(fresh(X).logits, expected, atol=1e-6, rtol=0)
    h2 = load("tiny-random")
    load_peft_adapter(h2, tmp_path / "adapter", name)
    torch.testing.assert_close(logits(h2), expected, atol=1e-6, rtol=0)
    h2.save(tmp_path / "m")  # a folder with a peft adapter reloads with it, unmerged
    again = load(tmp_path / "m")
    assert torch.equal(logits(again), logits(h2))
    assert {n for n, p in again.model.named_parameters() if p.requires_grad} == {
        n for n, p in h2.model.named_parameters() if p.requires_grad
    }


# --- training ----------------------------------------------------------------------------------------------------


def test_train_config_trains_only_the_adapter():
    h = load("tiny-random")
    base = {n: p.detach().clone() for n, p in h.model.named_parameters()}
    train = {"steps": 2, "batch_size": 2, "max_len": 48, "lr": 1e-2, "data": {"task": "arith", "limit": 8}}
    report = apply_steps(h, [{"method": "lora", "train": train}])[0]
    assert len(report.stats["train"]["losses"]) == 2
    params = dict(h.model.named_parameters())
    after = {n.replace(".base_layer", ""): p for n, p in params.items() if "lora_" not in n}
    assert after.keys() == base.keys()
    assert all(torch.equal(p, after[n]) for n, p in base.items())
    assert any(p.abs().sum() > 0 for n, p in params.items() if "lora_B" in n)


# --- errors ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["lora", "lora_xs", "mars", "qlora"])
def test_rank_larger_than_a_layer_allows_is_one_line_and_changes_nothing(name):
    h = load("tiny-random")
    with pytest.raises(ConfigError) as e:
        apply_steps(h, [{"method": name, "r": 65}])
    msg = str(e.value)
    assert "r=65" in msg and "64" in msg and "k_proj" in msg and "\n" not in msg
    assert all(type(m) is not AdaptedLinear and not isinstance(m, NF4Linear) for m in h.model.modules())
    assert not getattr(h.model, "budgetlm_parts", None)


@pytest.mark.parametrize("name", ["lora", "mars"])
def test_targets_matching_nothing_name_the_patterns_and_the_modules(name):
    h = load("tiny-random")
    with pytest.raises(ConfigError) as e:
        apply_steps(h, [{"method": name, "targets": ["*.attn_c"]}])
    assert "*.attn_c" in str(e.value) and "q_proj" in str(e.value) and "\n" not in str(e.value)


def test_other_bad_inputs_are_one_line_errors():
    h, _ = attached("lora")
    with pytest.raises(ConfigError, match="already carries an adapter"):
        apply_steps(h, [{"method": "mars"}])
    with pytest.raises(ConfigError, match="vector_length=48 does not divide"):
        apply_steps(load("tiny-random"), [{"method": "vblora", "vector_length": 48}])
    with pytest.raises(ConfigError, match="save_every"):
        parse_config("lora", {"train": {"steps": 2, "save_every": 1}})
    with pytest.raises(ConfigError, match="carries no adapter"):
        merge(load("tiny-random"))
    with pytest.raises(ConfigError, match="r"):
        parse_config("dora", {"r": 0})
