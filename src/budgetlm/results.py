"""The one results schema: a Metric is a value with its standard error, item count, unit and source.

Rows in the store are (cell_id, task_or_phase, metric, value, stderr, n, unit, source); lower layers
produce {task_or_phase: {metric: Metric}} and the experiment layer adds the cell id.
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


def mean_stderr(values: list[float]) -> tuple[float, float]:
    """Mean and the standard error of the mean (sample sd / sqrt(n)), as lm-eval reports it."""
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def flatten(results: dict[str, dict[str, Metric]]) -> dict[str, dict[str, float]]:
    """{'task': {'metric': value}} for --json output."""
    return {task: {m: met.value for m, met in metrics.items()} for task, metrics in results.items()}
