"""report.html's figures as data (report/figures.py) checked against the store, the device projection against
hardware/devices.py, and the page itself (self-contained, every figure present with its caption). The browser test
is tests/integration/test_report_browser.py."""

from __future__ import annotations

import json
import re
import sqlite3

import pytest

from budgetlm.errors import UnknownNameError
from budgetlm.experiments import store as st
from budgetlm.experiments.study import recovery
from budgetlm.hardware import devices as dv
from budgetlm.models.sources import tiny_config
from budgetlm.report import figures as fg
from budgetlm.report.build import build_report, load_study
from budgetlm.report.projection import DEFAULT_DEVICES, project_cells

RTN8 = {"method": "rtn", "bits": 8}
RTN4 = {"method": "rtn", "bits": 4}
LORA = {"method": "lora", "r": 8}


def metric(value, stderr=None, n=None, unit="", **extra):
    return {"value": value, "stderr": stderr, "n": n, "unit": unit, "source": "measured", "extra": extra}


def phases(acc, ppl, size, decode=None, rss=None, params=1.0e6, bench=True):
    """A cell's rows; with bench=False only the tasks (a study run with the benchmark off)."""
    out = {"t-acc": {"acc": metric(acc, 0.05, 40)}, "t-ppl": {"perplexity": metric(ppl, 0.5, 40)}}
    if bench:
        out["size"] = {
            "stored_bytes": metric(size, unit="B"),
            "bpw": metric(size * 8 / params, unit="bits"),
            "params": metric(params, unit="count"),
            "read_bytes_per_token": metric(size * 0.9, unit="B"),
        }
        out["speed"] = {
            "decode_ms_per_token": metric(decode, decode / 20, 3, unit="ms/token", dtype="float32"),
            "decode_roofline_ms": metric(decode / 2.5, unit="ms", bandwidth_gb_s=10.0),
        }
        out["memory"] = {"peak_rss_benchmark": metric(rss, unit="B")}
    return out


# pipeline -> (steps, rows); sizes, speeds and memory chosen so that each cost axis has its own front
CELLS = {
    "baseline": ([], phases(0.80, 10.0, 4.0e6, decode=4.0, rss=3.0e8)),
    "int8": ([RTN8], phases(0.78, 10.2, 1.1e6, decode=2.0, rss=2.0e8)),
    "int4": ([RTN4], phases(0.60, 12.5, 0.6e6, decode=2.5, rss=2.5e8)),
    "int8-lora": ([RTN8, LORA], phases(0.79, 10.1, 1.2e6, decode=2.2, rss=2.1e8)),
    "int4-lora": ([RTN4, LORA], phases(0.70, 11.0, 0.7e6, decode=2.7, rss=2.6e8)),
    "huge": ([{"method": "magnitude", "sparsity": 0.1}], phases(0.75, 10.5, 9.0e9, decode=9.0, rss=1e10)),
    "nobench": ([{"method": "magnitude", "sparsity": 0.2}], phases(0.74, 10.6, None, bench=False)),
}


def make_study(path, cells=CELLS, recipe_extra=None, models=("tiny-random",)):
    env = {"python": "3.11.7", "cores": 2}
    plan = []
    with st.Store(path) as s:
        for model in models:
            for name, (steps, rows) in cells.items():
                cid = f"{model[:4]}-{name}"
                s.start_cell(cid, model, name, {"model": model, "tasks": ["t-acc", "t-ppl"], "steps": steps})
                s.finish_cell(cid, rows, env)
                plan.append(cid)
        s.start_cell("failed", models[0], "broken", {"tasks": ["t-acc"], "steps": [RTN4]})
        s.set_status("failed", "failed", "boom")
        s.set_meta("plan", plan + ["failed"])
        s.set_meta(
            "recipe", {"name": "demo", "models": list(models), "tasks": ["t-acc", "t-ppl"], **(recipe_extra or {})}
        )
        rows = st.by_cell(s.rows())
        for model in models:
            base = f"{model[:4]}-baseline"
            for cid in plan:
                if cid.startswith(model[:4]):
                    s.put_rows(cid, recovery(rows[cid], rows[base], base))
    return path


