"""Device projections of a study's cells for the report, from the results store's rows through hardware/devices.py
(the same roofline and calibration as `budgetlm devices`; nothing is recomputed here). Every figure is projected.

The rows a projection reads: size/stored_bytes, size/read_bytes_per_token, size/params, and for the calibration
speed/decode_ms_per_token and speed/decode_roofline_ms; the KV cache per token comes from the model's config (the
cell's saved model when a step changed it, else the model it started from), as in `budgetlm devices`.
"""

from __future__ import annotations

from pathlib import Path

from budgetlm.errors import BudgetLMError
from budgetlm.hardware import devices as dv

# the report.md cost table's device columns when the recipe names none: an edge board, a GPU board, a laptop
DEFAULT_DEVICES = ("rpi5", "jetson-nano", "apple-m2")
ROWS = tuple(f"size/{m}" for m in dv.SIZE_ROWS) + ("speed/decode_ms_per_token", "speed/decode_roofline_ms")


def chosen_devices(recipe: dict, default: tuple[str, ...] | None) -> dict[str, dv.Device]:
    """The devices a recipe names (`devices:` as a list or a comma-separated string), else `default` (None: every
    profile); an unknown name is a one-line error with the close ones."""
    named = recipe.get("devices")
    profiles = dv.load_devices()
    if named:
        return dv.select(named if isinstance(named, str) else ",".join(map(str, named)), profiles)
    return profiles if default is None else dv.select(",".join(default), profiles)


def project_cells(
    directory: Path, cells: list[dict], devices: dict[str, dv.Device], context: int | None = None
) -> dict[str, dict[str, dict] | str]:
    """{cell_id: {device: projected metrics (devices.project)}, or the reason the cell has no projection}."""
    out: dict[str, dict[str, dict] | str] = {}
    for c in cells:
        saved = Path(directory) / c["folder"] / "model"
        spec = str(saved) if saved.is_dir() else c["model"]
        try:
            work = dv.workload_from_phases(c["phases"], spec, c["label"], c["folder"], context)
        except BudgetLMError as exc:
            out[c["cell_id"]] = str(exc)
            continue
        out[c["cell_id"]] = dv.project_all(work, devices)
    return out


def decode_s(projected: dict) -> tuple[float, bool]:
    """(projected decode seconds per token, fits in the device's memory) of one device's projection."""
    return projected["decode_ms_per_token"].value / 1e3, bool(projected["fits"].value)


def describe(projected: dict, does_not_fit: str = " (does not fit)") -> str:
    """One device's projected decode s/token as a table entry, marked when it does not fit or is uncalibrated."""
    s, fits = decode_s(projected)
    bare = not isinstance(projected["fits"].extra["calibration"], dict)
    return f"{s:.3g}" + ("" if fits else does_not_fit) + (" (uncalibrated)" if bare else "")


def contexts(projections: dict) -> list[int]:
    """The contexts (tokens) the projections were stated at: one per model window, usually a single one."""
    return sorted(
        {next(iter(p.values()))["fits"].extra["context"] for p in projections.values() if isinstance(p, dict) and p}
    )
