"""Peak resident memory of one phase of this process, from a sampler of RSS.

`PeakRSS` samples /proc/self/statm every ~5 ms in a background thread. It also reads the kernel's high-water
mark VmHWM: that is a process-lifetime figure, so on entry the block tries to reset it (writing "5" to
/proc/self/clear_refs, Linux >= 4.0) and uses it only when the reset worked or the mark rose inside the block;
otherwise the sampled maximum stands alone. The cell runner wraps its phases ("load", "evaluation",
"benchmark") with it and stores `.metric()` as the phase's `peak_rss_bytes`:

    with PeakRSS("load") as mem:
        handle = load(...)
    mem.peak_bytes, mem.start_bytes
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator

from budgetlm.results import Metric

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    """Current resident set size of this process in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def hwm_bytes() -> int | None:
    """The kernel's peak RSS of this process (VmHWM), or None when /proc does not say."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def reset_hwm() -> bool:
    """Reset VmHWM to the current RSS; False when the kernel or the sandbox does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


_LIBC = None


def _glibc():
    """glibc through ctypes (malloc_trim, mallopt), or None where the C library is another one."""
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes

            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim  # noqa: B018 - AttributeError on a libc without it
            _LIBC.mallopt  # noqa: B018
        except (OSError, AttributeError):
            _LIBC = False
    return _LIBC or None


def release_freed_heap() -> bool:
    """Give the heap memory this process has freed back to the OS (glibc's malloc_trim); False where there is no
    glibc. Layer-by-layer work frees tens of MB per layer in blocks glibc keeps mapped: without this the RSS
    climbs by ~50 MB per decoder layer of SmolLM2 under GPTQ although the live memory falls."""
    libc = _glibc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
MMAP_THRESHOLD_MAX = 32 << 20  # glibc's ceiling for its dynamic threshold on 64-bit
_MAPPED_DEPTH = 0


@contextlib.contextmanager
def mapped_large_buffers(threshold: int = 1 << 20) -> Iterator[bool]:
    """Inside the block, glibc serves every allocation of at least `threshold` bytes with its own mapping, so
    the memory of a freed activation goes back to the OS at once (yields False where there is no glibc).

    By default glibc raises its mapping threshold each time a mapped block is freed (up to 32 MiB), after
    which multi-MB activations come from the heap, where a layer pass that keeps some buffers and frees others
    leaves freed holes the RSS keeps: for GPTQ's one-pass calibration of SmolLM2 that was 150-300 MB above
    the live tensors. The cost is a page fault per fresh page of each new buffer. glibc still serves a request
    from a free chunk already in the heap's bins before it maps anything, so in a long-lived process that has
    fragmented its heap some buffers come from there (the CLI and each benchmark row start a fresh process).
    On exit the threshold is set to glibc's 32 MiB ceiling, the value its dynamic rule reaches in a process
    that frees large buffers."""
    global _MAPPED_DEPTH
    libc = _glibc()
    if libc is None:
        yield False
        return
    if _MAPPED_DEPTH == 0:  # nested blocks (a calibration inside another's loop) leave it to the outermost
        libc.mallopt(M_MMAP_THRESHOLD, threshold)
    _MAPPED_DEPTH += 1
    try:
        yield True
    finally:
        _MAPPED_DEPTH -= 1
        if _MAPPED_DEPTH == 0:
            libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)


class PeakRSS:
    """Context manager: peak and starting RSS of the block, in bytes."""

    def __init__(self, phase: str = "", interval: float = 0.005, sample: bool = True):
        """`sample=False`: no sampling thread where VmHWM can be reset on entry (it is then the block's exact peak,
        and a thread waking every `interval` takes time from a timed block's compute threads: ~4% of a 2-thread
        forward on 2 cores); sampled as usual where it cannot."""
        self.phase = phase
        self.interval = interval
        self.sample = sample
        self.start_bytes = 0
        self.end_bytes = 0
        self.sampled_peak = 0
        self.hwm_peak: int | None = None
        self.hwm_reset = False
        self.samples = 0
        self.sampled = True  # a thread sampled statm (sample=False where VmHWM could be reset: no thread)
        self.seconds = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._take()
            self._stop.wait(self.interval)

    def _take(self) -> None:
        rss = rss_bytes()
        self.samples += 1
        if rss > self.sampled_peak:
            self.sampled_peak = rss

    def __enter__(self) -> PeakRSS:
        self.hwm_reset = reset_hwm()
        self._hwm_start = hwm_bytes()
        self.start_bytes = rss_bytes()
        self.sampled_peak = self.start_bytes
        self._t0 = time.perf_counter()
        self._stop.clear()
        self._thread = None
        self.sampled = self.sample or not self.hwm_reset
        if self.sampled:
            self._thread = threading.Thread(target=self._sample, name=f"peak-rss-{self.phase}", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._take()
        self.end_bytes = rss_bytes()
        self.seconds = time.perf_counter() - self._t0
        hwm = hwm_bytes()
        # VmHWM belongs to this block only if it was reset on entry or rose during the block
        if hwm is not None and (self.hwm_reset or (self._hwm_start is not None and hwm > self._hwm_start)):
            self.hwm_peak = hwm
        else:
            self.hwm_peak = None

    @property
    def peak_bytes(self) -> int:
        return max(self.sampled_peak, self.hwm_peak or 0)

    @property
    def delta_bytes(self) -> int:
        """Peak above the starting RSS: what the block itself added at its worst."""
        return self.peak_bytes - self.start_bytes

    def metric(self) -> Metric:
        how = f"sampled /proc/self/statm every {self.interval * 1000:g} ms" if self.sampled else "statm on exit"
        if self.hwm_peak is not None:
            how += " + VmHWM" + (" (reset on entry)" if self.hwm_reset else " (rose inside the block)")
        return Metric(
            float(self.peak_bytes),
            n=self.samples,
            unit="B",
            extra={
                "phase": self.phase,
                "start_bytes": self.start_bytes,
                "end_bytes": self.end_bytes,
                "delta_bytes": self.delta_bytes,
                "seconds": round(self.seconds, 3),
                "method": how,
            },
        )
