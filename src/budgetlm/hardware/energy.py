"""CPU energy from RAPL through Linux powercap, or an honest "unavailable".

Zones are /sys/class/powercap/intel-rapl:N (the AMD driver uses the same names); their counter energy_uj
counts micro-joules and wraps at max_energy_range_uj. `EnergyMeter` reads every top-level package zone on
entry and exit (and polls every `poll_s` seconds in between so that a counter wrapping more than once in a
long block is still counted), and reports the package energy in joules. RAPL counts the whole package: other
processes running at the same time are included, which the metric says. When no zone is readable the meter
has `joules = None` and `note = "unavailable: <reason>"`; there is no fallback constant or estimate.
"""

from __future__ import annotations

import threading
from pathlib import Path

from budgetlm.results import Metric

POWERCAP = Path("/sys/class/powercap")


def _root(root: Path | str | None) -> Path:
    return Path(root) if root is not None else POWERCAP


def zones(root: Path | str | None = None) -> list[Path]:
    """Top-level RAPL zones (intel-rapl:N; sub-zones intel-rapl:N:M are parts of them and are not summed)."""
    r = _root(root)
    if not r.is_dir():
        return []
    return sorted(p for p in r.iterdir() if p.name.startswith("intel-rapl:") and p.name.count(":") == 1)


def _zone_name(z: Path) -> str:
    try:
        return (z / "name").read_text().strip()
    except OSError:
        return z.name


def energy_available(root: Path | str | None = None) -> tuple[bool, str]:
    """(True, "RAPL: zone names") when the counters can be read, else (False, the reason)."""
    r = _root(root)
    if not r.is_dir():
        return False, f"no {r} (kernel without powercap, or not exposed in this VM/container)"
    found = zones(r)
    if not found:
        return False, f"no RAPL zone (intel-rapl:N) under {r}"
    names = []
    for z in found:
        f = z / "energy_uj"
        try:
            int(f.read_text())
        except PermissionError:
            return False, f"permission denied reading {f} (root-only since Linux 5.10; run as root or chmod o+r)"
        except (OSError, ValueError) as exc:
            return False, f"cannot read {f}: {exc}"
        names.append(_zone_name(z))
    return True, "RAPL: " + ", ".join(names)


def read_counters(root: Path | str | None = None) -> dict[str, tuple[int, int]]:
    """zone dir name -> (energy_uj, max_energy_range_uj)."""
    out = {}
    for z in zones(root):
        uj = int((z / "energy_uj").read_text())
        try:
            top = int((z / "max_energy_range_uj").read_text())
        except (OSError, ValueError):
            top = 0
        out[z.name] = (uj, top)
    return out


def delta_uj(start: int, end: int, max_range: int) -> int:
    """Counter increase from start to end, allowing one wrap at max_range."""
    if end >= start:
        return end - start
    if max_range <= 0:
        raise ValueError("RAPL counter went backwards and max_energy_range_uj is unknown")
    return end + max_range - start


class EnergyMeter:
    """Context manager: package energy of the block in joules, or None with an 'unavailable' note."""

    def __init__(self, root: Path | str | None = None, poll_s: float | None = 10.0):
        self.root = _root(root)
        self.poll_s = poll_s
        self.available, reason = energy_available(self.root)
        self.note = f"measured: {reason}" if self.available else f"unavailable: {reason}"
        self.joules: float | None = None
        self.zones: dict[str, float] = {}
        self._uj: dict[str, int] = {}
        self._last: dict[str, tuple[int, int]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _update(self) -> None:
        now = read_counters(self.root)
        with self._lock:
            for name, (uj, top) in now.items():
                prev = self._last.get(name)
                if prev is not None:
                    self._uj[name] = self._uj.get(name, 0) + delta_uj(prev[0], uj, top)
            self._last = now

    def _poll(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self._update()
            except (OSError, ValueError):
                return

    def __enter__(self) -> EnergyMeter:
        if self.available:
            self._uj = {}
            self._last = read_counters(self.root)
            if self.poll_s:
                self._stop.clear()
                self._thread = threading.Thread(target=self._poll, name="rapl-poll", daemon=True)
                self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if not self.available:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            self._update()
        except (OSError, ValueError) as err:
            self.available, self.note, self.joules = False, f"unavailable: counter read failed ({err})", None
            return
        names = {z.name: _zone_name(z) for z in zones(self.root)}
        self.zones = {names.get(k, k): v / 1e6 for k, v in self._uj.items()}
        self.joules = sum(self._uj.values()) / 1e6

    def metric(self, per: float = 1.0, unit: str = "J", **extra) -> Metric | None:
        """Joules divided by `per` (tokens, say), or None when energy is unavailable."""
        if self.joules is None:
            return None
        return Metric(
            self.joules / per,
            unit=unit,
            extra={"zones_j": self.zones, "scope": "whole CPU package (other processes included)", **extra},
        )


def describe() -> str:
    """One line for reports: what energy measurement this host supports."""
    ok, reason = energy_available()
    return ("measured: " if ok else "unavailable: ") + reason
