"""The results store: one SQLite file per study (DIR/results.sqlite), written only by the study driver.

    rows(cell_id, task_or_phase, metric, value, stderr, n, unit, source, extra_json)   one per measured figure
    cells(cell_id, model, pipeline, config_json, env_json, status, started, finished, error)
    meta(key, value)                                                                  e.g. the current plan

A cell's rows and its status 'done' are committed in one transaction, so a study killed at any moment
leaves each cell either complete or absent. Statuses: running, done, failed, interrupted.
A new store records the layout of its tables (meta 'schema', SCHEMA_VERSION) and the budgetlm that made it (meta
'budgetlm'); a store of a later layout, or one missing a column this code reads, is refused in one line (a store
made before the key existed has layout 1).
"""

from __future__ import annotations

import json
import math
import re
import sqlite3
import time
from collections.abc import Iterable
from pathlib import Path

from budgetlm._version import __version__
from budgetlm.errors import BudgetLMError

FILENAME = "results.sqlite"
SCHEMA_VERSION = 1  # the tables below; raise it when a change makes older code misread a store

_SCHEMA = """
CREATE TABLE IF NOT EXISTS rows (
    cell_id TEXT NOT NULL, task_or_phase TEXT NOT NULL, metric TEXT NOT NULL,
    value REAL, stderr REAL, n INTEGER, unit TEXT, source TEXT, extra_json TEXT,
    PRIMARY KEY (cell_id, task_or_phase, metric)
);
CREATE TABLE IF NOT EXISTS cells (
    cell_id TEXT PRIMARY KEY, model TEXT, pipeline TEXT, config_json TEXT, env_json TEXT,
    status TEXT, started REAL, finished REAL, error TEXT
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
"""
_ROW_COLUMNS = ("cell_id", "task_or_phase", "metric", "value", "stderr", "n", "unit", "source", "extra_json")
_CELL_COLUMNS = ("cell_id", "model", "pipeline", "config_json", "env_json", "status", "started", "finished", "error")


def is_study(directory: str | Path) -> bool:
    """True when the folder holds a results store; a results.sqlite that is not one is a one-line error. Reads only
    (nothing is created or changed), so it can check an --out folder before a study starts."""
    path = Path(directory) / FILENAME
    if not path.is_file():
        return False
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        finally:
            conn.close()
    except sqlite3.OperationalError as exc:
        if _interrupted_transaction(path):
            return True  # a driver killed inside a transaction: the store's next writer rolls its journal back
        raise BudgetLMError(
            f"{path} is not a budgetlm results store ({exc}); move it away, or give another study folder"
        ) from None
    except sqlite3.DatabaseError as exc:
        raise BudgetLMError(
            f"{path} is not a budgetlm results store ({exc}); move it away, or give another study folder"
        ) from None
    return {"rows", "cells", "meta"} <= tables


def _interrupted_transaction(path: Path) -> bool:
    """A SQLite file with a hot rollback journal beside it: the process writing it died inside a transaction, and a
    read-only connection cannot open it until a writer rolls the journal back."""
    try:
        with open(path, "rb") as f:
            header = f.read(16)
    except OSError:
        return False
    journal = path.with_name(path.name + "-journal")
    return header == b"SQLite format 3\x00" and journal.is_file() and journal.stat().st_size > 0