@pytest.fixture
def study(tmp_path):
    return make_study(tmp_path)


def done_cells(path):
    _, cells, _, tasks = load_study(path)
    return [c for c in cells if c["status"] == "done"], tasks


def sql_values(path, phase, metric):
    """{cell_id: value} of one store row, read with plain SQL (not through the store module)."""
    with sqlite3.connect(path / st.FILENAME) as conn:
        q = "SELECT cell_id, value FROM rows WHERE task_or_phase=? AND metric=? AND value IS NOT NULL"
        return dict(conn.execute(q, (phase, metric)).fetchall())


def cost_rows(markdown: str) -> dict[str, list[str]]:
    """{pipeline: its entries} of report.md's cost table."""
    section = markdown.split("## Cost")[1].split("##")[0]
    rows = [ln for ln in section.splitlines() if ln.startswith("| ") and not ln.startswith("| pipeline")]
    return {r.split("|")[1].strip(): [e.strip() for e in r.strip(" |").split("|")] for r in rows}


def dominated(p, q, higher):
    """q dominates p: no more cost, no worse score, and better on one of them."""
    better = q[1] > p[1] if higher else q[1] < p[1]
    no_worse = q[1] >= p[1] if higher else q[1] <= p[1]
    return q[0] <= p[0] and no_worse and (q[0] < p[0] or better)


# ---------------------------------------------------------------------------------------------- Pareto


def test_pareto_points_are_the_store_rows(study):
    cells, tasks = done_cells(study)
    figures = fg.pareto_figures(cells, tasks)
    assert [f.task for f in figures] == ["t-acc", "t-ppl"] and [f.metric for f in figures] == ["acc", "perplexity"]
    for fig in figures:
        ys = sql_values(study, fig.task, fig.metric)
        assert [p.axis.row for p in fig.panels] == [
            "size/stored_bytes", "size/bpw", "speed/decode_ms_per_token", "memory/peak_rss_benchmark"
        ]  # fmt: skip
        for panel in fig.panels:
            xs = sql_values(study, panel.axis.phase, panel.axis.metric)
            want = {(c, xs[c] / panel.axis.scale, ys[c]) for c in ys if c in xs}
            got = {(m.cell_id, m.x, m.y) for m in panel.marks}
            assert got == want and len(panel.marks) == 6  # every cell with both rows; not the unbenchmarked one
            assert panel.note == "no " + panel.axis.row + " in the store for tiny-nobench"
            assert [m.baseline for m in panel.marks].count(True) == 1
            assert all(m.folder.startswith("cells/tiny-random_") and m.folder.endswith(m.cell_id) for m in panel.marks)
            assert fig.caption.count(panel.axis.row) == 1
        assert "tiny-int4" in fig.caption and "tiny-nobench" not in fig.caption.split("cells ")[1].split(".")[0]


def test_pareto_front_against_a_brute_force_reference(study):
    cells, tasks = done_cells(study)
    for fig in fg.pareto_figures(cells, tasks):
        for panel in fig.panels:
            pts = [(m.x, m.y) for m in panel.marks]
            want = {i for i, p in enumerate(pts) if not any(dominated(p, q, fig.higher_is_better) for q in pts)}
            assert set(panel.front) == want
            assert [panel.marks[i].x for i in panel.front] == sorted(panel.marks[i].x for i in panel.front)
    # by hand: accuracy against stored size: int4 (0.6 MB), int4-lora (0.7), int8 (1.1), int8-lora (1.2),
    # baseline (4.0); `huge` (6 GB, 0.75) is beaten by all of them; int8 (0.78) by nobody smaller
    size = fg.pareto_figures(cells, tasks)[0].panels[0]
    assert [size.marks[i].cell_id for i in size.front] == ["tiny-int4", "tiny-int4-lora", "tiny-int8",
                                                           "tiny-int8-lora", "tiny-baseline"]  # fmt: skip
    # perplexity (lower is better) against decode ms: int8 (2.0 ms, 10.2), int8-lora (2.2, 10.1), baseline (4.0, 10.0)
    decode = fg.pareto_figures(cells, tasks)[1].panels[2]
    assert [decode.marks[i].cell_id for i in decode.front] == ["tiny-int8", "tiny-int8-lora", "tiny-baseline"]


