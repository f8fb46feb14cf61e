"""Numbers for people: the text a human table shows for a measured value (JSON output keeps raw numbers).

Bytes in decimal units (KB, MB, GB: 10^3, 10^6, 10^9 bytes, as the reports use), seconds as s / min / h,
counts in thousands or millions, other values with 4 significant digits and thousands separators (never
exponent notation below 10^9). And back: sizes and times a person types (`--max-size 1.5GiB`, `--max-ms-per-token
30`) as numbers, a one-line error for anything else.
"""

from __future__ import annotations

import math
import re

from budgetlm.errors import ConfigError, suggest

_BYTE_UNITS = ((1e12, "TB"), (1e9, "GB"), (1e6, "MB"), (1e3, "KB"))


def human_bytes(n: float) -> str:
    """171_400_000 -> '171.4 MB'; under 1 KB in bytes."""
    for size, name in _BYTE_UNITS:
        if abs(n) >= size:
            return f"{n / size:.1f} {name}"
    return f"{n:.0f} B"


def byte_unit(largest: float) -> tuple[float, str]:
    """(scale, name) of the unit a column of byte counts is shown in: the one its largest value fits."""
    for size, name in _BYTE_UNITS:
        if abs(largest) >= size:
            return size, name
    return 1.0, "B"


def human_seconds(s: float) -> str:
    """0.0421 -> '0.042 s', 6.03 -> '6.0 s', 552 -> '9 min 12 s', 7300 -> '2 h 01 min'."""
    if s < 1:
        return f"{s:.2g} s"
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        m, sec = divmod(round(s), 60)
        return f"{m} min {sec:02d} s"
    h, m = divmod(round(s / 60), 60)
    return f"{h} h {m:02d} min"


def human_count(n: float) -> str:
    """134_515_008 -> '134.5 M', 46_080 -> '46.1 k', 512 -> '512'."""
    if abs(n) >= 1e9:
        return f"{n / 1e9:.2f} G"
    if abs(n) >= 1e6:
        return f"{n / 1e6:.1f} M"
    if abs(n) >= 1e4:
        return f"{n / 1e3:.1f} k"
    return f"{n:,.0f}" if float(n).is_integer() else f"{n:.4g}"


def number(x: float) -> str:
    """4 significant digits; thousands separators from 10^4 (no '8.375e+07'); exponent only from 10^9."""
    if not math.isfinite(x):
        return str(x)
    if abs(x) >= 1e9:
        return f"{x:.3e}"
    if abs(x) >= 1e4:
        return f"{x:,.0f}"
    return f"{x:.4g}"


def _stderr(se: float | None) -> str:
    """' ± se' to 2 significant digits, without exponent from 100 up (320, not 3.2e+02)."""
    if se is None or math.isnan(se):
        return ""
    if not math.isfinite(se) or se < 100:
        return f" ± {se:.2g}"
    return f" ± {round(se, 1 - int(math.floor(math.log10(se)))):,.0f}"


def format_value(value: float, stderr: float | None = None, unit: str = "") -> str:
    """A measured value with its standard error and unit, as a person reads it."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "nan"
    if unit == "B":
        return human_bytes(value) + (f" ± {human_bytes(stderr)}" if stderr and not math.isnan(stderr) else "")
    if unit == "s":
        return human_seconds(value) + (f" ± {stderr:.2g} s" if stderr and not math.isnan(stderr) else "")
    if unit == "count":
        return human_count(value)
    return number(value) + _stderr(stderr) + (f" {unit}" if unit else "")


# ---------------------------------------------------------------------------------------------- numbers from people

_SIZE_UNITS = {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}
_SIZE_UNITS["TiB"] = 2**40
_AMOUNT = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z]*)\s*$", re.I)


def parse_bytes(text: str, flag: str = "size") -> float:
    """'100MB' -> 1e8, '1.5GiB' -> 1.5 x 2^30 (decimal KB/MB/GB/TB as the tables show them, binary KiB/MiB/GiB/TiB;
    the unit's case does not matter). A bare number, an unknown unit or a size of 0 is a one-line ConfigError
    naming `flag`."""
    match = _AMOUNT.match(str(text))
    units = ", ".join(_SIZE_UNITS)
    if match is None:
        raise ConfigError(f"{flag} {text!r} is not a size; give a number and a unit, e.g. 100MB or 1.5GiB ({units})")
    amount, unit = float(match.group(1)), match.group(2)
    scale = {k.lower(): v for k, v in _SIZE_UNITS.items()}.get(unit.lower())
    if not unit:
        raise ConfigError(f"{flag} {text!r} has no unit; give one, e.g. {match.group(1)}MB ({units})")
    if scale is None:
        raise ConfigError(f"{flag} {text!r}: unknown unit '{unit}'{suggest(unit, _SIZE_UNITS)}; use {units}")
    if not amount > 0 or not math.isfinite(amount):
        raise ConfigError(f"{flag} {text!r} must be a positive size, e.g. 100MB")
    return amount * scale


def parse_ms(text: str, flag: str = "time") -> float:
    """'30' or '30ms' -> 30.0, '0.03s' -> 30.0 (milliseconds); anything else, or not above 0, is a one-line
    ConfigError naming `flag`."""
    match = _AMOUNT.match(str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in ("", "ms", "s"):
        raise ConfigError(f"{flag} {text!r} is not a time; give milliseconds, e.g. 30 or 30ms (or 0.03s)")
    ms = float(match.group(1)) * (1000.0 if unit == "s" else 1.0)
    if not ms > 0 or not math.isfinite(ms):
        raise ConfigError(f"{flag} {text!r} must be a positive time, e.g. 30 (ms)")
    return ms
