"""The report's tables of a generated study (experiments/generated.py), each A-vs-B claim with its paired test.

  ablation  per model and task: the full pipeline, each step removed in turn, and the change against the full pipeline
  transfer  per model: training task x evaluated task (the diagonal marked), each against the untrained baseline cell

Values are the store's rows (each task's headline metric, as in the other figures). The paired tests are
`budgetlm compare`'s (evaluation/compare.py, compare_records): the two cells' per-item records (cells/<cell>/items/
<task>.jsonl, named by the store's plan) matched by item id; McNemar's test for 0/1 accuracies, a paired bootstrap
(N_BOOT resamples, seed 0) for the other metrics. p >= ALPHA is marked "n.s." (not significant); a pair without
per-item records says so instead of a p-value. report.md gets tables, report.html heatmaps (report/figures.Heatmap,
drawn by report/html.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from budgetlm.errors import DataError
from budgetlm.experiments import store as st
from budgetlm.experiments.plan import model_label
from budgetlm.experiments.recipe import BASELINE
from budgetlm.report.figures import Heatmap, headline

N_BOOT = 2000
ALPHA = 0.05
TESTS = "McNemar's test (0/1 accuracies, exact binomial under 25 discordant items) or a paired bootstrap"


@dataclass
class StudyTable:
    """One model's ablation or transfer: `rows` are (role, cell), the first the reference the others are tested
    against (ablation: the full pipeline; transfer: the untrained baseline, role ''); `columns` (task, metric)."""

    kind: str
    model: str
    pipeline: str
    rows: list[tuple[str, dict]]
    columns: list[tuple[str, str]]
    higher: dict[str, bool] = field(default_factory=dict)  # task -> higher is better
    claims: dict[tuple[str, str], dict | str] = field(default_factory=dict)  # (cell id, task) -> compare row or why not

    @property
    def reference(self) -> dict:
        return self.rows[0][1]


class PairedTests:
    """compare_records over cell folders, each folder's per-item records read once."""

    def __init__(self, directory: Path, n_boot: int = N_BOOT, seed: int = 0):
        self.directory, self.n_boot, self.seed = Path(directory), n_boot, seed
        self._items: dict[str, tuple | str] = {}

    def _records(self, cell: dict) -> tuple | str:
        from budgetlm.evaluation.compare import read_aggregations, read_items

        folder = self.directory / cell["folder"]
        if cell["cell_id"] not in self._items:
            try:
                self._items[cell["cell_id"]] = (read_items(folder), read_aggregations(folder))
            except DataError:
                self._items[cell["cell_id"]] = f"no per-item records in {cell['folder']}"
        return self._items[cell["cell_id"]]

    def claim(self, a: dict, b: dict, task: str, metric: str) -> dict | str:
        """B against A on `task`/`metric`: compare's row (diff = B - A, test, p), or why there is none."""
        from budgetlm.evaluation.compare import compare_records, task_aggregations

        ra, rb = self._records(a), self._records(b)
        for r in (ra, rb):
            if isinstance(r, str):
                return r
        agg = task_aggregations(task, ra[1].get(task, {})).get(metric)
        if agg is None or task not in ra[0] or task not in rb[0]:
            return f"no per-item {task}/{metric} records"
        row = compare_records(task, metric, agg, ra[0][task], rb[0][task], self.n_boot, self.seed)
        return row if row is not None else f"no {task} item of {a['folder']} matches one of {b['folder']}"


def study_tables(directory: Path, recipe: dict, cells: list[dict], tasks: list[str]) -> list[StudyTable]:
    """The tables of the recipe's generated study (none without one), per model, from the done cells."""
    study = recipe.get("study") or {}
    roles = study.get("roles") or {}
    if study.get("kind") not in ("ablation", "transfer") or not roles:
        return []
    tests = PairedTests(directory)
    columns = [(t, m) for t in tasks if (m := headline(cells, t)) is not None]
    out = []
    for model in dict.fromkeys(c["model"] for c in cells):
        mine = {c["pipeline"]: c for c in cells if c["model"] == model}
        if study["kind"] == "ablation":
            full = mine.get(study["pipeline"])
            if full is None:
                continue
            rows = [(roles[p], c) for p, c in mine.items() if p in roles and p != study["pipeline"]]
            rows.insert(0, ("full", full))
        else:
            base = mine.get(BASELINE)
            if base is None:
                continue
            rows = [("", base)] + [(roles[p], c) for p, c in mine.items() if p in roles]
        table = StudyTable(study["kind"], model, study["pipeline"], rows, columns)
        for task, metric in columns:
            table.higher[task] = not st.lower_is_better(metric)
            for _, c in rows[1:]:
                if _value(c, task, metric) is not None and _value(table.reference, task, metric) is not None:
                    table.claims[(c["cell_id"], task)] = tests.claim(table.reference, c, task, metric)
        out.append(table)
    return out


