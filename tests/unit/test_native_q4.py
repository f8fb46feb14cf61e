"""budgetlm's own 4-bit kernel (methods/quant/native): the C code against a product written here."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from budgetlm.methods.quant import kernels, native
from budgetlm.methods.quant.layers import QuantLinear
from budgetlm.methods.quant.quantizer import find_grid, quantize

needs_lib = pytest.mark.skipif(native.library() is None, reason=f"kernel not built: {native.status()}")


def byte_pack(q: torch.Tensor, block: int) -> torch.Tensor:
    """torch's CPU 4-bit layout, byte by byte (independent of budgetlm's packer)."""
    n, k = q.shape
    flat = torch.zeros(n * k // 2, dtype=torch.uint8)
    half = block // 2
    for b0 in range(0, n, block):
        for col in range(k):
            base = b0 * k // 2 + col * half
            for j in range(half):
                flat[base + j] = int(q[b0 + j, col]) | (int(q[b0 + half + j, col]) << 4)
    return flat.view(n, k // 2)


def case(n, k, g, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
    s = (torch.rand(n, k // g, generator=gen) * 0.05 + 1e-3).half()
    zp = torch.randint(0, 16, (n, k // g), generator=gen).half()
    w = (q.double() - zp.double().repeat_interleave(g, dim=1)) * s.double().repeat_interleave(g, dim=1)
    return q, s, zp, w


@needs_lib
@pytest.mark.parametrize("block", [16, 32, 64])
@pytest.mark.parametrize("n,k,g", [(64, 64, 32), (128, 192, 64), (192, 256, 256), (64, 96, 96)])
@pytest.mark.parametrize("vector", [True, False])
def test_q4_mm_equals_the_dequantised_product(block, n, k, g, vector):
    q, s, zp, w = case(n, k, g, seed=n + k + g + block)
    packed = byte_pack(q, block)
    for m in (1, 2, 3, 4, 5, 9):  # whole and partial passes of four rows
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
        want = x.double() @ w.t()
        got = native.q4_mm(x, packed, block, s.t().contiguous(), zp.t().contiguous(), g, threads=1, vector=vector)
        assert got.dtype == torch.float32 and got.shape == (m, n)
        assert (got.double() - want).abs().max() <= 1e-5 * want.abs().max(), (m, vector)


@needs_lib
def test_threads_share_blocks_not_results():
    q, s, zp, _ = case(256, 128, 64)
    packed = byte_pack(q, 32)
    x = torch.randn(3, 128)
    args = (packed, 32, s.t().contiguous(), zp.t().contiguous(), 64)
    assert torch.equal(native.q4_mm(x, *args, threads=1), native.q4_mm(x, *args, threads=2))


@needs_lib
def test_bad_shapes_are_refused_not_read_past():
    q, s, zp, _ = case(64, 64, 32)
    packed = byte_pack(q, 32)
    with pytest.raises(RuntimeError, match="do not make"):
        native.q4_mm(torch.randn(1, 64), packed[:32], 32, s.t().contiguous(), zp.t().contiguous(), 32)
    with pytest.raises(RuntimeError, match="contiguous"):
        native.q4_mm(torch.randn(1, 64), packed, 32, s.t(), zp.t().contiguous(), 32)
    with pytest.raises(RuntimeError, match="refused"):  # rows not in whole blocks of 48
        native.q4_mm(torch.randn(1, 64), packed, 48, s.t().contiguous(), zp.t().contiguous(), 32)


@needs_lib
def test_a_layer_on_q4_gives_gradients_through_the_exact_path(monkeypatch):
    monkeypatch.setattr(kernels, "_enabled", True)
    monkeypatch.setattr(kernels, "crossover", lambda kind: 32)
    monkeypatch.setattr(kernels, "four_bit", lambda: "q4")
    w = torch.randn(64, 128)
    grid = find_grid(w, 4, 64, False)
    layer = QuantLinear.from_codes(quantize(w, grid), grid, None)
    ref = layer.dequantized_weight()
    x = torch.randn(2, 128, requires_grad=True)
    layer(x).sum().backward()  # the kernel has no backward: this call must not take it
    assert torch.allclose(x.grad, ref.sum(0).expand(2, -1), atol=1e-5)
    with torch.no_grad():
        assert torch.allclose(layer(x), F.linear(x, ref), atol=1e-4)


def test_no_compiler_leaves_torchs_kernel(monkeypatch):
    monkeypatch.setattr(native, "_compiler", lambda: None)
    native.library.cache_clear()
    native.simd.cache_clear()
    kernels._four_bit.cache_clear()
    try:
        assert native.library() is None and "no C compiler" in native.status()
        assert kernels._four_bit(1) == "int4"
        with pytest.raises(RuntimeError, match="unavailable"):
            tables = [torch.zeros(2, 64).half()] * 2
            native.q4_mm(torch.randn(1, 64), torch.zeros(64, 32, dtype=torch.uint8), 32, *tables, 32)
    finally:
        native.library.cache_clear()
        native.simd.cache_clear()
        kernels._four_bit.cache_clear()


@needs_lib
def test_the_build_is_cached_and_found_by_a_new_process(tmp_path):
    code = "from budgetlm.methods.quant import native; print(native.library()._name)"
    env = {"BUDGETLM_CACHE": str(tmp_path), "PATH": "/usr/bin:/bin"}
    first = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    built = list((tmp_path / "native").iterdir())
    assert len(built) == 1 and built[0].suffix == ".so" and first.strip() == str(built[0])  # no temporary left
    mtime = built[0].stat().st_mtime_ns
    second = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert second == first and built[0].stat().st_mtime_ns == mtime  # loaded, not rebuilt


@needs_lib
@pytest.mark.parametrize("vector", [True, False])
@pytest.mark.parametrize("n,k", [(64, 64), (130, 200), (2, 8)])
def test_q8_equals_the_dequantised_product(vector, n, k):
    gen = torch.Generator().manual_seed(n + k)
    codes = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8)
    scales = (torch.rand(n, 1, generator=gen) * 0.01 + 1e-4).half()
    w = codes.double() * scales.double()
    call = native.bind_q8(codes, scales, vector=vector)
    for m in (1, 2, 4, 5, 9):
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
        want = x.double() @ w.t()
        got = call(x)
        assert got.shape == (m, n) and (got.double() - want).abs().max() <= 1e-5 * want.abs().max(), (m, vector)
    assert native.bind_q8(codes[:, :6].contiguous(), scales) is None  # K not a multiple of 8: refused, not misread
    assert native.bind_q8(codes[:1], scales[:1]) is None  # an odd row count
