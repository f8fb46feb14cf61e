"""budgetlm's own CPU code in C, built on the host at first use and called through ctypes: the 4- and 8-bit
kernels (q4.c, q4a8.c, q4bf.c, q8.c, used by methods/quant/kernels.py), the decoder-layer glue of the lean runtime
(ops.c, decode/lean.py) and its one-call decode step (step.c, decode/lean_step.py).

The C sources ship with the package; the first process that needs it compiles it with the host's C compiler
(`cc`, or $CC) into a cache folder ($BUDGETLM_CACHE/native, default ~/.cache/budgetlm/native), under a name that
hashes the source, the compiler's version and the machine, so a shared home on another CPU builds its own copy.
The build writes a temporary file and renames it: processes building at once never load a half-written library.
No compiler, or a failed build, leaves the kernel unavailable (`status()` says why) and every layer on torch's
paths; nothing fails. The AVX2 path is used only where the CPU runs AVX2 and FMA (checked by the library itself,
so that it never executes an instruction the CPU lacks; likewise q4bf.c's AVX-512 BF16 path, `bf16_simd()`);
whether budgetlm *takes* a kernel at all is decided by timing it against torch's on the host
(methods/quant/kernels.py), never by CPU flags.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

import torch

SOURCES = [Path(__file__).with_name(name) for name in ("q4.c", "q8.c", "ops.c", "q4a8.c", "q4bf.c", "step.c")]
FLAGS = ["-O3", "-shared", "-fPIC", "-std=gnu11"]
_status = "not built"


def cache_dir() -> Path:
    root = os.environ.get("BUDGETLM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "budgetlm")
    return Path(root) / "native"


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")


def _build(cc: str) -> Path:
    """The compiled library for this source, compiler and machine (built once, then found in the cache)."""
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    source = b"".join(path.read_bytes() for path in SOURCES)
    key = hashlib.sha256(source + version.encode() + platform.machine().encode() + " ".join(FLAGS).encode())
    out = cache_dir() / f"q4-{key.hexdigest()[:16]}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=".q4-", suffix=".so.tmp")
    os.close(fd)
    try:
        errors = ""
        for extra in (["-fopenmp"], []):  # OpenMP threads where the compiler has them, else one thread
            cmd = [cc, *FLAGS, *extra, "-o", tmp, *map(str, SOURCES), "-lm"]
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            if r.returncode == 0:
                os.replace(tmp, out)
                return out
            errors = r.stderr.strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"{cc} failed: {errors[0]}")
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@lru_cache(maxsize=1)
def library() -> ctypes.CDLL | None:
    """The loaded kernel library, or None where it cannot be built here (`status()` says why)."""
    global _status
    if os.environ.get("BUDGETLM_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
        _status = "off (BUDGETLM_NATIVE=0)"
        return None
    cc = _compiler()
    if cc is None:
        _status = "no C compiler (cc / $CC) on this host"
        return None
    try:
        lib = ctypes.CDLL(str(_build(cc)))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        _status = f"build failed: {e}"
        return None
    c_int, ptr = ctypes.c_int, ctypes.c_void_p
    lib.q4_mm.argtypes = [ptr, c_int, c_int, ptr, c_int, c_int, ptr, ptr, c_int, ptr, c_int, c_int]
    lib.q4_mm.restype = c_int
    lib.q4_has_simd.restype = c_int
    lib.q4a8_mm.argtypes = lib.q4_mm.argtypes
    lib.q4a8_mm.restype = c_int
    lib.q4bf_mm.argtypes = lib.q4_mm.argtypes
    lib.q4bf_mm.restype = c_int
    lib.q4bf_has_simd.restype = c_int
    # x, M, K, hi codes, hi scales, hi zeros, lo codes, lo scales, lo zeros, N, block, group, y, threads, simd
    lib.q8bf_mm.argtypes = [ptr, c_int, c_int, ptr, ptr, ptr, ptr, ptr, ptr, c_int, c_int, c_int, ptr, c_int, c_int]
    lib.q8bf_mm.restype = c_int
    lib.q4bf_round.argtypes = [ptr, ctypes.c_int64, ptr]
    lib.q4bf_round.restype = None
    lib.q8_mm.argtypes = [ptr, c_int, c_int, ptr, c_int, ptr, ptr, c_int, c_int]
    lib.q8_mm.restype = c_int
    c_float = ctypes.c_float
    lib.lean_rms_norm.argtypes = [ptr, ptr, c_int, c_int, c_float, ptr, c_int]
    lib.lean_rms_norm.restype = None
    lib.lean_add_rms_norm.argtypes = [ptr, ptr, ptr, c_int, c_int, c_float, ptr, c_int]
    lib.lean_add_rms_norm.restype = None
    lib.lean_rope_store.argtypes = [ptr, ptr, ptr, ptr, ptr, c_int, c_int, c_int, c_int, ptr, ptr, c_int, c_int]
    lib.lean_rope_store.restype = None
    # q, keys, values, M, heads, kv_heads, head_dim, capacity, start, scale, window, sinks, out, simd, threads
    att = [ptr, ptr, ptr, c_int, c_int, c_int, c_int, c_int, c_int, c_float, c_int, c_int, ptr, c_int, c_int]
    lib.lean_attention.argtypes = att
    lib.lean_attention.restype = c_int
    lib.lean_rope_store_kv.argtypes = [*lib.lean_rope_store.argtypes, c_int]  # ..., bfloat16 caches
    lib.lean_rope_store_kv.restype = None
    lib.lean_attention_kv.argtypes = [*att, c_int]
    lib.lean_attention_kv.restype = c_int
    lib.lean_silu_mul.argtypes = [ptr, ptr, c_int, ptr]
    lib.lean_silu_mul.restype = None
    lib.lean_gelu_tanh_mul.argtypes = [ptr, ptr, c_int, ptr]
    lib.lean_gelu_tanh_mul.restype = None
    lib.lean_step.argtypes = [ptr, ptr, ptr, c_int, c_int, c_int, ptr, ptr, c_int, ptr, ptr, ptr, ptr, ptr, ptr,
                              c_int, c_int]  # fmt: skip
    lib.lean_step.restype = c_int
    lib.lean_step_scratch.argtypes = [ptr, c_int]
    lib.lean_step_scratch.restype = ctypes.c_int64
    lib.step_dense_mm.argtypes = [ptr, c_int, c_int, ptr, c_int, ptr, c_int, c_int]
    lib.step_dense_mm.restype = None
    _status = "built (AVX2)" if lib.q4_has_simd() else "built (plain C: no AVX2/FMA on this CPU)"
    _status += ", q4bf: AVX-512 BF16" if lib.q4bf_has_simd() else ", q4bf: plain C (no AVX-512 BF16)"
    return lib


def status() -> str:
    library()
    return _status


@lru_cache(maxsize=1)
def simd() -> int:
    lib = library()
    return int(lib.q4_has_simd()) if lib is not None else 0


@lru_cache(maxsize=1)
def bf16_simd() -> int:
    """1 where q4bf.c's AVX-512 BF16 path runs on this CPU (cpuid, checked by the library)."""
    lib = library()
    return int(lib.q4bf_has_simd()) if lib is not None else 0


