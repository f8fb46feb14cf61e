"""8-bit grids on the "q8bf" kernel (methods/quant/kernels.py: the two 4-bit halves of the codes, c = 16 hi + lo, on
budgetlm's q4bf kernel, the products added): numerics against a product written here (activations rounded to
bfloat16 by torch, the 8-bit weight dequantised in float64), the layer's choice and round trip, and the probe."""

from __future__ import annotations

import pytest
import torch

from budgetlm.methods.quant import kernels, native
from budgetlm.methods.quant.layers import QuantLinear
from budgetlm.methods.quant.quantizer import find_grid, quantize

pytestmark = pytest.mark.skipif(
    native.library() is None or not kernels._layout_matches(),
    reason=f"kernel not built or torch's 4-bit layout not budgetlm's: {native.status()}",
)


def case(n: int, k: int, g: int, symmetric: bool, seed: int = 0):
    """8-bit codes, fp16 scales [n, k/g], uint8 zero points (None when symmetric: 128), the weight in float64."""
    gen = torch.Generator().manual_seed(seed)
    c = torch.randint(0, 256, (n, k), generator=gen, dtype=torch.uint8)
    s = (torch.rand(n, k // g, generator=gen) * 0.02 + 1e-3).half()
    zp = None if symmetric else torch.randint(0, 256, (n, k // g), generator=gen, dtype=torch.uint8)
    z = torch.full((n, k // g), 128.0) if zp is None else zp.double()
    w = (c.double() - z.double().repeat_interleave(g, 1)) * s.double().repeat_interleave(g, 1)
    return c, s, zp, w


def check(got: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    want = x.to(torch.bfloat16).double() @ w.t()
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert (got.double() - want).abs().max() <= 1e-5 * want.abs().max()


@pytest.mark.parametrize("g,symmetric", [(32, False), (64, True), (128, False), (None, True)])
@pytest.mark.parametrize("m", [1, 3, 16])
def test_q8bf_product_equals_bf16_activations_times_the_8_bit_weight(g, symmetric, m):
    n, k = 128, 256
    g = g or k  # None: one group per row (per channel)
    c, s, zp, w = case(n, k, g, symmetric, seed=m)
    parts = kernels.int8_split(c, s.float(), None if zp is None else zp.float(), g, 32)
    tables = kernels.q8bf_tables(s, None if zp is None else zp.float())
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(7))
    got = kernels.q8bf_mm(x, parts, tables, g)
    check(got, x, w)
    assert torch.equal(kernels.bind_q8bf(parts, tables, g)(x), got)
    # the test can fail: float32 activations (no bf16 rounding) give another product
    exact = x.double() @ w.t()
    assert (got.double() - exact).abs().max() > 1e-6 * exact.abs().max()


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("vector", [True, False])
def test_q8bf_in_one_call_is_the_two_halves_q4bf_products_added(threads, vector):
    """One C call rounds x once and runs both halves of a block in one thread: the sums of two q4bf calls, bitwise."""
    n, k, g = 256, 512, 64
    c, s, zp, w = case(n, k, g, False, seed=11)
    parts = kernels.int8_split(c, s.float(), zp.float(), g, 32)
    tables = kernels.q8bf_tables(s, zp.float())
    call = native.bind_q8bf(parts[0], parts[2], kernels.block_n(), tables, g, vector=vector)
    for m in (1, 5, 33):
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
        halves = [
            native.q4_mm(
                x, parts[i], kernels.block_n(), tables[j], tables[j + 1], g, threads=threads, bf16=True, vector=vector
            )  # fmt: skip
            for i, j in ((0, 0), (2, 2))
        ]
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            got = call(x)
        finally:
            torch.set_num_threads(before)
        assert torch.equal(got, halves[0] + halves[1])
        check(got, x, w)
    with pytest.raises(RuntimeError, match="cannot take"):
        native.bind_q8bf(parts[0], parts[2], 24, tables, g)


@pytest.fixture
def on_q8bf(monkeypatch):
    monkeypatch.setattr(kernels, "_enabled", True)
    monkeypatch.setattr(kernels, "crossover", lambda kind: 32)
    monkeypatch.setattr(kernels, "eight_bit", lambda n, k: "q8bf")


@pytest.mark.parametrize("g,symmetric", [(None, True), (32, False)])
def test_quantlinear_on_q8bf_and_its_round_trip(on_q8bf, g, symmetric):
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(3))
    grid = find_grid(w, 8, g, symmetric=symmetric)
    codes = quantize(w, grid)
    layer = QuantLinear.from_codes(codes, grid, None)
    assert layer.int8_kernel == (g is None)
    q = layer.dequantized_weight().double()
    with torch.no_grad():
        assert layer.kernel == "q8bf" and layer.path(1) == layer.path(31) == "q8bf" and layer.path(32) == "dense"
        for m in (1, 4, 16):
            x = torch.randn(m, 128, generator=torch.Generator().manual_seed(m))
            check(layer(x), x, q)
        assert layer._fast is not None and layer._fast[2] is not None  # the bound one-token path
        x = torch.randn(40, 128)
        want = x.double() @ q.t()  # past the crossover: exact dequantisation from the halves
        assert (layer(x).double() - want).abs().max() <= 1e-5 * want.abs().max()
    state = layer.state_dict()  # saved as the codes it was given, whatever it holds in memory
    again = QuantLinear.from_codes(codes, grid, None)
    assert all(torch.equal(state[key], again.state_dict()[key]) for key in state)
    fresh = QuantLinear(128, 64, 8, grid.group_size, symmetric, False)
    fresh.load_state_dict(state)
    x = torch.randn(2, 128)
    with torch.no_grad():
        assert torch.equal(fresh(x), layer(x))
    bytes_ = 2 * (64 * 128 // 2 + (128 // grid.group_size) * 64 * 2 * 2)  # two halves, fp16 tables per stored group
    assert layer.memory_bytes() == bytes_
    assert layer._int4[1] is None and layer._int4[3] is None  # torch's tables dropped while q8bf serves: not held


def test_a_layer_goes_back_from_q8bf_to_torchs_halves(on_q8bf, monkeypatch):
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(4))
    grid = find_grid(w, 8, 32, symmetric=False)
    layer = QuantLinear.from_codes(quantize(w, grid), grid, None)
    q = layer.dequantized_weight().double()
    x = torch.randn(2, 128)
    with torch.no_grad():
        check(layer(x), x, q)
        monkeypatch.setattr(kernels, "eight_bit", lambda n, k: "int4x2")
        assert layer.kernel == "int4x2"
        want = x.double() @ q.t()  # torch's kernel rounds its scales to bf16 too: a looser bound
        assert (layer(x).double() - want).abs().max() <= 1e-2 * want.abs().max()
        assert layer._int4[1] is not None and layer._q4 is None


def test_the_8_bit_probe_times_q8bf_and_own_kernels_only_when_asked(monkeypatch):
    seen = []

    def fastest(calls, copies):
        seen.append(sorted(calls))
        return "q8bf"

    monkeypatch.setattr(kernels, "fastest", fastest)
    kernels._eight_bit.cache_clear()
    try:
        assert kernels._eight_bit(256, 512, 1) == "q8bf"
        assert kernels._eight_bit(256, 512, 1, own_only=True) == "q8bf"
    finally:
        kernels._eight_bit.cache_clear()
    assert seen[0] == ["int4x2", "int8", "q8", "q8bf"] and seen[1] == ["q8", "q8bf"]
