"""The Ray runner (`budgetlm run --runner ray`): with a stand-in for the ray module (fast: CPUs reserved, baselines
first, failures, results the driver cannot see, an interrupted driver, bad addresses) and, marked slow, on a real
local Ray instance: the same metrics as the local runner, and a driver killed with SIGKILL that resumes without
rerunning the cells that finished."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from test_study import FakeRunner, recipe, registries  # noqa: F401 - the study tests' fake runner, method, tasks

from budgetlm.errors import BudgetLMError, ConfigError
from budgetlm.experiments import ray_runner
from budgetlm.experiments import store as st
from budgetlm.experiments.runners import CellFailed
from budgetlm.experiments.study import run_study

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("kill_resume", ROOT / "benchmarks" / "kill_resume.py")
kill_resume = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(kill_resume)


class FakeRayError(Exception):
    pass


class Ref:
    """A stand-in ObjectRef: hashable, its outcome held."""

    def __init__(self, pipeline: str):
        self.pipeline, self.value = pipeline, None


class FakeRay:
    """The calls RayPool makes of the ray module. A task runs when it is submitted, by `runner` (a FakeRunner that
    writes result.json as a cell would); `wait` hands back the oldest pending task."""

    def __init__(self, runner=None, initialized=True, interrupt_at_wait=None):
        self.runner = runner or FakeRunner()
        self.initialized, self.interrupt_at_wait = initialized, interrupt_at_wait
        self.submitted: list[dict] = []  # per task: pipeline, num_cpus, the refs it waits for
        self.cancelled: list = []
        self.waits = 0
        self.exceptions = SimpleNamespace(RayError=FakeRayError)

    def is_initialized(self):
        return self.initialized

    def nodes(self):
        return [{"Alive": True, "Resources": {"CPU": 2.0}}, {"Alive": False, "Resources": {"CPU": 64.0}}]

    def shutdown(self):
        self.initialized = False

    def remote(self, **_):
        return lambda fn: SimpleNamespace(options=lambda **opts: SimpleNamespace(remote=self._task(opts)))

    def _task(self, opts):
        def remote(folder, threads, *after):
            cfg = json.loads((Path(folder) / "config.json").read_text())
            ref = Ref(cfg["pipeline"])
            self.submitted.append({"pipeline": cfg["pipeline"], "num_cpus": opts["num_cpus"], "threads": threads,
                                   "after": [a.pipeline for a in after]})  # fmt: skip
            try:
                self.runner(Path(folder), lambda text: None)
                ref.value = {"error": None, "node": "node-1"}
            except CellFailed as exc:
                ref.value = {"error": str(exc), "node": "node-1"}
            except FakeRayError as exc:
                ref.value = exc
            return ref

        return remote

    def wait(self, refs, num_returns, timeout):
        self.waits += 1
        if self.waits == self.interrupt_at_wait:
            raise KeyboardInterrupt
        return refs[:1], refs[1:]

    def get(self, ref):
        if isinstance(ref.value, Exception):
            raise ref.value
        return ref.value

    def cancel(self, ref, force):
        self.cancelled.append(ref.pipeline)


@pytest.fixture
def demo(request):
    """test_study's recipe: baseline, q4 and q2 of the fake method on t-acc and t-ppl."""
    return request.getfixturevalue("recipe")


def with_ray(monkeypatch, fake: FakeRay) -> FakeRay:
    monkeypatch.setattr(ray_runner, "import_ray", lambda: fake)
    return fake


def stored(out):
    with st.Store.open(out) as s:
        return {c["pipeline"]: c for c in s.cells()}


def test_cells_are_ray_tasks_reserving_their_threads_after_their_baseline(tmp_path, demo, monkeypatch):
    demo.write_text(demo.read_text() + "threads: 2\n")
    ray = with_ray(monkeypatch, FakeRay())
    out = run_study(demo, tmp_path / "out", progress=False, runner="ray")
    assert ray.submitted == [
        {"pipeline": "baseline", "num_cpus": 2, "threads": 2, "after": []},
        {"pipeline": "q4", "num_cpus": 2, "threads": 2, "after": ["baseline"]},
        {"pipeline": "q2", "num_cpus": 2, "threads": 2, "after": ["baseline"]},
    ]
    cells = stored(out)
    assert {p: c["status"] for p, c in cells.items()} == {"baseline": "done", "q4": "done", "q2": "done"}
    assert cells["q4"]["config"]["threads"] == 2
    assert ray.initialized  # a connection this process had before is left open
    # resumed with the baseline done: nothing waits for it, nothing reruns
    again = with_ray(monkeypatch, FakeRay())
    run_study(demo, out, progress=False, runner="ray")
    assert again.submitted == []