def test_a_study_without_benchmarks_says_so_instead_of_failing(tmp_path):
    unbenchmarked = {
        "baseline": ([], phases(0.8, 10, None, bench=False)),
        "q": ([RTN8], phases(0.7, 11, None, bench=False)),
    }
    make_study(tmp_path, unbenchmarked)
    cells, tasks = done_cells(tmp_path)
    for fig in fg.pareto_figures(cells, tasks):
        assert all(not p.marks and p.note.startswith("no cell has both") for p in fig.panels)
        assert fig.note.startswith(f"no cell has both size/stored_bytes and {fig.task}/{fig.metric} in the store; ")
    heat = fg.device_heatmap(cells, project_cells(tmp_path, cells, dv.load_devices()), dv.load_devices())
    assert heat.note.startswith("no projection: baseline: cells/tiny-random_baseline_tiny-baseline: the cell was not")
    paths = build_report(tmp_path)
    page = paths["html"].read_text()
    assert "no cell has both size/stored_bytes and t-acc/acc in the store" in page
    assert "no projection: baseline" in page
    cost = cost_rows(paths["markdown"].read_text())
    assert cost["baseline"][-3:] == ["-", "-", "-"]


# ---------------------------------------------------------------------------------------------- heatmaps


def test_recovery_heatmap_holds_the_stored_recovery_rows(study):
    cells, tasks = done_cells(study)
    heat = fg.recovery_heatmap(cells, tasks)
    stored = sql_values(study, "t-acc", "acc_recovery_pct")
    assert heat.cols == ["t-acc (acc)"]  # perplexity has no recovery %: not an accuracy
    assert [v[0] for v in heat.values] == [stored[c] for c in heat.cell_ids]
    assert heat.values[heat.cell_ids.index("tiny-int4")][0] == pytest.approx(75.0)
    assert heat.text[heat.cell_ids.index("tiny-int4")][0] == "75.0 ± 6.2"
    assert "t-acc/acc_recovery_pct" in heat.caption and "t-ppl (perplexity has no recovery %" in heat.caption


def test_device_projection_equals_the_devices_module(study):
    cells, tasks = done_cells(study)
    profiles = dv.load_devices()
    heat = fg.device_heatmap(cells, project_cells(study, cells, profiles), profiles)
    assert heat.cols == list(profiles) and "nobench" not in " ".join(heat.rows)
    assert (
        "Not projected: nobench: cells/tiny-random_nobench_tiny-nobench: the cell was not benchmarked" in heat.caption
    )
    assert "Projected, not measured" in heat.caption
    config = tiny_config()
    for i, cid in enumerate(heat.cell_ids):
        size, speed = (dict(CELLS[heat.rows[i]][1][p]) for p in ("size", "speed"))
        work = dv.Workload(
            cid,
            size["stored_bytes"]["value"],
            size["read_bytes_per_token"]["value"],
            size["params"]["value"],
            dv.kv_bytes_per_token(config, 4, 1024),  # fp32, tiny-random's 1,024-token window
            1024,
            dv.Calibration(speed["decode_ms_per_token"]["value"], speed["decode_roofline_ms"]["value"], 10.0, "x"),
        )
        for j, name in enumerate(heat.cols):
            want = dv.project(work, profiles[name])
            assert heat.values[i][j] == pytest.approx(want["decode_ms_per_token"].value / 1e3, rel=1e-12)
            assert ((i, j) in heat.crossed) == (not want["fits"].value)
    # by hand for one: rpi5, int8: 2.5 x max((0.99 MB + KV) / 17.07 GB/s, 2e6 / 153.6e9) (ratio 2.0 / 0.8)
    i, j = heat.cell_ids.index("tiny-int8"), heat.cols.index("rpi5")
    kv = 2 * 2 * 32 * 4 * 1024 * 2  # K and V x 2 KV heads x head dim 32 x 4 bytes x 1,024 tokens x 2 layers
    assert heat.values[i][j] == pytest.approx(2.5 * max((0.99e6 + kv) / 17.07e9, 2e6 / 153.6e9))
    # 9 GB of weights fit the 16 GiB Apple M2, not the 8 GiB Raspberry Pis nor the 4 GiB Jetson Nano
    huge = heat.cell_ids.index("tiny-huge")
    assert {heat.cols[j] for (r, j) in heat.crossed if r == huge} == {"rpi4", "rpi5", "jetson-nano"}
    assert heat.text[huge][heat.cols.index("rpi5")].endswith(" ✗")


