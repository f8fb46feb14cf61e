"""Reliability of a study under SIGKILL: a 50-cell grid on the tiny model, its driver killed at random moments and
resumed each time, against the same grid run once without interruption.

    .venv/bin/python benchmarks/kill_resume.py [--runner local|ray] [--address HOST:PORT] [--kills 20] [--seed 0]
                                               [--work DIR] [--json FILE] [--small]

The grid (RECIPE): rtn bits [2, 3, 4, 8] x group_size [per channel, 8, 16, 32, 64, 128] x symmetric [true, false],
one magnitude-pruning pipeline and the baseline, each cell scored on 2 items of text-ppl (no speed benchmark), one
torch thread per cell. Every driver is a real `budgetlm run` process; with --runner ray each starts its own local
Ray instance (which dies with it), or with --address uses that cluster. Each driver is killed after a delay drawn
(seeded) from U(0.5 s, 1.5 x the time the uninterrupted run took per cell x cells left / (kills left + 1), at
least 3 s), so the kills spread over the whole study whatever the machine's speed: early in a driver's start, in
the middle of a cell, or between a cell's end and its store transaction. After each kill the benchmark waits until
no cell process of the study is left (a cell dies with its driver), notes what is finished, and starts the next
driver (the resume). The uninterrupted run is reused when --work already holds it complete (uninterrupted.json).

Checked, and printed with the figures:
- zero finished cells rerun: a cell whose result.json existed at a kill keeps that very file (inode and mtime) to the
  end, and no later driver starts it again (the drivers' own "cell i/N <label>: started" lines, kept per driver);
- no partial file: at every kill, no finished cell's folder holds a temporary file of an atomic write (".<name>.*");
  after the last resume none is left anywhere in the study, nor a SQLite hot journal;
- the final store equals the uninterrupted run's: the same cells, all done, and the same rows (cell, task or phase,
  metric: value, stderr, n, unit, source), timings and peak memory aside.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = """\
name: kill-resume
models: [tiny-random]
pipelines:
  rtn: [{method: rtn, bits: [2, 3, 4, 8], group_size: [null, 8, 16, 32, 64, 128], symmetric: [true, false]}]
  magnitude: [{method: magnitude, sparsity: 0.5}]
tasks: [text-ppl]
limit: 2
bench: {enabled: false}
threads: 1
"""
SMALL = RECIPE.replace("[2, 3, 4, 8]", "[2, 8]").replace("[null, 8, 16, 32, 64, 128]", "[null, 16]")
SMALL = SMALL.replace(", symmetric: [true, false]", "")  # 6 cells, to try the script out (--small)
CELLS = {RECIPE: 50, SMALL: 6}
TIMINGS = ("time", "memory", "speed")  # phases whose figures differ from run to run
STARTED = re.compile(r"^run: cell \d+/\d+ (.+?): (started|submitted to Ray)$")


def driver_cmd(recipe: Path, out: Path, runner: str, address: str | None) -> list[str]:
    cmd = [sys.executable, "-m", "budgetlm.cli", "run", str(recipe), "--out", str(out), "--runner", runner]
    return cmd + (["--address", address] if address else [])


def environment() -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH")) if p)
    env.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # a local Ray instance on 127.0.0.1
    return env


def cell_processes(study: Path) -> list[int]:
    """Live cell processes (python -m budgetlm.experiments.cell) of the study."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"budgetlm.experiments.cell" in cmd and any(str(study).encode() in part for part in cmd):
            found.append(int(proc.name))
    return found


def finished(study: Path) -> dict[str, tuple[int, int]]:
    """Cell folder name -> (inode, mtime_ns) of its result.json."""
    out = {}
    for p in study.glob("cells/*/result.json"):
        st = p.stat()
        out[p.parent.name] = (st.st_ino, st.st_mtime_ns)
    return out


def partial_files(root: Path) -> list[Path]:
    """Temporary files and folders of atomic writes (".<name>.<random>"), the driver's lock aside."""
    return [p for p in root.rglob(".*") if p.name != ".lock"] if root.exists() else []


