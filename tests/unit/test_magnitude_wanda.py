"""magnitude and wanda against references written here: a naive per-row (or global) sort of |W|, Wanda's mask on
a hand-built 2x8 layer computed by hand, Wanda on the tiny model against norms gathered by plain hooks on the
(partly pruned) model; one-line errors that leave the model unchanged; modules not targeted untouched."""

import copy
import math

import pytest
import torch
from torch import nn

from budgetlm.errors import ConfigError
from budgetlm.methods.base import StepContext, apply_steps
from budgetlm.methods.prune.sparse import SparseLinear
from budgetlm.models.handle import ModelHandle
from budgetlm.models.sources import load


def naive_row_pruned(scores: torch.Tensor, k: int) -> torch.Tensor:
    mask = torch.zeros(scores.shape, dtype=torch.bool)
    for r, row in enumerate(scores.tolist()):
        for j in sorted(range(len(row)), key=lambda j: (row[j], j))[:k]:
            mask[r, j] = True
    return mask


def weight_of(mod) -> torch.Tensor:
    return mod.effective_weight() if isinstance(mod, SparseLinear) else mod.weight.detach()


def state(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def same_state(model, before) -> bool:
    now = model.state_dict()
    return now.keys() == before.keys() and all(torch.equal(now[k], before[k]) for k in before)


# --- a hand-built one-layer model (for Wanda's hand-computed mask) -----------------------------------------------


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 2, bias=False)

    def forward(self, hidden_states, **_):
        self.proj(hidden_states)
        return hidden_states


class Inner(nn.Module):
    def __init__(self, x: torch.Tensor):
        super().__init__()
        self.embed = nn.Embedding(x.shape[0], 8)
        self.embed.weight.data = x.clone()
        self.layers = nn.ModuleList([Block()])


class HandModel(nn.Module):
    """Token t embeds to row t of x: the calibration inputs of `proj` are exactly the rows of x."""

    def __init__(self, x: torch.Tensor, w: torch.Tensor):
        super().__init__()
        self.model = Inner(x)
        self.model.layers[0].proj.weight.data = w.clone()

    def forward(self, input_ids, **_):
        h = self.model.embed(input_ids)
        for layer in self.model.layers:
            h = layer(h)
        return h


W_HAND = torch.tensor([[1.0, -2, 3, -4, 5, -6, 7, -8], [8, 7, -6, 5, 4, 3, -2, 1]])
X_HAND = torch.tensor([[3.0, 0, 1, 2, 0, 4, 1, 0], [4, 1, 0, 0, 2, 3, 0, 1]])
# by hand: ‖X_j‖₂ = [5, 1, 1, 2, 2, 5, 1, 1]; scores row 0 = [5, 2, 3, 8, 10, 30, 7, 8],
# row 1 = [40, 7, 6, 10, 8, 15, 2, 1]
HAND_50 = [{0, 1, 2, 6}, {1, 2, 6, 7}]  # the 4 lowest of each row
HAND_24 = [{1, 2, 6, 7}, {1, 2, 6, 7}]  # the 2 lowest of [0:4] and of [4:8]
HAND_MAGNITUDE_50 = [{0, 1, 2, 3}, {4, 5, 6, 7}]  # |W| alone: the activations change the mask


def hand_handle() -> ModelHandle:
    return ModelHandle(HandModel(X_HAND, W_HAND), None, "hand")


def hand_ctx() -> StepContext:
    ctx = StepContext(n_calibration=1, calibration_len=2)
    ctx._calibration = torch.tensor([[0, 1]])
    return ctx


def pruned_sets(w: torch.Tensor) -> list[set[int]]:
    return [{j for j, v in enumerate(row) if v == 0} for row in w.tolist()]


@pytest.mark.parametrize(
    ("method", "extra", "expected"),
    [("wanda", {}, HAND_50), ("wanda", {"pattern": "2:4"}, HAND_24), ("magnitude", {}, HAND_MAGNITUDE_50)],
)
def test_hand_built_layer_mask_equals_the_hand_computed_one(method, extra, expected):
    h = hand_handle()
    report = apply_steps(h, [{"method": method, **extra}], hand_ctx())[0]
    w = weight_of(h.model.model.layers[0].proj)
    assert pruned_sets(w) == expected
    kept = W_HAND.masked_fill(w == 0, 0)
    assert torch.equal(w, kept)  # no weight update
    assert report.stats["model.layers.0.proj"]["sparsity"] == 0.5


# --- the tiny model ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base():
    return load("tiny-random")


def small_ctx() -> StepContext:
    return StepContext(n_calibration=4, calibration_len=32, seed=1)


@pytest.mark.parametrize("sparsity", [0.5, 0.3])
def test_magnitude_row_mask_is_a_naive_sort_of_abs_w(base, sparsity):
    h = copy.deepcopy(base)
    rep = apply_steps(h, [{"method": "magnitude", "sparsity": sparsity}])[0]
    for name, st in rep.stats.items():
        w0 = base.model.get_submodule(name).weight.detach()
        w = weight_of(h.model.get_submodule(name))
        k = int(w0.shape[1] * sparsity)
        mask = naive_row_pruned(w0.abs(), k)
        assert torch.equal(w, w0.masked_fill(mask, 0)), name
        assert ((w == 0).sum(1) == k).all()  # exact per row
        assert st["sparsity"] == k / w0.shape[1] and st["format"] == "bitmask"
        assert st["bytes"] == h.model.get_submodule(name).storage_bytes()


