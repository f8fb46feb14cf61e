"""Cells as Ray tasks: `budgetlm run RECIPE --runner ray [--address ADDR]` (the extra: pip install 'budgetlm[ray]').

The driver (study.py) prepares each cell folder as for the local runner and submits one Ray task per cell. The task
runs runners.subprocess_runner on whichever node Ray picks: the same fresh `python -m budgetlm.experiments.cell`
process, which reads the folder's config.json and writes result.json last and atomically. The task returns the
cell's one-line error (or None) and its node; the driver reads result.json from the folder and alone writes the
store, as it does for the local runner.

- CPUs: a task reserves the recipe's `threads` CPUs, 1 when the recipe leaves it unset, and its cell runs with as
  many torch threads; Ray runs as many cells side by side as the nodes have CPUs for.
- Where: without an address, a local Ray instance started for the study (or the one this process is connected to
  already, or the cluster RAY_ADDRESS names); with one, an existing cluster (`ray start --head` prints its address).
  On a cluster the study folder must be a path every node sees at the same place (a shared file system): a cell
  whose result.json the driver cannot see is a failed cell that says so. Every node needs budgetlm installed, and
  the models and data files its cells read at the same paths.
- Order: a model's baseline cell writes the references the model's other cells compare with, so their tasks take
  the baseline's task as an argument: Ray starts them once it ended.
- Failures: Ray does not retry a task (max_retries=0); a failed cell is recorded and a rerun of the study retries it.
- Interrupted, the driver cancels the tasks still queued or running (their workers are killed, and each cell
  process dies with its worker: PR_SET_PDEATHSIG). A driver killed outright takes a local instance with it; on a
  cluster Ray ends the tasks of a job whose driver died. A rerun resumes as for the local runner.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from budgetlm.errors import BudgetLMError, ConfigError, Interrupted
from budgetlm.experiments.cell import RESULT
from budgetlm.experiments.plan import Cell
from budgetlm.experiments.runners import CellFailed, subprocess_runner

INSTALL = "pip install 'budgetlm[ray]' (from a checkout: pip install -e '.[ray]')"
DEFAULT_PORT = 6379  # `ray start --head`'s


def run_cell_task(folder: str, threads: int, *after) -> dict:
    """In a Ray worker: the cell's process, started as the local runner starts it, with `threads` torch threads (the
    CPUs the task reserved). `after`: the baseline task's outcome this cell waited for (not used)."""
    os.environ["OMP_NUM_THREADS"] = str(threads)  # the cell process inherits it; torch takes it as its thread count
    node = socket.gethostname()
    try:
        subprocess_runner(Path(folder), lambda text: None)  # its status lines are in the folder's log.txt
    except CellFailed as exc:
        return {"error": str(exc), "node": node}
    return {"error": None, "node": node}