def comparable(study: Path) -> tuple[dict, dict]:
    """The store's cells (id -> status) and rows ((cell, task or phase, metric) -> figures), timings aside."""
    conn = sqlite3.connect(f"file:{study / 'results.sqlite'}?mode=ro", uri=True)
    try:
        cells = dict(conn.execute("SELECT cell_id, status FROM cells"))
        rows = {
            (c, t, m): (v, se, n, u, src)
            for c, t, m, v, se, n, u, src in conn.execute(
                "SELECT cell_id, task_or_phase, metric, value, stderr, n, unit, source FROM rows"
            )
            if t not in TIMINGS and m not in ("seconds", "peak_rss")
        }
    finally:
        conn.close()
    return cells, rows


def run_uninterrupted(recipe: Path, out: Path, args, env: dict) -> float:
    t0 = time.perf_counter()
    with open(out.parent / f"{out.name}.log", "w") as log:
        code = subprocess.run(driver_cmd(recipe, out, args.runner, args.address), env=env, stderr=log,
                              stdout=subprocess.DEVNULL).returncode  # fmt: skip
    if code != 0:
        sys.exit(f"the uninterrupted run failed (exit {code}); see {out.parent / f'{out.name}.log'}")
    return time.perf_counter() - t0


def run_with_kills(recipe: Path, out: Path, args, env: dict, reference_s: float) -> dict:
    cells = CELLS[recipe.read_text()]
    rng = random.Random(args.seed)
    per_cell = reference_s / cells
    logs = out.parent / f"{out.name}-logs"
    logs.mkdir(parents=True, exist_ok=True)
    kills: list[dict] = []
    first_seen: dict[str, tuple[int, tuple[int, int]]] = {}  # cell folder -> (driver it was seen finished after, id)
    launches: list[tuple[int, str]] = []  # (driver, cell label) for every cell a driver started or submitted
    partial_in_finished: list[str] = []
    exit_waits: list[float] = []
    t_start = time.perf_counter()
    driver = 0
    while True:
        driver += 1
        last = len(kills) == args.kills  # the last resume runs to the end
        left = cells - len(finished(out))  # at least a few seconds: the window of a driver's start and ingests
        delay = None if last else rng.uniform(0.5, max(3.0, 1.5 * per_cell * left / (args.kills - len(kills) + 1)))
        log_path = logs / f"driver-{driver:02d}.log"
        with open(log_path, "w") as log:
            proc = subprocess.Popen(driver_cmd(recipe, out, args.runner, args.address), env=env, stderr=log,
                                    stdout=subprocess.DEVNULL)  # fmt: skip
            try:
                proc.wait(timeout=delay)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
        killed = proc.returncode == -signal.SIGKILL
        if not killed and proc.returncode != 0:
            sys.exit(f"driver {driver} failed (exit {proc.returncode}); see {log_path}")
        t_wait = time.perf_counter()
        while cell_processes(out) and time.perf_counter() - t_wait < 120:
            time.sleep(0.05)
        exit_waits.append(time.perf_counter() - t_wait)
        launches += [(driver, label) for label in started_labels(log_path)]
        now = finished(out)
        for folder, ident in now.items():
            first_seen.setdefault(folder, (driver, ident))
        unfinished_partial = []
        for p in partial_files(out):
            parts = p.relative_to(out).parts
            in_finished = parts[0] == "cells" and len(parts) > 2 and parts[1] in now
            (partial_in_finished if in_finished else unfinished_partial).append(str(p.relative_to(out)))
        if not killed:
            break  # the study is complete (the last resume, or a driver that finished before its kill)
        kills.append({"driver": driver, "after_s": round(delay, 2), "finished": len(now),
                      "partial_files_in_unfinished_cells": len(unfinished_partial),
                      "cell_exit_wait_s": round(exit_waits[-1], 2)})  # fmt: skip
        print(f"kill {len(kills)}/{args.kills} after {delay:.1f} s: {len(now)}/{cells} cells finished, "
              f"{len(unfinished_partial)} temporary file(s) in unfinished cells", file=sys.stderr)  # fmt: skip
    now = finished(out)
    rerun = sorted(folder for folder, (_, ident) in first_seen.items() if now.get(folder) != ident)
    labels = cell_labels(out)
    seen_by_label = {labels[folder.rsplit("_", 1)[1]]: d for folder, (d, _) in first_seen.items()}
    started_again = sorted({label for d, label in launches if d > seen_by_label.get(label, d)})
    return {
        "kills": kills,
        "drivers": driver,
        "seconds_total": round(time.perf_counter() - t_start, 1),
        "cells_finished_before_the_last_resume": sum(1 for d, _ in first_seen.values() if d < driver),
        "finished_cells_rerun": rerun,
        "finished_cells_started_again": started_again,
        "cell_launches": len(launches),
        "partial_files_in_finished_cells": partial_in_finished,
        "partial_files_at_end": [str(p.relative_to(out)) for p in partial_files(out)],
        "hot_journal_at_end": (out / "results.sqlite-journal").exists(),
        "max_cell_exit_wait_s": round(max(exit_waits, default=0.0), 2),
    }


