"""`budgetlm compare DIR_A DIR_B`: item-by-item comparison of two evaluation output folders.

An evaluation folder holds items/<task>.jsonl (one JSON record per item: "id" and that item's metric
values) and eval.json ({task: {metric: {value, stderr, n, ...}}}). Items are matched by id within each
task both folders have; every metric both record per item is compared on the matched items:

- 0/1 metrics (acc, acc_norm, exact_match*): McNemar's test, with a paired-bootstrap 95% interval of B - A;
- continuous metrics (kld, rougeL, ...): paired bootstrap of the mean difference;
- per-item "nll" with "tokens": perplexity exp(sum nll / sum tokens), paired bootstrap of its difference.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from budgetlm.errors import DataError
from budgetlm.evaluation.stats import mcnemar, paired_bootstrap, perplexity

NOT_METRICS = {"id", "target", "pred", "label", "index", "tokens", "nll", "n_tokens"}
PERPLEXITY_NAMES = ("perplexity", "ppl", "word_perplexity")


def _is_binary_name(metric: str) -> bool:
    return metric in ("acc", "acc_norm") or metric.startswith("exact_match")


def _number(v) -> float | None:
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, int | float) and math.isfinite(float(v)):
        return float(v)
    return None


def read_items(folder: Path) -> dict[str, dict[str, dict]]:
    """{task: {id: record}} from folder/items/*.jsonl; DataError when there are none or a line is bad."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder} is not a folder; give the --out folder of a budgetlm eval run")
    files = sorted((folder / "items").glob("*.jsonl"))
    if not files:
        raise DataError(
            f"{folder} has no per-item logs (items/<task>.jsonl); write them with: budgetlm eval MODEL --out {folder}"
        )
    out = {}
    for path in files:
        records: dict[str, dict] = {}
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                item_id = str(rec["id"])
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise DataError(f"{path} line {lineno} is not a JSON record with an 'id' ({e})") from None
            if item_id in records:
                raise DataError(f"{path} line {lineno} repeats the item id {item_id!r}")
            records[item_id] = rec
        out[path.stem] = records
    return out


def read_metric_order(folder: Path) -> dict[str, list[str]]:
    """Metric names per task in eval.json's order ({} when there is no readable eval.json)."""
    try:
        data = json.loads((Path(folder) / "eval.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    return {task: list(metrics) for task, metrics in data.items() if isinstance(metrics, dict)}


def _metric_names(recs_a: list[dict], recs_b: list[dict], order: list[str]) -> list[str]:
    names = set()
    for recs in (recs_a, recs_b):
        for r in recs:
            names |= {k for k, v in r.items() if k not in NOT_METRICS and _number(v) is not None}
    common = {m for m in names if any(m in r for r in recs_a) and any(m in r for r in recs_b)}
    return [m for m in order if m in common] + sorted(common - set(order))


def _compare_metric(task, metric, pairs, n_boot, seed) -> dict:
    a = [x for x, _ in pairs]
    b = [y for _, y in pairs]
    boot = paired_bootstrap(a, b, n_boot=n_boot, seed=seed)
    row = {
        "task": task,
        "metric": metric,
        "n": len(pairs),
        "a": boot["a"],
        "b": boot["b"],
        "diff": boot["diff"],
        "ci_low": boot["ci_low"],
        "ci_high": boot["ci_high"],
    }
    if _is_binary_name(metric) and all(v in (0.0, 1.0) for v in a + b):
        test = mcnemar(a, b)
        row.update(test="mcnemar", p=test["p"], b01=test["b01"], b10=test["b10"])
    else:
        row.update(test="bootstrap", p=boot["p"])
    return row


def _compare_perplexity(task, name, matched, ra, rb, n_boot, seed) -> dict | None:
    rows_a, rows_b = [], []
    for i in matched:
        va = (_number(ra[i].get("nll")), _number(ra[i].get("tokens")))
        vb = (_number(rb[i].get("nll")), _number(rb[i].get("tokens")))
        if None not in va and None not in vb:
            rows_a.append(va)
            rows_b.append(vb)
    if not rows_a or sum(t for _, t in rows_a) <= 0 or sum(t for _, t in rows_b) <= 0:
        return None
    boot = paired_bootstrap(rows_a, rows_b, n_boot=n_boot, seed=seed, stat_fn=perplexity)
    return {
        "task": task,
        "metric": name,
        "n": len(rows_a),
        "a": boot["a"],
        "b": boot["b"],
        "diff": boot["diff"],
        "ci_low": boot["ci_low"],
        "ci_high": boot["ci_high"],
        "test": "bootstrap",
        "p": boot["p"],
    }


def compare(dir_a: Path, dir_b: Path, n_boot: int = 10000, seed: int = 0) -> list[dict]:
    """Rows {task, metric, n, a, b, diff, test, p, ci_low, ci_high, matched, n_a, n_b} for every task and
    metric both folders log per item: n items compared (matched by id and valued in both), matched items
    of the task, n_a and n_b items in A and in B; McNemar rows also carry b01 and b10."""
    items_a, items_b = read_items(Path(dir_a)), read_items(Path(dir_b))
    order_a = read_metric_order(Path(dir_a))
    tasks = [t for t in items_a if t in items_b]
    if not tasks:
        raise DataError(f"{dir_a} and {dir_b} share no task: A has {', '.join(items_a)}; B has {', '.join(items_b)}")
    rows: list[dict] = []
    total_matched = 0
    for task in tasks:
        ra, rb = items_a[task], items_b[task]
        matched = [i for i in ra if i in rb]
        total_matched += len(matched)
        if not matched:
            continue
        recs_a, recs_b = [ra[i] for i in matched], [rb[i] for i in matched]
        sizes = {"matched": len(matched), "n_a": len(ra), "n_b": len(rb)}
        order = order_a.get(task, [])
        for metric in _metric_names(recs_a, recs_b, order):
            pairs = [(_number(x.get(metric)), _number(y.get(metric))) for x, y in zip(recs_a, recs_b)]
            pairs = [(x, y) for x, y in pairs if x is not None and y is not None]
            if pairs:
                rows.append({**_compare_metric(task, metric, pairs, n_boot, seed), **sizes})
        if any("nll" in r and "tokens" in r for r in recs_a):
            name = next((m for m in order if m in PERPLEXITY_NAMES), "perplexity")
            row = _compare_perplexity(task, name, matched, ra, rb, n_boot, seed)
            if row is not None:
                rows.append({**row, **sizes})
    if total_matched == 0:
        raise DataError(
            f"no item ids match between {dir_a} and {dir_b} (tasks {', '.join(tasks)}); "
            "evaluate both on the same items (same --limit and --seed)"
        )
    return rows


def _num(x: float) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.4f}" if abs(x) < 100 else f"{x:.1f}"


def _signed(x: float) -> str:
    return ("+" if x >= 0 else "") + _num(x)


def _p(p: float) -> str:
    return "<0.0001" if p < 1e-4 else f"{p:.4f}"


def format_table(rows: list[dict]) -> str:
    """A plain-text table: one line per task and metric, then how many items each task matched."""
    header = ["task", "metric", "n", "A", "B", "B-A", "95% CI", "test", "p"]
    body = [
        [
            r["task"],
            r["metric"],
            str(r["n"]),
            _num(r["a"]),
            _num(r["b"]),
            _signed(r["diff"]),
            f"[{_signed(r['ci_low'])}, {_signed(r['ci_high'])}]",
            r["test"],
            _p(r["p"]),
        ]
        for r in rows
    ]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    right = {2, 3, 4, 5, 8}
    lines = []
    for line in [header, *body]:
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths))]
        lines.append("  ".join(cells).rstrip())
    lines.insert(1, "-" * len(lines[0]))
    seen = {}
    for r in rows:
        seen.setdefault(r["task"], (r.get("n_a"), r.get("n_b"), r.get("matched", r["n"])))
    for task, (n_a, n_b, n) in seen.items():
        lines.append(f"{task}: {n} items matched by id (A has {n_a}, B has {n_b})")
    mc = [r for r in rows if r["test"] == "mcnemar"]
    if mc:
        lines.append("mcnemar: exact binomial under 25 discordant items, else chi-square with continuity correction;")
        lines.append("95% CI: paired bootstrap of B - A over the matched items")
    return "\n".join(lines)