def test_report_md_device_columns_come_from_the_same_projection(study):
    text = build_report(study)["markdown"].read_text()
    lines = text.splitlines()
    cost = cost_rows(text)
    head = next(ln for ln in lines if ln.startswith("| pipeline | stored MB"))
    assert head.endswith(" | ".join(f"{d} decode s/tok (projected)" for d in DEFAULT_DEVICES) + " |")
    cells, _ = done_cells(study)
    profiles = dv.load_devices()
    projected = project_cells(study, cells, profiles)
    for c in cells:
        entries = cost[c["pipeline"]][-len(DEFAULT_DEVICES) :]
        if c["pipeline"] == "nobench":
            assert entries == ["-"] * 3
            continue
        for d, entry in zip(DEFAULT_DEVICES, entries):
            p = projected[c["cell_id"]][d]
            s = p["decode_ms_per_token"].value / 1e3
            assert entry == f"{s:.3g}" + ("" if p["fits"].value else " (does not fit)")
    assert [e.endswith("(does not fit)") for e in cost["huge"][-3:]] == [True, True, False]  # the M2 has 16 GiB
    note = next(ln for ln in lines if ln.startswith("Device columns are projected, not measured"))
    assert "at 1,024 tokens of context" in note and "Not projected ('-'): nobench" in note


def test_a_recipe_names_its_devices(tmp_path):
    make_study(tmp_path, recipe_extra={"devices": ["rpi4", "h100"]})
    paths = build_report(tmp_path)
    head = next(ln for ln in paths["markdown"].read_text().splitlines() if ln.startswith("| pipeline | stored MB"))
    assert head.endswith("| rpi4 decode s/tok (projected) | h100 decode s/tok (projected) |")
    assert "(rpi4, h100)" in paths["html"].read_text()
    make_study(tmp_path / "bad", recipe_extra={"devices": "rpi9"})
    with pytest.raises(UnknownNameError, match="unknown device 'rpi9'"):
        build_report(tmp_path / "bad")


# ---------------------------------------------------------------------------------------------- slope charts


def test_slope_chart_of_a_recovery_fine_tune(study):
    cells, tasks = done_cells(study)
    slopes, note = fg.slope_figures(cells, tasks)
    assert note == "" and len(slopes) == 1
    fig = slopes[0]
    assert fig.conditions == ("before lora", "after lora")
    acc = fig.panels[0]
    assert (acc.task, acc.metric) == ("t-acc", "acc")
    # before: int8 0.78 (1), int4 0.60 (2); after: int8-lora 0.79 (1), int4-lora 0.70 (2)
    got = [((a.label, a.rank, a.value), (b.label, b.rank, b.value)) for a, b in acc.pairs]
    assert got == [(("int8", 1, 0.78), ("int8-lora", 1, 0.79)), (("int4", 2, 0.60), ("int4-lora", 2, 0.70))]
    ppl = fig.panels[1]
    assert [(a.rank, b.rank) for a, b in ppl.pairs] == [(1, 1), (2, 2)] and not ppl.higher_is_better
    assert "t-acc/acc, t-ppl/perplexity of cells tiny-int4, tiny-int4-lora, tiny-int8, tiny-int8-lora" in fig.caption


