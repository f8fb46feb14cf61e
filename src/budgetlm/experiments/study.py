"""Run a study: plan the cells of a recipe, run each unfinished one in a fresh process, store the results.

    out/recipe.yaml           the resolved recipe (every default filled in)
    out/results.sqlite        the results store (written by this driver only, one transaction per cell)
    out/references/           base-model outputs the KL / fidelity tasks of the other cells compare with
    out/cells/<..>_<id>/      config.json, env.json, steps.json, items/<task>.jsonl, eval.json, log.txt,
                              model/ (when a step changed the model), result.json (written last)

A killed study, rerun with the same recipe and folder, skips the cells marked done in the store, ingests a
cell that finished while the driver was gone, and cleans and reruns the others, keeping a compressed model such a
cell saved: its steps do not run again (nor do they for a cell whose model, steps and seed another cell of the
study shares: experiments/cell.py's `compressed_model`). A failed cell is recorded and the study goes on; at the
end a BudgetLMError names the failed cells.

Where the cells run is a pool (experiments/runners.py): `InOrder` runs each cell as it is handed over, one at a time
(the local runner, a fresh process per cell); experiments/ray_runner.py's `RayPool` runs the same cell processes as
Ray tasks side by side. Either way the driver prepares each cell folder and alone reads its result.json into the
store.
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import sys
import threading
import time
from contextlib import contextmanager
from functools import partial
from pathlib import Path

from budgetlm.errors import BudgetLMError, ConfigError, Interrupted, suggest
from budgetlm.experiments import store as st
from budgetlm.experiments.cell import CONFIG, RESULT
from budgetlm.experiments.plan import Cell, model_label, plan
from budgetlm.experiments.recipe import Recipe, dump_recipe, load_recipe, parse_recipe
from budgetlm.experiments.runners import InOrder, Pool, Runner
from budgetlm.experiments.runtime import SKIPPED, check_runtimes, skip_line, split_unavailable
from budgetlm.models.handle import MANIFEST
from budgetlm.progress import Progress, duration
from budgetlm.utils import atomic_write_text, check_output, move_aside

LOCK = ".lock"
KEPT = ("model", "steps.json")  # what an unfinished cell keeps: its compressed model (experiments/cell.py reuses it)
RUNNERS = ("local", "ray")


def check_max_cells(rec: Recipe, cells: list[Cell], max_cells: int | None) -> None:
    """Refuse a plan of more cells than the user allowed (lists of settings multiply pipelines)."""
    if max_cells is None:
        return
    if max_cells < 1:
        raise ConfigError(f"--max-cells {max_cells}: allow at least 1 cell")
    if len(cells) > max_cells:
        raise ConfigError(
            f"recipe {rec.name} expands to {len(cells)} cells ({len(rec.models)} model(s) x "
            f"{len(cells) // max(1, len(rec.models))} pipelines, baseline included), more than --max-cells "
            f"{max_cells}; raise --max-cells or shorten the lists of settings (`budgetlm run --dry-run` lists them)"
        )


def run_study(
    recipe: str | Path | Recipe | None = None,
    out_dir: str | Path | None = None,
    progress: bool = True,
    *,
    runner: Runner | Pool | str | None = None,
    address: str | None = None,
    force: bool = False,
    max_cells: int | None = None,
) -> Path:
    """Run every unfinished cell of the recipe (None: the bundled quickstart); returns the study folder.

    `runner`: "local" (default: one fresh process per cell, in turn), "ray" (the same processes as Ray tasks on a
    local instance or, with `address`, an existing cluster: experiments/ray_runner.py), a Pool, or a function that
    runs one cell folder (tests). Everything is checked before the folder is touched: the recipe, the folder (a study
    folder is resumed; anything else is refused, or with `force` moved aside, as is an existing study), every task's
    data (loaded once) and, for Ray, the connection."""
    check_runner(runner, address)
    rec = parse_recipe(recipe, "recipe") if isinstance(recipe, Recipe) else load_recipe(recipe)
    out = Path(out_dir) if out_dir is not None else Path("runs") / rec.name
    check_output(out, "a study", marker=_is_study, force=force, resume=True)
    cells = plan(rec)
    check_max_cells(rec, cells, max_cells)
    check_pipelines(rec)
    check_runtimes(rec)  # llama.cpp cells: codes a GGUF block type holds
    check_task_data(rec)
    pool = _pool(runner, address, rec)
    try:
        if force and out.is_dir() and any(out.iterdir()):
            move_aside(out)
        out.mkdir(parents=True, exist_ok=True)
        out = out.resolve()
        with study_lock(out), st.Store(out) as store, _terminate_as_interrupt():
            atomic_write_text(out / "recipe.yaml", dump_recipe(rec))
            store.set_meta("plan", [c.id for c in cells])
            store.set_meta("recipe", rec.model_dump(mode="json"))
            failed = _run_cells(cells, out, store, pool, progress)
    finally:
        pool.close()
    if failed:
        names = "; ".join(f"{c.label}: {err}" for c, err in failed)
        raise BudgetLMError(f"{len(failed)} of {len(cells)} cells failed in {out}: {names}")
    return out


def check_runner(runner, address: str | None) -> None:
    if isinstance(runner, str) and runner not in RUNNERS:
        raise ConfigError(f"unknown runner '{runner}'{suggest(runner, RUNNERS)}; use one of: {', '.join(RUNNERS)}")
    if address is not None and runner != "ray":
        raise ConfigError(f"--address {address} names a Ray cluster: add --runner ray, or leave --address out")


def _pool(runner, address: str | None, rec: Recipe) -> Pool:
    if runner == "ray":
        from budgetlm.experiments.ray_runner import RayPool

        return RayPool(address, threads=rec.threads or 1)
    if runner is None or runner == "local":
        return InOrder()
    return runner if hasattr(runner, "submit") else InOrder(runner)


def _run_cells(cells: list[Cell], out: Path, store: st.Store, pool: Pool, progress: bool) -> list[tuple[Cell, str]]:
    """Hand every unfinished cell to the pool (its folder cleaned, its config written) and store each as it ends;
    returns the failed cells with their errors. Interrupted, the cells still running are marked so and stopped."""
    for model in dict.fromkeys(c.model for c in cells):  # rows a driver killed after a cell's transaction missed
        update_recovery(store, cells, model)
    done = store.done_cells()
    todo, skipped = split_unavailable([c for c in cells if c.id not in done])  # runtimes not installed here
    for cell, why in skipped:
        store.start_cell(cell.id, cell.model, cell.pipeline, cell.config)
        store.set_status(cell.id, SKIPPED, why)
    if skipped and progress:
        print(skip_line(skipped), file=sys.stderr, flush=True)
    failed: list[tuple[Cell, str]] = []
    running: dict[str, float] = {}  # cell id -> when it was handed over
    with _Display(len(cells), len(cells) - len(todo), progress) as display:

        def ended(cell: Cell, error: str | None) -> None:
            error = _ingest(cell, out, store, error)
            if error is None:
                update_recovery(store, cells, cell.model)
            else:
                failed.append((cell, error))
            display.finish(cell, error, time.perf_counter() - running.pop(cell.id))

        try:
            for cell in todo:
                running[cell.id] = time.perf_counter()
                if _prepare(cell, out, store):
                    display.start(cell, pool.verb)
                    pool.submit(cell, cell.folder(out), partial(display.status, cell))
                else:  # it finished while no driver watched: its result is read as it is
                    display.start(cell, "found finished")
                    ended(cell, None)
                for c, error in pool.ended(wait=False):
                    ended(c, error)
            for c, error in pool.ended(wait=True):
                ended(c, error)
        except BaseException:
            for cell_id in running:
                store.set_status(cell_id, "interrupted", "the study was interrupted while this cell ran")
            pool.stop()
            raise
    return failed


def _is_study(folder: Path) -> bool:
    """A study folder, or one a driver locked and was killed in before it wrote its store."""
    return st.is_study(folder) or {f.name for f in folder.iterdir()} == {LOCK}


def check_pipelines(rec: Recipe) -> None:
    """Check the first step of every pipeline against every model's modules (a weightless copy, see
    MethodConfig.check): a group size that does not divide a width, or targets that match nothing, is a one-line
    error before anything is written, not a failed cell. Later steps see a changed model and are left to the cell."""
    from budgetlm.methods.base import parse_config
    from budgetlm.models.sources import skeleton

    firsts = {name: steps[0] for name, steps in rec.pipelines.items() if steps}
    for spec in rec.models if firsts else []:
        model = skeleton(spec)
        for name, step in firsts.items() if model is not None else []:
            cfg = parse_config(step["method"], {k: v for k, v in step.items() if k != "method"})
            try:
                cfg.check(model)
            except BudgetLMError as exc:
                raise type(exc)(f"pipelines.{name}[0] on {model_label(spec)}: {exc}") from None


def check_task_data(rec: Recipe) -> None:
    """Load every task's items once, as the cells will, so that a missing or malformed data file is a one-line
    error before the study folder is written, not a failure in every cell."""
    from budgetlm.data.tasks import tasks as registry
    from budgetlm.data.tasks.base import TaskContext
    from budgetlm.errors import DataError

    ctx = TaskContext(seed=rec.seed, data_dir=Path(rec.data_dir) if rec.data_dir else None)
    for name in rec.tasks:
        data = registry.get(name).load(ctx)
        if not data.items:
            raise DataError(f"task '{name}' has no items ({data.source}); check the data file")


def _prepare(cell: Cell, out: Path, store: st.Store) -> bool:
    """Mark the cell started; unless it holds a result already (returns False), clean its folder and write its
    config.json (returns True: it is to run)."""
    folder = cell.folder(out)
    store.start_cell(cell.id, cell.model, cell.pipeline, cell.config)
    if _read_result(folder) is not None:
        return False
    if folder.exists():  # unfinished or never started: start clean, but for a compressed model it saved
        keep = KEPT if (folder / "steps.json").is_file() and (folder / "model" / MANIFEST).is_file() else ()
        for f in folder.iterdir():
            if f.name not in keep:
                shutil.rmtree(f) if f.is_dir() and not f.is_symlink() else f.unlink()
    folder.mkdir(parents=True, exist_ok=True)
    config = {**cell.config, "cell_id": cell.id, "study_dir": str(out)}
    atomic_write_text(folder / CONFIG, json.dumps(config, indent=2))
    return True


def _ingest(cell: Cell, out: Path, store: st.Store, error: str | None) -> str | None:
    """Store a cell that ended: its rows and 'done' from its result.json, or 'failed' with the error; returns None
    or the one-line error."""
    folder = cell.folder(out)
    result = None if error else _read_result(folder)
    if error is None and result is None:
        error = f"the cell ended without writing {RESULT} (see {folder})"
    elif error is not None:
        error = f"{error} (log: {folder / 'log.txt'})"
    if error is None:
        try:
            store.finish_cell(cell.id, result["phases"], result.get("env"))
        except (KeyError, TypeError, ValueError) as exc:
            error = f"malformed {folder / RESULT}: {exc}"
    if error is not None:
        store.set_status(cell.id, "failed", error)
    return error


def _read_result(folder: Path) -> dict | None:
    try:
        result = json.loads((folder / RESULT).read_text())
    except (OSError, ValueError):
        return None
    return result if isinstance(result, dict) and isinstance(result.get("phases"), dict) else None


@contextmanager
def study_lock(out: Path):
    """One driver per study folder: a second `budgetlm run` on the same folder stops at once."""
    import fcntl

    with open(out / LOCK, "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BudgetLMError(
                f"another study driver is running in {out}; wait for it or choose another --out"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextmanager
def _terminate_as_interrupt():
    """Turn SIGTERM into an Interrupted exception while the driver runs, so the running cell is marked and stopped."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Interrupted(signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# ---------------------------------------------------------------------------------------------- recovery %