def test_more_threads_than_a_node_has_cpus_is_refused_before_anything_is_written(tmp_path, demo, monkeypatch):
    demo.write_text(demo.read_text() + "threads: 3\n")
    ray = with_ray(monkeypatch, FakeRay(initialized=False))
    ray.init = lambda **kw: setattr(ray, "initialized", True)
    with pytest.raises(ConfigError, match=r"recipe threads: 3 is more CPUs than any node of the Ray cluster has \(2\)"):
        run_study(demo, tmp_path / "out", progress=False, runner="ray")
    assert not (tmp_path / "out").exists() and not ray.initialized  # the connection it opened is closed


def test_a_recipe_without_threads_reserves_one_cpu_per_cell(tmp_path, demo, monkeypatch):
    ray = with_ray(monkeypatch, FakeRay())
    run_study(demo, tmp_path / "out", progress=False, runner="ray")
    assert {(t["num_cpus"], t["threads"]) for t in ray.submitted} == {(1, 1)}


def test_failed_cells_lost_results_and_crashed_tasks_are_recorded_one_line_each(tmp_path, demo, monkeypatch):
    fails = FakeRunner(fail="q4")

    def runner(folder, on_status):
        pipeline = json.loads((folder / "config.json").read_text())["pipeline"]
        if pipeline == "q2":  # a node whose folder the driver does not see: the result is elsewhere
            return
        if pipeline == "baseline":
            fails(folder, on_status)
            raise FakeRayError("worker died\nThe worker process crashed (OOM)")
        fails(folder, on_status)

    with_ray(monkeypatch, FakeRay(runner))
    with pytest.raises(BudgetLMError) as err:
        run_study(demo, tmp_path / "out", progress=False, runner="ray")
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("3 of 3 cells failed")
    cells = stored(tmp_path / "out")
    assert cells["baseline"]["error"].startswith("its Ray task failed: FakeRayError: The worker process crashed (OOM)")
    assert cells["q4"]["error"].startswith("boom: out of cheese (log: ")
    assert "result.json is not visible to the driver" in cells["q2"]["error"]
    assert "must be a shared path every node sees" in cells["q2"]["error"]


def test_an_interrupted_driver_cancels_its_tasks_and_resumes(tmp_path, demo, monkeypatch):
    ray = with_ray(monkeypatch, FakeRay(interrupt_at_wait=2))  # the 2nd wait: the baseline was stored, q4 queued
    with pytest.raises(KeyboardInterrupt):
        run_study(demo, tmp_path / "out", progress=False, runner="ray")
    assert ray.cancelled == ["q4"]
    cells = stored(tmp_path / "out")
    assert cells["baseline"]["status"] == "done" and cells["q4"]["status"] == "interrupted" and "q2" not in cells
    again = with_ray(monkeypatch, FakeRay())
    run_study(demo, tmp_path / "out", progress=False, runner="ray")
    # q4 wrote its result.json before the interrupt (the stand-in runs at submission): it is read, not rerun
    assert [t["pipeline"] for t in again.submitted] == ["q2"]
    assert {c["status"] for c in stored(tmp_path / "out").values()} == {"done"}


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_address_nobody_answers_is_one_line_before_anything_is_written(tmp_path, demo, monkeypatch):
    ray = with_ray(monkeypatch, FakeRay(initialized=False))
    ray.init = lambda **kw: pytest.fail("ray.init must not be reached")
    address = f"127.0.0.1:{closed_port()}"
    t0 = time.perf_counter()
    with pytest.raises(BudgetLMError) as err:
        run_study(demo, tmp_path / "out", progress=False, runner="ray", address=address)
    assert time.perf_counter() - t0 < 10
    assert str(err.value).startswith(f"--address {address}: no Ray cluster answers there (Connection refused)")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match="HOST:PORT"):
        ray_runner.check_reachable(":6379")


def test_connection_errors_are_one_line_and_restore_the_sigterm_handler(monkeypatch):
    ray = FakeRay(initialized=False)

    def init(**kw):
        signal.signal(signal.SIGTERM, lambda *a: None)  # as ray.init does
        raise ConnectionError("Could not find any running Ray instance.\nPlease specify the one to connect to.")

    ray.init = init
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(BudgetLMError) as err:
        ray_runner.connect(ray, "auto")
    assert (
        str(err.value)
        == "--address auto: cannot connect to Ray: ConnectionError: Please specify the one to connect to."
    )
    assert signal.getsignal(signal.SIGTERM) is before


