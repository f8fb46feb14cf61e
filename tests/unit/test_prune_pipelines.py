"""Prune, then quantise: the quantisers keep a pruned model's zeros exactly (rtn by its grid, gptq when told the
mask), the pipeline saves and reloads, and the N:M pattern survives."""

import pytest
import torch

from budgetlm.methods.base import StepContext, apply_steps
from budgetlm.methods.prune.common import nm_mask
from budgetlm.methods.prune.sparse import SparseLinear
from budgetlm.methods.quant.gptq import gptq_layer
from budgetlm.methods.quant.layers import QuantLinear
from budgetlm.methods.quant.quantizer import dequantize, find_grid, quantize


def correlated_hessian(n_in: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(512, n_in, generator=g) @ torch.randn(n_in, n_in, generator=g)
    return 2 / X.shape[0] * X.T @ X


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_keeps_the_zeros_it_is_told_to_keep(symmetric, act_order):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(24, 64, generator=g)
    mask = nm_mask(w.abs(), 2, 4)
    w = w.masked_fill(mask, 0)
    H = correlated_hessian(64)
    codes, grid, perm, _ = gptq_layer(w, H, 4, 16, symmetric, act_order=act_order, keep_zero=mask)
    deq = dequantize(codes, grid)
    if perm is not None:
        deq = deq[:, torch.argsort(perm)]
    assert torch.equal(deq[mask], torch.zeros(int(mask.sum())))
    # without the mask the error feedback fills the pruned weights in
    codes2, grid2, perm2, _ = gptq_layer(w, H, 4, 16, symmetric, act_order=act_order)
    deq2 = dequantize(codes2, grid2)
    if perm2 is not None:
        deq2 = deq2[:, torch.argsort(perm2)]
    assert int((deq2[mask] != 0).sum()) > 0
    # and it still beats plain rounding of the pruned weight on these inputs
    rtn = dequantize(quantize(w, find_grid(w, 4, 16, symmetric)), find_grid(w, 4, 16, symmetric))
    rtn = rtn.masked_fill(mask, 0)

    def err(q):
        d = (w - q).double()
        return float(torch.trace(d @ H.double() @ d.T))

    assert err(deq) < err(rtn)


def test_wanda_24_then_gptq_keeps_the_pattern_and_reloads(tiny, tmp_path):
    from budgetlm.models.sources import load

    ctx = StepContext(n_calibration=4, calibration_len=32)
    apply_steps(tiny, [{"method": "wanda", "pattern": "2:4"}], ctx)
    pruned = {n: m.weight.detach().clone() for n, m in tiny.model.named_modules() if isinstance(m, SparseLinear)}
    assert pruned
    reports = apply_steps(tiny, [{"method": "gptq", "bits": 4, "group_size": 32}], ctx)
    assert any("kept their" in n for n in reports[0].notes)
    for name, w in pruned.items():
        q = tiny.model.get_submodule(name)
        assert isinstance(q, QuantLinear)
        deq = q.dequantized_weight()
        assert torch.equal(deq[w == 0], torch.zeros(int((w == 0).sum())))
        groups = (deq == 0).reshape(deq.shape[0], -1, 4).sum(-1)
        assert bool((groups >= 2).all())  # 2:4 still holds
    tiny.save(tmp_path / "m")
    again = load(str(tmp_path / "m"))
    x = torch.randint(0, 100, (1, 12))
    with torch.no_grad():
        assert torch.equal(again.model(x).logits, tiny.model(x).logits)


def test_magnitude_then_rtn_keeps_zeros_exactly(tiny):
    apply_steps(tiny, [{"method": "magnitude", "sparsity": 0.5}])
    pruned = {n: m.weight.detach().clone() for n, m in tiny.model.named_modules() if isinstance(m, SparseLinear)}
    apply_steps(tiny, [{"method": "rtn", "bits": 4, "group_size": 32}])
    for name, w in pruned.items():
        deq = tiny.model.get_submodule(name).dequantized_weight()
        assert torch.equal(deq[w == 0], torch.zeros(int((w == 0).sum())))
