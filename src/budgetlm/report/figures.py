"""The figures of a study's HTML report as plain data: what each one draws, from which store rows, and why a figure
or a panel is empty. report/html.py draws them with plotly; the tests check them against the store.

Every function takes the report's done cells (dicts with cell_id, model, pipeline, config, label, folder and
phases = {task_or_phase: {metric: row}}), reads only those rows, and names them in the figure's caption.
  pareto_figures   per task: its headline metric against each cost axis (COST_AXES), the Pareto front, the baseline
  recovery_heatmap pipeline x task: recovery % of the baseline (the store's <metric>_recovery_pct rows)
  device_heatmap   pipeline x device: projected decode s/token (report/projection.py), cells that do not fit marked
  slope_figures    the ranking of pipelines under two conditions, for each pairing the study holds (pairings)
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from budgetlm.experiments import store as st
from budgetlm.experiments.plan import model_label
from budgetlm.experiments.recipe import BASELINE
from budgetlm.report.plots import pareto_front
from budgetlm.report.projection import ROWS as PROJECTION_ROWS
from budgetlm.report.projection import contexts, decode_s, describe

MB = 1e6


@dataclass(frozen=True)
class Axis:
    title: str
    phase: str
    metric: str
    scale: float = 1.0  # the row's value / scale is plotted

    @property
    def row(self) -> str:
        return f"{self.phase}/{self.metric}"


COST_AXES = (
    Axis("stored size (MB)", "size", "stored_bytes", MB),
    Axis("bits per weight (whole model)", "size", "bpw"),
    Axis("decode ms/token (measured)", "speed", "decode_ms_per_token"),
    Axis("peak RSS while benchmarking (MB)", "memory", "peak_rss_benchmark", MB),
)


@dataclass
class Mark:
    """One plotted point: a cell, its coordinates and standard errors (None: not stored)."""

    cell_id: str
    label: str
    folder: str
    x: float
    y: float
    x_err: float | None = None
    y_err: float | None = None
    baseline: bool = False


@dataclass
class Panel:
    axis: Axis
    marks: list[Mark]
    front: list[int]  # indices into marks, by increasing x
    note: str = ""  # why cells are missing, or why the panel is empty


@dataclass
class Figure:
    id: str
    title: str
    caption: str  # the store rows it came from
    note: str = ""  # shown instead of the figure when it has no data


@dataclass
class Pareto(Figure):
    task: str = ""
    metric: str = ""
    higher_is_better: bool = True
    panels: list[Panel] = field(default_factory=list)


@dataclass
class Heatmap(Figure):
    rows: list[str] = field(default_factory=list)  # cell labels
    cols: list[str] = field(default_factory=list)
    values: list[list[float | None]] = field(default_factory=list)
    text: list[list[str]] = field(default_factory=list)
    crossed: list[tuple[int, int]] = field(default_factory=list)  # (row, col) marked: does not fit
    cell_ids: list[str] = field(default_factory=list)
    folders: list[str] = field(default_factory=list)
    colorbar: str = ""
    log: bool = False  # colour by log10 of the value


@dataclass
class Ranked:
    cell_id: str
    label: str
    folder: str
    value: float
    rank: int


@dataclass
class SlopePanel:
    task: str
    metric: str
    higher_is_better: bool
    pairs: list[tuple[Ranked, Ranked]]


@dataclass
class Slope(Figure):
    conditions: tuple[str, str] = ("", "")
    panels: list[SlopePanel] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------- Pareto fronts


def headline(cells: list[dict], task: str) -> str | None:
    return st.main_metric(list(dict.fromkeys(m for c in cells for m in c["phases"].get(task, {}))))


def pareto_figures(cells: list[dict], tasks: list[str]) -> list[Pareto]:
    out = []
    for k, task in enumerate(tasks):
        metric = headline(cells, task)
        if metric is None:
            out.append(Pareto(f"pareto-{k}", f"{task}: Pareto fronts", "", note=f"no {task} rows in the store"))
            continue
        higher = not st.lower_is_better(metric)
        panels = [_panel(cells, task, metric, higher, axis) for axis in COST_AXES]
        if not any(p.marks for p in panels):
            note = "; ".join(p.note for p in panels)
            out.append(Pareto(f"pareto-{k}", f"{task}: Pareto fronts", "", note, task, metric, higher, panels))
            continue
        used = sorted({m.cell_id for p in panels for m in p.marks})
        caption = (
            f"Store rows: y = {task}/{metric}; x = " + ", ".join(a.row for a in COST_AXES)
            + f"; cells {', '.join(used) or 'none'}. Stars: the baseline; red line: the Pareto front (cells no other"
            f" cell beats on both axes: smaller x and {'higher' if higher else 'lower'} {metric})."
        )  # fmt: skip
        arrow = "higher is better" if higher else "lower is better"
        out.append(Pareto(f"pareto-{k}", f"{task}: {metric} ({arrow}) against cost", caption, "", task, metric,
                          higher, panels))  # fmt: skip
    return out


def _panel(cells: list[dict], task: str, metric: str, higher: bool, axis: Axis) -> Panel:
    marks, lacking = [], []
    for c in cells:
        y = c["phases"].get(task, {}).get(metric)
        x = c["phases"].get(axis.phase, {}).get(axis.metric)
        if not _ok(y):
            continue
        if not _ok(x):
            lacking.append(c["cell_id"])
            continue
        marks.append(Mark(c["cell_id"], c["label"], c["folder"], x["value"] / axis.scale, y["value"],
                          _err(x, axis.scale), _err(y), c["pipeline"] == BASELINE))  # fmt: skip
    front = pareto_front([m.x for m in marks], [m.y for m in marks], higher)
    note = f"no {axis.row} in the store for {', '.join(lacking)}" if lacking else ""
    if not marks:
        note = f"no cell has both {axis.row} and {task}/{metric} in the store"
    return Panel(axis, marks, front, note)


# ---------------------------------------------------------------------------------------------- heatmaps


def recovery_heatmap(cells: list[dict], tasks: list[str]) -> Heatmap:
    """Pipeline x task: the recovery % row of each task's headline metric (else its first recovery row)."""
    cols, metrics, skipped = [], [], []
    for task in tasks:
        names = list(dict.fromkeys(m for c in cells for m in c["phases"].get(task, {}) if m.endswith(st.RECOVERY)))
        main = headline(cells, task)
        if not names:
            skipped.append(f"{task}" + (f" ({main} has no recovery %: not an accuracy)" if main else ""))
            continue
        cols.append(task)
        metrics.append(main + st.RECOVERY if main and main + st.RECOVERY in names else names[0])
    fig = Heatmap("recovery", "Recovery % of the baseline, pipeline x task", "", colorbar="recovery %")
    if not cols:
        fig.note = "no recovery % rows in the store" + (f": {'; '.join(skipped)}" if skipped else "")
        return fig
    _rows(fig, cells)
    for c in cells:
        line, text = [], []
        for task, m in zip(cols, metrics):
            row = c["phases"].get(task, {}).get(m)
            ok = _ok(row)
            line.append(row["value"] if ok else None)
            se = row.get("stderr") if ok else None
            text.append("-" if not ok else f"{row['value']:.1f}" + ("" if not _finite(se) else f" ± {se:.1f}"))
        fig.values.append(line)
        fig.text.append(text)
    fig.cols = [f"{t} ({m.removesuffix(st.RECOVERY)})" for t, m in zip(cols, metrics)]
    fig.caption = (
        "Store rows: " + ", ".join(f"{t}/{m}" for t, m in zip(cols, metrics)) + f" of cells {', '.join(fig.cell_ids)}"
        + " (100 x the cell's value / its model's baseline cell's value; '-': not in the store)."
        + (f" Not shown: {'; '.join(skipped)}." if skipped else "")
    )  # fmt: skip
    return fig


