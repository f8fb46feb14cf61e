"""When a speed figure cannot be trusted: the one rule the CLI tables, the study summary and report.md apply.

A busy machine slows 2-thread torch several times over, so every speed measurement records the load average
(speed.py: loadavg_before / loadavg_after and the usable CPU count; bench.py and host.py: loadavg at the end).
A figure is flagged as contended when the 1-minute load average recorded with it exceeded the number of CPUs
usable here: more runnable threads than cores means other work competed with the measurement. No torch
import, so report and study code can use it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

LOAD_KEYS = ("loadavg_before", "loadavg_after", "loadavg")


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def recorded_load(extras: Iterable[dict]) -> float | None:
    """The highest 1-minute load average recorded in these Metric extras (None when none recorded one)."""
    loads = []
    for extra in extras:
        for key in LOAD_KEYS:
            v = (extra or {}).get(key)
            if isinstance(v, list | tuple) and v and isinstance(v[0], int | float):
                loads.append(float(v[0]))
    return max(loads) if loads else None


def contended(extras: Iterable[dict], cpus: int | None = None) -> str | None:
    """'load 3.10 on 2 CPUs' when the figures of these extras were measured under contention, else None.
    CPUs: the count recorded with the figures ("cpus"), else `cpus`, else the CPUs usable here."""
    extras = [e or {} for e in extras]
    load = recorded_load(extras)
    if load is None:
        return None
    recorded = [e["cpus"] for e in extras if isinstance(e.get("cpus"), int)]
    n = recorded[0] if recorded else (cpus or usable_cpus())
    return f"load {load:.2f} on {n} CPUs" if load > n else None
