"""budgetlm's 4-bit kernel with 8-bit activations ("q4a8", native/q4a8.c): numerics against a product written here,
and the opt-in that keeps it from ever replacing the exact kernel silently."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from budgetlm.methods.quant import kernels, native
from budgetlm.methods.quant.layers import QuantLinear
from budgetlm.methods.quant.quantizer import find_grid, quantize

needs_lib = pytest.mark.skipif(native.library() is None, reason=f"kernel not built: {native.status()}")


def byte_pack(q: torch.Tensor, block: int) -> torch.Tensor:
    """torch's CPU 4-bit layout (q4.c's header), written with explicit indices: block b, column k, byte j holds
    rows b*block + j (low nibble) and b*block + block/2 + j (high nibble)."""
    n, k = q.shape
    half = block // 2
    rows = q.reshape(n // block, 2, half, k).to(torch.uint8)
    out = torch.empty(n // block, k, half, dtype=torch.uint8)
    for b in range(n // block):
        for j in range(half):
            out[b, :, j] = rows[b, 0, j] | (rows[b, 1, j] << 4)
    return out.reshape(n, k // 2)


def grid_case(n: int, k: int, g: int, bits: int = 4, seed: int = 0):
    """Codes in 0..15 (2- and 3-bit grids stored shifted, as int4_pack_grid does: c = q + 8 - zp with zp = 8 in the
    table), fp16 scales and zero points, and the dequantised weight in float64."""
    gen = torch.Generator().manual_seed(seed)
    if bits == 4:
        q = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
        zp = torch.randint(0, 16, (n, k // g), generator=gen).half()
    else:  # 2^bits codes around the symmetric zero point, shifted to 8 - 2^(bits-1) ..
        q = torch.randint(0, 2**bits, (n, k), generator=gen, dtype=torch.uint8) + (8 - 2 ** (bits - 1))
        zp = torch.full((n, k // g), 8.0).half()
    s = (torch.rand(n, k // g, generator=gen) * 0.05 + 1e-3).half()
    w = (q.double() - zp.double().repeat_interleave(g, dim=1)) * s.double().repeat_interleave(g, dim=1)
    return q, s, zp, w


def act8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The documented activation quantisation: per row and block of 32 columns d = max|x| / 127, codes
    round-half-even(x / d) (0 where d == 0). Returns (dequantised activations float64, per-element d)."""
    xb = x.float().reshape(x.shape[0], -1, 32)
    d = xb.abs().amax(-1, keepdim=True) / 127
    q = torch.where(d > 0, torch.round(xb / d), torch.zeros_like(xb)).clamp(-127, 127)
    return (q.double() * d.double()).reshape(x.shape), d.expand_as(xb).reshape(x.shape).double()


def check(got: torch.Tensor, x: torch.Tensor, w: torch.Tensor, lossy: bool = True) -> None:
    """got equals the reference (dequantised weight times dequantised int8 activations) to 1e-5 relative, and differs
    from the exact product by at most the bound of the activation rounding: sum_k |w_k| d_k / 2 per output."""
    xq, d = act8(x)
    want = xq @ w.t()
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert (got.double() - want).abs().max() <= 1e-5 * want.abs().max()
    exact = x.double() @ w.t()
    bound = (d / 2) @ w.abs().t()
    assert ((got.double() - exact).abs() <= bound * (1 + 1e-4) + 1e-6 * exact.abs().max()).all()
    if lossy:  # the activations were rounded: the test sees the lossy path, not the exact one
        assert not torch.allclose(got.double(), exact, rtol=0, atol=1e-7)


@needs_lib
@pytest.mark.parametrize("vector", [True, False])
@pytest.mark.parametrize("g", [32, 64, 128, 256])
@pytest.mark.parametrize("block", [32, 64])
def test_q4a8_every_group_size_and_row_count(vector, g, block):
    n, k = 2 * block, 2 * 256
    q, s, zp, w = grid_case(n, k, g, seed=g + block)
    packed = byte_pack(q, block)
    for m in (1, 2, 3, 4, 5):  # 5: a pass of four rows and one more
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)) * 3
        got = native.q4_mm(x, packed, block, s.t().contiguous(), zp.t().contiguous(), g, threads=1, vector=vector,
                           act8=True)  # fmt: skip
        check(got, x, w)