def _kernel(lib, act8: bool, bf16: bool):
    """(C function, its name, its `simd` argument) of the 4-bit kernel asked for."""
    if act8 and bf16:
        raise ValueError("a 4-bit call takes int8 (act8) or bfloat16 (bf16) activations, not both")
    if bf16:
        return lib.q4bf_mm, "q4bf_mm", bf16_simd()
    return (lib.q4a8_mm, "q4a8_mm", simd()) if act8 else (lib.q4_mm, "q4_mm", simd())


def bf16_round(x: torch.Tensor) -> torch.Tensor:
    """x (float32) rounded to bfloat16 by q4bf.c's own rounding, as float32 (tests)."""
    lib = library()
    if lib is None:
        raise RuntimeError(f"budgetlm's 4-bit kernel is unavailable: {status()}")
    x = x.float().contiguous()
    out = torch.empty(x.shape, dtype=torch.int16)
    lib.q4bf_round(x.data_ptr(), x.numel(), out.data_ptr())
    return (out.int() << 16).view(torch.float32)


def _check_q4(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g: int, k: int) -> None:
    """Refuses 4-bit codes and tables that are not contiguous uint8 / float16 or do not make an N x k weight."""
    for t, dtype in ((packed, torch.uint8), (scales, torch.float16), (zeros, torch.float16)):
        if t.dtype != dtype or not t.is_contiguous():
            raise RuntimeError(f"q4_mm takes contiguous {dtype} tensors, not {t.dtype}")
    n = scales.shape[1]
    if packed.numel() * 2 != n * k or zeros.shape != scales.shape or scales.shape[0] * g != k:
        raise RuntimeError(f"q4_mm: codes {tuple(packed.shape)} and tables {tuple(scales.shape)} do not make {n}x{k}")