def recovery(phases: dict[str, dict[str, dict]], baseline: dict[str, dict[str, dict]], base_id: str) -> dict:
    """'<metric>_recovery_pct' = 100 x value / baseline value, for every accuracy metric of every task the
    baseline also scored (skipped where the baseline is 0 or missing). The stderr is the cell's own stderr
    scaled the same way: the baseline is treated as exact."""
    out: dict[str, dict[str, dict]] = {}
    for phase, metrics in phases.items():
        for metric, row in metrics.items():
            if not st.is_accuracy(metric):
                continue
            base = st.value(baseline, phase, metric)
            val = row.get("value")
            if base is None or base == 0 or val is None or math.isnan(val):
                continue
            se = row.get("stderr")
            out.setdefault(phase, {})[metric + st.RECOVERY] = {
                "value": 100.0 * val / base,
                "stderr": None if se is None or math.isnan(se) else 100.0 * se / abs(base),
                "n": row.get("n"),
                "unit": "%",
                "source": "measured",
                "extra": {"baseline_cell": base_id, "baseline_value": base, "of": metric},
            }
    return out


def update_recovery(store: st.Store, cells: list[Cell], model: str) -> None:
    """(Re)compute recovery rows of every finished cell of `model` once its baseline cell is done."""
    done = store.done_cells()
    mine = [c for c in cells if c.model == model and c.id in done]
    base = next((c for c in mine if c.is_baseline), None)
    if base is None:
        return
    rows = st.by_cell(store.rows([c.id for c in mine]))
    for c in mine:
        phases = recovery(rows.get(c.id, {}), rows.get(base.id, {}), base.id)
        if phases:
            store.put_rows(c.id, phases)