class RayPool:
    """runners.Pool over Ray: `submit` queues a cell's task, `ended` collects the tasks that ended."""

    verb = "submitted to Ray"

    def __init__(self, address: str | None = None, threads: int = 1):
        self.ray = import_ray()
        self.owned = connect(self.ray, address)
        try:
            check_cpus(self.ray, threads)
        except BudgetLMError:
            self.close()
            raise
        self.task = self.ray.remote(max_retries=0)(run_cell_task)
        self.pending: dict = {}  # ObjectRef -> (cell, folder)
        self.baselines: dict = {}  # model -> the ObjectRef of its baseline cell's task

    def submit(self, cell: Cell, folder: Path, on_status: Callable[[str], None]) -> None:
        threads = int(cell.config.get("threads") or 1)
        after = [self.baselines[cell.model]] if not cell.is_baseline and cell.model in self.baselines else []
        task = self.task.options(num_cpus=threads, name=f"budgetlm cell {cell.label}")
        ref = task.remote(str(folder), threads, *after)
        if cell.is_baseline:
            self.baselines[cell.model] = ref
        self.pending[ref] = (cell, folder)

    def ended(self, wait: bool) -> Iterator[tuple[Cell, str | None]]:
        while self.pending:
            ready, _ = self.ray.wait(list(self.pending), num_returns=1, timeout=1.0 if wait else 0)
            if not ready:
                if wait:
                    continue  # a second at a time: SIGINT / SIGTERM are handled between waits
                return
            cell, folder = self.pending.pop(ready[0])
            yield cell, self._outcome(ready[0], folder)

    def _outcome(self, ref, folder: Path) -> str | None:
        try:
            out = self.ray.get(ref)
        except self.ray.exceptions.RayError as exc:
            return f"its Ray task failed: {_one_line(exc)}"
        if out["error"] is None and not (folder / RESULT).is_file():
            return (
                f"the cell ended on node {out['node']} but its {RESULT} is not visible to the driver at {folder}; on a "
                "Ray cluster the study folder (--out) must be a shared path every node sees at the same place"
            )
        return out["error"]

    def stop(self) -> None:
        for ref in list(self.pending):
            try:
                self.ray.cancel(ref, force=True)
            except Exception:  # noqa: BLE001 - a task that ended meanwhile, or a lost connection: nothing to stop
                pass
        self.pending.clear()
        self.close()

    def close(self) -> None:
        if self.owned and self.ray.is_initialized():
            self.ray.shutdown()
            self.owned = False


def import_ray():
    """The ray module, or a one-line error naming the extra to install (looked up first with find_spec, as the other
    optional packages are)."""
    missing = BudgetLMError(f"--runner ray needs the ray package, which is not installed: {INSTALL}")
    if importlib.util.find_spec("ray") is None:
        raise missing
    try:
        import ray
    except ImportError:
        raise missing from None
    return ray


def connect(ray, address: str | None) -> bool:
    """Connect this process to Ray (a new local instance, or the cluster at `address`); False when it was connected
    already (the connection is then left open at the end). An address that does not answer is a one-line error
    within seconds (ray.init itself retries for minutes)."""
    if ray.is_initialized():
        return False
    where = f"--address {address}" if address else "a local Ray instance"
    if address and "://" not in address and address not in ("auto", "local"):
        check_reachable(address)
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if main else None
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    except SystemExit:  # ray.init turns a SIGTERM that arrives while it connects into an exit
        raise Interrupted(signal.SIGTERM) from None
    except (ConnectionError, TimeoutError, ValueError, RuntimeError, OSError) as exc:
        raise BudgetLMError(f"{where}: cannot connect to Ray: {_one_line(exc)}") from None
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)  # ray.init installs its own SIGTERM handler (an exit)
    return True


def check_cpus(ray, threads: int) -> None:
    """A task that reserves more CPUs than any node has would wait forever: refuse it before anything is written."""
    largest = max((n.get("Resources", {}).get("CPU", 0) for n in ray.nodes() if n.get("Alive")), default=0)
    if threads > largest:
        raise ConfigError(
            f"recipe threads: {threads} is more CPUs than any node of the Ray cluster has ({largest:g}); each cell "
            "runs on one node: lower threads, or add larger nodes"
        )


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """A TCP connection to the cluster's address (host:port, default port 6379), or a one-line error."""
    host, _, port = address.rpartition(":") if address.rpartition(":")[2].isdigit() else (address, "", "")
    host = host.strip("[]")  # [::1]:6379
    if not host:
        raise ConfigError(f"--address {address}: give the cluster's address as HOST:PORT (e.g. 10.0.0.5:6379)")
    try:
        socket.create_connection((host, int(port or DEFAULT_PORT)), timeout=timeout).close()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise BudgetLMError(
            f"--address {address}: no Ray cluster answers there ({reason}); start one with `ray start --head` on that "
            "host, or leave --address out to start a local Ray instance"
        ) from None


def _one_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return f"{type(exc).__name__}: {lines[-1] if lines else ''}".rstrip(": ")