def q4_mm(x: torch.Tensor, packed: torch.Tensor, block: int, scales: torch.Tensor, zeros: torch.Tensor, g: int,
          threads: int | None = None, vector: bool = True, act8: bool = False,
          bf16: bool = False) -> torch.Tensor:  # fmt: skip
    """x [M, K] float32 times the 4-bit weight of `packed` (uint8 [N, K/2], torch's CPU layout with blocks of
    `block` rows) with float16 `scales` and zero points `zeros` [K/g, N]: float32 [M, N]. `threads` defaults to
    torch's; `vector=False` takes the plain C path even where the AVX2 one runs (tests). `act8=True`: q4a8.c,
    the activations quantised to int8 per block of 32 columns (lossy; g a multiple of 32). `bf16=True`: q4bf.c,
    the activations rounded to bfloat16 (lossy; AVX-512 BF16 where the CPU has it, `vector=False`: plain C)."""
    lib = library()
    if lib is None:
        raise RuntimeError(f"budgetlm's 4-bit kernel is unavailable: {status()}")
    x = x.contiguous() if x.dtype == torch.float32 else x.float().contiguous()
    m, k = x.shape
    n = scales.shape[1]
    y = torch.empty(m, n, dtype=torch.float32)
    _check_q4(packed, scales, zeros, g, k)
    threads = torch.get_num_threads() if threads is None else threads
    fn, name, vec = _kernel(lib, act8, bf16)
    err = fn(x.data_ptr(), m, k, packed.data_ptr(), n, block, scales.data_ptr(), zeros.data_ptr(), g,
             y.data_ptr(), threads, vec if vector else 0)  # fmt: skip
    if err:
        raise RuntimeError(f"{name} refused a {n}x{k} layer (block {block}, group {g}): code {err}")
    return y


def bind_q4(packed: torch.Tensor, block: int, scales: torch.Tensor, zeros: torch.Tensor, g: int,
            act8: bool = False, vector: bool = True, bf16: bool = False):  # fmt: skip
    """q4_mm for one layer with its arguments checked once: call(x [M, K]) -> float32 [M, N]. The tensors must stay
    alive and unchanged while the call is used (the layer that binds them holds them). `act8`, `vector`, `bf16`: as
    in q4_mm."""
    lib = library()
    if lib is None:
        raise RuntimeError(f"budgetlm's 4-bit kernel is unavailable: {status()}")
    n, k = scales.shape[1], scales.shape[0] * g
    q4_mm(torch.zeros(1, k), packed, block, scales, zeros, g, threads=1, act8=act8, bf16=bf16)  # validates the shapes
    fn, _, vec = _kernel(lib, act8, bf16)
    pp, sp, zp, vec = packed.data_ptr(), scales.data_ptr(), zeros.data_ptr(), vec if vector else 0
    threads = torch.get_num_threads
    held = (packed, scales, zeros)  # the pointers above stay valid while the call exists

    def call(x: torch.Tensor, _held=held) -> torch.Tensor:
        if x.dtype != torch.float32 or not x.is_contiguous():
            x = x.float().contiguous()
        y = torch.empty(x.shape[0], n)
        fn(x.data_ptr(), x.shape[0], k, pp, n, block, sp, zp, g, y.data_ptr(), threads(), vec)
        return y

    return call