class Store:
    """A thin wrapper over the SQLite file. Open with Store(dir) (creates it) or Store.open(dir) (must exist)."""

    def __init__(self, directory: str | Path):
        self.path = Path(directory) / FILENAME
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new = not self.path.is_file() or self.path.stat().st_size == 0
        self.conn = sqlite3.connect(self.path, isolation_level=None)  # explicit BEGIN/COMMIT below
        self.conn.row_factory = sqlite3.Row
        try:
            self.conn.execute("PRAGMA journal_mode=DELETE")
            self.conn.executescript(_SCHEMA)
            if new:
                self.set_meta("schema", SCHEMA_VERSION)
                self.set_meta("budgetlm", __version__)
            check_schema(self.conn, self.path)
        except sqlite3.DatabaseError as exc:
            self.conn.close()
            raise BudgetLMError(
                f"{self.path} is not a budgetlm results store ({exc}); move it away, or give another study folder"
            ) from None
        except BudgetLMError:
            self.conn.close()
            raise

    @classmethod
    def open(cls, directory: str | Path) -> Store:
        if not (Path(directory) / FILENAME).is_file():
            raise BudgetLMError(f"{directory} has no {FILENAME}: it is not a study folder; run `budgetlm run` first")
        if not is_study(directory):
            raise BudgetLMError(f"{Path(directory) / FILENAME} holds no budgetlm results; give a study folder")
        return cls(directory)

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _transaction(self):
        return _Transaction(self.conn)

    # -------------------------------------------------------------------------------------- writing

    def start_cell(self, cell_id: str, model: str, pipeline: str, config: dict) -> None:
        with self._transaction():
            self.conn.execute(
                "INSERT INTO cells (cell_id, model, pipeline, config_json, status, started) VALUES (?,?,?,?,?,?) "
                "ON CONFLICT(cell_id) DO UPDATE SET model=excluded.model, pipeline=excluded.pipeline, "
                "config_json=excluded.config_json, status=excluded.status, started=excluded.started, "
                "finished=NULL, error=NULL",
                (cell_id, model, pipeline, _dumps(config), "running", time.time()),
            )

    def finish_cell(self, cell_id: str, phases: dict[str, dict[str, dict]], env: dict | None = None) -> None:
        """Replace the cell's rows with `phases` ({task_or_phase: {metric: Metric dict}}) and mark it done,
        all in one transaction: if anything fails, nothing of it is stored."""
        with self._transaction():
            self.conn.execute("DELETE FROM rows WHERE cell_id=?", (cell_id,))
            self._insert(cell_id, phases)
            cur = self.conn.execute(
                "UPDATE cells SET status='done', finished=?, error=NULL, env_json=? WHERE cell_id=?",
                (time.time(), _dumps(env or {}), cell_id),
            )
            if cur.rowcount != 1:
                raise BudgetLMError(f"cell {cell_id} was never started in {self.path}")

    def put_rows(self, cell_id: str, phases: dict[str, dict[str, dict]]) -> None:
        """Insert or replace derived rows (recovery %) for a cell, in one transaction."""
        with self._transaction():
            self._insert(cell_id, phases)

    def set_status(self, cell_id: str, status: str, error: str | None = None) -> None:
        with self._transaction():
            self.conn.execute(
                "UPDATE cells SET status=?, error=?, finished=? WHERE cell_id=?", (status, error, time.time(), cell_id)
            )

    def set_meta(self, key: str, value) -> None:
        with self._transaction():
            self.conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?,?)", (key, _dumps(value)))

    def _insert(self, cell_id: str, phases: dict[str, dict[str, dict]]) -> None:
        for phase, metrics in phases.items():
            for metric, m in metrics.items():
                self.conn.execute(
                    f"INSERT OR REPLACE INTO rows ({', '.join(_ROW_COLUMNS)}) VALUES (?,?,?,?,?,?,?,?,?)",
                    (
                        cell_id,
                        str(phase),
                        str(metric),
                        _real(m["value"]),
                        _real(m.get("stderr")),
                        None if m.get("n") is None else int(m["n"]),
                        m.get("unit", "") or "",
                        m.get("source", "measured"),
                        _dumps(m.get("extra") or {}),
                    ),
                )

    # -------------------------------------------------------------------------------------- reading

    def get_meta(self, key: str, default=None):
        row = self.conn.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return default if row is None else json.loads(row["value"])

    def done_cells(self) -> set[str]:
        return {r[0] for r in self.conn.execute("SELECT cell_id FROM cells WHERE status='done'")}

    def cells(self, cell_ids: Iterable[str] | None = None) -> list[dict]:
        out = []
        for r in self.conn.execute("SELECT * FROM cells ORDER BY started"):
            d = dict(r)
            d["config"] = json.loads(d.pop("config_json") or "{}")
            d["env"] = json.loads(d.pop("env_json") or "{}")
            out.append(d)
        return _select(out, cell_ids)

    def plan_cells(self) -> list[dict]:
        """The cells of the study's current plan (all cells when no plan is recorded), in plan order."""
        plan = self.get_meta("plan")
        return self.cells(plan) if plan is not None else self.cells()

    def rows(self, cell_ids: Iterable[str] | None = None) -> list[dict]:
        """Every row joined with its cell's model and pipeline; NULL values read back as NaN."""
        query = (
            "SELECT rows.*, cells.model AS model, cells.pipeline AS pipeline FROM rows "
            "LEFT JOIN cells ON rows.cell_id = cells.cell_id ORDER BY cells.started, rows.rowid"
        )
        out = []
        for r in self.conn.execute(query):
            d = dict(r)
            d["value"] = math.nan if d["value"] is None else d["value"]
            d["extra"] = json.loads(d.pop("extra_json") or "{}")
            out.append(d)
        return _select(out, cell_ids)


