"""budgetlm's 4-bit kernel with bfloat16 activations ("q4bf", native/q4bf.c): numerics against a product written
here (activations rounded to bfloat16 by torch, the dequantised weight, a float64 matmul), on the plain C path and
on the AVX-512 BF16 one where the CPU has it, and the layer's choice of it."""

from __future__ import annotations

import pytest
import torch

from budgetlm.methods.quant import kernels, native
from budgetlm.methods.quant.layers import QuantLinear
from budgetlm.methods.quant.quantizer import find_grid, quantize

needs_lib = pytest.mark.skipif(native.library() is None, reason=f"kernel not built: {native.status()}")
PATHS = [
    False,
    pytest.param(True, marks=pytest.mark.skipif(not native.bf16_simd(), reason="no AVX-512 BF16 on this CPU")),
]


def byte_pack(q: torch.Tensor, block: int) -> torch.Tensor:
    """torch's CPU 4-bit layout written with explicit indices: block b, column k, byte j holds rows b*block + j (low
    nibble) and b*block + block/2 + j (high nibble)."""
    n, k = q.shape
    half = block // 2
    rows = q.reshape(n // block, 2, half, k).to(torch.uint8)
    out = torch.empty(n // block, k, half, dtype=torch.uint8)
    for b in range(n // block):
        for j in range(half):
            out[b, :, j] = rows[b, 0, j] | (rows[b, 1, j] << 4)
    return out.reshape(n, k // 2)


def grid_case(n: int, k: int, g: int, bits: int = 4, symmetric: bool = False, seed: int = 0):
    """Codes in 0..15 (2- and 3-bit grids stored shifted as int4_pack_grid does: c = q + 8 - zp, zp = 8 in the
    table), fp16 scales and zero points [N, K/g], and the dequantised weight in float64."""
    gen = torch.Generator().manual_seed(seed)
    if bits == 4:
        q = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
        zp = torch.full((n, k // g), 8.0) if symmetric else torch.randint(0, 16, (n, k // g), generator=gen).float()
    else:
        q = torch.randint(0, 2**bits, (n, k), generator=gen, dtype=torch.uint8) + (8 - 2 ** (bits - 1))
        zp = torch.full((n, k // g), 8.0)
    s = (torch.rand(n, k // g, generator=gen) * 0.05 + 1e-3).half()
    zp = zp.half()
    w = (q.double() - zp.double().repeat_interleave(g, dim=1)) * s.double().repeat_interleave(g, dim=1)
    return q, s, zp, w


def check(got: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    """got is the product of bf16-rounded activations with the dequantised weight to 1e-5 relative."""
    want = x.to(torch.bfloat16).double() @ w.t()
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert (got.double() - want).abs().max() <= 1e-5 * want.abs().max()


def run(x, q, s, zp, g, block, vector, threads=1):
    args = (byte_pack(q, block), block, s.t().contiguous(), zp.t().contiguous(), g)
    return native.q4_mm(x, *args, threads=threads, vector=vector, bf16=True)


@needs_lib
@pytest.mark.parametrize("vector", PATHS)
@pytest.mark.parametrize("g", [32, 64, 128])
@pytest.mark.parametrize("block", [32, 64])
def test_q4bf_every_group_block_and_row_count(vector, g, block):
    n, k = 2 * block, 256
    q, s, zp, w = grid_case(n, k, g, seed=g + block)
    for m in (1, 2, 3, 4, 5, 16, 64):
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)) * 3
        check(run(x, q, s, zp, g, block, vector), x, w)


@needs_lib
@pytest.mark.parametrize("vector", PATHS)
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("symmetric", [True, False])
def test_q4bf_two_three_and_four_bit_codes(vector, bits, symmetric):
    q, s, zp, w = grid_case(128, 192, 64, bits=bits, symmetric=symmetric, seed=bits)
    call = native.bind_q4(byte_pack(q, 64), 64, s.t().contiguous(), zp.t().contiguous(), 64, bf16=True, vector=vector)
    for m in (1, 3, 4):
        x = torch.randn(m, 192, generator=torch.Generator().manual_seed(m + bits))
        check(call(x), x, w)


@needs_lib
def test_q4bf_rounds_activations_and_paths_agree():
    """The activations are rounded to bf16 (ties to even, as torch rounds): the result differs from the exact
    product, and the two paths agree to float32 summation order."""
    q, s, zp, w = grid_case(64, 128, 32, seed=5)
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(5))
    ties = torch.tensor([1 + 2**-8, 1 + 3 * 2**-8, -(2 + 2**-7), 3e38, float("inf"), 1e-3])
    assert torch.equal(native.bf16_round(ties), ties.to(torch.bfloat16).float())
    plain = run(x, q, s, zp, 32, 32, False)
    exact = x.double() @ w.t()
    assert not torch.allclose(plain.double(), exact, rtol=0, atol=1e-6)
    bound = 2**-9 * x.abs().double() @ w.abs().t()  # half a unit of bf16's 8-bit mantissa per activation
    assert ((plain.double() - exact).abs() <= bound * (1 + 1e-3) + 1e-6).all()
    if native.bf16_simd():
        fast = run(x, q, s, zp, 32, 32, True)
        assert (fast - plain).abs().max() <= 1e-5 * plain.abs().max()


@needs_lib
def test_q4bf_plain_c_block_and_threads():
    """A layout block of 16 rows takes the plain C path even with AVX-512; threads share blocks, same numbers."""
    q, s, zp, w = grid_case(128, 128, 32, seed=3)
    x = torch.randn(3, 128)
    check(run(x, q, s, zp, 32, 16, True), x, w)
    one = run(x, q, s, zp, 32, 64, True)
    assert torch.equal(one, run(x, q, s, zp, 32, 64, True, threads=2))


@needs_lib
@pytest.mark.parametrize("vector", PATHS)
def test_q4bf_zero_and_non_finite_activations(vector):
    q, s, zp, w = grid_case(64, 64, 32, seed=4)
    x = torch.zeros(2, 64)
    x[1, 40] = 1.0
    check(run(x, q, s, zp, 32, 64, vector), x, w)
    x[0, 3] = float("nan")
    x[1, 5] = float("inf")
    got = run(x, q, s, zp, 32, 64, vector)
    assert got[0].isnan().all() and not got[1].isfinite().any()  # never a silent finite result


@needs_lib
def test_q4bf_refuses_what_it_cannot_take():
    q, s, zp, _ = grid_case(64, 64, 32)
    with pytest.raises(RuntimeError, match="q4bf_mm refused"):
        native.q4_mm(torch.randn(1, 64), byte_pack(q, 64), 24, s.t().contiguous(), zp.t().contiguous(), 32, bf16=True)
    with pytest.raises(ValueError, match="not both"):
        native.q4_mm(torch.randn(1, 64), byte_pack(q, 64), 64, s.t().contiguous(), zp.t().contiguous(), 32,
                     act8=True, bf16=True)  # fmt: skip


def quant_layer(bits: int = 4, n: int = 64, k: int = 128, group: int = 64, **extra) -> QuantLinear:
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(bits))
    grid = find_grid(w, bits, group, symmetric=bits < 4)
    return QuantLinear.from_codes(quantize(w, grid), grid, **extra)


@pytest.fixture
def clean_choice(monkeypatch):
    monkeypatch.setattr(kernels, "_enabled", True)
    monkeypatch.setattr(kernels, "_act_bits", None)
    monkeypatch.setattr(kernels, "_four_forced", None)
    monkeypatch.setattr(kernels, "crossover", lambda kind: 32 if kind == "q4bf" else 0)  # q4bf: its own crossover
    monkeypatch.delenv("BUDGETLM_ACT8", raising=False)


@needs_lib
def test_the_probe_times_q4bf_by_default(clean_choice):
    kernels._four_bit.cache_clear()
    try:
        assert kernels._four_bit(1) in ("int4", "q4", "q4bf")
    finally:
        kernels._four_bit.cache_clear()
    with pytest.raises(ValueError, match="q4bf"):
        with kernels.four_bit_kernel("bf16"):
            pass


@needs_lib
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_quantlinear_on_q4bf_when_chosen(clean_choice, monkeypatch, bits):
    if not kernels._layout_matches():
        pytest.skip("torch's 4-bit layout is not the one budgetlm writes on this host")
    layer = quant_layer(bits, bias=None)
    w = layer.dequantized_weight().double()
    monkeypatch.setattr(kernels, "_four_bit", lambda threads, act8=False: "q4bf")
    with torch.no_grad():
        assert layer.kernel == "q4bf" and layer.path(1) == layer.path(31) == "q4bf" and layer.path(32) == "dense"
        for m in (1, 4, 16):
            x = torch.randn(m, 128, generator=torch.Generator().manual_seed(m))
            check(layer(x), x, w)  # the bound fast path
        assert layer._fast is not None and layer.memory_bytes() == 64 * 64 + 2 * 64 * 2 * 2
        x = torch.randn(40, 128)
        want = x.double() @ w.t()  # 40 rows: past the crossover, exact dequantisation
        assert (layer(x).double() - want).abs().max() <= 1e-5 * want.abs().max()


@needs_lib
def test_q4bf_on_a_layer_with_bias_and_correction(clean_choice):
    """Layers without the bound fast path (bias, low-rank correction) take q4bf in the general forward."""
    if not kernels._layout_matches():
        pytest.skip("torch's 4-bit layout is not the one budgetlm writes on this host")
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(9))
    grid = find_grid(w, 4, 64, symmetric=False)
    u, v = torch.randn(64, 2) * 0.1, torch.randn(2, 128) * 0.1
    layer = QuantLinear.from_codes(quantize(w, grid), grid, torch.randn(64), correction=(u, v))
    x = torch.randn(2, 128)
    with torch.no_grad(), kernels.four_bit_kernel("q4bf"):
        assert layer.path(2) == "q4bf"
        got = layer(x)
    q = layer.dequantized_weight().double()
    base = got.double() - layer.bias.double() - (x @ layer.lr_v.float().t() @ layer.lr_u.float().t()).double()
    check(base.float(), x, q)


@needs_lib
def test_q4bf_has_its_own_crossover_probe():
    """q4bf's crossover is timed on q4bf itself (bf16 dot products can beat float32 GEMM at every size), on a probe
    layer whose kernel is q4bf's product and whose dense path is the exact dequantisation of the same codes."""
    if not kernels._layout_matches():
        pytest.skip("torch's 4-bit layout is not the one budgetlm writes on this host")
    kernel, dense = kernels._probe_layer("q4bf")
    x = torch.randn(3, kernels.PROBE_SHAPE[1], generator=torch.Generator().manual_seed(1))
    exact = dense(x).double()
    got = kernel(x).double()
    assert got.shape == exact.shape and 0 < (got - exact).abs().max() <= 2e-2 * exact.abs().max()  # bf16, not exact
    kernels._crossover.cache_clear()
    try:
        assert kernels._crossover("q4bf", 1) in (*kernels.PROBE_TOKENS, 2 * kernels.PROBE_TOKENS[-1])
    finally:
        kernels._crossover.cache_clear()