def diagonal(train_task: str, eval_task: str) -> bool:
    """Whether a transfer cell trained on `train_task` is evaluated on that task (an option like :eval-fold aside)."""
    return bool(train_task) and eval_task.partition(":")[0] == train_task


# ---------------------------------------------------------------------------------------------- report.md


def study_markdown(directory: Path, recipe: dict, cells: list[dict], tasks: list[str]) -> list[str]:
    """report.md's sections: the generated study's tables, then the paired tests of the slope charts' pairs."""
    tables = study_tables(directory, recipe, cells, tasks)
    out = []
    for t in tables:
        out += _ablation_md(t) if t.kind == "ablation" else _transfer_md(t)
    return out + slope_tests_md(directory, cells, tasks)


def slope_tests_md(directory: Path, cells: list[dict], tasks: list[str]) -> list[str]:
    """Each pair of report.html's slope charts (figures.pairings: a pipeline under two conditions) on each task's
    headline metric, B against A with its paired test."""
    from budgetlm.report.figures import pairings

    tests = PairedTests(directory)
    out = []
    for (cond_a, cond_b), pairs in pairings(cells):
        lines = []
        for task in tasks:
            metric = headline(cells, task)
            for a, b in pairs if metric is not None else []:
                if _row(a, task, metric) is None or _row(b, task, metric) is None:
                    continue
                cols = _claim_cols(tests.claim(a, b, task, metric))
                values = (
                    f"{_cell_text(_row(a, task, metric), se=False)} | {_cell_text(_row(b, task, metric), se=False)}"
                )
                lines.append(
                    f"| {task} ({metric}) | {a['label']} | {b['label']} | {values} | " + " | ".join(cols) + " |"
                )
        if lines:
            out += [f"### {cond_a} vs {cond_b}", "", "| task | A | B | A value | B value | B − A | 95% CI | test | p |",
                    "|---|---|---|---|---|---|---|---|---|", *lines, ""]  # fmt: skip
    if out:
        out = ["## Paired tests of the slope charts' pairs", "", _test_note(), "", *out]
    return out


def _ablation_md(t: StudyTable) -> list[str]:
    out = [f"## Ablation of `{t.pipeline}` ({model_label(t.model)})", "",
           f"Each step of the full pipeline removed in turn; Δ = the cell's value − the full pipeline's, on the same "
           f"items. {_test_note()}", ""]  # fmt: skip
    for task, metric in t.columns:
        arrow = "↑" if t.higher[task] else "↓"
        out += [f"### {task}: {metric} {arrow}", "", "| pipeline | removed | value | Δ vs full | 95% CI | test | p |",
                "|---|---|---|---|---|---|---|"]  # fmt: skip
        for role, c in t.rows:
            value = _cell_text(_row(c, task, metric))
            if role == "full":
                out.append(f"| {c['label']} | (none: the full pipeline) | {value} | | | | |")
                continue
            out.append(
                f"| {c['label']} | {role} | {value} | "
                + " | ".join(_claim_cols(t.claims.get((c["cell_id"], task))))
                + " |"
            )
        out.append("")
    return out


def _transfer_md(t: StudyTable) -> list[str]:
    head = "| trained on ↓ / evaluated on → | " + " | ".join(f"{task} ({metric})" for task, metric in t.columns) + " |"
    intro = (
        "Rows: the task the pipeline adapted on (its cell); columns: the evaluated task's headline metric. **Bold**: "
        "the diagonal (evaluated on the task it trained on). In brackets: the difference from the untrained "
        f"baseline on the same items and its p-value. {_test_note()}"
    )
    out = [f"## Transfer of `{t.pipeline}` ({model_label(t.model)})", "", intro, "", head]
    out.append("|---" * (len(t.columns) + 1) + "|")
    for role, c in t.rows:
        name = "(untrained baseline)" if not role else f"{role} (`{c['pipeline']}`)"
        line = []
        for task, metric in t.columns:
            text = _cell_text(_row(c, task, metric), se=False)
            if role:
                claim = t.claims.get((c["cell_id"], task))
                text += f" ({_short(claim)})" if claim is not None else ""
            line.append(f"**{text}**" if diagonal(role, task) else text)
        out.append(f"| {name} | " + " | ".join(line) + " |")
    return out + [""]


def _test_note() -> str:
    return (f"Tests: {TESTS} ({N_BOOT:,} resamples) of the two cells' per-item records; n.s.: p ≥ {ALPHA} (not "
            "significant).")  # fmt: skip


def _claim_cols(claim: dict | str | None) -> list[str]:
    if claim is None:
        return ["-", "", "", ""]
    if isinstance(claim, str):
        return ["-", "", claim, ""]
    ns = "" if claim["p"] < ALPHA else " n.s."
    ci = f"[{_signed(claim['ci_low'])}, {_signed(claim['ci_high'])}]"
    return [_signed(claim["diff"]) + ns, ci, claim["test"], _p(claim["p"])]


