"""The fast CPU paths of quantised Linears and the host probe that chooses between them.

Three ways to compute y = x Q(W)^T for a QuantLinear, all from the same stored codes:
- "int4": torch's 4-bit weight-only kernel (`_weight_int4pack_mm_for_cpu`) for grids of at most 4 bits. It reads
  half a byte per weight and computes w = (q - 8) * s + z per group of g in {32, 64, 128, 256} columns, so a code
  q with zero point zp (asymmetric) or 2^(b-1) (symmetric) maps exactly with z = (8 - zp) * s; 2- and 3-bit codes
  are stored shifted to c = q + 8 - zp (still in 0..15), so that z = 0 and only the scale is rounded. A
  per-channel grid, or a group a multiple of a kernel group, is the same scale repeated: exact. Its activations,
  scales and offsets are bfloat16 (float32 activations fall to a scalar loop 15-60x slower), which rounds the
  scales of the stored grid to 8 mantissa bits: the quality cost is measured per grid by
  benchmarks/bench_decode.py (KL to the exact path).
- "int4x2": an 8-bit grid as two 4-bit halves through the same kernel, c = 16 hi + lo and
  (c - zp) s = 16 s (hi - 8) + s (lo - 8) + (136 - zp) s: two calls whose products add up to the 8-bit layer's.
- "int8": torch's int8 weight-only kernel (`_weight_int8pack_mm`) for 8-bit symmetric per-channel grids: one byte
  per weight, bfloat16 activations and scales. On an AMD EPYC (1 thread) it read ~2.5 GB/s on a 49152 x 576
  lm_head (12 ms) where the two halves took ~3 ms; `eight_bit()` measures which one is faster on the host.
- "q4": budgetlm's own 4-bit kernel (methods/quant/native/q4.c, compiled on the host at first use) for the same
  grids and the same packed codes: float32 activations, the stored fp16 scales and zero points widened to float32,
  so it computes exactly the product with the dequantised weight (no bf16 rounding); where bf16 is emulated (AVX2
  without AVX512-BF16) torch's kernel is compute-bound and this one is faster. `four_bit()` times the two on
  the host, for one token over weights that exceed the last-level cache, and the faster one serves every <= 4-bit
  layer; an unavailable build (no C compiler) leaves "int4".
- "q4a8": budgetlm's 4-bit kernel with 8-bit activations (native/q4a8.c) on the same codes and tables: each call
  quantises its activations per block of 32 columns to int8 (symmetric, d = max|x| / 127, round to nearest even)
  and multiplies codes by codes with integer SIMD (1.3-2.6x faster than "q4" per layer for one token on an AVX2
  EPYC, cold to warm weights). LOSSY (the error of
  int8 activations, reported as KL by benchmarks/bench_decode.py), so it is never taken silently: only when the
  process opts in (BUDGETLM_ACT8=1 or `set_activation_bits(8)`: `four_bit()` then times it with the other two and
  takes the fastest) or a block forces it (`four_bit_kernel("q4a8")`). It serves calls of at most ACT8_TOKENS
  tokens (decode, small verification batches); larger calls of the same layer take the exact "q4" kernel up to its
  crossover, then dequantise + GEMM.
- "q4bf": budgetlm's 4-bit kernel with bfloat16 activations (native/q4bf.c) on the same codes and tables: each call
  rounds its activations to bf16 (round to nearest even, as torch's int4 kernel does; lossy, the KL is reported by
  benchmarks/bench_decode.py) and sums codes times activations with AVX-512 BF16 dot products (vdpbf16ps) where
  the CPU has them (plain C elsewhere); scales and zero points stay fp16 -> float32 (exact, unlike int4's bf16
  table). Lossy like "int4", so `four_bit()` times it with "int4" and "q4" by default and takes the fastest.
- "q8bf": an 8-bit grid as two 4-bit halves (c = 16 hi + lo, as "int4x2" packs them) on the "q4bf" kernel, the two
  products added: bfloat16 activations (lossy, like "int4x2" and torch's "int8"), exact fp16 scales. 2.8x faster
  than "q8" and 2.1x than torch's int8 kernel per layer on an AVX-512 BF16 Zen 4; `eight_bit()` times it with the
  others, for every 8-bit grid whose halves the layout takes.
- "q8": budgetlm's own 8-bit kernel (native/q8.c) for 8-bit symmetric per-channel grids, on the stored int8 codes
  and fp16 scales, float32 activations: exact; `eight_bit()` times it with the other two.
- "dense": the codes dequantised to float32, a block of output rows at a time (DENSE_BLOCK_WEIGHTS weights), each
  block multiplied in float32: exact w.r.t. the stored grid and never more than a block of float32 weights alive.
Which one a call takes depends on its token count M: the kernels win for a few tokens (decode reads fewer bytes),
dequantise + GEMM for many (prefill, scoring). The crossover is measured once per process and thread count on a
representative layer (`crossover`, ~0.1-0.6 s; up to 1,024 tokens), never assumed from CPU flags: where bf16 is
emulated the kernels lose at every M and are never taken. `choose` is a pure function of M and the probe's result.

The 4-bit layout: torch's CPU packer stores blocks of B output rows, for every input column B/2 bytes, byte j
holding row j in its low nibble and row B/2 + j in its high nibble. B follows the CPU's vector width (64 with
AVX-512, 32 with AVX2), so it is found once per process by packing a probe layer with torch's own packer and
matching the candidates (`block_n`), never read from CPU flags. `pack_int4` / `unpack_int4` write and read that
layout with tensor ops (cheap and exact both ways); a torch whose layout matches no candidate leaves every layer on
the dense path (`_layout_matches`). Set BUDGETLM_KERNELS=0
(or `kernels_enabled(False)`) to compute every quantised layer by exact dequantisation.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from functools import lru_cache

import torch
import torch.nn.functional as F

from budgetlm.methods.quant import native

INT4_GROUPS = (256, 128, 64, 32)  # the kernel's group sizes, largest first
LAYOUT_BLOCKS = (64, 32, 16)  # candidate output rows per block of torch's CPU 4-bit layout
DENSE_BLOCK_WEIGHTS = 1 << 21  # float32 weights dequantised at once on the dense path (8 MiB)
PROBE_TOKENS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)  # token counts the probe times, ascending
PROBE_SHAPE = (1024, 1024)  # [out, in] of the layer the probe times
ACT8_TOKENS = 4  # "q4a8" serves calls of at most this many tokens; larger ones take the exact kernels

_enabled: bool | None = None  # None: read BUDGETLM_KERNELS


def enabled() -> bool:
    if _enabled is not None:
        return _enabled
    return os.environ.get("BUDGETLM_KERNELS", "1").strip().lower() not in ("0", "false", "no", "off")


@contextlib.contextmanager
def kernels_enabled(on: bool):
    """Within the block, quantised layers take the kernels (True, where the probe says they pay) or compute by
    exact dequantisation only (False)."""
    global _enabled
    before, _enabled = _enabled, on
    try:
        yield
    finally:
        _enabled = before


# -- the 4-bit layout ------------------------------------------------------------------------------------------
def int4_group(bits: int, group_size: int, out_features: int, in_features: int) -> int | None:
    """The kernel group size that expresses this grid exactly (8-bit grids as two 4-bit halves, `int8_split`), or
    None when the kernel cannot take it."""
    if bits not in (2, 3, 4, 8) or out_features % block_n() or in_features % 2:
        return None
    for g in INT4_GROUPS:
        if group_size % g == 0 and in_features % g == 0:
            return g
    return None


def _pack(codes: torch.Tensor, block: int) -> torch.Tensor:
    n, k = codes.shape
    c = codes.to(torch.uint8).reshape(n // block, 2, block // 2, k)
    packed = c[:, 0] | (c[:, 1] << 4)  # [blocks, block/2, K]
    return packed.transpose(1, 2).contiguous().reshape(n, k // 2)


def match_block(packer) -> int | None:
    """The block of the 4-bit layout `packer(codes int32 [N, K], 1)` writes: the candidate whose packing of a
    random 128 x 64 layer is exactly the packer's; None when none is (or the packer fails)."""
    q = torch.randint(0, 16, (128, 64), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    try:
        theirs = packer(q, 1)
    except (RuntimeError, AttributeError, NotImplementedError):
        return None
    if theirs.shape != (128, 32) or theirs.dtype != torch.uint8:
        return None
    return next((b for b in LAYOUT_BLOCKS if torch.equal(theirs, _pack(q, b))), None)


@lru_cache(maxsize=1)
def _host_block() -> int | None:
    with torch.device("cpu"):  # real tensors even when first asked inside a meta-device block (lobi's storage_bytes)
        return match_block(lambda q, inner: torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, inner))