def cell_labels(study: Path) -> dict[str, str]:
    """Cell id -> the label the driver prints ("<pipeline> (<model>)"), from the store."""
    conn = sqlite3.connect(f"file:{study / 'results.sqlite'}?mode=ro", uri=True)
    try:
        return {cid: f"{pipeline} ({model})" for cid, pipeline, model in conn.execute(
            "SELECT cell_id, pipeline, model FROM cells")}  # fmt: skip
    finally:
        conn.close()


def started_labels(log_path: Path) -> list[str]:
    """The cells a driver started (local) or submitted to Ray, from its own progress lines."""
    lines = log_path.read_text(errors="replace").splitlines()
    return [m.group(1) for m in (STARTED.match(line.strip()) for line in lines) if m]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runner", choices=["local", "ray"], default="local")
    ap.add_argument("--address", help="with --runner ray: an existing cluster (default: a local instance per driver)")
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, help="folder for the two studies (default: a new temporary folder)")
    ap.add_argument("--json", type=Path, help="write the figures here too")
    ap.add_argument("--small", action="store_true", help="a 6-cell grid instead of 50, to try the script out")
    args = ap.parse_args()
    work = (args.work or Path(tempfile.mkdtemp(prefix="budgetlm-kill-resume-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    recipe = work / "kill_resume.yaml"
    recipe.write_text(SMALL if args.small else RECIPE)
    env = environment()
    print(f"uninterrupted run ({args.runner}) in {work / 'uninterrupted'} (or an earlier one's) ...", file=sys.stderr)
    done = work / "uninterrupted.json"
    if done.is_file() and json.loads(done.read_text()).get("recipe") == recipe.read_text():
        reference_s = json.loads(done.read_text())["seconds"]  # an earlier invocation's, complete
    else:
        reference_s = run_uninterrupted(recipe, work / "uninterrupted", args, env)
        done.write_text(json.dumps({"seconds": reference_s, "recipe": recipe.read_text()}))
    for old in (work / "killed", work / "killed-logs"):  # an earlier invocation's killed study: start it again
        if old.exists():
            shutil.rmtree(old)
    print(f"... {reference_s:.0f} s; now {args.kills} kills", file=sys.stderr)
    result = run_with_kills(recipe, work / "killed", args, env, reference_s)
    ref_cells, ref_rows = comparable(work / "uninterrupted")
    cells, rows = comparable(work / "killed")
    differing = sorted(str(k) for k in set(ref_rows) | set(rows) if ref_rows.get(k) != rows.get(k))
    result.update(
        {
            "runner": args.runner,
            "seed": args.seed,
            "cells": len(ref_cells),
            "rows_compared": len(ref_rows),
            "seconds_uninterrupted": round(reference_s, 1),
            "all_done": set(cells.values()) == {"done"} and set(cells) == set(ref_cells),
            "rows_differing": differing,
            "load_average": list(os.getloadavg()),
            "work": str(work),
        }
    )
    ok = (
        result["cells"] == CELLS[recipe.read_text()]
        and len(result["kills"]) == args.kills
        and not result["finished_cells_rerun"]
        and not result["finished_cells_started_again"]
        and not result["partial_files_in_finished_cells"]
        and not result["partial_files_at_end"]
        and not result["hot_journal_at_end"]
        and result["all_done"]
        and not differing
    )
    result["ok"] = ok
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "kills"}, indent=2))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
