"""Plots of a study, drawn with matplotlib's Agg canvas (no display, no global pyplot state).

pareto_plot: accuracy (or any task's headline metric) against stored size, one panel per task, one labelled
point per cell with its standard error, and the Pareto front: the cells no other cell beats on both axes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Point:
    label: str
    size_mb: float
    value: float
    stderr: float | None = None


@dataclass
class Panel:
    task: str
    metric: str
    higher_is_better: bool
    points: list[Point]
    note: str = ""  # shown instead of points when there are none


def pareto_front(xs: list[float], ys: list[float], higher_is_better: bool = True) -> list[int]:
    """Indices of the points not dominated by another (smaller or equal x and better or equal y, one of
    them strictly), ordered by x. Points with a NaN coordinate are never on the front."""
    sign = 1.0 if higher_is_better else -1.0
    ok = [i for i in range(len(xs)) if not (math.isnan(xs[i]) or math.isnan(ys[i]))]
    front = []
    for i in ok:
        dominated = any(
            xs[j] <= xs[i] and sign * ys[j] >= sign * ys[i] and (xs[j] < xs[i] or sign * ys[j] > sign * ys[i])
            for j in ok
            if j != i
        )
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: (xs[i], -sign * ys[i]))


def pareto_plot(panels: list[Panel], path: str | Path, title: str = "") -> Path:
    """Write a PNG with one panel per task; returns the path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    n = max(1, len(panels))
    cols = min(n, 2)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(6.0 * cols, 4.2 * rows), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    if title:
        fig.suptitle(title)
    if not panels:
        ax = fig.add_subplot(1, 1, 1)
        ax.axis("off")
        ax.text(0.5, 0.5, "no task results to plot", ha="center", va="center")
    for k, panel in enumerate(panels):
        ax = fig.add_subplot(rows, cols, k + 1)
        _draw_panel(ax, panel)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png")
    tmp.replace(path)
    return path


def _draw_panel(ax, panel: Panel) -> None:
    arrow = "higher is better" if panel.higher_is_better else "lower is better"
    ax.set_title(f"{panel.task}: {panel.metric} ({arrow})", fontsize=10)
    ax.set_xlabel("stored size (MB)")
    ax.set_ylabel(panel.metric)
    pts = [p for p in panel.points if not (math.isnan(p.size_mb) or math.isnan(p.value))]
    if not pts:
        ax.text(0.5, 0.5, panel.note or "no points", ha="center", va="center", transform=ax.transAxes)
        return
    xs = [p.size_mb for p in pts]
    ys = [p.value for p in pts]
    errs = [p.stderr if p.stderr is not None and not math.isnan(p.stderr) else 0.0 for p in pts]
    front = pareto_front(xs, ys, panel.higher_is_better)
    ax.errorbar(xs, ys, yerr=errs, fmt="o", color="tab:blue", ecolor="tab:gray", capsize=3, zorder=3)
    if front:
        fx = [xs[i] for i in front]
        fy = [ys[i] for i in front]
        ax.step(fx, fy, where="post", color="tab:red", linewidth=1.2, label="Pareto front", zorder=2)
        ax.scatter(fx, fy, s=80, facecolors="none", edgecolors="tab:red", zorder=4)
        ax.legend(loc="best", fontsize=8)
    for p in pts:
        ax.annotate(p.label, (p.size_mb, p.value), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.grid(True, alpha=0.3)
    ax.margins(x=0.15, y=0.15)