def test_without_ray_installed_the_error_names_the_extra(tmp_path, demo, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    with pytest.raises(BudgetLMError, match=r"pip install 'budgetlm\[ray\]'"):
        run_study(demo, tmp_path / "out", progress=False, runner="ray")
    assert not (tmp_path / "out").exists()


def test_runner_names_and_address_are_checked(tmp_path, demo):
    with pytest.raises(ConfigError, match=r"unknown runner 'rey' \(did you mean: ray\?\)"):
        run_study(demo, tmp_path / "out", progress=False, runner="rey")
    with pytest.raises(ConfigError, match="add --runner ray"):
        run_study(demo, tmp_path / "out", progress=False, runner="local", address="10.0.0.1:6379")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------- a real Ray instance

TINY = """
name: tiny-grid
models: [tiny-random]
pipelines:
  rtn: [{method: rtn, bits: [2, 8], group_size: 16}]
  prune: [{method: magnitude, sparsity: 0.5}]
tasks: [text-ppl, text-cloze]
limit: 3
bench: {enabled: false}
threads: 1
"""
TIMINGS = ("time", "memory", "speed")  # phases of timings and memory, which differ from run to run


def comparable(out: Path) -> dict:
    """(pipeline, task or phase, metric) -> (value, stderr, n, unit), timings and peak memory left out."""
    with st.Store.open(out) as s:
        cells = {c["cell_id"]: c["pipeline"] for c in s.cells()}
        rows = s.rows()
    return {
        (cells[r["cell_id"]], r["task_or_phase"], r["metric"]): (r["value"], r["stderr"], r["n"], r["unit"])
        for r in rows
        if r["task_or_phase"] not in TIMINGS and r["metric"] not in ("seconds", "peak_rss")
    }


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray instance on the loopback address (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 makes Ray bind 127.0.0.1,
    as it does on macOS), two CPUs, shared by the slow tests below; cell processes find this checkout's budgetlm."""
    ray = pytest.importorskip("ray", reason="the ray package is not installed (pip install -e '.[ray]')")
    mp = pytest.MonkeyPatch()
    mp.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    mp.setenv("PYTHONPATH", os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()
    mp.undo()


@pytest.fixture(scope="module")
def tiny_on_ray(local_ray, tmp_path_factory):
    """The tiny grid run once, uninterrupted, as Ray tasks: (recipe, study folder)."""
    root = tmp_path_factory.mktemp("tiny")
    path = root / "r.yaml"
    path.write_text(TINY)
    return path, run_study(path, root / "ray", progress=False, runner="ray")


@pytest.mark.slow
def test_ray_gives_the_local_runners_metrics(tmp_path, local_ray, tiny_on_ray):
    tiny, remote = tiny_on_ray
    assert local_ray.is_initialized()  # the test's own connection is left open
    local = run_study(tiny, tmp_path / "local", progress=False)
    rows = comparable(local)
    assert {k[0] for k in rows} == {"baseline", "rtn.bits-2", "rtn.bits-8", "prune"}
    assert ("text-cloze", "acc") in {k[1:] for k in rows}
    assert comparable(remote) == rows
    for folder in (remote / "cells").iterdir():
        assert json.loads((folder / "env.json").read_text())["threads"] == 1
        assert "status: done" in (folder / "log.txt").read_text()  # the cell process's own log, as locally


@pytest.mark.slow
def test_a_driver_killed_mid_run_resumes_without_rerunning_finished_cells(tmp_path, local_ray, tiny_on_ray):
    tiny, uninterrupted = tiny_on_ray
    out = tmp_path / "study"
    address = local_ray.get_runtime_context().gcs_address
    cmd = [sys.executable, "-m", "budgetlm.cli", "run", str(tiny), "--out", str(out), "--runner", "ray"]
    driver = subprocess.Popen([*cmd, "--address", address], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and driver.poll() is None:
        if len(list(out.glob("cells/*/result.json"))) >= 2:  # the baseline and one more: two cells are left
            break
        time.sleep(0.2)
    assert driver.poll() is None, "the driver ended before it could be killed"
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    before = {p.parent.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("cells/*/result.json")}
    assert 2 <= len(before) < 4
    deadline = time.monotonic() + 60  # Ray ends the dead driver's tasks, and each cell process dies with its task
    while kill_resume.cell_processes(out) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert kill_resume.cell_processes(out) == []
    run_study(tiny, out, progress=False, runner="ray")
    after = {p.parent.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("cells/*/result.json")}
    assert {k: after[k] for k in before} == before  # not one finished cell ran again
    assert len(after) == 4
    with st.Store.open(out) as s:
        assert {c["status"] for c in s.cells()} == {"done"}
    assert [p for p in out.rglob(".*") if p.name != ".lock"] == []  # no temporary file of an atomic write is left
    assert comparable(out) == comparable(uninterrupted)
