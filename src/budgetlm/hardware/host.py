"""Host profile: CPU, memory bandwidth measured here, and the decode roofline it implies.

`memory_bandwidth()` copies a 256 MiB float32 tensor into another with torch (using torch's current thread
count, as decoding does) and counts read + write bytes (2 x buffer per copy), the STREAM "Copy" convention:
the write-allocate read the cache may add is not counted. The value is the best of the repeats (the
attainable rate a roofline needs); the median is in extra. The result is cached per process and per
(size, threads).

A decode step at batch 1 must read every weight it uses once, so bytes_per_token / bandwidth is a lower
bound on its time: `decode_roofline_ms`. Measured decode time is then reported as % of that roofline
(100 % = memory-bound at full bandwidth).
"""

from __future__ import annotations

import math
import os
import statistics
import time
from functools import lru_cache

import torch

from budgetlm.results import Metric

FLAGS_OF_INTEREST = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx512_fp16")
FLAGS_OF_INTEREST += ("avx_vnni", "amx_tile", "amx_bf16", "amx_int8")


def _cpuinfo() -> list[dict[str, str]]:
    procs: list[dict[str, str]] = [{}]
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    if procs[-1]:
                        procs.append({})
                    continue
                key, _, val = line.partition(":")
                procs[-1][key.strip()] = val.strip()
    except OSError:
        return []
    return [p for p in procs if p]


def cpu_model() -> str:
    procs = _cpuinfo()
    return procs[0].get("model name", "unknown") if procs else "unknown"


def _meminfo_bytes(key: str) -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def cpu_profile() -> dict:
    """CPU model, physical cores, logical CPUs usable here, torch threads, SIMD/AMX flags and memory total."""
    procs = _cpuinfo()
    flags = set(procs[0].get("flags", "").split()) if procs else set()
    cores = {(p.get("physical id", "0"), p.get("core id", p.get("processor"))) for p in procs}
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 0
    return {
        "cpu_model": cpu_model(),
        "cores": len(cores) or None,
        "logical_cpus": len(procs) or os.cpu_count(),
        "usable_cpus": usable,
        "torch_threads": torch.get_num_threads(),
        "flags": [f for f in FLAGS_OF_INTEREST if f in flags],
        "mem_total_bytes": _meminfo_bytes("MemTotal"),
        "torch": torch.__version__,
    }


def _matmul_seconds(
    dtype: torch.dtype, tokens: int = 1024, d_in: int = 576, d_out: int = 1536, repeats: int = 5
) -> float:
    """Best-of-`repeats` seconds of one decoder-Linear-shaped matmul (tokens x d_in -> d_out) in `dtype`, with
    torch's threads, after a warm-up call (oneDNN builds its kernel on the first)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, d_in, generator=g).to(dtype)
    w = torch.randn(d_out, d_in, generator=g).to(dtype)
    torch.nn.functional.linear(x, w)
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.nn.functional.linear(x, w)
        best = min(best, time.perf_counter() - t0)
    return best


@lru_cache(maxsize=1)
def bf16_matmul_speedup() -> float:
    """How many times faster a bfloat16 matmul runs than a float32 one on this CPU, measured once per process
    (~0.15 s). It depends on the CPU more than on its flags: ~11x on an Intel Xeon with AMX tiles, 3.9-5.8x on an
    AMD EPYC with native AVX-512 bf16 dot products, ~1/7 on an earlier AMD EPYC where torch emulated bf16."""
    return _matmul_seconds(torch.float32) / _matmul_seconds(torch.bfloat16)


@lru_cache(maxsize=8)
def _bandwidth(size_bytes: int, repeats: int, threads: int) -> tuple[float, float, tuple[float, ...]]:
    n = size_bytes // 4
    src = torch.ones(n, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)  # touch both buffers: page faults are not bandwidth
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        dt = time.perf_counter() - t0
        rates.append(2 * n * 4 / dt / 1e9)
    del src, dst
    return max(rates), statistics.median(rates), tuple(rates)


def memory_bandwidth(size_mb: int = 256, repeats: int = 10) -> Metric:
    """Memory copy bandwidth in GB/s (10^9 bytes/s), best of `repeats`, read + write bytes counted."""
    threads = torch.get_num_threads()
    best, median, rates = _bandwidth(size_mb * 2**20, repeats, threads)
    return Metric(
        best,
        n=repeats,
        unit="GB/s",
        extra={
            "median": median,
            "all": [round(r, 2) for r in rates],
            "buffer_bytes": size_mb * 2**20,
            "counted": "read + write (2 x buffer per copy), STREAM Copy convention; best of repeats",
            "kernel": "torch.Tensor.copy_ float32",
            "threads": threads,
            "loadavg": list(os.getloadavg()),
        },
    )


def decode_roofline_ms(bytes_per_token: float, bandwidth_gb_s: float) -> float:
    """Lower bound on one decode step: bytes read per token / bandwidth, in milliseconds."""
    if bandwidth_gb_s <= 0:
        raise ValueError(f"bandwidth must be positive, got {bandwidth_gb_s}")
    return bytes_per_token / (bandwidth_gb_s * 1e9) * 1e3
