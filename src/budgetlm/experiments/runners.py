"""Where a study's cells run: the pool protocol the driver (study.py) hands cells to, the local runner (`InOrder`)
and the cell process every runner starts (`subprocess_runner`: `python -m budgetlm.experiments.cell CELL_DIR`, its
output in CELL_DIR/log.txt, its status and progress lines relayed, its last `error:` line the cell's one-line
error). experiments/ray_runner.py runs the same process as Ray tasks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

from budgetlm.experiments.plan import Cell
from budgetlm.progress import PROGRESS_PREFIX

STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}
Runner = Callable[[Path, Callable[[str], None]], None]  # (cell folder, status callback); raises CellFailed


class CellFailed(Exception):
    """A cell process that ended without a result; the message is its one-line error."""


class Pool(Protocol):
    """Where cells run. `submit` hands over a prepared cell folder (run at once, or queued); `ended` yields each
    cell that ended since, with its one-line error or None (it wrote result.json), waiting for all of them when
    `wait`; `stop` ends what still runs (the driver was interrupted); `close` releases the pool after a study."""

    verb: str  # what the display says when a cell is handed over ("started", "submitted to Ray")

    def submit(self, cell: Cell, folder: Path, on_status: Callable[[str], None]) -> None: ...
    def ended(self, wait: bool) -> Iterator[tuple[Cell, str | None]]: ...
    def stop(self) -> None: ...
    def close(self) -> None: ...


class InOrder:
    """The local runner: each cell runs when it is submitted, by `runner` (a fresh cell process by default)."""

    verb = "started"

    def __init__(self, runner: Runner | None = None):
        self.runner = runner or subprocess_runner
        self.done: deque[tuple[Cell, str | None]] = deque()

    def submit(self, cell: Cell, folder: Path, on_status: Callable[[str], None]) -> None:
        try:
            self.runner(folder, on_status)
            self.done.append((cell, None))
        except CellFailed as exc:
            self.done.append((cell, str(exc)))

    def ended(self, wait: bool) -> Iterator[tuple[Cell, str | None]]:
        while self.done:
            yield self.done.popleft()

    def stop(self) -> None:
        pass  # a cell runs inside submit: the interruption already stopped it

    close = stop


def subprocess_runner(folder: Path, on_status: Callable[[str], None]) -> None:
    """Run the cell in a fresh `python -m budgetlm.experiments.cell`; its output goes to folder/log.txt."""
    cmd = [sys.executable, "-m", "budgetlm.experiments.cell", str(folder)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    last_error, tail = None, deque(maxlen=5)
    with open(folder / "log.txt", "w", encoding="utf-8") as log:
        # SIGINT/SIGTERM wait while the child starts (one arriving inside Popen's fork could be lost) and are
        # handled right after, with `proc` known; the child unblocks them before its exec (_die_with_parent)
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            proc = subprocess.Popen(
                cmd,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                env=env,
                bufsize=1,
                preexec_fn=_die_with_parent,  # only signal settings: safe after fork
            )
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        try:
            for line in proc.stdout:
                log.write(line)
                log.flush()
                line = line.strip()
                if line.startswith("status: "):
                    on_status(line[len("status: ") :])
                elif line.startswith(PROGRESS_PREFIX):  # the cell's work in detail (a layer, a task, a phase)
                    on_status(line[len(PROGRESS_PREFIX) :])
                elif line.startswith("error: "):
                    last_error = line[len("error: ") :]
                if line:
                    tail.append(line)
            code = proc.wait()
        except BaseException:
            _stop(proc)
            raise
    if code != 0:
        reason = last_error or (tail[-1] if tail else "no output")
        raise CellFailed(f"exit code {code}: {reason}" if not last_error else reason)


def _die_with_parent() -> None:
    """In the child: unblock SIGINT/SIGTERM (blocked by the driver while it starts the child) and ask Linux to send
    SIGTERM when the driver dies, so a killed study leaves no orphan cell writing into a folder the rerun will
    clean."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