def test_magnitude_global_is_one_threshold_over_all_targets(base):
    h = copy.deepcopy(base)
    rep = apply_steps(h, [{"method": "magnitude", "scope": "global", "sparsity": 0.4}])[0]
    names = list(rep.stats)
    flat = torch.cat([base.model.get_submodule(n).weight.detach().abs().flatten() for n in names])
    k = int(flat.numel() * 0.4)
    threshold = sorted(flat.tolist())[k - 1]
    pruned = torch.cat([(weight_of(h.model.get_submodule(n)) == 0).flatten() for n in names])
    assert int(pruned.sum()) == k
    assert torch.equal(pruned, flat <= threshold)  # random weights: no ties at the threshold
    per_module = {rep.stats[n]["sparsity"] for n in names}
    assert len(per_module) > 1  # modules differ under a global threshold


def test_magnitude_global_with_a_pattern_is_one_line():
    with pytest.raises(ConfigError, match="N:M pattern") as e:
        apply_steps(load("tiny-random"), [{"method": "magnitude", "scope": "global", "pattern": "2:4"}])
    assert "\n" not in str(e.value)


def test_magnitude_pattern_not_dividing_the_width_changes_nothing():
    model = nn.Sequential(nn.Linear(8, 6), nn.Linear(6, 3))  # module "1" has 6 inputs: not a multiple of 4
    h = ModelHandle(model, None, "custom")
    before = state(model)
    with pytest.raises(ConfigError, match="M=4 does not divide 1's 6 input features") as e:
        apply_steps(h, [{"method": "magnitude", "pattern": "2:4"}])
    assert "\n" not in str(e.value) and same_state(model, before) and isinstance(model[0], nn.Linear)


def test_wanda_mask_on_the_tiny_model_uses_norms_of_the_pruned_model_inputs(base):
    """Layer 0's down_proj is pruned with norms of the original model's activations; layer 1's q_proj with the
    activations that reach it through the pruned layer 0 (the pruned outputs are fed forward)."""
    h = copy.deepcopy(base)
    ctx = small_ctx()
    apply_steps(h, [{"method": "wanda"}], ctx)
    tokens = ctx.calibration(h.tokenizer)

    def input_norms(model, name):
        sq = torch.zeros(model.get_submodule(name).in_features)

        def add(_m, args):
            sq.add_(args[0].reshape(-1, args[0].shape[-1]).pow(2).sum(0))

        hook = model.get_submodule(name).register_forward_pre_hook(add)
        with torch.no_grad():
            for batch in torch.split(tokens, 8):
                model(input_ids=batch, use_cache=False)
        hook.remove()
        return sq.sqrt()

    checks = [(base.model, "model.layers.0.mlp.down_proj"), (h.model, "model.layers.1.self_attn.q_proj")]
    for model, name in checks:
        w0 = base.model.get_submodule(name).weight.detach()
        scores = w0.abs() * input_norms(model, name)[None, :]
        expected = w0.masked_fill(naive_row_pruned(scores, w0.shape[1] // 2), 0)
        assert torch.equal(weight_of(h.model.get_submodule(name)), expected), name
    # and the activations matter: plain magnitude would prune differently
    mag = naive_row_pruned(base.model.model.layers[0].mlp.down_proj.weight.detach().abs(), 128)
    assert not torch.equal(weight_of(h.model.model.layers[0].mlp.down_proj) == 0, mag)


def test_wanda_2_4_holds_the_pattern_and_leaves_other_modules_untouched(base):
    h = copy.deepcopy(base)
    rep = apply_steps(h, [{"method": "wanda", "pattern": "2:4"}], small_ctx())[0]
    assert len(rep.stats) == 14
    for name in rep.stats:
        w = weight_of(h.model.get_submodule(name))
        groups = (w == 0).reshape(w.shape[0], -1, 4).sum(-1)
        assert (groups == 2).all(), name
        assert h.model.get_submodule(name).format == "nm"
    sd0, sd = base.model.state_dict(), h.model.state_dict()
    untouched = [k for k in sd0 if not any(k.startswith(n + ".") for n in rep.stats)]
    assert any("embed_tokens" in k for k in untouched) and any("norm" in k for k in untouched)
    for k in untouched:
        assert torch.equal(sd[k], sd0[k]), k
    assert isinstance(h.model.lm_head, nn.Linear) and torch.equal(h.model.lm_head.weight, base.model.lm_head.weight)
    notes = " ".join(rep.notes)
    assert "sparsity 0.5000" in notes and "whole-model sparsity" in notes and "storage: nm" in notes


def test_wanda_dense_storage_keeps_linears():
    h = load("tiny-random")
    rep = apply_steps(h, [{"method": "wanda", "sparsity": 0.25, "storage": "dense"}], small_ctx())[0]
    for name, st in rep.stats.items():
        mod = h.model.get_submodule(name)
        assert type(mod) is nn.Linear and st["format"] == "dense"
        assert st["sparsity"] == math.floor(mod.in_features * 0.25) / mod.in_features


@pytest.mark.parametrize(
    ("values", "ctx", "needle"),
    [
        ({}, StepContext(n_calibration=0), "needs calibration text but got none"),
        ({"pattern": "1:3"}, StepContext(n_calibration=2, calibration_len=16), "M=3 does not divide"),
        ({"sparsity": 1.0}, StepContext(n_calibration=2, calibration_len=16), "sparsity must be in [0, 1)"),
        ({"pattern": "4:2"}, StepContext(n_calibration=2, calibration_len=16), "less than M"),
    ],
)
def test_wanda_errors_are_one_line_and_change_nothing(values, ctx, needle):
    h = load("tiny-random")
    before = state(h.model)
    with pytest.raises(ConfigError) as e:
        apply_steps(h, [{"method": "wanda", **values}], ctx)
    assert needle in str(e.value) and "\n" not in str(e.value)
    assert same_state(h.model, before) and h.provenance == []
    assert not any(isinstance(m, SparseLinear) for m in h.model.modules())
