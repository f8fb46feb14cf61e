"""The row machinery every table benchmark shares (quant_peers.py, prune.py): each row runs in a fresh process
(its peak RSS is its own and a crash costs one row), results go to one JSON file after every row (atomic, under
a lock), and a rerun skips the rows already there.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run_in_process(script: Path, row: dict, opts: dict, log: Path, timeout: float) -> dict:
    """Run `script --worker ROW --opts OPTS --result FILE` and return its result (or an error row)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="budgetlm-row-") as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, str(script), "--worker", json.dumps(row), "--opts", json.dumps(opts)]
        cmd += ["--result", str(result)]
        t0 = time.perf_counter()
        with open(log, "w") as f:
            try:
                proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout)
                rc = proc.returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
        wall = time.perf_counter() - t0
        if result.is_file():
            res = json.loads(result.read_text())
        else:
            lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
            last = lines[-1] if lines else "no output"
            what = f"timed out after {timeout:g}s" if rc == "timeout" else f"worker exited with {rc}"
            res = {"status": "error", "error": f"{what}: {last[:300]}"}
    res["wall_seconds"] = wall
    res["log"] = str(log)
    return res


def load_results(path: Path, config: dict, fresh: bool) -> dict:
    if path.is_file() and not fresh:
        data = json.loads(path.read_text())
        if data.get("config") != config:
            sys.exit(
                f"{path} holds results of another configuration ({data.get('config')}); "
                f"pass --fresh to overwrite it or --out to write elsewhere"
            )
        return data
    return {"config": config, "rows": {}}


def save_row(path: Path, config: dict, key: str, res: dict) -> dict:
    """Add one row to the results file (read, update, write atomically, under a lock), so two invocations can
    fill the same file at once; returns the file's rows."""
    import fcntl

    from budgetlm.utils import atomic_write_json

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        data = json.loads(path.read_text()) if path.is_file() else {"config": config, "rows": {}}
        data["rows"][key] = res
        atomic_write_json(path, data)
    return data["rows"]


def pm(m: dict | None, digits: int) -> str:
    """value ± stderr of a metric dict, or — when absent."""
    if not m or m.get("value") is None:
        return "—"
    v, se = m["value"], m.get("stderr")
    if se is None or (isinstance(se, float) and math.isnan(se)):
        return f"{v:.{digits}f}"
    return f"{v:.{digits}f} ± {se:.{digits}f}"


def mib(x) -> str:
    return "—" if x is None else f"{x / 2**20:.0f}"


def add_worker_args(ap) -> None:
    """The hidden arguments of a row's worker process (see run_in_process)."""
    import argparse

    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--opts", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)


def run_worker(args, run_row) -> None:
    """In the worker: run_row(row, opts), recording a failure (with its traceback in the log) as an error row."""
    import traceback

    try:
        res = run_row(json.loads(args.worker), json.loads(args.opts))
    except Exception as exc:  # noqa: BLE001 - one row's failure is recorded, the table goes on
        traceback.print_exc()
        res = {"status": "error", "error": f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"}
    Path(args.result).write_text(json.dumps(res, default=str))