@needs_lib
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("vector", [True, False])
def test_q4a8_two_three_and_four_bit_codes(bits, vector):
    q, s, zp, w = grid_case(96, 192, 64, bits=bits, seed=bits)
    call = native.bind_q4(byte_pack(q, 32), 32, s.t().contiguous(), zp.t().contiguous(), 64, act8=True, vector=vector)
    for m in (1, 4):
        x = torch.randn(m, 192, generator=torch.Generator().manual_seed(m + bits))
        check(call(x), x, w)


@needs_lib
def test_q4a8_plain_c_block_and_threads():
    """A layout block of 16 rows (8 bytes a column) takes the plain C path even on AVX2; threads share blocks."""
    q, s, zp, w = grid_case(64, 128, 32, seed=3)
    x = torch.randn(3, 128)
    args = (s.t().contiguous(), zp.t().contiguous(), 32)
    check(native.q4_mm(x, byte_pack(q, 16), 16, *args, threads=1, act8=True), x, w)
    one = native.q4_mm(x, byte_pack(q, 32), 32, *args, threads=1, act8=True)
    assert torch.equal(one, native.q4_mm(x, byte_pack(q, 32), 32, *args, threads=2, act8=True))


@needs_lib
def test_q4a8_zero_and_non_finite_activations():
    q, s, zp, w = grid_case(32, 64, 32, seed=4)
    args = (byte_pack(q, 32), 32, s.t().contiguous(), zp.t().contiguous(), 32)
    x = torch.zeros(2, 64)
    x[1, 40] = 1.0  # the first block of row 1 all zeros (d = 0), the second one value
    check(native.q4_mm(x[1:], *args, act8=True), x[1:], w, lossy=False)  # 1.0 = 127 * (1 / 127): exact
    assert torch.equal(native.q4_mm(x[:1], *args, act8=True), torch.zeros(1, 32))
    x[0, 3] = float("nan")
    assert native.q4_mm(x, *args, act8=True)[0].isnan().all()  # never a silent finite result


@needs_lib
def test_q4a8_refuses_what_it_cannot_take():
    q, s, zp, _ = grid_case(64, 96, 32, seed=5)
    packed = byte_pack(q, 32)
    with pytest.raises(RuntimeError, match="do not make"):  # rows not whole: 48 rows of a 64-row layout
        native.q4_mm(torch.randn(1, 96), packed[:24], 32, s.t().contiguous(), zp.t().contiguous(), 32, act8=True)
    with pytest.raises(RuntimeError, match="q4a8_mm refused"):  # an odd row count is not whole blocks
        native.q4_mm(torch.randn(1, 96), packed[:33], 33, s[:33].t().contiguous(), zp[:33].t().contiguous(), 32,
                     act8=True)  # fmt: skip
    tables48 = torch.ones(2, 64).half(), torch.full((2, 64), 8.0).half()
    with pytest.raises(RuntimeError, match="q4a8_mm refused"):  # a group of 48: not whole blocks of 32 activations
        native.bind_q4(packed, 32, *tables48, 48, act8=True)
    native.bind_q4(packed, 32, *tables48, 48)  # the exact kernel takes it


def quant_layer(bits: int = 4, n: int = 64, k: int = 128, group: int = 64) -> QuantLinear:
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(bits))
    grid = find_grid(w, bits, group, symmetric=bits < 4)
    return QuantLinear.from_codes(quantize(w, grid), grid, None)


