"""The report of a study, built from the results store alone (DIR/results.sqlite):

DIR/report.md     a table per task (value ± stderr, recovery % of the baseline), the cost table (stored
                  size, bits/weight, peak RSS per phase, prefill/decode speed, % of roofline, energy) and
                  the environment every figure was measured in
DIR/results.csv   every row: one per cell x task/phase x metric, with model and pipeline
DIR/pareto.png    each task's headline metric against stored size, Pareto front drawn
DIR/report.html   one self-contained page (plotly, its script inlined): Pareto fronts of each task against four
                  costs, recovery and projected-device heatmaps, slope charts (report/figures.py, report/html.py),
                  the latent-space t-SNE panels per variant (report/latent.py, from the cells' `latent` rows)
                  and, for a recipe's generated study, the ablation / transfer heatmaps (report/studies.py)
report.md also holds a generated study's ablation tables and transfer matrix, each difference with its paired test.
The device columns of the cost table and the device heatmap are projections (report/projection.py), never
measurements: the recipe's `devices`, else DEFAULT_DEVICES in the table and every profile in the heatmap.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import math
from pathlib import Path

from budgetlm.experiments import store as st
from budgetlm.experiments.plan import Cell, model_label
from budgetlm.hardware.contention import contended, recorded_load
from budgetlm.report import figures as fg
from budgetlm.report import latent
from budgetlm.report.html import write_html
from budgetlm.report.plots import Panel, Point, pareto_plot
from budgetlm.report.projection import DEFAULT_DEVICES, chosen_devices, contexts, describe, project_cells
from budgetlm.report.studies import study_markdown, study_sections

CSV_COLUMNS = ["cell_id", "model", "pipeline", "task_or_phase", "metric", "value", "stderr", "n", "unit", "source",
               "extra_json"]  # fmt: skip
MB = 1e6


def build_report(directory: str | Path) -> dict[str, Path]:
    """Write report.md, results.csv, pareto.png and report.html into the study folder; returns their paths by
    kind."""
    directory = Path(directory)
    recipe, cells, rows, tasks = load_study(directory)
    devices = chosen_devices(recipe, None)
    table_devices = list(chosen_devices(recipe, DEFAULT_DEVICES))
    done = [c for c in cells if c["status"] == "done"]
    projections = project_cells(directory, done, devices)
    paths = {
        "csv": write_csv(rows, directory / "results.csv"),
        "pareto": pareto_plot(pareto_panels(cells, tasks), directory / "pareto.png", recipe.get("name", "")),
    }
    text = markdown(directory, recipe, cells, tasks, projections, table_devices)
    paths["markdown"] = directory / "report.md"
    _write(paths["markdown"], text)
    paths["html"] = html_report(directory, recipe, cells, tasks, projections, devices)
    return paths


def load_study(directory: Path) -> tuple[dict, list[dict], list[dict], list[str]]:
    """(the recipe, the plan's cells, their rows, the tasks) from the store; each cell also gets its `label` (the
    pipeline, with the model when there are several), `folder` (relative to the study folder) and `phases`
    ({task_or_phase: {metric: row}})."""
    with st.Store.open(directory) as store:
        cells = store.plan_cells()
        rows = store.rows([c["cell_id"] for c in cells])
        recipe = store.get_meta("recipe") or {}
    by = st.by_cell(rows)
    several = len({c["model"] for c in cells}) > 1
    for c in cells:
        c["label"] = f"{c['pipeline']} ({model_label(c['model'])})" if several else c["pipeline"]
        c["phases"] = by.get(c["cell_id"], {})
        c["folder"] = Cell(c["cell_id"], c["model"], c["pipeline"], c["config"]).folder(Path()).as_posix()
    tasks = list(dict.fromkeys(st.result_name(t) for c in cells for t in c["config"].get("tasks", [])))
    return recipe, cells, rows, tasks


def html_report(directory: Path, recipe: dict, cells: list[dict], tasks: list[str], projections: dict,
                devices: dict) -> Path:  # fmt: skip
    done = [c for c in cells if c["status"] == "done"]
    slopes, slope_note = fg.slope_figures(done, tasks)
    name = recipe.get("name", directory.name)
    intro = [
        f"Study folder {directory}; built {dt.datetime.now().isoformat(timespec='seconds')} from results.sqlite alone. "
        f"{len(done)} of {len(cells)} cells done"
        + "".join(f"; {c['label']}: {c['status']}" for c in cells if c["status"] != "done") + ".",
        "Every figure names the store rows it came from under it; hovering a point or a cell shows its cell id and "
        "folder (relative to this page). Measured figures and projected ones are kept apart: only the device section "
        "holds projections.",
    ]  # fmt: skip
    sections = [
        ("Pareto fronts (measured)", fg.pareto_figures(done, tasks), "no tasks in the study"),
        ("Recovery of the baseline (measured)", [fg.recovery_heatmap(done, tasks)], ""),
        ("Devices (projected, not measured)", [fg.device_heatmap(done, projections, devices)], ""),
        ("Slope charts (measured)", slopes, slope_note),
    ]
    sections += study_sections(directory, recipe, done, tasks)  # a generated study's ablation / transfer (studies.py)
    sections.append(("Latent space (measured in each cell)", [latent.latent_figure(done)], ""))
    return write_html(directory / "report.html", f"Study {name}", intro, sections)


def write_csv(rows: list[dict], path: Path) -> Path:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(CSV_COLUMNS)
        for r in rows:
            extra = json.dumps(r.get("extra") or {}, sort_keys=True, default=str)
            w.writerow([_csv(r.get(k)) for k in CSV_COLUMNS[:-1]] + [extra])
    tmp.replace(path)
    return path


def pareto_panels(cells: list[dict], tasks: list[str]) -> list[Panel]:
    panels = []
    for task in tasks:
        metric = st.main_metric(list(dict.fromkeys(m for c in cells for m in c["phases"].get(task, {}))))
        if metric is None:
            continue
        points = []
        for c in cells:
            row = c["phases"].get(task, {}).get(metric)
            size = st.value(c["phases"], "size", "stored_bytes")
            if row is None or size is None:
                continue
            points.append(Point(c["label"], size / MB, row["value"], row.get("stderr")))
        note = "" if points else "no stored size measured (bench disabled or failed)"
        panels.append(Panel(task, metric, not st.lower_is_better(metric), points, note))
    return panels


# ---------------------------------------------------------------------------------------------- markdown


def markdown(
    directory: Path, recipe: dict, cells: list[dict], tasks: list[str], projections: dict, devices: list[str]
) -> str:
    done = [c for c in cells if c["status"] == "done"]
    out = [f"# Study {recipe.get('name', directory.name)}", ""]
    out.append(f"Folder `{directory}`; report built {dt.datetime.now().isoformat(timespec='seconds')} from "
               f"`results.sqlite`. {len(done)} of {len(cells)} cells done.")  # fmt: skip
    if recipe:
        out.append(
            f"Models: {', '.join(recipe.get('models', []))}. Tasks: {', '.join(recipe.get('tasks', []))}. "
            f"Limit: {recipe.get('limit') or 'all items'} per task, seed {recipe.get('seed', 0)}."
        )
    out.append("")
    for c in cells:
        if c["status"] != "done":
            out.append(f"- **{c['label']}**: {c['status']}" + (f" — {c['error']}" if c.get("error") else ""))
    out += ["", "## Pipelines", "", "| pipeline | cell | steps |", "|---|---|---|"]
    for c in cells:
        steps = " → ".join(_step_text(s) for s in c["config"].get("steps", [])) or "(unmodified model)"
        out.append(f"| {c['label']} | `{c['cell_id']}` | {steps} |")
    out += ["", "## Tasks", "", "Value ± standard error; recovery = 100 × value / the baseline cell's value.", ""]
    for task in tasks:
        out += task_table(task, done)
    out += study_markdown(directory, recipe, done, tasks)  # a generated study's ablation / transfer (studies.py)
    out += ["## Cost", ""] + cost_table(done, projections, devices) + [""]
    out += step_table(done)
    out += latent.markdown(done)
    out += ["## Environment", ""] + env_table(done)
    out += ["", "Files: `results.csv` (every row), `pareto.png`, `report.html` (interactive figures), `cells/<cell>/` "
            "(config, env, per-item logs).", ""]  # fmt: skip
    return "\n".join(out)


def task_table(task: str, cells: list[dict]) -> list[str]:
    metrics = list(dict.fromkeys(m for c in cells for m in c["phases"].get(task, {})))
    scores = [m for m in metrics if not m.endswith(st.RECOVERY) and m not in st.NOT_SCORES]
    if not scores:
        return [f"### {task}", "", "no results", ""]
    head = ["pipeline", "n"]
    for m in scores:
        head.append(m + (" ↓" if st.lower_is_better(m) else " ↑" if st.is_accuracy(m) else ""))
        if st.is_accuracy(m):
            head.append(f"{m} recovery %")
    lines = [f"### {task}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    source = None
    for c in cells:
        ph = c["phases"].get(task, {})
        n = next((r["n"] for r in ph.values() if r.get("n") is not None), None)
        line = [c["label"], str(n) if n is not None else "-"]
        for m in scores:
            line.append(_pm(ph.get(m)))
            if st.is_accuracy(m):
                rec = ph.get(m + st.RECOVERY)
                line.append(_pm(rec, digits=1))
            source = source or (ph.get(m) or {}).get("extra", {}).get("data")
        lines.append("| " + " | ".join(line) + " |")
    if source:
        lines += ["", f"Data: {source}."]
    return lines + [""]


def cost_table(cells: list[dict], projections: dict | None = None, devices: list[str] = ()) -> list[str]:
    prefill = list(dict.fromkeys(p for c in cells for p in st.prefill_metrics(c["phases"])))
    head = ["pipeline", "stored MB", "params M", "bpw", "linear bpw", "peak RSS load MB", "peak RSS eval MB",
            "peak RSS bench MB"]  # fmt: skip
    head += [f"prefill tok/s @{p.split('@')[1]}" for p in prefill]
    head += ["decode ms/tok", "% of roofline", "energy J/tok (decode)", "load avg (bench)"]
    head += [f"{d} decode s/tok (projected)" for d in devices]
    projections = projections or {}
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    reasons: set[str] = set()
    for c in cells:
        ph = c["phases"]
        line = [
            c["label"],
            _num(st.value(ph, "size", "stored_bytes"), MB, 1),
            _num(st.value(ph, "size", "params"), 1e6, 2),
            _num(st.value(ph, "size", "bpw"), 1, 2),
            _num(st.value(ph, "size", "linear_bpw"), 1, 2),
        ]
        line += [_num(st.value(ph, "memory", f"peak_rss_{p}"), MB, 0) for p in ("load", "evaluation", "benchmark")]
        line += [_pm(ph.get("speed", {}).get(p), digits=0) for p in prefill]
        line += [_pm(ph.get("speed", {}).get("decode_ms_per_token"), digits=1)]
        line += [_num(st.value(ph, "speed", "decode_pct_roofline"), 1, 0)]
        energy, reason = _energy(ph)
        line.append(energy)
        if reason:
            reasons.add(reason)
        extras = [r.get("extra") for r in ph.get("speed", {}).values()]
        load = recorded_load(extras)
        busy = contended(extras, (c.get("env") or {}).get("cores"))
        line.append("-" if load is None else f"{load:.2f}" + (" (contended)" if busy else ""))
        line += _projected(projections.get(c["cell_id"]), devices)
        lines.append("| " + " | ".join(line) + " |")
    bw = next((st.value(c["phases"], "host", "mem_bandwidth_gb_s") for c in cells if "host" in c["phases"]), None)
    notes = [
        "",
        "Sizes count the bytes of the stored state; peak RSS is sampled per phase of the cell's process. Speed is "
        "batch 1; a load average above the CPU count while benchmarking (the highest 1-minute figure recorded) "
        "means other work competed: those figures are marked contended.",
    ]
    if bw:
        notes.append(f"Roofline: bytes read per decoded token / measured memory bandwidth ({bw:.1f} GB/s).")
    notes += [f"Energy {r}." for r in sorted(reasons)]
    if devices:
        notes.append(_projection_note(cells, projections))
    return lines + notes


def _projected(per_device: dict | str | None, devices: list[str]) -> list[str]:
    if not isinstance(per_device, dict):
        return ["-"] * len(devices)
    return [describe(per_device[d]) for d in devices]


def _projection_note(cells: list[dict], projections: dict) -> str:
    missing = [
        f"{c['label']}: {projections[c['cell_id']]}" for c in cells if isinstance(projections.get(c["cell_id"]), str)
    ]
    text = (
        "Device columns are projected, not measured (hardware/devices.py, as `budgetlm devices`): decode s/token = the "
        "cell's measured-to-roofline decode ratio here x max((bytes read per token + KV cache) / the device's "
        "bandwidth, 2 x params / its fp32 peak), at " + (" / ".join(f"{n:,}" for n in contexts(projections)) or "-")
        + " tokens of context; 'does not fit': weights + KV cache + runtime overhead exceed the device's memory; "
        "'uncalibrated': no decode measured here, the bare roofline."
    )  # fmt: skip
    return text + (f" Not projected ('-'): {'; '.join(missing)}." if missing else "")


def step_table(cells: list[dict]) -> list[str]:
    """Seconds and peak RSS of every step; for adapter steps also the trainable parameters and, when the step
    trained, its training seconds, training peak RSS and last loss."""
    lines = []
    train_cols = ("train_seconds", "train_peak_rss", "train_loss_last")
    adapters = any("trainable_params" in m for c in cells for p, m in c["phases"].items() if p.startswith("step"))
    for c in cells:
        for phase, metrics in c["phases"].items():
            if phase.startswith("step") and "seconds" in metrics:
                secs, rss = (st.value(c["phases"], phase, k) for k in ("seconds", "peak_rss"))
                line = f"| {c['label']} | {phase} | {_num(secs, 1, 1)} | {_num(rss, MB, 0)} |"
                if adapters:
                    tp, secs, rss, loss = (st.value(c["phases"], phase, k) for k in ("trainable_params", *train_cols))
                    line += f" {'-' if tp is None else f'{tp:,.0f}'} | {_num(secs, 1, 1)} | {_num(rss, MB, 0)} |"
                    line += f" {_num(loss, 1, 4)} |"
                lines.append(line)
    if not lines:
        return []
    head = "| pipeline | step | seconds | peak RSS MB |"
    if adapters:
        head += " trainable params | train s | train peak RSS MB | last loss |"
    return ["## Steps", "", head, "|" + "---|" * (head.count("|") - 1)] + lines + [""]


def env_table(cells: list[dict]) -> list[str]:
    keys = ["python", "torch", "transformers", "budgetlm", "cpu", "cores", "threads", "git_commit", "load_average"]
    lines = ["| pipeline | " + " | ".join(keys) + " |", "|" + "---|" * (len(keys) + 1)]
    for c in cells:
        env = c.get("env") or {}
        vals = []
        for k in keys:
            v = env.get(k)
            if k == "git_commit" and v:
                v = v[:10] + (" (modified)" if env.get("git_dirty") else "")
            elif k == "load_average" and v:
                v = " ".join(f"{x:.2f}" for x in v)
            vals.append("-" if v is None else str(v))
        lines.append(f"| {c['label']} | " + " | ".join(vals) + " |")
    return lines


# ---------------------------------------------------------------------------------------------- formatting


def _energy(phases: dict) -> tuple[str, str | None]:
    """(table entry, the reason it is unavailable or None)."""
    j = st.value(phases, "energy", "decode_j_per_token")
    if j is not None:
        return f"{j:.3f}", None
    decode = phases.get("speed", {}).get("decode_ms_per_token")
    note = (decode or {}).get("extra", {}).get("energy")
    reason = note if isinstance(note, str) and note.startswith("unavailable") else "unavailable: not measured"
    return "unavailable", reason


def _step_text(step: dict) -> str:
    keys = [k for k in step if k not in ("method", "targets", "ignore")]
    return f"{step.get('method')}(" + ", ".join(f"{k}={step[k]}" for k in keys) + ")"


def _pm(row: dict | None, digits: int | None = None) -> str:
    if row is None or row.get("value") is None or math.isnan(row["value"]):
        return "-"
    v, se = row["value"], row.get("stderr")
    d = digits if digits is not None else (3 if abs(v) < 10 else 1)
    return f"{v:,.{d}f}" + (f" ± {se:,.{d}f}" if se is not None and not math.isnan(se) else "")


def _num(x: float | None, scale: float, digits: int) -> str:
    return "-" if x is None else f"{x / scale:,.{digits}f}"


def _csv(x):
    if isinstance(x, float) and math.isnan(x):
        return ""
    return "" if x is None else x


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