# ---------------------------------------------------------------------------------------------- display


class _Display:
    """Progress over the cells (budgetlm.progress, on stderr): on a terminal a bar whose description follows the
    running cell (its phase and, relayed from the cell's process, its layer, task or benchmark run) and a line
    per finished cell; elsewhere a plain line per cell start and finish and per status of the running cell.
    Cells that run side by side (Ray) are numbered in the order they were handed over."""

    def __init__(self, total: int, completed: int, enabled: bool):
        self.total, self.completed, self.enabled = total, completed, enabled
        self.bar: Progress | None = None
        self.started, self.number = completed, {}  # cells are numbered as they are handed over

    def __enter__(self):
        self.bar = Progress("run", self.total, enabled=self.enabled, completed=self.completed, transient=False)
        return self

    def __exit__(self, *exc):
        self.bar.status("finished" if exc[0] is None else "stopped", line=False)
        self.bar.close()

    def start(self, cell: Cell, verb: str = "started") -> None:
        self.number[cell.id] = self.started = self.started + 1
        self.bar.status(f"{self._name(cell)}: {verb}")

    def status(self, cell: Cell, text: str) -> None:
        if text != "done":  # the cell's last status: finish() says it with the time
            self.bar.status(f"{self._name(cell)}: {text}")

    def finish(self, cell: Cell, error: str | None, seconds: float) -> None:
        outcome = "done" if error is None else f"failed: {error}"
        self.bar.advance(f"{self._name(cell)}: {outcome} in {duration(seconds)}", log=True)

    def _name(self, cell: Cell) -> str:
        return f"cell {self.number[cell.id]}/{self.total} {cell.label}"