def device_heatmap(cells: list[dict], projections: dict, devices: dict) -> Heatmap:
    """Pipeline x device: projected decode seconds per token; a cell that does not fit the device is crossed."""
    fig = Heatmap("devices", "Projected decode s/token, pipeline x device (roofline projection, not measured)", "",
                  colorbar="projected s/token (log colour)", log=True)  # fmt: skip
    names = list(devices)
    projected = [c for c in cells if isinstance(projections.get(c["cell_id"]), dict)]
    reasons = [f"{c['label']}: {projections.get(c['cell_id'], 'not projected')}" for c in cells if c not in projected]
    if not projected:
        fig.note = "no projection: " + ("; ".join(reasons) if reasons else "no finished cells")
        return fig
    _rows(fig, projected)
    fig.cols = names
    for i, c in enumerate(projected):
        line, text = [], []
        for j, name in enumerate(names):
            s, fits = decode_s(projections[c["cell_id"]][name])
            line.append(s)
            text.append(describe(projections[c["cell_id"]][name], " ✗"))
            if not fits:
                fig.crossed.append((i, j))
        fig.values.append(line)
        fig.text.append(text)
    context = " / ".join(f"{n:,}" for n in contexts(projections))
    fig.caption = (
        f"Projected, not measured (hardware/devices.py, as `budgetlm devices`): store rows {', '.join(PROJECTION_ROWS)}"
        f" of cells {', '.join(fig.cell_ids)}; device figures from devices.yaml ({', '.join(names)}). Decode = the"
        f" cell's measured-to-roofline ratio here x max((bytes read per token + KV cache) / bandwidth, 2 x params /"
        f" fp32 peak), at {context} tokens of context. ✗: weights + KV cache + runtime overhead exceed the device's"
        " memory (does not fit); uncalibrated: no decode measured here, the bare roofline."
        + (f" Not projected: {'; '.join(reasons)}." if reasons else "")
    )  # fmt: skip
    return fig


def _rows(fig: Heatmap, cells: list[dict]) -> None:
    fig.rows = [c["label"] for c in cells]
    fig.cell_ids = [c["cell_id"] for c in cells]
    fig.folders = [c["folder"] for c in cells]


# ---------------------------------------------------------------------------------------------- slope charts


