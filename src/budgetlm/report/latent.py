"""The latent-space figure (HOLA's t-SNE of final hidden states) from the store alone: the rows of the phase "latent"
that a cell writes when the recipe has `latent:` (experiments/latent.py). Nothing is recomputed here: the 2-D points
are the extra of each cell's `latent/tsne_kl` row.

  latent_figure  a panel per variant (cell), its points coloured by task; each panel is its own t-SNE fit of the
                 same items, so positions compare within a panel, never across panels
  draw           the plotly figure (report/html.py calls it)
  markdown       report.md's table of the companion rows: silhouettes and cosine to the baseline
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass, field

from budgetlm.report.figures import Figure

PHASE = "latent"  # experiments/latent.py's phase (not imported: report reads the store, it does not run cells)
POINTS = "tsne_kl"
COLUMNS = (("silhouette_task", "silhouette (hidden, cosine)"), ("silhouette_task_2d", "silhouette (t-SNE 2-D)"),
           ("cosine_to_baseline", "cosine to baseline"), (POINTS, "t-SNE KL"))  # fmt: skip
COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")
PER_ROW = 3
NONE = "no cell has latent data: add `latent: {tasks: [...], items: 64, perplexity: 30}` to the recipe"


@dataclass
class LatentPanel:
    cell_id: str
    label: str
    folder: str
    x: list[float]
    y: list[float]
    ids: list[str]
    task: list[int]  # index into the figure's tasks
    silhouette: float | None = None
    cosine: float | None = None


@dataclass
class Latent(Figure):
    tasks: list[str] = field(default_factory=list)
    panels: list[LatentPanel] = field(default_factory=list)


def latent_figure(cells: list[dict]) -> Latent:
    """One panel per done cell holding a `latent/tsne_kl` row with its points."""
    fig = Latent("latent", "Latent space: t-SNE of the final hidden state, one fit per variant", "")
    for c in cells:
        row = c["phases"].get(PHASE, {}).get(POINTS)
        extra = (row or {}).get("extra") or {}
        if not all(k in extra for k in ("x", "y", "ids", "task", "tasks")):
            continue
        fig.tasks += [name for name in extra["tasks"] if name not in fig.tasks]  # one colour per task on every panel
        task = [fig.tasks.index(extra["tasks"][k]) for k in extra["task"]]
        fig.panels.append(
            LatentPanel(c["cell_id"], c["label"], c["folder"], list(extra["x"]), list(extra["y"]), list(extra["ids"]),
                        task, _value(c, "silhouette_task"), _value(c, "cosine_to_baseline"))
        )  # fmt: skip
    if not fig.panels:
        fig.note = NONE
        return fig
    extra = next(c["phases"][PHASE][POINTS]["extra"] for c in cells if c["cell_id"] == fig.panels[0].cell_id)
    fig.caption = (
        f"Store rows {PHASE}/{POINTS} (the points, in its extra), {PHASE}/silhouette_task and "
        f"{PHASE}/cosine_to_baseline of cells {', '.join(p.cell_id for p in fig.panels)}; the hidden states each "
        f"fit embeds are cells/<cell>/{extra.get('states')}. Per cell: {len(fig.panels[0].ids)} items "
        f"({', '.join(fig.tasks)}), the final hidden state ({extra.get('hidden')}), t-SNE ({extra.get('method')}) "
        f"with {extra.get('distance')} distance, perplexity {extra.get('perplexity')}, seed {extra.get('seed')}. Each "
        "panel is its own fit: compare the clusters within a panel, not positions across panels; the cosine to the "
        "baseline is measured in the hidden space itself."
    )
    return fig


def _value(cell: dict, metric: str) -> float | None:
    row = cell["phases"].get(PHASE, {}).get(metric)
    v = None if row is None else row.get("value")
    return None if v is None or math.isnan(v) else v


def _title(panel: LatentPanel) -> str:
    parts = [panel.label]
    if panel.silhouette is not None:
        parts.append(f"silhouette {panel.silhouette:.2f}")
    if panel.cosine is not None:
        parts.append(f"cos to baseline {panel.cosine:.3f}")
    return html.escape(" · ".join(parts))


def draw(fig: Latent):
    """Panels of PER_ROW columns; a trace per task and panel, one legend entry per task."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    rows = math.ceil(len(fig.panels) / PER_ROW)
    cols = min(PER_ROW, len(fig.panels))
    plot = make_subplots(rows=rows, cols=cols, subplot_titles=[_title(p) for p in fig.panels],
                         horizontal_spacing=0.06, vertical_spacing=min(0.08, 0.5 / rows))  # fmt: skip
    for k, panel in enumerate(fig.panels):
        for t, name in enumerate(fig.tasks):
            idx = [i for i, task in enumerate(panel.task) if task == t]
            if not idx:
                continue
            plot.add_trace(
                go.Scatter(
                    x=[panel.x[i] for i in idx],
                    y=[panel.y[i] for i in idx],
                    mode="markers",
                    marker={"size": 6, "color": COLOURS[t % len(COLOURS)], "opacity": 0.8},
                    customdata=[[panel.ids[i], name, panel.cell_id, panel.folder] for i in idx],
                    hovertemplate="item %{customdata[0]}<br>task %{customdata[1]}<br>cell %{customdata[2]}<br>"
                    "folder %{customdata[3]}<extra></extra>",
                    name=name,
                    legendgroup=name,
                    showlegend=k == 0,
                ),
                row=k // PER_ROW + 1,
                col=k % PER_ROW + 1,
            )
    plot.update_xaxes(showticklabels=False)
    plot.update_yaxes(showticklabels=False)
    plot.update_layout(height=120 + 340 * rows, margin={"t": 60, "b": 30}, legend={"orientation": "h", "y": -0.04})
    return plot