# ---------------------------------------------------------------------------------------------- summary


def summary_table(directory: str | Path):
    """A rich Table: one row per cell with size (in the unit that fits the largest), bits per weight over the
    Linears and over the whole model, the main metric of each task and speed ('*' where the load average
    during the benchmark exceeded the CPU count: hardware/contention.py)."""
    from rich.table import Table

    from budgetlm.hardware.contention import contended
    from budgetlm.units import byte_unit

    with st.Store.open(directory) as store:
        cells = store.plan_cells()
        rows = st.by_cell(store.rows([c["cell_id"] for c in cells]))
    tasks = list(dict.fromkeys(t for c in cells for t in c["config"].get("tasks", [])))
    several_models = len({c["model"] for c in cells}) > 1
    sizes = [st.value(rows.get(c["cell_id"], {}), "size", "stored_bytes") for c in cells]
    scale, unit = byte_unit(max((s for s in sizes if s), default=0))
    table = Table(title=f"study {Path(directory)}")
    if several_models:
        table.add_column("model")
    table.add_column("pipeline")
    table.add_column("status")
    table.add_column(f"stored {unit}", justify="right")
    table.add_column("bpw Linears", justify="right")
    table.add_column("bpw model", justify="right")
    mains = {}
    names = {t: st.result_name(t) for t in tasks}  # rows carry the canonical name (`sciq-rag:gate=grad` -> `...:k=3`)
    for t in tasks:
        metrics = [m for c in cells for m in rows.get(c["cell_id"], {}).get(names[t], {})]
        mains[t] = st.main_metric(list(dict.fromkeys(metrics)))
        table.add_column(f"{t} {mains[t] or ''}".strip(), justify="right")
    table.add_column("decode ms/tok", justify="right")
    table.add_column("prefill tok/s", justify="right")
    flagged = False
    for c, size in zip(cells, sizes):
        phases = rows.get(c["cell_id"], {})
        line = [model_label(c["model"])] if several_models else []
        line += [c["pipeline"], c["status"] or "", _fmt(size / scale if size else None, 1)]
        line.append(_fmt(st.value(phases, "size", "linear_bpw"), 2))
        line.append(_fmt(st.value(phases, "size", "bpw"), 2))
        for t in tasks:
            line.append(_task_cell(phases.get(names[t], {}), mains[t]))
        busy = contended([r.get("extra") for r in phases.get("speed", {}).values()], (c.get("env") or {}).get("cores"))
        mark = " *" if busy else ""
        flagged = flagged or bool(busy)
        line.append(_fmt(st.value(phases, "speed", "decode_ms_per_token"), 1) + mark)
        prefill = st.prefill_metrics(phases)
        line.append((" / ".join(_fmt(st.value(phases, "speed", p), 0) for p in prefill) or "-") + mark)
        table.add_row(*line)
    notes = []
    prefill_names = {p.split("@")[1] for c in cells for p in st.prefill_metrics(rows.get(c["cell_id"], {}))}
    if prefill_names:
        notes.append(f"prefill at {' / '.join(sorted(prefill_names, key=int))} tokens; recovery % of baseline")
    if flagged:
        notes.append("* measured while the load average exceeded the CPU count: speed figures low and noisy")
    table.caption = "; ".join(notes) or None
    return table


def _task_cell(metrics: dict[str, dict], main: str | None) -> str:
    if main is None or main not in metrics:
        return "-"
    row = metrics[main]
    text = _fmt(row["value"], 3 if abs(row["value"]) < 10 else 1)
    if row.get("stderr") is not None:
        text += f" ± {_fmt(row['stderr'], 3 if abs(row['value']) < 10 else 1)}"
    rec = metrics.get(main + st.RECOVERY)
    if rec is not None:
        text += f" ({rec['value']:.0f}%)"
    return text


def _fmt(x: float | None, digits: int) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:,.{digits}f}"