def pairings(cells: list[dict]) -> list[tuple[tuple[str, str], list[tuple[dict, dict]]]]:
    """Pairs of cells that differ by one condition, grouped by the condition, where a group holds two pairs or more:
    - the same pipeline on two models (the first model against each other one): a different base;
    - within a model, pipeline B = pipeline A's steps followed (or preceded) by the same extra steps, A not empty:
      before and after a recovery fine-tune, or with and without a quantised base.
    Returns [((condition A, condition B), [(cell A, cell B), ...]), ...]."""
    groups: dict[tuple, list[tuple[dict, dict]]] = {}
    models = list(dict.fromkeys(c["model"] for c in cells))
    for other in models[1:]:
        first = {c["pipeline"]: c for c in cells if c["model"] == models[0]}
        key = ("models", model_label(models[0]), model_label(other))
        groups[key] = [(first[c["pipeline"]], c) for c in cells if c["model"] == other and c["pipeline"] in first]
    for a in cells:
        sa = a["config"].get("steps") or []
        for b in cells:
            sb = b["config"].get("steps") or []
            if not sa or a["model"] != b["model"] or len(sb) <= len(sa):
                continue
            n = len(sb) - len(sa)
            if sb[: len(sa)] == sa:
                groups.setdefault(("after", json.dumps(sb[len(sa) :], sort_keys=True)), []).append((a, b))
            elif sb[n:] == sa:
                groups.setdefault(("first", json.dumps(sb[:n], sort_keys=True)), []).append((a, b))
    kept = {k: v for k, v in groups.items() if len(v) >= 2}
    return [(_conditions(k, kept), v) for k, v in kept.items()]


def _conditions(key: tuple, groups: dict) -> tuple[str, str]:
    """The two conditions' names: the models, or the extra steps by method (with their settings when another
    pairing has the same methods)."""
    if key[0] == "models":
        return key[1], key[2]
    names = _methods(key[1])
    if sum(k[0] == key[0] and _methods(k[1]) == names for k in groups) > 1:
        names = " → ".join(_step_text(s) for s in json.loads(key[1]))
    return (f"before {names}", f"after {names}") if key[0] == "after" else (f"without {names} first", f"{names} first")


def _methods(steps_json: str) -> str:
    return " → ".join(str(s.get("method", "?")) for s in json.loads(steps_json))


def _step_text(step: dict) -> str:
    keys = [k for k in step if k not in ("method", "targets", "ignore", "train")]
    return f"{step.get('method')}(" + ", ".join(f"{k}={step[k]}" for k in keys) + ")"


def slope_figures(cells: list[dict], tasks: list[str]) -> tuple[list[Slope], str]:
    """One slope chart per pairing (a panel per task: each side ranked 1 = best), or a note saying why none."""
    out = []
    for k, (conds, pairs) in enumerate(pairings(cells)):
        panels, rows = [], set()
        for task in tasks:
            metric = headline(cells, task)
            if metric is None:
                continue
            higher = not st.lower_is_better(metric)
            usable = [(a, b) for a, b in pairs if _ok(_row(a, task, metric)) and _ok(_row(b, task, metric))]
            if len(usable) < 2:
                continue
            left = _ranks([a for a, _ in usable], task, metric, higher)
            right = _ranks([b for _, b in usable], task, metric, higher)
            panels.append(SlopePanel(task, metric, higher, list(zip(left, right))))
            rows.add(f"{task}/{metric}")
            for a, b in usable:
                rows.update((a["cell_id"], b["cell_id"]))
        if not panels:
            continue
        metrics = sorted(r for r in rows if "/" in r)
        ids = sorted(r for r in rows if "/" not in r)
        caption = (
            f"Store rows: {', '.join(metrics)} of cells {', '.join(ids)}. Each line joins a pipeline under the two "
            f"conditions; the y axis is its rank among the pipelines of that side (1 = best), its value in the label."
        )
        title = f"Ranking of pipelines: {conds[0]} vs {conds[1]}"
        out.append(Slope(f"slope-{k}", title, caption, "", conds, panels))
    note = "" if out else (
        "No slope chart: the study holds no pairing of two conditions (the same pipelines on two models, or at least "
        "two pipelines each run with and without the same extra steps, such as a recovery fine-tune)."
    )  # fmt: skip
    return out, note


def _ranks(cells: list[dict], task: str, metric: str, higher: bool) -> list[Ranked]:
    values = [_row(c, task, metric)["value"] for c in cells]
    sign = -1 if higher else 1
    ranks = [1 + sum(sign * w < sign * v for w in values) for v in values]  # ties share the better rank
    return [Ranked(c["cell_id"], c["pipeline"], c["folder"], v, r) for c, v, r in zip(cells, values, ranks)]


# ---------------------------------------------------------------------------------------------- rows


def _row(cell: dict, phase: str, metric: str) -> dict | None:
    return cell["phases"].get(phase, {}).get(metric)


def _ok(row: dict | None) -> bool:
    return row is not None and _finite(row.get("value"))


def _finite(x) -> bool:
    return x is not None and not math.isnan(x) and not math.isinf(x)


def _err(row: dict, scale: float = 1.0) -> float | None:
    se = row.get("stderr")
    return se / scale if _finite(se) else None