def bind_q8bf(hi: torch.Tensor, lo: torch.Tensor, block: int, tables: tuple[torch.Tensor, ...], g: int,
              vector: bool = True):  # fmt: skip
    """An 8-bit grid's two 4-bit halves (packed uint8 [N, K/2] each, torch's CPU layout with blocks of `block` rows)
    with their fp16 tables (s_hi, z_hi, s_lo, z_lo) [K/g, N], on q4bf.c's q8bf_mm: call(x [M, K]) -> float32 [M, N]
    = the q4bf product of each half, added (bfloat16 activations; lossy). Checked once; the tensors must stay alive
    and unchanged while the call is used. `vector=False`: the plain C path (tests)."""
    lib = library()
    if lib is None:
        raise RuntimeError(f"budgetlm's 4-bit kernel is unavailable: {status()}")
    n, k = tables[0].shape[1], tables[0].shape[0] * g
    for half, (s, z) in ((hi, tables[:2]), (lo, tables[2:])):
        _check_q4(half, s, z, g, k)
        if s.shape != tables[0].shape:
            raise RuntimeError(f"q8bf_mm: tables of the halves differ: {tuple(tables[0].shape)}, {tuple(s.shape)}")
    if block <= 0 or block % 16 or n % block or g % 2:
        raise RuntimeError(f"q8bf_mm cannot take a {n}x{k} layer with block {block} and group {g}")
    args = (hi.data_ptr(), *(t.data_ptr() for t in tables[:2]), lo.data_ptr(), *(t.data_ptr() for t in tables[2:]))
    fn, vec, threads = lib.q8bf_mm, bf16_simd() if vector else 0, torch.get_num_threads
    held = (hi, lo, tables)  # the pointers above stay valid while the call exists

    def call(x: torch.Tensor, _held=held) -> torch.Tensor:
        if x.dtype != torch.float32 or not x.is_contiguous():
            x = x.float().contiguous()
        y = torch.empty(x.shape[0], n)
        err = fn(x.data_ptr(), x.shape[0], k, *args, n, block, g, y.data_ptr(), threads(), vec)
        if err:
            raise RuntimeError(f"q8bf_mm failed on a {n}x{k} layer: code {err}")
        return y

    return call


def bind_q8(codes: torch.Tensor, scales: torch.Tensor, vector: bool = True):
    """x [M, K] times int8 codes [N, K] with float16 per-row scales (any [N] or [N, 1] contiguous tensor): a call
    checked once, call(x) -> float32 [M, N]. None where the kernel cannot take the shape (K % 8, odd N).
    `vector=False`: the plain C path (tests)."""
    lib = library()
    if lib is None:
        raise RuntimeError(f"budgetlm's 8-bit kernel is unavailable: {status()}")
    n, k = codes.shape
    if codes.dtype != torch.int8 or not codes.is_contiguous() or scales.dtype != torch.float16:
        raise RuntimeError("q8_mm takes contiguous int8 codes and float16 scales")
    if not scales.is_contiguous() or scales.numel() != n or k % 8 or n % 2:
        return None
    fn, cp, sp, vec = lib.q8_mm, codes.data_ptr(), scales.data_ptr(), simd() if vector else 0
    threads = torch.get_num_threads
    held = (codes, scales)

    def call(x: torch.Tensor, _held=held) -> torch.Tensor:
        if x.dtype != torch.float32 or not x.is_contiguous():
            x = x.float().contiguous()
        y = torch.empty(x.shape[0], n)
        fn(x.data_ptr(), x.shape[0], k, cp, n, sp, y.data_ptr(), threads(), vec)
        return y

    return call