def check_schema(conn: sqlite3.Connection, path: Path) -> None:
    """Refuse, in one line, a store this code would misread: another layout (meta 'schema') or a missing column."""
    wanted = {"rows": _ROW_COLUMNS, "cells": _CELL_COLUMNS, "meta": ("key", "value")}
    missing = []
    for table, names in wanted.items():
        have = {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}
        missing += [f"{table}.{c}" for c in names if c not in have]
    meta = dict(conn.execute("SELECT key, value FROM meta WHERE key IN ('schema', 'budgetlm')").fetchall())
    try:
        schema = json.loads(meta.get("schema", "1"))
        writer = json.loads(meta["budgetlm"]) if "budgetlm" in meta else "an earlier budgetlm"
    except ValueError:
        schema, writer = meta.get("schema"), "an unknown budgetlm"
    if schema == SCHEMA_VERSION and not missing:
        return
    what = f"missing {', '.join(missing[:3])}" if missing else f"store layout {schema}"
    raise BudgetLMError(
        f"{path} was written by an incompatible budgetlm ({writer}: {what}; budgetlm {__version__} reads store layout "
        f"{SCHEMA_VERSION}); read it with the budgetlm that wrote it, or rerun the study into a new folder"
    )


class _Transaction:
    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn

    def __enter__(self):
        self.conn.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type, exc, tb):
        self.conn.execute("ROLLBACK" if exc_type else "COMMIT")
        return False


def _select(items: list[dict], cell_ids: Iterable[str] | None) -> list[dict]:
    if cell_ids is None:
        return items
    order = {c: i for i, c in enumerate(cell_ids)}
    chosen = [d for d in items if d["cell_id"] in order]
    return sorted(chosen, key=lambda d: order[d["cell_id"]])  # stable: keeps row order within a cell


def _real(x) -> float | None:
    if x is None:
        return None
    x = float(x)
    return None if math.isnan(x) else x


def _dumps(obj) -> str:
    return json.dumps(obj, sort_keys=True, default=str, allow_nan=True)


# ---------------------------------------------------------------------------------------------- interpreting rows

RECOVERY = "_recovery_pct"
_HIGHER = re.compile(
    r"^(acc|acc_norm|accuracy|exact_match\w*|em|f1|rouge\w*|bertscore\w*|top1\w*|\w*agreement\w*)$", re.I
)
_LOWER = re.compile(r"^(ppl|\w*perplexity\w*|bits_per_byte|bpb|kl\w*|kld\w*|nll|loss)$", re.I)
_MAIN = ("acc", "exact_match", "exact_match_flexible", "exact_match_strict", "rougeL", "rouge_l", "rougeLsum",
         "bertscore_f1", "bertscore", "perplexity", "ppl", "word_perplexity", "kld", "kl")  # fmt: skip


def is_accuracy(metric: str) -> bool:
    """Higher-is-better scores bounded by a ceiling: these also get a recovery % of the baseline."""
    return bool(_HIGHER.match(metric)) and not metric.endswith(RECOVERY)


def lower_is_better(metric: str) -> bool:
    return bool(_LOWER.match(metric))


NOT_SCORES = {"seconds", "n", "items"}


def main_metric(metrics) -> str | None:
    """The headline metric of a task among the metrics it reported."""
    names = [m for m in metrics if not m.endswith(RECOVERY) and m not in NOT_SCORES]
    for m in _MAIN:
        if m in names:
            return m
    for m in names:
        if is_accuracy(m) or lower_is_better(m):
            return m
    return names[0] if names else None


def by_cell(rows: list[dict]) -> dict[str, dict[str, dict[str, dict]]]:
    """{cell_id: {task_or_phase: {metric: row}}}, keeping the row order."""
    out: dict[str, dict[str, dict[str, dict]]] = {}
    for r in rows:
        out.setdefault(r["cell_id"], {}).setdefault(r["task_or_phase"], {})[r["metric"]] = r
    return out


def value(phases: dict[str, dict[str, dict]], phase: str, metric: str) -> float | None:
    row = phases.get(phase, {}).get(metric)
    return None if row is None or row["value"] is None or math.isnan(row["value"]) else row["value"]


def prefill_metrics(phases: dict[str, dict[str, dict]]) -> list[str]:
    """prefill_tok_s@N metric names of the speed phase, by increasing N."""
    names = [m for m in phases.get("speed", {}) if m.startswith("prefill_tok_s@")]
    return sorted(names, key=lambda m: int(m.rsplit("@", 1)[1]) if m.rsplit("@", 1)[1].isdigit() else 0)


def result_name(task: str) -> str:
    """The name a task's rows carry in the store: its canonical form (`sciq-rag:gate=grad` -> `...:k=3`); a name the
    registry does not know (rows of an older study) as it is."""
    from budgetlm.data.tasks.base import tasks as registry
    from budgetlm.errors import BudgetLMError

    try:
        return registry.get(task).name or task  # a task object without a name of its own: its registry key
    except BudgetLMError:
        return task
