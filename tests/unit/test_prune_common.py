"""The shared pruning pieces against references written here: masks against a naive per-row / per-group sort,
the config's one-line errors, the pattern checks and the report."""

import pytest
import torch
import yaml
from torch import nn

from budgetlm.errors import ConfigError
from budgetlm.methods.base import parse_config
from budgetlm.methods.prune.common import (
    PruneConfig,
    check_pattern,
    model_sparsity,
    nm_mask,
    parse_pattern,
    pruned_stats,
    row_mask,
    sparsity_report,
    store_pruned,
)
from budgetlm.methods.prune.sparse import SparseLinear


def naive_lowest(values: list[float], k: int) -> set[int]:
    """Indices of the k lowest values, ties to the lower index."""
    order = sorted(range(len(values)), key=lambda j: (values[j], j))
    return set(order[:k])


def tied_scores(out_f, in_f, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 5, (out_f, in_f), generator=g).float()  # many ties


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.5, 0.7, 0.99])
def test_row_mask_is_a_naive_sort_per_row_with_exact_count(sparsity):
    scores = tied_scores(6, 13)
    mask = row_mask(scores, sparsity)
    k = int(13 * sparsity)
    for r in range(6):
        assert set(torch.nonzero(mask[r]).flatten().tolist()) == naive_lowest(scores[r].tolist(), k)
        assert int(mask[r].sum()) == k


@pytest.mark.parametrize(("n", "m"), [(1, 4), (2, 4), (4, 8), (1, 2), (3, 5)])
def test_nm_mask_holds_the_pattern_in_every_group(n, m):
    scores = tied_scores(5, 4 * m, seed=n + m)
    mask = nm_mask(scores, n, m)
    for r in range(5):
        for g in range(4):
            cols = range(g * m, (g + 1) * m)
            got = {j - g * m for j in cols if mask[r, j]}
            assert len(got) == n
            assert got == naive_lowest([float(scores[r, j]) for j in cols], n)


def test_masks_are_deterministic_on_ties():
    scores = torch.ones(3, 8)
    assert row_mask(scores, 0.5)[:, :4].all() and not row_mask(scores, 0.5)[:, 4:].any()
    assert torch.equal(nm_mask(scores, 2, 4), torch.tensor([[1, 1, 0, 0] * 2] * 3, dtype=torch.bool))


@pytest.mark.parametrize(
    ("values", "needle"),
    [
        ({"sparsity": 1.0}, "sparsity must be in [0, 1)"),
        ({"sparsity": -0.1}, "sparsity must be in [0, 1)"),
        ({"pattern": "4:2"}, "less than M"),
        ({"pattern": "2:2"}, "less than M"),
        ({"pattern": "0:4"}, "at least 1"),
        ({"pattern": "2-4"}, "form 'N:M'"),
        ({"pattern": "2:32"}, "at most 16"),
        ({"pattern": "2:4", "sparsity": 0.3}, "fixes the sparsity at 0.5"),
        ({"storage": "nm"}, "needs an N:M pattern"),
        ({"storage": "csr"}, "storage"),
    ],
)
@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_bad_config_is_one_line(method, values, needle):
    with pytest.raises(ConfigError) as e:
        parse_config(method, values)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_pattern_sets_the_sparsity_and_round_trips():
    cfg = parse_config("magnitude", {"pattern": " 1 : 4 "})
    assert cfg.pattern == "1:4" and cfg.sparsity == 0.25 and cfg.nm == (1, 4) and cfg.storage_format == "nm"
    assert type(cfg).model_validate(yaml.safe_load(yaml.safe_dump(cfg.model_dump()))) == cfg
    assert parse_config("magnitude", {"pattern": "2:4", "sparsity": 0.5}).sparsity == 0.5
    assert PruneConfig().storage_format == "bitmask" and PruneConfig(storage="dense").storage_format == "dense"
    assert parse_pattern(None) is None and parse_pattern("4:8") == (4, 8)


def test_check_pattern_needs_m_to_divide_the_width():
    check_pattern("x", 12, 4)
    check_pattern("x", 6, None)
    with pytest.raises(ConfigError, match="M=4 does not divide x's 6 input features") as e:
        check_pattern("x", 6, 4)
    assert "\n" not in str(e.value)


def test_store_pruned_formats_and_report():
    model = nn.Sequential(nn.Linear(8, 4), nn.Linear(8, 8, bias=False))
    w = torch.randn(4, 8)
    w[nm_mask(w.abs(), 2, 4)] = 0
    layer = store_pruned(model, "0", w, model[0].bias, PruneConfig(pattern="2:4"))
    assert isinstance(model[0], SparseLinear) and layer is model[0] and layer.format == "nm"
    assert torch.equal(layer.effective_weight(), w)
    old = model[1]
    w1 = old.weight.detach().clone()
    w1[:, :3] = 0
    assert store_pruned(model, "1", w1, None, PruneConfig(storage="dense")) is old is model[1]
    assert torch.equal(model[1].weight, w1)
    stats = {"0": pruned_stats(model[0]), "1": pruned_stats(model[1])}
    assert stats["0"] == {"sparsity": 0.5, "format": "nm", "bytes": 16 * 4 + 4, "zeros": 16, "params": 32}
    assert stats["1"] == {"sparsity": 3 / 8, "format": "dense", "bytes": 64 * 4, "zeros": 24, "params": 64}
    total = 4 + 32 + 64  # bias of model[0] (4 non-zero values) + the two weights
    assert model_sparsity(model) == pytest.approx((16 + 24) / total)
    notes = " ".join(sparsity_report(stats, model))
    assert "sparsity 0.4167 over their 96 weights" in notes and "dense, nm" in notes and "no speed-up" in notes