def exact_product(got: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> bool:
    want = x.double() @ w.t()
    return bool((got.double() - want).abs().max() <= 1e-5 * want.abs().max())


@pytest.fixture
def clean_choice(monkeypatch):
    monkeypatch.setattr(kernels, "_enabled", True)
    monkeypatch.setattr(kernels, "_act_bits", None)
    monkeypatch.setattr(kernels, "_four_forced", None)
    monkeypatch.setattr(kernels, "crossover", lambda kind: 32)
    monkeypatch.delenv("BUDGETLM_ACT8", raising=False)


def test_default_stays_exact(clean_choice, monkeypatch):
    calls = []

    def probe(threads, act8=False):
        calls.append(act8)
        return "q4a8" if act8 else "q4"

    monkeypatch.setattr(kernels, "_four_bit", probe)
    assert kernels.activation_bits() == 32 and kernels.four_bit() == "q4" and calls == [False]
    monkeypatch.setenv("BUDGETLM_ACT8", "1")
    assert kernels.activation_bits() == 8 and kernels.four_bit() == "q4a8" and calls[-1] is True
    kernels.set_activation_bits(32)  # explicit: exact whatever the environment says
    assert kernels.four_bit() == "q4" and calls[-1] is False
    kernels.set_activation_bits(None)
    assert kernels.activation_bits() == 8
    with pytest.raises(ValueError, match="activation bits"):
        kernels.set_activation_bits(16)
    with pytest.raises(ValueError, match="q4a8"):
        with kernels.four_bit_kernel("a8"):
            pass


@needs_lib
def test_the_real_probe_stays_exact_unless_opted_in(clean_choice):
    kernels._four_bit.cache_clear()
    try:
        assert kernels._four_bit(1) in ("int4", "q4", "q4bf")  # q4bf: bf16 activations, lossy like int4
        assert kernels._four_bit(1, True) in ("int4", "q4", "q4a8", "q4bf")
    finally:
        kernels._four_bit.cache_clear()


@needs_lib
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_quantlinear_on_q4a8_when_chosen(clean_choice, monkeypatch, bits):
    if not kernels._layout_matches():
        pytest.skip("torch's 4-bit layout is not the one budgetlm writes on this host")
    layer = quant_layer(bits)
    w = layer.dequantized_weight().double()
    x = torch.randn(4, 128, generator=torch.Generator().manual_seed(7))
    monkeypatch.setattr(kernels, "_four_bit", lambda threads, act8=False: "q4a8" if act8 else "q4")
    with torch.no_grad():
        exact = layer(x)  # not opted in: q4, exact
        assert layer.path(4) == "q4" and exact_product(exact, x, w)
        kernels.set_activation_bits(8)
        assert layer.kernel == "q4a8" and layer.path(1) == layer.path(4) == "q4a8" and layer.path(5) == "q4"
        for m in (1, 2, 3, 4):
            check(layer(x[:m]), x[:m], w)  # the fast decode path took q4a8: the reference product
        many = torch.randn(8, 128)
        assert exact_product(layer(many), many, w)  # more rows: the exact kernel
        kernels.set_activation_bits(32)
        assert torch.equal(layer(x), exact)  # back to exact at the next call
        with kernels.four_bit_kernel("q4a8"):  # the explicit choice for a block, no opt-in
            check(layer(x[:1]), x[:1], w)
        assert layer.path(1) == "q4"


@needs_lib
def test_q4a8_on_a_layer_with_bias_and_correction(clean_choice):
    """Layers without the bound fast path (bias, act-order, low-rank correction) take q4a8 in the general forward."""
    if not kernels._layout_matches():
        pytest.skip("torch's 4-bit layout is not the one budgetlm writes on this host")
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(9))
    grid = find_grid(w, 4, 64, symmetric=False)
    u, v = torch.randn(64, 2) * 0.1, torch.randn(2, 128) * 0.1
    layer = QuantLinear.from_codes(quantize(w, grid), grid, torch.randn(64), correction=(u, v))
    x = torch.randn(2, 128)
    with torch.no_grad(), kernels.four_bit_kernel("q4a8"):
        got = layer(x)
    q = layer.dequantized_weight().double()
    base = got.double() - layer.bias.double() - F.linear(F.linear(x, layer.lr_v.float()), layer.lr_u.float()).double()
    check(base.float(), x, q)
