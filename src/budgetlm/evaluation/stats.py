"""Paired statistics for comparing two evaluations item by item, and bootstrap errors of non-mean metrics.

- McNemar's test for accuracies: only the discordant items count (b01: A wrong and B right, b10: A right
  and B wrong). Exact two-sided binomial p-value when there are fewer than 25 of them, otherwise the
  chi-square statistic with continuity correction, (|b01 - b10| - 1)^2 / (b01 + b10), on one degree of freedom.
- Paired bootstrap for continuous metrics: items are resampled with replacement, the same indices for A
  and B, and the statistic's difference B - A is recomputed; the 95% interval is the 2.5/97.5 percentiles
  and the two-sided p-value is the share of replicates at least as far from the observed difference as the
  observed difference is from zero (the bootstrap distribution shifted to the null), with the +1 correction.
- bootstrap_stderr: the standard deviation of a statistic over bootstrap resamples, for metrics that are
  not plain means (perplexity = exp(sum nll / sum tokens)).

Every resample draws its indices with numpy's default_rng(seed).integers(0, n, size=n), one replicate
after another, so results are reproducible and a plain loop with the same seed gives the same numbers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

EXACT_BELOW = 25  # discordant pairs under which McNemar uses the exact binomial test
_CHUNK_ELEMENTS = 2_000_000  # resampled values held in memory at once


def _binary(values: Sequence, which: str) -> list[bool]:
    out = []
    for v in values:
        f = float(v)
        if f not in (0.0, 1.0):
            raise ValueError(f"McNemar needs 0/1 values; {which} has {v!r}")
        out.append(f == 1.0)
    return out


def mcnemar(a: Sequence[bool | float], b: Sequence[bool | float]) -> dict:
    """McNemar's test of paired 0/1 outcomes of systems A and B on the same items."""
    if len(a) != len(b):
        raise ValueError(f"paired samples differ in length: {len(a)} and {len(b)}")
    xa, xb = _binary(a, "a"), _binary(b, "b")
    b01 = sum(1 for x, y in zip(xa, xb) if not x and y)
    b10 = sum(1 for x, y in zip(xa, xb) if x and not y)
    discordant = b01 + b10
    if discordant == 0:
        return {"n": len(a), "b01": 0, "b10": 0, "statistic": None, "p": 1.0, "method": "exact binomial"}
    if discordant < EXACT_BELOW:
        tail = sum(math.comb(discordant, i) for i in range(min(b01, b10) + 1)) / 2**discordant
        p = min(1.0, 2 * tail)
        return {"n": len(a), "b01": b01, "b10": b10, "statistic": None, "p": p, "method": "exact binomial"}
    chi2 = (abs(b01 - b10) - 1) ** 2 / discordant
    p = math.erfc(math.sqrt(chi2 / 2))  # survival function of chi-square with 1 degree of freedom
    return {"n": len(a), "b01": b01, "b10": b10, "statistic": chi2, "p": p, "method": "chi-square, corrected"}


def _resampled_means(d: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    n = len(d)
    chunk = max(1, _CHUNK_ELEMENTS // max(1, n))
    out = np.empty(n_boot)
    for start in range(0, n_boot, chunk):
        k = min(chunk, n_boot - start)
        out[start : start + k] = d[rng.integers(0, n, size=(k, n))].mean(axis=1)
    return out


def paired_bootstrap(
    a: Sequence,
    b: Sequence,
    n_boot: int = 10000,
    seed: int = 0,
    stat_fn: Callable[[np.ndarray], float] | None = None,
) -> dict:
    """Difference B - A of a statistic (the mean by default) over paired items, with its 95% bootstrap
    interval and two-sided p-value. With stat_fn, a and b may hold rows (e.g. (nll, tokens) per item) and
    stat_fn maps an array of resampled rows to a number."""
    xa, xb = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(xa) != len(xb):
        raise ValueError(f"paired samples differ in length: {len(xa)} and {len(xb)}")
    n = len(xa)
    if n == 0:
        raise ValueError("paired bootstrap needs at least one item")
    rng = np.random.default_rng(seed)
    if stat_fn is None:
        value_a, value_b = float(xa.mean()), float(xb.mean())
        boots = _resampled_means(xb - xa, n_boot, rng)
        diff = float((xb - xa).mean())
    else:
        value_a, value_b = float(stat_fn(xa)), float(stat_fn(xb))
        diff = value_b - value_a
        boots = np.empty(n_boot)
        for i in range(n_boot):
            idx = rng.integers(0, n, size=n)
            boots[i] = stat_fn(xb[idx]) - stat_fn(xa[idx])
    lo, hi = np.percentile(boots, [2.5, 97.5])
    extreme = int(np.sum(np.abs(boots - diff) >= abs(diff)))
    return {
        "n": n,
        "a": value_a,
        "b": value_b,
        "diff": diff,
        "ci_low": float(lo),
        "ci_high": float(hi),
        "p": (extreme + 1) / (n_boot + 1),
        "n_boot": n_boot,
    }


def bootstrap_stderr(
    values: Sequence, stat_fn: Callable[[np.ndarray], float], n_boot: int = 1000, seed: int = 0
) -> float:
    """Standard deviation of stat_fn over bootstrap resamples of the items (rows of `values`)."""
    x = np.asarray(values, dtype=float)
    n = len(x)
    if n < 2:
        return float("nan")
    rng = np.random.default_rng(seed)
    stats = np.array([stat_fn(x[rng.integers(0, n, size=n)]) for _ in range(n_boot)])
    return float(stats.std(ddof=1))


def perplexity(rows: np.ndarray) -> float:
    """exp(sum nll / sum tokens) over rows of (nll summed over an item's tokens, number of tokens)."""
    rows = np.asarray(rows, dtype=float)
    return float(math.exp(rows[:, 0].sum() / rows[:, 1].sum()))
