"""report.html: one self-contained page (plotly.js inlined once, no network) drawing report/figures.py's figures with
plotly. Each figure is a section: its title, the plot (hovering a point or a cell shows its cell id and folder) and
its caption, which names the store rows it came from; a figure without data shows why instead."""

from __future__ import annotations

import html
import math
from pathlib import Path

from budgetlm.report import latent
from budgetlm.report.figures import Figure, Heatmap, Pareto, Slope

KINDS = ((False, "cells", "circle", "#1f77b4"), (True, "baseline", "star", "#2ca02c"))  # Pareto marks
HOVER = "cell %{customdata[0]}<br>folder %{customdata[1]}<extra></extra>"
STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1250px; margin: 0 auto; padding: 1em 1.5em; color: #222; }
section { margin: 2em 0; } .caption { color: #444; font-size: 0.9em; } .note { color: #8a4b00; }
h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em; } .projected { background: #f6f3ff; padding: 0.5em 1em; }
"""


def write_html(path: Path, title: str, intro: list[str], sections: list[tuple[str, list[Figure], str]]) -> Path:
    """Write the page: `sections` are (heading, figures, note shown when there are none) in order."""
    from plotly.offline import get_plotlyjs

    body = [f"<h1>{html.escape(title)}</h1>"] + [f"<p>{html.escape(p)}</p>" for p in intro]
    for heading, figures, note in sections:
        cls = ' class="projected"' if "projected" in heading.lower() else ""
        body.append(f"<section{cls}><h2>{html.escape(heading)}</h2>")
        if not figures and note:
            body.append(f'<p class="note">{html.escape(note)}</p>')
        for fig in figures:
            body.append(_figure_html(fig))
        body.append("</section>")
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{STYLE}</style>\n"
        f'<script type="text/javascript">{get_plotlyjs()}</script>\n</head><body>\n'
        + "\n".join(body)
        + "\n</body></html>\n"
    )
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(path)
    return path


def _figure_html(fig: Figure) -> str:
    out = [f"<h3>{html.escape(fig.title)}</h3>"]
    plot = None if fig.note else draw(fig)
    if plot is None:
        out.append(f'<p class="note">{html.escape(fig.note or "no data")}</p>')
    else:
        config = {"displaylogo": False, "responsive": True}
        out.append(plot.to_html(full_html=False, include_plotlyjs=False, div_id=fig.id, config=config))
    if fig.caption:
        out.append(f'<p class="caption">{html.escape(fig.caption)}</p>')
    return "\n".join(out)


def draw(fig: Figure):
    """The plotly figure of one report figure."""
    if isinstance(fig, Pareto):
        return _pareto(fig)
    if isinstance(fig, Heatmap):
        return _heatmap(fig)
    if isinstance(fig, Slope):
        return _slope(fig)
    if isinstance(fig, latent.Latent):
        return latent.draw(fig)
    raise TypeError(f"no drawing for {type(fig).__name__}")


def _pareto(fig: Pareto):
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    plot = make_subplots(rows=2, cols=2, subplot_titles=[p.axis.title for p in fig.panels], vertical_spacing=0.14)
    shown = set()
    for k, panel in enumerate(fig.panels):
        row, col = k // 2 + 1, k % 2 + 1
        for baseline, name, symbol, color in KINDS:
            marks = [m for m in panel.marks if m.baseline == baseline]
            if not marks:
                continue
            plot.add_trace(
                go.Scatter(
                    x=[m.x for m in marks],
                    y=[m.y for m in marks],
                    error_x=_errors([m.x_err for m in marks]),
                    error_y=_errors([m.y_err for m in marks]),
                    mode="markers+text",
                    text=[m.label for m in marks],
                    textposition="top center",
                    customdata=[[m.cell_id, m.folder] for m in marks],
                    hovertemplate=f"<b>%{{text}}</b><br>{panel.axis.title} %{{x:.4g}}<br>{fig.metric} %{{y:.4g}}<br>"
                    + HOVER,
                    marker={"symbol": symbol, "size": 14 if baseline else 9, "color": color},
                    name=name,
                    legendgroup=name,
                    showlegend=name not in shown,
                ),
                row=row,
                col=col,
            )
            shown.add(name)
        if panel.front:
            front = [panel.marks[i] for i in panel.front]
            plot.add_trace(
                go.Scatter(
                    x=[m.x for m in front],
                    y=[m.y for m in front],
                    mode="lines",
                    line={"shape": "hv", "color": "#d62728", "width": 1.5},
                    name="Pareto front",
                    legendgroup="front",
                    showlegend="front" not in shown,
                    hoverinfo="skip",
                ),
                row=row,
                col=col,
            )
            shown.add("front")
        plot.update_xaxes(title_text=panel.axis.title, row=row, col=col)
        plot.update_yaxes(title_text=fig.metric, row=row, col=col)
        if panel.note:
            axis = "" if k == 0 else str(k + 1)
            plot.add_annotation(
                text=html.escape(panel.note), xref=f"x{axis} domain", yref=f"y{axis} domain", x=0.5,
                y=0.5 if not panel.marks else 1.0, yanchor="middle" if not panel.marks else "top", showarrow=False,
                font={"color": "#8a4b00", "size": 11},
            )  # fmt: skip
    plot.update_layout(height=760, margin={"t": 60, "b": 50}, legend={"orientation": "h", "y": -0.08})
    return plot


def _heatmap(fig: Heatmap):
    import plotly.graph_objects as go

    values = [[math.nan if v is None else v for v in row] for row in fig.values]
    z = [[math.log10(v) if fig.log and v > 0 else v for v in row] for row in values]
    colorbar = {"title": {"text": fig.colorbar}}
    finite = [v for row in z for v in row if not math.isnan(v)]
    if fig.log and finite:
        ticks = list(range(math.floor(min(finite)), math.ceil(max(finite)) + 1))
        colorbar.update(tickvals=ticks, ticktext=[f"{10.0**t:g}" for t in ticks])
    custom = [[[cid, folder] for _ in fig.cols] for cid, folder in zip(fig.cell_ids, fig.folders)]
    plot = go.Figure(
        go.Heatmap(
            z=z,
            x=fig.cols,
            y=fig.rows,
            text=fig.text,
            texttemplate="%{text}",
            customdata=custom,
            hovertemplate="<b>%{y}</b> · %{x}: %{text}<br>" + HOVER,
            colorscale="Viridis" if not fig.log else "Cividis",
            reversescale=fig.log,  # short times light
            colorbar=colorbar,
            xgap=2,
            ygap=2,
        )
    )
    plot.update_yaxes(autorange="reversed", type="category")
    plot.update_xaxes(type="category", side="top")
    plot.update_layout(height=160 + 42 * len(fig.rows), margin={"t": 80, "b": 20})
    return plot


def _slope(fig: Slope):
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    titles = [f"{p.task}: {p.metric} ({'higher' if p.higher_is_better else 'lower'} is better)" for p in fig.panels]
    plot = make_subplots(rows=1, cols=len(fig.panels), subplot_titles=titles)
    for k, panel in enumerate(fig.panels):
        for a, b in panel.pairs:
            plot.add_trace(
                go.Scatter(
                    x=list(fig.conditions),
                    y=[a.rank, b.rank],
                    mode="lines+markers+text",
                    text=[f"{a.label} ({a.value:.3g})", f"{b.label} ({b.value:.3g})"],
                    textposition=["middle left", "middle right"],
                    customdata=[[a.cell_id, a.folder], [b.cell_id, b.folder]],
                    hovertemplate="<b>%{text}</b>, rank %{y}<br>" + HOVER,
                    cliponaxis=False,
                    showlegend=False,
                ),
                row=1,
                col=k + 1,
            )
        n = max(len(panel.pairs), 1)
        plot.update_yaxes(dtick=1, range=[n + 0.5, 0.5], title_text="rank (1 = best)", row=1, col=k + 1)
        plot.update_xaxes(type="category", range=[-0.9, 1.9], row=1, col=k + 1)  # room for the labels
    plot.update_layout(height=200 + 50 * max(len(p.pairs) for p in fig.panels))
    return plot


def _errors(errs: list[float | None]) -> dict | None:
    if all(e is None for e in errs):
        return None
    return {"type": "data", "array": [0.0 if e is None else e for e in errs], "visible": True, "thickness": 1}