def markdown(cells: list[dict]) -> list[str]:
    """report.md's section: a row per cell with latent rows, or a line saying there are none."""
    lines = ["## Latent space", ""]
    have = [c for c in cells if c["phases"].get(PHASE)]
    if not have:
        return lines + [NONE + ".", ""]
    lines += [
        "| pipeline | cell | items | " + " | ".join(t for _, t in COLUMNS) + " |",
        "|" + "---|" * (3 + len(COLUMNS)),
    ]
    for c in have:
        ph = c["phases"][PHASE]
        n = next((r.get("n") for r in ph.values() if r.get("n") is not None), None)
        vals = []
        for metric, _ in COLUMNS:
            row = ph.get(metric)
            v = None if row is None else row.get("value")
            se = None if row is None else row.get("stderr")
            ok = v is not None and not math.isnan(v)
            vals.append(
                "-" if not ok else f"{v:.3f}" + (f" ± {se:.2g}" if se is not None and not math.isnan(se) else "")
            )
        lines.append(f"| {c['label']} | `{c['cell_id']}` | {n if n is not None else '-'} | " + " | ".join(vals) + " |")
    missing = []  # why a cell has no cosine to the baseline (experiments/latent.py notes it in the points' extra)
    for c in have:
        note = ((c["phases"][PHASE].get(POINTS) or {}).get("extra") or {}).get("cosine_to_baseline")
        if isinstance(note, str):
            missing.append(f"{c['label']}: {note}")
    lines += [
        "",
        *([f"No cosine to the baseline: {'; '.join(missing)}.", ""] if missing else []),
        f"Store rows {PHASE}/<metric>: silhouette_task = silhouette of the task labels in the final hidden states "
        "(after the final norm, last prompt token; cosine distance), silhouette_task_2d = the same in the t-SNE "
        "points, cosine_to_baseline = mean cosine of each item's hidden state with the baseline cell's (± standard "
        "error over items), tsne_kl = the fit's final KL divergence. The points are drawn in report.html.",
        "",
    ]
    return lines
