"""The one results schema: a Metric is a value with its standard error, item count, unit and source.

Rows in the store are (cell_id, task_or_phase, metric, value, stderr, n, unit, source); lower layers
produce {task_or_phase: {metric: Metric}} and the experiment layer adds the cell id.

A task metric computed from per-item records declares how in an `Aggregate` (the mean of one field, or a
ratio of two fields' sums, optionally exp'd or turned into bits): the task computes its value and stderr
from it, eval.json keeps it in the metric's extra["aggregate"], and `budgetlm compare` recomputes the same
statistic on paired items from it, so the two never disagree.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Literal

Source = Literal["measured", "projected", "estimated"]


@dataclass
class Metric:
    value: float
    stderr: float | None = None
    n: int | None = None
    unit: str = ""
    source: Source = "measured"
    extra: dict = field(default_factory=dict)  # how it was measured: batch, dtype, threads, data source...

    def to_dict(self) -> dict:
        return asdict(self)


def ratio_stderr(num: list[float], den: list[float]) -> tuple[float, float]:
    """sum(num) / sum(den) and its delta-method standard error, items being the sampling unit (with every
    den 1 this is the mean and the standard error of the mean, sample sd / sqrt(n), as lm-eval reports it)."""
    n, total = len(num), sum(den)
    r = sum(num) / total if total else float("nan")
    if n < 2 or not total:
        return r, float("nan")
    resid = sum((a - r * b) ** 2 for a, b in zip(num, den))
    return r, math.sqrt(resid / (n * (n - 1))) / (total / n)


FINISH = {"": lambda x: x, "exp": math.exp, "bits": lambda x: x / math.log(2)}


@dataclass(frozen=True)
class Aggregate:
    """A metric from per-item records: mean of the field `of` (per=None), or sum(of) / sum(per) (a ratio:
    token- or byte-weighted), then `finish`: "" as is, "exp" (perplexity from nll per token), "bits" (nats ->
    bits). Items are the sampling unit of the stderr (delta method for ratios; for a mean it is the usual
    sample sd / sqrt(n))."""

    of: str
    per: str | None = None
    finish: str = ""

    def __post_init__(self):
        if self.finish not in FINISH:
            raise ValueError(f"Aggregate.finish must be one of {sorted(FINISH)}, got {self.finish!r}")

    @property
    def is_mean(self) -> bool:
        return self.per is None

    def row(self, record: dict) -> tuple[float, float] | None:
        """(numerator, denominator) of one item; None when the item has no number there (a NaN stays: garbage
        must show in the aggregate, not drop out of it)."""
        num = _number(record.get(self.of))
        den = 1.0 if self.per is None else _number(record.get(self.per))
        return None if num is None or den is None else (num, den)

    def value(self, num_sum: float, den_sum: float) -> float:
        """The statistic from the column sums of the items' rows."""
        if not den_sum:
            return float("nan")
        try:
            return FINISH[self.finish](num_sum / den_sum)
        except OverflowError:
            return float("inf")

    def metric(self, records: list[dict], unit: str = "", extra: dict | None = None) -> Metric:
        rows = [r for r in map(self.row, records) if r is not None]
        _, se = ratio_stderr([a for a, _ in rows], [b for _, b in rows])
        value = self.value(sum(a for a, _ in rows), sum(b for _, b in rows))
        if self.finish == "exp":  # delta method: d exp(r) = exp(r) dr
            se = value * se
        elif self.finish == "bits":
            se = se / math.log(2)
        return Metric(value, se, len(rows), unit, extra={**(extra or {}), "aggregate": self.to_dict()})

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v not in (None, "")}

    @classmethod
    def from_dict(cls, d) -> Aggregate | None:
        """The declaration eval.json holds, or None when it holds none (or a malformed one)."""
        if not isinstance(d, dict) or not isinstance(d.get("of"), str):
            return None
        try:
            return cls(d["of"], d.get("per"), d.get("finish", ""))
        except (TypeError, ValueError):
            return None


def _number(v) -> float | None:
    return float(v) if isinstance(v, int | float) else None


def flatten(results: dict[str, dict[str, Metric]]) -> dict[str, dict[str, float]]:
    """{'task': {'metric': value}} for --json output."""
    return {task: {m: met.value for m, met in metrics.items()} for task, metrics in results.items()}
