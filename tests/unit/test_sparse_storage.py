"""SparseLinear storage: bitwise round trips of both formats, bytes against formulas written here, the forward
pass, and a pruned model that saves, reloads the same modules and counts its bytes as the file holds them."""

import math

import pytest
import torch
import torch.nn.functional as F

from budgetlm.errors import ModelError
from budgetlm.hardware.size import model_size
from budgetlm.methods.base import apply_steps
from budgetlm.methods.prune.common import nm_mask
from budgetlm.methods.prune.sparse import SparseLinear, rebuild
from budgetlm.models.sources import load

INT_OF = {
    torch.float32: torch.int32,
    torch.float64: torch.int64,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
}


def bits(w: torch.Tensor) -> torch.Tensor:
    return w.view(INT_OF[w.dtype])


def random_pruned(out_f, in_f, keep_prob, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g).to(dtype)
    return w.masked_fill(torch.rand(out_f, in_f, generator=g) >= keep_prob, 0)


def nm_pruned(out_f, in_f, n, m, dtype=torch.float32, seed=0):
    w = torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(seed)).to(dtype)
    return w.masked_fill(nm_mask(w.abs().float(), n, m), 0)


def reload(layer: SparseLinear) -> SparseLinear:
    """What ModelHandle save/load does: rebuild from the meta, then load the saved tensors."""
    again = rebuild(None, layer.layer_meta())
    again.load_state_dict({k: v.clone() for k, v in layer.state_dict().items()})
    return again


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize(("shape", "keep"), [((7, 13), 0.5), ((1, 1), 1.0), ((3, 5), 0.0), ((16, 24), 0.1)])
def test_bitmask_round_trip_is_bitwise(dtype, shape, keep):
    w = random_pruned(*shape, keep, dtype)
    layer = SparseLinear.from_dense(w, None, "bitmask")
    values = layer.compressed()["values"]
    assert values.dtype == dtype and values.numel() == int((w != 0).sum())
    assert torch.equal(bits(layer.effective_weight()), bits(w))
    assert torch.equal(bits(reload(layer).effective_weight()), bits(w))


