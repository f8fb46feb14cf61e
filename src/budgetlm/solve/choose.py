"""The choice: among the evaluated cells of a study, the most accurate on a task that meets every limit.

Reads the results store only (DIR/results.sqlite). A cell is evaluated when it is done and has the task's headline
metric (experiments/store.py main_metric: acc before acc_norm, perplexity before the rest; lower is better for
perplexities and KL). Its figures:
  stored size        size/stored_bytes, measured (the same bytes on any device)
  decode ms/token    speed/decode_ms_per_token, measured here; with a device, projected by hardware/devices.py
                     (roofline scaled by the cell's own measured-to-roofline ratio)
  peak RSS           memory/peak_rss_benchmark, measured here (the model loaded and decoding); with a device, the
                     projected memory it needs there (weights + KV cache at the context + runtime)
  fits               with a device only: the projected memory needed against the device's memory
A figure that is missing (the cell was not benchmarked, its model's config cannot be read) fails its limit.
Ties in the score go to the smaller stored size. The neighbours are the cells beside the chosen one on the
accuracy-vs-size and accuracy-vs-speed fronts (report/plots.py pareto_front over every evaluated cell): the nearest
front cell cheaper than it and the nearest costlier one, whether or not they meet the limits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from budgetlm.errors import BudgetLMError, ConfigError, DataError, UnknownNameError, suggest
from budgetlm.experiments import store as st
from budgetlm.experiments.plan import Cell, model_label
from budgetlm.report.plots import pareto_front
from budgetlm.units import format_value

SIZE, DECODE, RSS, FITS = "stored_bytes", "decode_ms_per_token", "peak_rss", "fits"
FRONTS = {"size": SIZE, "speed": DECODE}  # front name -> the figure on its x axis


@dataclass(frozen=True)
class Limits:
    max_size: float | None = None  # stored bytes
    max_ms: float | None = None  # decode ms per token
    max_rss: float | None = None  # bytes
    device: str | None = None  # project decode and memory onto this device profile (`budgetlm devices`)
    context: int | None = None  # KV cache tokens a projection is stated at (default: devices.py's)

    def check(self) -> None:
        if self.max_size is None and self.max_ms is None and self.max_rss is None and self.device is None:
            raise ConfigError("give a budget: --max-size, --max-ms-per-token, --max-rss and/or --device")
        if self.context is not None and self.device is None:
            raise ConfigError("--context applies to a projection; give --device too")


@dataclass
class Figure:
    value: float | None
    unit: str
    source: str  # measured | projected
    what: str
    limit: float | None = None
    flag: str = ""  # the option that set the limit
    missing: str = ""  # why there is no value
    rule: str = ""  # the limit in words (default: the flag and the limit)
    extra: dict = field(default_factory=dict)  # how a projected figure was made (device, context, host ratio)

    def __post_init__(self):
        if not self.rule and self.limit is not None:
            self.rule = f"{self.flag} {format_value(self.limit, None, self.unit)}"

    @property
    def ok(self) -> bool:
        return self.limit is None or (self.value is not None and self.value <= self.limit)

    @property
    def excess(self) -> float:
        """How far over the limit, as a fraction of it (0 within it, inf when unknown)."""
        if self.ok:
            return 0.0
        return math.inf if self.value is None else self.value / self.limit - 1

    def text(self) -> str:
        if self.value is None:
            return f"{self.what}: none ({self.missing})"
        return f"{self.what} {format_value(self.value, None, self.unit)} ({self.source})"

    def over(self) -> str:
        """What breaks the limit, for the error line."""
        if self.value is None:
            return f"has no {self.what} for {self.flag} ({self.missing})"
        by = format_value(self.value - self.limit, None, self.unit)
        return f"{self.text()} is {by} ({100 * self.excess:.0f}%) over {self.rule}"


@dataclass
class Candidate:
    cell: dict  # the store's row of the cell (cell_id, model, pipeline, config, ...)
    folder: Path
    score: float
    stderr: float | None
    n: int | None
    figures: dict[str, Figure]

    @property
    def cell_id(self) -> str:
        return self.cell["cell_id"]

    @property
    def label(self) -> str:
        return f"{self.cell['pipeline']} ({model_label(self.cell['model'])})"

    @property
    def meets(self) -> bool:
        return all(f.ok for f in self.figures.values())

    @property
    def excess(self) -> float:
        return sum(f.excess for f in self.figures.values())


@dataclass
class Solution:
    directory: Path
    task: str
    task_from: str  # "--task" or "the study's first task"
    metric: str
    higher: bool
    limits: Limits
    candidates: list[Candidate]  # every evaluated cell
    chosen: Candidate
    neighbours: list[tuple[str, str, Candidate]]  # (front, "cheaper" | "costlier", cell)
    proposals: list = field(default_factory=list)  # propose.Proposal, filled by propose.proposals
    ran: list[str] = field(default_factory=list)  # the proposals --run evaluated before this solution was made


def solve(directory: str | Path, limits: Limits, task: str | None = None) -> Solution:
    """The most accurate evaluated cell of the study in `directory` meeting `limits` (see the module docstring);
    a one-line BudgetLMError for bad input, and when no cell meets the limits (naming the closest)."""
    limits.check()
    device = _device(limits)
    directory = Path(directory)
    with st.Store.open(directory) as store:
        cells = [c for c in store.cells() if c["status"] == "done"]
        rows = st.by_cell(store.rows([c["cell_id"] for c in cells]))
        recipe = store.get_meta("recipe")
    recipe = recipe if isinstance(recipe, dict) else {}
    task, task_from = _task(directory, task, recipe, cells)
    metric = st.main_metric(list(dict.fromkeys(m for c in cells for m in rows.get(c["cell_id"], {}).get(task, {}))))
    candidates = []
    for cell in cells:
        phases = rows.get(cell["cell_id"], {})
        row = phases.get(task, {}).get(metric) if metric else None
        if row is None or row["value"] is None or math.isnan(row["value"]):
            continue
        folder = Cell(cell["cell_id"], cell["model"], cell["pipeline"], cell["config"]).folder(directory)
        se = row.get("stderr")
        se = None if se is None or math.isnan(se) else se
        figs = figures(cell, phases, folder, limits, device)
        candidates.append(Candidate(cell, folder, row["value"], se, row.get("n"), figs))
    if not candidates:
        raise DataError(f"no finished cell of {directory} has results for task '{task}'; run the study first")
    higher = not st.lower_is_better(metric)
    meeting = [c for c in candidates if c.meets]
    if not meeting:
        raise BudgetLMError(_none_meets(directory, candidates, limits, higher))
    chosen = min(meeting, key=lambda c: (-c.score if higher else c.score, _size(c), c.cell_id))
    return Solution(directory, task, task_from, metric, higher, limits, candidates, chosen,
                    neighbours(candidates, chosen, higher))  # fmt: skip


def _device(limits: Limits):
    """The device profile of --device (one name; an unknown one gets the closest names), None without one."""
    if limits.device is None:
        return None
    from budgetlm.hardware import devices as dv

    if "," in limits.device:
        raise ConfigError(f"--device {limits.device}: give one device; the budget holds on one at a time")
    if limits.context is not None:
        dv.check_context(limits.context, None)
    return next(iter(dv.select(limits.device, dv.load_devices()).values()))


def _task(directory: Path, task: str | None, recipe: dict, cells: list[dict]) -> tuple[str, str]:
    tasks = list(dict.fromkeys([*recipe.get("tasks", []), *(t for c in cells for t in c["config"].get("tasks", []))]))
    if task is None:
        if not tasks:
            raise DataError(f"the study in {directory} evaluated no task; give --task or add tasks to its recipe")
        return st.result_name(tasks[0]), "the study's first task"  # the name its rows carry
    if task not in tasks:
        listed = ", ".join(tasks) or "none"
        raise UnknownNameError(
            f"--task '{task}' is not among the tasks of the study in {directory}{suggest(task, tasks)}; its tasks: "
            f"{listed}"
        )
    return st.result_name(task), "--task"


def figures(cell: dict, phases: dict, folder: Path, limits: Limits, device) -> dict[str, Figure]:
    """A cell's constrained figures (see the module docstring), measured or projected for `device`."""
    not_run = "its benchmark did not run"
    size = st.value(phases, "size", "stored_bytes")
    out = {SIZE: Figure(size, "B", "measured", "stored size", limits.max_size, "--max-size", not_run)}
    if device is None:
        dec = st.value(phases, "speed", "decode_ms_per_token")
        rss = st.value(phases, "memory", "peak_rss_benchmark")
        out[DECODE] = Figure(dec, "ms/token", "measured", "decode", limits.max_ms, "--max-ms-per-token", not_run)
        out[RSS] = Figure(rss, "B", "measured", "peak RSS while benchmarking", limits.max_rss, "--max-rss", not_run)
        return out
    from budgetlm.hardware.devices import project, workload_from_phases

    model = folder / "model"  # the cell's saved model (a step changed it): its config, e.g. fewer layers
    spec = str(model) if (model / "config.json").is_file() else cell["model"]
    try:
        work = workload_from_phases(phases, spec, cell["pipeline"], str(folder), limits.context)
        proj, why = project(work, device), ""
    except BudgetLMError as exc:
        proj, why = None, f"not projected: {exc}"
    where = f"on {device.name}"
    needed = proj["memory_needed"].value if proj else None
    dec = proj["decode_ms_per_token"].value if proj else None
    how = {k: proj["fits"].extra[k] for k in ("device", "context", "host_ratio")} if proj else {}
    out[DECODE] = Figure(dec, "ms/token", "projected", f"decode {where}", limits.max_ms, "--max-ms-per-token", why)
    out[DECODE].extra = how
    memory = f"the memory of {device.name} ({format_value(device.memory_bytes, None, 'B')})"
    flag = f"--device {device.name}"
    out[FITS] = Figure(needed, "B", "projected", f"memory needed {where}", device.memory_bytes, flag, why, memory, how)
    if limits.max_rss is not None:
        out[RSS] = Figure(needed, "B", "projected", f"memory needed {where}", limits.max_rss, "--max-rss", why)
        out[RSS].extra = how
    return out