def test_slope_chart_of_two_bases_and_of_none(tmp_path):
    two = {k: CELLS[k] for k in ("baseline", "int8", "int4")}
    make_study(tmp_path / "two", two, models=("tiny-random", "other/model-q4"))
    cells, tasks = done_cells(tmp_path / "two")
    slopes, _ = fg.slope_figures(cells, tasks)
    assert [s.conditions for s in slopes] == [("tiny-random", "model-q4")]
    assert [(a.cell_id, b.cell_id) for a, b in slopes[0].panels[0].pairs] == [
        ("tiny-baseline", "othe-baseline"), ("tiny-int8", "othe-int8"), ("tiny-int4", "othe-int4")
    ]  # fmt: skip
    # a quantised base under the same pipelines: [lora] vs [rtn4, lora], [dora] vs [rtn4, dora]
    first = {
        "lora": ([LORA], phases(0.8, 10, 1e6, 2, 1e8)),
        "dora": ([{"method": "dora"}], phases(0.7, 11, 1e6, 2, 1e8)),
        "q-lora": ([RTN4, LORA], phases(0.6, 12, 1e6, 2, 1e8)),
        "q-dora": ([RTN4, {"method": "dora"}], phases(0.65, 12, 1e6, 2, 1e8)),
    }
    make_study(tmp_path / "first", {"baseline": CELLS["baseline"], **first})
    cells, tasks = done_cells(tmp_path / "first")
    slopes, _ = fg.slope_figures(cells, tasks)
    assert [s.conditions for s in slopes] == [("without rtn first", "rtn first")]
    assert [(a.rank, b.rank) for a, b in slopes[0].panels[0].pairs] == [(1, 2), (2, 1)]  # the ranking flips
    make_study(tmp_path / "none", {k: CELLS[k] for k in ("baseline", "int8", "int4")})
    cells, tasks = done_cells(tmp_path / "none")
    slopes, note = fg.slope_figures(cells, tasks)
    assert slopes == [] and note.startswith("No slope chart: the study holds no pairing")
    assert note in build_report(tmp_path / "none")["html"].read_text()


# ---------------------------------------------------------------------------------------------- the page


def test_report_html_is_one_self_contained_page(study):
    from plotly.offline import get_plotlyjs

    page = build_report(study)["html"].read_text()
    assert page.count(get_plotlyjs()) == 1  # plotly.js inlined once
    assert not re.search(r"""<(script|link|img|iframe)[^>]*(src|href)=["']?https?:""", page)
    cells, tasks = done_cells(study)
    ids = [f.id for f in fg.pareto_figures(cells, tasks)] + ["recovery", "devices", "slope-0"]
    for fid in ids:
        assert page.count(f'id="{fid}"') == 1, fid
    # each figure's data is in the page: the plotted cells' folders (shown on hover) and their captions
    specs = [
        json.JSONDecoder().raw_decode(page, m.end())[0] for m in re.finditer(r'Plotly\.newPlot\(\s*"[\w-]+",\s*', page)
    ]
    assert len(specs) == len(ids)
    folders = {c["folder"] for c in cells}
    hover = {d[1] for spec in specs for trace in spec for row in trace.get("customdata", []) for d in _pairs(row)}
    assert hover == folders
    assert "Measured figures and projected ones are kept apart" in page
    assert "broken: failed" in page


def _pairs(row):
    """customdata rows: [cell id, folder] for scatter points, a list of them per heatmap row."""
    return [row] if isinstance(row[0], str) else row