def _layout_matches() -> bool:
    """pack_int4 writes exactly what torch's own packer writes on this host."""
    return _host_block() is not None


def block_n() -> int:
    """Output rows per block of the host's 4-bit layout (64 where it is unknown: no layer then takes the kernel)."""
    return _host_block() or LAYOUT_BLOCKS[0]


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Codes [N, K] (values 0..15, N a multiple of block_n()) in torch's CPU 4-bit layout, uint8 [N, K/2]."""
    return _pack(codes, block_n())


def unpack_int4(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """The inverse of pack_int4: uint8 codes [n, k] from a layout [n, k/2] (or a block of whole blocks)."""
    b = block_n()
    p = packed.reshape(n // b, k, b // 2).transpose(1, 2)  # [blocks, b/2, K]
    return torch.stack([p & 15, p >> 4], dim=1).reshape(n, k)


def _offsets(zeros: torch.Tensor | None, bits: int, like: torch.Tensor) -> torch.Tensor:
    """Each group's zero point: the stored zeros (asymmetric) or 2^(b-1) (symmetric)."""
    return zeros.float() if zeros is not None else torch.full_like(like.float(), 2 ** (bits - 1))


def int4_pack_grid(codes, scales, zeros, bits: int, group_size: int, g: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer's codes [N, K] and grid in the kernel's form: (packed [N, K/2] uint8, bf16 table [K/g, N, 2]).

    The kernel computes (c - 8) * s + z with bf16 s and z. For grids of at most 3 bits the codes are stored shifted
    by 8 - zp (c = q + 8 - zp stays in 0..15), so that z = 0 and only the scale is rounded to bf16; 4-bit codes
    fill 0..15 and keep z = (8 - zp) * s (rounded to bf16 too)."""
    if bits <= 3:
        zp = _offsets(zeros, bits, scales)
        shift = (8 - zp).to(torch.int16).repeat_interleave(group_size, dim=1)
        codes = (codes.to(torch.int16) + shift).to(torch.uint8)
    return pack_int4(codes), int4_table(scales, zeros, bits, group_size, g)


def int4_table(scales, zeros, bits: int, group_size: int, g: int) -> torch.Tensor:
    """torch's kernel's bf16 table [K/g, N, 2] of (scale, offset) for int4_pack_grid's codes: z = 0 for the shifted
    codes of grids of at most 3 bits, z = (8 - zp) * s for 4-bit ones."""
    s = scales.float()
    z = torch.zeros_like(s) if bits <= 3 else (8 - _offsets(zeros, bits, s)) * s
    rep = group_size // g
    if rep > 1:
        s, z = s.repeat_interleave(rep, dim=1), z.repeat_interleave(rep, dim=1)
    return torch.stack([s.t(), z.t()], dim=-1).contiguous().to(torch.bfloat16)


def q4_table(scales, zeros, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """budgetlm's kernel's tables for int4_pack_grid's codes: fp16 scales and zero points [K/group, N] (the
    layer's own groups; 8 for the shifted codes of grids of at most 3 bits). Both exact in fp16."""
    zp = torch.full_like(scales, 8, dtype=torch.float16) if bits <= 3 else _offsets(zeros, bits, scales).half()
    return scales.half().t().contiguous(), zp.t().contiguous()


def q8bf_tables(scales, zeros) -> tuple[torch.Tensor, ...]:
    """The "q8bf" kernel's fp16 tables [K/group, N] for an 8-bit grid's two 4-bit halves (int8_split's codes: c =
    16 hi + lo): (c - zp) s = 16 s (hi - 8) + s (lo - (zp - 128)), so the high half runs with scale 16 s and zero
    point 8, the low half with scale s and zero point zp - 128. Returns (s_hi, z_hi, s_lo, z_lo), exact in fp16
    (the scales are stored in fp16; zero points are integers of at most 8 bits)."""
    s = scales.half().float()
    zp = _offsets(zeros, 8, s)
    return tuple(t.half().t().contiguous() for t in (16 * s, torch.full_like(s, 8), s, zp - 128))


def q8bf_mm(x: torch.Tensor, parts: tuple[torch.Tensor, ...], tables: tuple[torch.Tensor, ...], g: int) -> torch.Tensor:
    """x [M, K] times an 8-bit grid's two halves (int8_split's packed hi and lo, parts[0] and parts[2]) with
    q8bf_tables' tables: the "q4bf" kernel on each half, the two products added (bfloat16 activations; lossy)."""
    return bind_q8bf(parts, tables, g)(x).to(x.dtype)


def bind_q8bf(parts: tuple[torch.Tensor, ...], tables: tuple[torch.Tensor, ...], g: int):
    """q8bf_mm for one layer, checked once: call(x [M, K]) -> float32 [M, N] (both halves in one C call)."""
    return native.bind_q8bf(parts[0], parts[2], block_n(), tables, g)


def bind_q8(codes: torch.Tensor, scales: torch.Tensor):
    """budgetlm's 8-bit kernel for int8 codes [N, K] with fp16 per-row scales, checked once (None: shape refused)."""
    return native.bind_q8(codes, scales)


def bind_q4(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g: int):
    """q4_mm for one layer's codes and q4_table's tables, checked once: call(x [M, K]) -> float32 [M, N]."""
    return native.bind_q4(packed, block_n(), scales, zeros, g)


def q4_mm(x: torch.Tensor, packed: torch.Tensor, tables: tuple[torch.Tensor, torch.Tensor], g: int,
          act8: bool = False, bf16: bool = False) -> torch.Tensor:  # fmt: skip
    """x [M, K] times int4_pack_grid's codes with q4_table's tables (groups of g columns): [M, N] in x's dtype.
    `act8=True`: the "q4a8" kernel (activations quantised to int8 per block of 32; lossy); `bf16=True`: "q4bf"
    (activations rounded to bfloat16; lossy)."""
    return native.q4_mm(x, packed, block_n(), tables[0], tables[1], g, act8=act8, bf16=bf16).to(x.dtype)


def bind_q4a8(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g: int):
    """bind_q4 for the "q4a8" kernel (activations quantised to int8 per block of 32 columns; lossy)."""
    return native.bind_q4(packed, block_n(), scales, zeros, g, act8=True)


def bind_q4bf(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g: int):
    """bind_q4 for the "q4bf" kernel (activations rounded to bfloat16; lossy)."""
    return native.bind_q4(packed, block_n(), scales, zeros, g, bf16=True)


def int4_codes(packed, zeros, bits: int, group_size: int, n: int, k: int) -> torch.Tensor:
    """The stored codes [n, k] back from int4_pack_grid's layout (rows of whole blocks; zeros of those rows)."""
    codes = unpack_int4(packed, n, k)
    if bits <= 3:
        zp = _offsets(zeros, bits, torch.empty(n, k // group_size))
        shift = (8 - zp).to(torch.int16).repeat_interleave(group_size, dim=1)
        codes = (codes.to(torch.int16) - shift).to(torch.uint8)
    return codes


def int4_row_codes(packed, ids: torch.Tensor, zeros, bits: int, group_size: int, n: int, k: int) -> torch.Tensor:
    """The stored codes [len(ids), k] of rows `ids` (1-D) from int4_pack_grid's layout, reading those rows only:
    with B = block_n(), row r is nibble r // (B/2) % 2 of byte r % (B/2) in block r // B, for every column."""
    ids, b = ids.long(), block_n()
    blocks = packed.view(n // b, k, b // 2)
    within = ids % b
    raw = blocks[ids // b, :, within % (b // 2)]  # [len, k]
    codes = (raw >> (4 * (within >= b // 2)).to(torch.uint8).unsqueeze(1)) & 15
    if bits <= 3:
        zp = _offsets(None if zeros is None else zeros[ids], bits, torch.empty(len(ids), k // group_size))
        shift = (8 - zp).to(torch.int16).repeat_interleave(group_size, dim=1)
        codes = (codes.to(torch.int16) - shift).to(torch.uint8)
    return codes


def int4_dequantize(packed, scales, zeros, bits: int, group_size: int, n: int, k: int) -> torch.Tensor:
    """Float32 weights [n, k] straight from int4_pack_grid's layout (rows of whole blocks with their fp16
    scales and zeros): (c - 8) * s for shifted codes (<= 3 bits), (q - zp) * s for 4-bit ones. Exact."""
    offset = torch.full_like(scales, 8, dtype=torch.float32) if bits <= 3 else _offsets(zeros, bits, scales)
    w = unpack_int4(packed, n, k).reshape(n, k // group_size, group_size).float()
    return w.sub_(offset.unsqueeze(-1)).mul_(scales.float().unsqueeze(-1)).reshape(n, k)


def int8_split(codes, scales, zeros, group_size: int, g: int) -> tuple[torch.Tensor, ...]:
    """8-bit codes as two 4-bit halves for the int4 kernel: c = 16 hi + lo, and with zero point zp
    (c - zp) s = 16 s (hi - 8) + s (lo - 8) + (136 - zp) s, so the high half runs with table (16 s, 0) and the low
    half with (s, (136 - zp) s); the two products add up to the 8-bit layer's (scales rounded to bf16).
    Returns (packed_hi, table_hi, packed_lo, table_lo)."""
    c = codes.to(torch.uint8)
    hi, lo = int8_split_tables(scales, zeros, group_size, g)
    return pack_int4(c >> 4), hi, pack_int4(c & 15), lo


def int8_split_tables(scales, zeros, group_size: int, g: int) -> tuple[torch.Tensor, torch.Tensor]:
    """int8_split's two bf16 tables [K/g, N, 2]: (16 s, 0) for the high half, (s, (136 - zp) s) for the low one."""
    s = scales.float()
    zp = _offsets(zeros, 8, s)
    rep = group_size // g

    def table(scale, offset):
        if rep > 1:
            scale, offset = scale.repeat_interleave(rep, dim=1), offset.repeat_interleave(rep, dim=1)
        return torch.stack([scale.t(), offset.t()], dim=-1).contiguous().to(torch.bfloat16)

    return table(16 * s, torch.zeros_like(s)), table(s, (136 - zp) * s)


def int8_split_mm(x: torch.Tensor, parts: tuple[torch.Tensor, ...], g: int) -> torch.Tensor:
    xb = x.to(torch.bfloat16)
    mm = torch.ops.aten._weight_int4pack_mm_for_cpu
    return (mm(xb, parts[0], g, parts[1]).float() + mm(xb, parts[2], g, parts[3]).float()).to(x.dtype)


def int8_split_codes(parts: tuple[torch.Tensor, ...], n: int, k: int) -> torch.Tensor:
    return (unpack_int4(parts[0], n, k) << 4) | unpack_int4(parts[2], n, k)


def int8_split_row_codes(parts: tuple[torch.Tensor, ...], ids: torch.Tensor, n: int, k: int) -> torch.Tensor:
    hi = int4_row_codes(parts[0], ids, None, 4, k, n, k)
    return (hi << 4) | int4_row_codes(parts[2], ids, None, 4, k, n, k)


def int4_mm(x: torch.Tensor, packed: torch.Tensor, g: int, scale_zero: torch.Tensor) -> torch.Tensor:
    """x [M, K] (any float dtype) times the packed weight: [M, N] in x's dtype."""
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), packed, g, scale_zero).to(x.dtype)


def int8_mm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [M, K] times an int8 [N, K] weight with per-row bf16 scales: [M, N] in x's dtype."""
    return torch._weight_int8pack_mm(x.to(torch.bfloat16), qweight, scales).to(x.dtype)


def dense_mm(x: torch.Tensor, weight_rows, out_features: int, in_features: int) -> torch.Tensor:
    """x [M, K] times a weight dequantised block by block: `weight_rows(r0, r1)` gives rows r0:r1 in float32."""
    b = block_n()
    step = max(b, DENSE_BLOCK_WEIGHTS // max(in_features, 1) // b * b)
    if step >= out_features:
        return F.linear(x, weight_rows(0, out_features).to(x.dtype))
    y = x.new_empty(*x.shape[:-1], out_features)
    for r0 in range(0, out_features, step):
        r1 = min(out_features, r0 + step)
        y[..., r0:r1] = F.linear(x, weight_rows(r0, r1).to(x.dtype))
    return y


# -- the probe -------------------------------------------------------------------------------------------------
def _median_seconds(fn, repeats: int = 3) -> float:
    fn()  # warm-up: oneDNN and the kernels build their code on the first call
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _probe_layer(kind: str):
    """A random layer of PROBE_SHAPE for `kind` ("int4", "q4", "q4bf", "int4x2", "q8bf", "int8" or "q8"):
    (kernel(x), dense(x))."""
    from budgetlm.methods.quant.quantizer import find_grid, quantize

    n, k = PROBE_SHAPE
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(n, k, generator=gen)
    if kind in ("int4", "q4", "q4bf"):
        grid = find_grid(w, 4, 64, symmetric=False)
        codes = quantize(w, grid)
        packed, table = int4_pack_grid(codes, grid.scales, grid.zeros, 4, 64, 64)
        tables = q4_table(grid.scales, grid.zeros, 4)

        def kernel(x):
            if kind == "int4":
                return int4_mm(x, packed, 64, table)
            return q4_mm(x, packed, tables, 64, bf16=kind == "q4bf")

        def rows(r0, r1):
            return int4_dequantize(packed[r0:r1], grid.scales[r0:r1], grid.zeros[r0:r1], 4, 64, r1 - r0, k)

    elif kind == "int4x2":
        grid = find_grid(w, 8, None, symmetric=True)
        parts = int8_split(quantize(w, grid), grid.scales, None, k, 256)

        def kernel(x):
            return int8_split_mm(x, parts, 256)

        def rows(r0, r1):
            codes = int8_split_codes(tuple(p[r0:r1] if i % 2 == 0 else p for i, p in enumerate(parts)), r1 - r0, k)
            return codes.float().sub_(128).mul_(grid.scales[r0:r1])

    elif kind == "q8bf":
        grid = find_grid(w, 8, None, symmetric=True)
        parts = int8_split(quantize(w, grid), grid.scales, None, k, 256)
        tables = q8bf_tables(grid.scales, None)

        def kernel(x):
            return q8bf_mm(x, parts, tables, k)

        def rows(r0, r1):
            codes = int8_split_codes(tuple(p[r0:r1] if i % 2 == 0 else p for i, p in enumerate(parts)), r1 - r0, k)
            return codes.float().sub_(128).mul_(grid.scales[r0:r1])

    else:  # "int8" or "q8": the stored int8 codes
        grid = find_grid(w, 8, None, symmetric=True)
        q8 = (quantize(w, grid).to(torch.int16) - 128).to(torch.int8)
        s8 = grid.scales[:, 0].to(torch.bfloat16)
        own = bind_q8(q8, grid.scales[:, 0].half().contiguous()) if kind == "q8" else None

        def kernel(x):
            return own(x) if own is not None else int8_mm(x, q8, s8)

        def rows(r0, r1):
            return q8[r0:r1].float().mul_(grid.scales[r0:r1])

    def dense(x):
        return dense_mm(x, rows, n, k)

    return kernel, dense


@lru_cache(maxsize=16)
def _crossover(kind: str, threads: int) -> int:
    try:
        if kind in ("int4", "int4x2", "q4", "q4bf", "q8bf") and not _layout_matches():
            return 0
        kernel, dense = _probe_layer(kind)
        k = PROBE_SHAPE[1]
        gen = torch.Generator().manual_seed(1)
        for m in PROBE_TOKENS:
            x = torch.randn(m, k, generator=gen)
            if _median_seconds(lambda x=x: kernel(x)) >= _median_seconds(lambda x=x: dense(x)):
                return m  # from here on dense is at least as fast
        return PROBE_TOKENS[-1] * 2
    except (RuntimeError, AttributeError, NotImplementedError):  # a torch without the kernel
        return 0


def crossover(kind: str) -> int:
    """Token count from which the dense path is at least as fast as the `kind` kernel on this host, at torch's
    current thread count (0: the kernel never pays; measured once per process and thread count). "q4a8": that of
    "q4" (which serves its layers' calls above ACT8_TOKENS), at least ACT8_TOKENS + 1 (it was chosen explicitly)."""
    if kind == "q4a8":
        return max(_crossover("q4", torch.get_num_threads()), ACT8_TOKENS + 1)
    return _crossover(kind, torch.get_num_threads())


COLD_BYTES = 40 << 20  # the eight-bit probe cycles through this many bytes of codes: more than a last-level cache
# at most this many copies of a layer: a small layer's probe stays a few thousand calls (a 64 x 64 layer would need
# ~10,000 copies to fill COLD_BYTES, seconds of per-call overhead in every process that loads a tiny model); a
# model that small is read from cache anyway
MAX_COPIES = 256


def fastest(calls: dict, copies: int) -> str:
    """The name of the fastest of `calls` (name -> fn(i) on copy i of a layer), timed in interleaved passes over every
    copy (cold weights, as a decode step reads them); the first pass warms up, the median of three decides."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for rnd in range(4):
        for name, fn in calls.items():
            t0 = time.perf_counter()
            for i in range(copies):
                fn(i)
            if rnd:
                times[name].append(time.perf_counter() - t0)
    return min(times, key=lambda name: statistics.median(times[name]))


@lru_cache(maxsize=64)
def _eight_bit(n: int, k: int, threads: int, own_only: bool = False) -> str:
    try:
        g = int4_group(8, k, n, k)
        halves = _layout_matches() and g is not None
        own = native.library() is not None and k % 8 == 0 and n % 2 == 0
        bf = native.library() is not None and halves
        if not halves and not own:
            return "int8"
        b = block_n()
        n = min(n, max(b, COLD_BYTES // 2 // k // b * b))  # a large layer: a slice of its rows
        copies = min(MAX_COPIES, max(2, COLD_BYTES // (n * k)))
        # the kernels' speed does not depend on the code values: constant bytes are valid codes and packed layouts
        q8 = torch.full((copies, n, k), 0x35, dtype=torch.int8)
        hi = torch.full((copies, n, k // 2), 0x5A, dtype=torch.uint8)
        lo = torch.full((copies, n, k // 2), 0xA5, dtype=torch.uint8)
        scales = torch.full((n,), 1e-2, dtype=torch.bfloat16)
        table = torch.full((k // g, n, 2), 1e-2, dtype=torch.bfloat16) if halves else None
        x = torch.randn(1, k, generator=torch.Generator().manual_seed(2))
        calls = {"int8": lambda i: int8_mm(x, q8[i], scales)}
        if halves:
            calls["int4x2"] = lambda i: int8_split_mm(x, (hi[i], table, lo[i], table), g)
        if own:
            bound = [native.bind_q8(q8[i], scales.half()) for i in range(copies)]
            calls["q8"] = lambda i: bound[i](x)
        if bf:  # bfloat16 activations (lossy like int4x2's and int8's): a default candidate
            tables = q8bf_tables(torch.full((n, 1), 1e-2), None)
            pairs = [bind_q8bf((hi[i], None, lo[i], None), tables, k) for i in range(copies)]
            calls["q8bf"] = lambda i: pairs[i](x)
        if own_only:
            calls = {name: fn for name, fn in calls.items() if name in ("q8", "q8bf")}
            if not calls:
                return "int8"
        return fastest(calls, copies)
    except (RuntimeError, AttributeError, NotImplementedError):
        return "int8"


def eight_bit(n: int, k: int) -> str:
    """The faster kernel for one token of an 8-bit symmetric per-channel [n, k] layer on this host: torch's int8
    kernel ("int8"), the two 4-bit halves on torch's int4 kernel ("int4x2") or on budgetlm's "q4bf" ("q8bf",
    bfloat16 activations like the other two), or budgetlm's own 8-bit kernel ("q8": float32 activations,
    exact; where it is built), at torch's current thread count, timed over copies of
    random codes that exceed the last-level cache, as a decode step reads its weights (measured once per process,
    shape and thread count; ~0.05 s each)."""
    kind = _eight_bit(n, k, torch.get_num_threads())
    if _own_preferred and kind not in ("q8", "q8bf") and native.library() is not None:
        # prefer_own_kernels(): the whole step was timed faster on budgetlm's kernels: the faster of those
        own = _eight_bit(n, k, torch.get_num_threads(), own_only=True)
        return own if own in ("q8", "q8bf") else kind
    return kind


@lru_cache(maxsize=8)
def _four_bit(threads: int, act8: bool = False, own: bool = False) -> str:
    """The probe of four_bit(); `own`: among budgetlm's kernels only (prefer_own_kernels)."""
    if not _layout_matches() or native.library() is None:
        return "int4"
    try:
        n, k, g = 1536, 576, 64  # an MLP projection of a small model; copies of it beyond the last-level cache
        copies = max(2, COLD_BYTES // (n * k // 2))
        packed = torch.full((copies, n, k // 2), 0x5A, dtype=torch.uint8)
        scales = torch.full((n, k // g), 1e-2)
        zeros = torch.full((n, k // g), 7.0)
        table, tables = int4_table(scales, zeros, 4, g, g), q4_table(scales, zeros, 4)
        x = torch.randn(1, k, generator=torch.Generator().manual_seed(3))
        calls = {"int4": lambda i: int4_mm(x, packed[i], g, table), "q4": lambda i: q4_mm(x, packed[i], tables, g)}
        if own:
            del calls["int4"]
        calls["q4bf"] = lambda i: q4_mm(x, packed[i], tables, g, bf16=True)  # lossy like int4: a default candidate
        if act8:  # opted in to 8-bit activations (lossy): timed with the exact two
            calls["q4a8"] = lambda i: q4_mm(x, packed[i], tables, g, act8=True)
        return fastest(calls, copies)
    except (RuntimeError, AttributeError, NotImplementedError):
        return "int4"


_four_forced: str | None = None  # set by four_bit_kernel()
_own_preferred = False  # set by prefer_own_kernels(): a whole decode step timed faster on budgetlm's kernels
_act_bits: int | None = None  # set by set_activation_bits(); None: read BUDGETLM_ACT8
FOUR_BIT_KINDS = ("int4", "q4", "q4a8", "q4bf")


def activation_bits() -> int:
    """32 (exact float32 activations: the default) or 8 where the process opted in to the lossy "q4a8" kernel
    (`set_activation_bits(8)`, or BUDGETLM_ACT8=1 in the environment)."""
    if _act_bits is not None:
        return _act_bits
    on = os.environ.get("BUDGETLM_ACT8", "0").strip().lower() in ("1", "8", "true", "yes", "on")
    return 8 if on else 32


def set_activation_bits(bits: int | None) -> None:
    """Process-wide: 8 lets the 4-bit probe take "q4a8" (activations quantised to int8 per block of 32 columns,
    lossy) where it times fastest; 32 keeps every kernel exact whatever BUDGETLM_ACT8 says; None: back to
    BUDGETLM_ACT8 (default exact). Layers pick the change up at their next call (`state()`)."""
    global _act_bits
    if bits not in (8, 32, None):
        raise ValueError(f"activation bits {bits!r}: 8 (q4a8, lossy), 32 (exact) or None (BUDGETLM_ACT8)")
    _act_bits = bits


def four_bit() -> str:
    """The fastest kernel for one token of a <= 4-bit layer on this host: torch's ("int4") or budgetlm's own ("q4",
    exact; "q4bf", bfloat16 activations like int4's; "q4a8" too where the process opted in to 8-bit activations,
    `activation_bits()`), at torch's current thread
    count, timed over copies of a layer that exceed the last-level cache (measured once per process, thread count
    and opt-in; ~0.1 s). "int4" where budgetlm's kernel is not built."""
    if _four_forced is not None:
        return _four_forced
    kind = _four_bit(torch.get_num_threads(), activation_bits() == 8)
    if _own_preferred and kind == "int4" and native.library() is not None:  # the fastest of budgetlm's own
        return _four_bit(torch.get_num_threads(), activation_bits() == 8, own=True)
    return kind


def prefer_own_kernels(on: bool) -> None:
    """Process-wide: quantised layers take budgetlm's own kernels (the fastest of "q4" / "q4bf" / opted-in "q4a8" for
    <= 4 bits, by the same probe without torch's kernel; "q8" for 8 bits) where the
    per-layer probes found torch's faster. Set where a whole decode step was timed faster on them
    (decode/lean_step.py `step_runtime`: budgetlm's kernels let the step run as one C call, which a probe of one
    layer's product cannot see). Layers pick the change up at their next call (`state()`)."""
    global _own_preferred
    _own_preferred = bool(on)


def own_preferred() -> bool:
    return _own_preferred


@contextlib.contextmanager
def four_bit_kernel(kind: str):
    """Within the block, <= 4-bit layers take `kind` ("int4", "q4", "q4a8" or "q4bf") whatever the probe found: to
    time or check the kernels side by side (benchmarks/bench_decode.py's `variant@int4`, `variant@q4a8`). "q4a8" is
    the explicit choice of 8-bit activations (lossy) for calls of at most ACT8_TOKENS tokens; "q4bf" that of
    bfloat16 activations (lossy) at every call size below the crossover."""
    global _four_forced
    if kind not in FOUR_BIT_KINDS:
        raise ValueError(f"no 4-bit kernel {kind!r}: {', '.join(FOUR_BIT_KINDS)}")
    if kind in ("q4", "q4a8", "q4bf") and native.library() is None:
        raise RuntimeError(f"budgetlm's 4-bit kernel is unavailable: {native.status()}")
    before, _four_forced = _four_forced, kind
    try:
        yield
    finally:
        _four_forced = before


def state() -> tuple:
    """What a layer's path choice depends on besides its own grid and the call's size: a layer that cached its choice
    (QuantLinear's fast path) reuses it while this is unchanged (the probes' functions are part of it, so that a
    test or benchmark that replaces one invalidates every cached choice)."""
    return (enabled(), _four_forced, _own_preferred, activation_bits(), ACT8_TOKENS, torch.get_num_threads(), crossover,
            four_bit, eight_bit)  # fmt: skip


def choose(kind: str | None, tokens: int, crossover_tokens: int) -> str:
    """The path for a call of `tokens` tokens: the kernel `kind` below the crossover, else "dense"."""
    if kind is None or tokens >= crossover_tokens:
        return "dense"
    return kind