def _size(c: Candidate) -> float:
    size = c.figures[SIZE].value
    return math.inf if size is None else size


def neighbours(candidates: list[Candidate], chosen: Candidate, higher: bool) -> list[tuple[str, str, Candidate]]:
    """Per front (accuracy vs stored size, accuracy vs decode ms/token): the front cell just cheaper than the chosen
    one and the one just costlier (its neighbours on the front when it is on it)."""
    out = []
    for front, key in FRONTS.items():
        x0 = chosen.figures[key].value
        have = [c for c in candidates if c.figures[key].value is not None]
        if x0 is None or not have:
            continue
        order = pareto_front([c.figures[key].value for c in have], [c.score for c in have], higher)
        line = [have[i] for i in order]
        if chosen in line:
            k = line.index(chosen)
            cheaper, costlier = line[:k], line[k + 1 :]
        else:
            cheaper = [c for c in line if c.figures[key].value <= x0]
            costlier = [c for c in line if c.figures[key].value > x0]
        if cheaper:
            out.append((front, "cheaper", cheaper[-1]))
        if costlier:
            out.append((front, "costlier", costlier[0]))
    return out


def _none_meets(directory: Path, candidates: list[Candidate], limits: Limits, higher: bool) -> str:
    """The error line when no cell meets the limits: the limits, and the closest cell (the least total excess over
    them, as fractions of each limit) with what it breaks and by how much."""
    closest = min(candidates, key=lambda c: (c.excess, -c.score if higher else c.score))
    wanted = ", ".join(dict.fromkeys(f.rule for c in candidates for f in c.figures.values() if f.limit is not None))
    broken = "; ".join(f.over() for f in closest.figures.values() if not f.ok)
    return (
        f"no evaluated cell of {directory} meets {wanted} ({len(candidates)} evaluated); closest: {closest.label}, "
        f"cell {closest.cell_id}: {broken}; relax the limits or run smaller or faster pipelines"
    )
