"""What `budgetlm solve` prints: the chosen cell, its Pareto neighbours and the proposals, as text (rich tables on
stdout) or as one JSON object (raw numbers: bytes as bytes, ms as ms; every figure with its source)."""

from __future__ import annotations

import math

from budgetlm.experiments.plan import model_label
from budgetlm.solve.choose import DECODE, SIZE, Candidate, Figure, Solution
from budgetlm.units import format_value


def _figure(f: Figure) -> dict:
    return {
        "value": f.value,
        "unit": f.unit,
        "source": f.source,
        "what": f.what,
        "limit": f.limit,
        "flag": f.flag or None,
        "ok": f.ok,
        **({"projection": f.extra} if f.extra else {}),
        **({"missing": f.missing} if f.value is None else {}),
    }


def _cell(c: Candidate, s: Solution) -> dict:
    return {
        "cell_id": c.cell_id,
        "model": c.cell["model"],
        "pipeline": c.cell["pipeline"],
        "folder": str(c.folder),
        "steps": c.cell["config"].get("steps") or [],
        "metric": {"name": s.metric, "value": c.score, "stderr": c.stderr, "n": c.n},
        "figures": {k: _figure(f) for k, f in c.figures.items()},
        "meets_budget": c.meets,
    }


def to_dict(s: Solution) -> dict:
    limits = {k: getattr(s.limits, k) for k in ("max_size", "max_ms", "max_rss", "device", "context")}
    constraints = [
        {"flag": f.flag, "limit": f.limit, "unit": f.unit, "source": f.source, "what": f.what}
        for f in s.chosen.figures.values()
        if f.limit is not None
    ]
    doc = {
        "study": str(s.directory),
        "task": s.task,
        "task_from": s.task_from,
        "metric": s.metric,
        "higher_is_better": s.higher,
        "limits": limits,
        "constraints": constraints,
        "evaluated": len(s.candidates),
        "meeting": sum(c.meets for c in s.candidates),
        "chosen": _cell(s.chosen, s),
        "neighbours": [{"front": f, "side": side, **_cell(c, s)} for f, side, c in s.neighbours],
        "proposals": [p.to_dict() for p in s.proposals],
        "ran": s.ran,
    }
    return doc


def _score(c: Candidate) -> str:
    value = f"{c.score:.4g}"
    return value + (f" ± {c.stderr:.2g}" if c.stderr is not None and math.isfinite(c.stderr) else "")


def _short(f: Figure) -> str:
    if f.value is None:
        return "-"
    return format_value(f.value, None, f.unit) + ("" if f.source == "measured" else f" ({f.source})")


def print_solution(s: Solution, console, command: str) -> None:
    from rich.table import Table

    c = s.chosen
    n_meet = sum(x.meets for x in s.candidates)
    direction = "higher" if s.higher else "lower"
    console.print(
        f"task {s.task} ({s.task_from}), metric {s.metric} ({direction} is better): {len(s.candidates)} evaluated "
        f"cells, {n_meet} within the budget"
    )
    label = f"{c.cell['pipeline']}" + (f" ({model_label(c.cell['model'])})" if _several(s) else "")
    console.print(f"chosen: {label}, cell {c.cell_id}, {c.folder}")
    console.print(f"  {s.metric} {_score(c)}" + (f" (n {c.n:,})" if c.n else ""))
    for f in c.figures.values():
        limit = f" <= {format_value(f.limit, None, f.unit)} ({f.flag})" if f.limit is not None else ""
        console.print(f"  {f.text()}{limit}")
    how = next((f.extra for f in c.figures.values() if f.extra), None)
    if how:
        console.print(
            f"  projected for {how['device']} at {how['context']:,} tokens of context: a roofline scaled by each cell's"
            f" measured decode over its roofline here (this cell x {how['host_ratio']:.3g}; `budgetlm devices`)"
        )
    sample = c.figures
    cols = ["front", "side", "pipeline", s.metric, sample[SIZE].what, sample[DECODE].what, "within budget"]
    table = Table(title="Pareto neighbours (accuracy vs stored size, accuracy vs decode)")
    for col in cols:
        table.add_column(col)
    merged: dict[tuple[str, str], list[str]] = {}  # a cell beside the chosen one on both fronts: one row
    for front, side, n in s.neighbours:
        merged.setdefault((n.cell_id, side), []).append(front)
    by_id = {n.cell_id: n for _, _, n in s.neighbours}
    for (cell_id, side), fronts in merged.items():
        n = by_id[cell_id]
        name = n.cell["pipeline"] + (f" ({model_label(n.cell['model'])})" if _several(s) else "")
        broken = ", ".join(f.flag for f in n.figures.values() if not f.ok)
        table.add_row(", ".join(fronts), side, name, _score(n), _short(n.figures[SIZE]), _short(n.figures[DECODE]),
                      "yes" if n.meets else f"no ({broken})")  # fmt: skip
    if s.neighbours:
        console.print(table)
    else:
        console.print("Pareto neighbours: none (no other cell on either front)")
    if not s.proposals:
        console.print("proposals: none (every neighbouring setting of these pipelines is in the store or refused)")
        return
    table = Table(title="proposals: pipelines not yet run (neighbouring settings of the best cells)")
    for col in ("pipeline", "from", "change"):
        table.add_column(col)
    for p in s.proposals:
        table.add_row(p.name, p.source, p.change())
    console.print(table)
    console.print(f"`{command} --run` evaluates them as new cells of this study (on each of its models)")


def _several(s: Solution) -> bool:
    return len({c.cell["model"] for c in s.candidates}) > 1
