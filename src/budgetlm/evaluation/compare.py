"""`budgetlm compare DIR_A DIR_B`: item-by-item comparison of two evaluation output folders.

An evaluation folder holds items/<task>.jsonl (one JSON record per item: "id" and that item's fields) and
eval.json ({task: {metric: {value, stderr, n, extra}}}). Items are matched by id within each task both
folders have. Every metric of A's eval.json that declares how it aggregates its items (extra["aggregate"],
see results.Aggregate; a folder written before that falls back to the registered task's declaration) is
recomputed on the matched items exactly as eval computed it, so A's value equals eval.json's when all items
match. Per-item fields that are no metric (token counts, sums) never become rows.

- means of 0/1 values (acc, acc_norm, exact_match*): McNemar's test, with a paired-bootstrap 95% interval
  of B - A;
- other means (rouge_l, ...): paired bootstrap of the mean difference;
- ratios (perplexity = exp(sum nll / sum tokens), kld = sum kld_sum / sum tokens, ...): paired bootstrap of
  the ratio's difference.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from budgetlm.errors import DataError
from budgetlm.evaluation.stats import mcnemar, paired_bootstrap
from budgetlm.results import Aggregate


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


def read_aggregations(folder: Path) -> dict[str, dict[str, Aggregate | None]]:
    """{task: {metric: its declared Aggregate, or None}} in eval.json's order ({} without a readable eval.json)."""
    try:
        data = json.loads((Path(folder) / "eval.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    if not isinstance(data, dict):
        return {}
    out: dict[str, dict[str, Aggregate | None]] = {}
    for task, metrics in data.items():
        if isinstance(metrics, dict):
            out[task] = {
                m: Aggregate.from_dict((row.get("extra") or {}).get("aggregate")) if isinstance(row, dict) else None
                for m, row in metrics.items()
            }
    return out


def task_aggregations(task: str, declared: dict[str, Aggregate | None]) -> dict[str, Aggregate]:
    """The metrics to compare: eval.json's declarations; for an eval.json without any (written by an older
    budgetlm), the registered task's own declaration of the metrics eval.json lists."""
    found = {m: a for m, a in declared.items() if a is not None}
    if found:
        return found
    from budgetlm.data.tasks import tasks as registry

    if task not in registry.names():
        return {}
    own = registry.get(task).aggregations()
    return {m: own[m] for m in (declared or own) if m in own}


def _compare_metric(task: str, metric: str, agg: Aggregate, rows_a: list, rows_b: list, n_boot: int, seed: int):
    if agg.is_mean:
        a, b = [x for x, _ in rows_a], [y for y, _ in rows_b]
        boot = paired_bootstrap(a, b, n_boot=n_boot, seed=seed)
    else:
        boot = paired_bootstrap(rows_a, rows_b, n_boot=n_boot, seed=seed, stat_fn=_statistic(agg))
    row = {"task": task, "metric": metric, "n": len(rows_a)}
    row |= {k: boot[k] for k in ("a", "b", "diff", "ci_low", "ci_high")}
    if agg.is_mean and all(v in (0.0, 1.0) for v in a + b):
        test = mcnemar(a, b)
        row.update(test="mcnemar", p=test["p"], b01=test["b01"], b10=test["b10"])
    else:
        row.update(test="bootstrap", p=boot["p"])
    return row


def _statistic(agg: Aggregate):
    return lambda rows: agg.value(float(rows[:, 0].sum()), float(rows[:, 1].sum()))


def compare_records(
    task: str, metric: str, agg: Aggregate, ra: dict[str, dict], rb: dict[str, dict], n_boot: int = 10000, seed: int = 0
) -> dict | None:
    """One metric of one task compared over the items of A and B ({id: record}) matched by id and valued in both:
    {task, metric, n, a, b, diff, ci_low, ci_high, test, p} (McNemar rows also b01, b10); None when no item pairs."""
    pairs = [(agg.row(ra[i]), agg.row(rb[i])) for i in ra if i in rb]
    pairs = [(x, y) for x, y in pairs if x is not None and y is not None]
    if not pairs:
        return None
    return _compare_metric(task, metric, agg, [x for x, _ in pairs], [y for _, y in pairs], n_boot, seed)


def compare(dir_a: Path, dir_b: Path, n_boot: int = 10000, seed: int = 0) -> list[dict]:
    """Rows {task, metric, n, a, b, diff, test, p, ci_low, ci_high, matched, n_a, n_b} for every task both
    folders log per item and every metric A's eval.json declares: n items compared (matched by id and valued
    in both), matched items of the task, n_a and n_b items in A and in B; McNemar rows also carry b01 and b10."""
    items_a, items_b = read_items(Path(dir_a)), read_items(Path(dir_b))
    declared = read_aggregations(Path(dir_a))
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
        sizes = {"matched": len(matched), "n_a": len(ra), "n_b": len(rb)}
        for metric, agg in task_aggregations(task, declared.get(task, {})).items():
            row = compare_records(task, metric, agg, ra, rb, n_boot, seed)
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
    if x != 0 and abs(x) < 0.01:
        return f"{x:.3g}"  # a small kld keeps its digits
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