def _short(claim: dict | str) -> str:
    if isinstance(claim, str):
        return "untested: " + claim
    return f"{_signed(claim['diff'])}, p {_p(claim['p'])}" + ("" if claim["p"] < ALPHA else ", n.s.")


# ---------------------------------------------------------------------------------------------- report.html


def study_sections(directory: Path, recipe: dict, cells: list[dict], tasks: list[str]) -> list[tuple]:
    """report.html's sections for a generated study: (heading, figures, note), none without one."""
    tables = study_tables(directory, recipe, cells, tasks)
    ablations = [_ablation_heatmap(k, t) for k, t in enumerate(tables) if t.kind == "ablation"]
    transfers = [_transfer_heatmap(k, t) for k, t in enumerate(tables) if t.kind == "transfer"]
    out = []
    if ablations:
        out.append(("Ablation (measured, paired tests)", ablations, ""))
    if transfers:
        out.append(("Transfer matrix (measured, paired tests)", transfers, ""))
    return out


def _ablation_heatmap(k: int, t: StudyTable) -> Heatmap:
    fig = Heatmap(f"ablation-{k}", f"Ablation of {t.pipeline} ({model_label(t.model)}): change against the full "
                  "pipeline", "", colorbar="Δ vs full")  # fmt: skip

    def entry(role, c, task, metric, claim):
        text = _cell_text(_row(c, task, metric), se=False)
        if role == "full":
            return (0.0 if _row(c, task, metric) else None), text
        diff = claim["diff"] if isinstance(claim, dict) else None
        return diff, text + (f" ({_short(claim)})" if claim else "")

    _fill(fig, t, entry)
    fig.rows = [("full: " if role == "full" else "minus " + role + ": ") + c["label"] for role, c in t.rows]
    fig.caption = (
        _rows_caption(t) + " Colour: the cell's value minus the full pipeline's (arrow per column: ↑ higher is "
        f"better, ↓ lower). {_test_note()}"
    )
    return fig


def _transfer_heatmap(k: int, t: StudyTable) -> Heatmap:
    fig = Heatmap(f"transfer-{k}", f"Transfer matrix of {t.pipeline} ({model_label(t.model)}): trained on (rows) x "
                  "evaluated on (columns)", "", colorbar="value")  # fmt: skip

    def entry(role, c, task, metric, claim):
        row = _row(c, task, metric)
        text = _cell_text(row, se=False) + (f" ({_short(claim)})" if role and claim else "")
        return (row["value"] if row else None), ("◆ " if diagonal(role, task) else "") + text

    _fill(fig, t, entry)
    fig.rows = ["untrained baseline" if not role else f"trained on {role}" for role, _ in t.rows]
    fig.caption = (
        _rows_caption(t) + " ◆: the diagonal (evaluated on the task it trained on). In brackets: the difference from "
        f"the untrained baseline cell on the same items. {_test_note()}"
    )
    return fig


def _fill(fig: Heatmap, t: StudyTable, entry) -> None:
    fig.cols = [f"{task} ({metric} {'↑' if t.higher[task] else '↓'})" for task, metric in t.columns]
    fig.cell_ids = [c["cell_id"] for _, c in t.rows]
    fig.folders = [c["folder"] for _, c in t.rows]
    for role, c in t.rows:
        values, texts = [], []
        for task, metric in t.columns:
            v, text = entry(role, c, task, metric, t.claims.get((c["cell_id"], task)))
            values.append(v)
            texts.append(text)
        fig.values.append(values)
        fig.text.append(texts)
    if not t.columns:
        fig.note = "no task has a headline metric in the store"


def _rows_caption(t: StudyTable) -> str:
    rows = ", ".join(f"{task}/{metric}" for task, metric in t.columns)
    cells = ", ".join(c["cell_id"] for _, c in t.rows)
    return f"Store rows: {rows} of cells {cells}; per-item records: cells/<cell>/items/<task>.jsonl."


# ---------------------------------------------------------------------------------------------- formatting


def _row(cell: dict, task: str, metric: str) -> dict | None:
    row = cell["phases"].get(task, {}).get(metric)
    return row if row is not None and _finite(row.get("value")) else None


def _value(cell: dict, task: str, metric: str) -> float | None:
    row = _row(cell, task, metric)
    return None if row is None else row["value"]


def _finite(x) -> bool:
    return isinstance(x, int | float) and not math.isnan(x) and not math.isinf(x)


def _cell_text(row: dict | None, se: bool = True) -> str:
    if row is None:
        return "-"
    v = row["value"]
    d = 3 if abs(v) < 10 else 1
    err = row.get("stderr")
    return f"{v:.{d}f}" + (f" ± {err:.{d}f}" if se and _finite(err) else "")


def _signed(x: float) -> str:
    d = 3 if abs(x) < 10 else 1
    return f"{x:+.{d}f}"


def _p(p: float) -> str:
    return "<0.0001" if p < 1e-4 else f"{p:.4f}"