def test_bitmask_all_kept_and_all_pruned_rows_and_negative_zero():
    w = torch.randn(4, 9)
    w[1] = 0  # an all-pruned row
    w[2, ::2] = 0
    w[3, 4] = -0.0  # a kept -0.0 is a value: stored and restored bit for bit
    layer = SparseLinear.from_dense(w, None, "bitmask")
    assert torch.equal(bits(layer.effective_weight()), bits(w))
    assert layer.compressed()["values"].numel() == 9 + 0 + 4 + 9  # row 0 and row 3 are all kept


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("n", "m", "shape"),
    [(1, 4, (3, 8)), (2, 4, (5, 12)), (4, 8, (3, 16)), (3, 8, (2, 24)), (1, 2, (3, 6)), (7, 16, (1, 32))],
)
def test_nm_round_trip_is_bitwise(dtype, n, m, shape):
    w = nm_pruned(*shape, n, m, dtype, seed=n * m)
    w[0] = 0  # an all-pruned row: its groups store zeros
    layer = SparseLinear.from_dense(w, None, "nm", (n, m))
    values = layer.compressed()["values"]
    assert values.shape == (shape[0], shape[1] // m, m - n) and values.dtype == dtype
    assert torch.equal(bits(layer.effective_weight()), bits(w))
    assert torch.equal(bits(reload(layer).effective_weight()), bits(w))


def test_nm_rejects_a_weight_that_does_not_hold_the_pattern():
    w = torch.randn(2, 8)
    w[:, [1, 2, 5, 6]] = 0
    w[1, 2] = 1.0  # 3 non-zeros in a group of 4
    with pytest.raises(ModelError, match="not 2:4 sparse"):
        SparseLinear.from_dense(w, None, "nm", (2, 4))


def test_state_dict_holds_the_compressed_format_not_the_dense_weight():
    w = nm_pruned(6, 16, 2, 4)
    layer = SparseLinear.from_dense(w, torch.randn(6), "nm", (2, 4))
    sd = layer.state_dict()
    assert set(sd) == {"values", "positions", "bias"}
    assert sum(sd[k].numel() * sd[k].element_size() for k in ("values", "positions")) == layer.storage_bytes()
    bm = SparseLinear.from_dense(w, None, "bitmask").state_dict()
    assert set(bm) == {"values", "mask"} and bm["values"].numel() == int((w != 0).sum())


def test_a_weight_that_lost_its_pattern_is_refused_at_save_time():
    layer = SparseLinear.from_dense(nm_pruned(4, 8, 2, 4), None, "nm", (2, 4))
    with torch.no_grad():
        layer.weight.fill_(1.0)  # e.g. a full fine-tune that did not keep the mask
    with pytest.raises(ModelError, match="not 2:4 sparse any more"):
        layer.state_dict()


@pytest.mark.parametrize(("out_f", "in_f"), [(5, 12), (64, 128), (3, 4)])
def test_nm_2_4_bytes_match_the_formula(out_f, in_f):
    layer = SparseLinear.from_dense(nm_pruned(out_f, in_f, 2, 4), None, "nm", (2, 4))
    kept = out_f * in_f // 2
    # kept values in fp32 + 2-bit positions, packed 8 positions (2 bytes) at a time
    assert layer.storage_bytes() == kept * 4 + math.ceil(kept / 8) * 2
    half = SparseLinear.from_dense(nm_pruned(out_f, in_f, 2, 4, torch.bfloat16), None, "nm", (2, 4))
    assert half.storage_bytes() == kept * 2 + math.ceil(kept / 8) * 2


@pytest.mark.parametrize(("out_f", "in_f", "keep"), [(7, 13, 0.5), (64, 128, 0.3)])
def test_bitmask_bytes_match_the_formula(out_f, in_f, keep):
    w = random_pruned(out_f, in_f, keep)
    nnz = sum(1 for v in w.flatten().tolist() if v != 0)
    layer = SparseLinear.from_dense(w, None, "bitmask")
    assert layer.storage_bytes() == nnz * 4 + math.ceil(out_f * in_f / 8)


def test_forward_is_the_dense_linear_and_keeps_the_bias():
    w = nm_pruned(6, 8, 2, 4)
    b = torch.randn(6)
    x = torch.randn(3, 8)
    for fmt in ("nm", "bitmask"):
        layer = SparseLinear.from_dense(w, b, fmt, (2, 4))
        assert torch.equal(layer(x), F.linear(x, w, b))
        assert torch.equal(reload(layer)(x), F.linear(x, w, b))


@pytest.mark.parametrize("steps", [{"method": "magnitude"}, {"method": "magnitude", "pattern": "2:4"}])
def test_pruned_model_saves_reloads_and_counts_its_bytes(steps, tmp_path):
    h = load("tiny-random")
    apply_steps(h, [steps])
    sparse = {n: m for n, m in h.model.named_modules() if isinstance(m, SparseLinear)}
    assert len(sparse) == 14
    h.save(tmp_path / "m")
    again = load(tmp_path / "m")
    for name, mod in sparse.items():
        other = again.model.get_submodule(name)
        assert isinstance(other, SparseLinear) and other.format == mod.format
        assert torch.equal(bits(other.effective_weight()), bits(mod.effective_weight()))
    size = model_size(again, tmp_path / "m")
    lm_head = again.model.lm_head.weight
    tied = lm_head is again.model.get_input_embeddings().weight  # then it is counted with the embedding
    expected = sum(m.storage_bytes() for m in sparse.values()) + (0 if tied else lm_head.numel() * 4)
    assert size["linear_bytes"].value == expected
    assert size["params"].value == model_size(load("tiny-random"))["params"].value  # logical count unchanged


def test_a_pruned_model_reads_its_dense_weights_per_decode_step(tiny):
    """Stored bytes shrink; the bytes a decode step reads (the roofline's input) do not: the layers are dense in
    memory."""
    from budgetlm.hardware.size import model_size
    from budgetlm.methods.base import apply_steps

    before = model_size(tiny)
    apply_steps(tiny, [{"method": "magnitude", "pattern": "2:4"}])
    after = model_size(tiny)
    assert after["stored_bytes"].value < before["stored_bytes"].value
    assert after["read_bytes_per_token"].value == before["read_bytes_per_token"].value
