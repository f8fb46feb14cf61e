"""One cell of a study, run in its own process: `python -m budgetlm.experiments.cell CELL_DIR`.

Reads CELL_DIR/config.json (written by the driver), then
  load   the model and apply the pipeline's steps        (peak RSS "load")
  export with `runtime: llama.cpp`, CELL_DIR/model.gguf   (peak RSS "export"); evaluation and benchmark then run
         in llama.cpp, every metric naming the runtime and GGUF type (experiments/runtime.py)
  eval   the tasks, per-item logs into CELL_DIR/items/   (peak RSS "evaluation")
  latent with the recipe's `latent:`, final hidden states and their t-SNE (experiments/latent.py)
  bench  size, prefill and decode speed, energy          (peak RSS "benchmark")
and writes env.json, steps.json and finally result.json = {"phases": {task_or_phase: {metric: Metric}}}
(atomically, last: a cell folder without result.json is unfinished). The driver alone writes the store.
Progress goes to stdout as "status: ..." lines (the phases) and "progress: ..." lines (layers, tasks, benchmark
runs); a failure ends with one "error: ..." line on stderr.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
import traceback
from importlib import metadata
from pathlib import Path

from budgetlm._version import __version__
from budgetlm.errors import BudgetLMError
from budgetlm.progress import relay_lines
from budgetlm.results import Metric
from budgetlm.utils import atomic_write_json

RESULT = "result.json"
CONFIG = "config.json"


def status(text: str) -> None:
    sys.stdout.write(f"status: {text}\n")  # one write: progress lines come from a timer thread too
    sys.stdout.flush()


def run_cell(cell_dir: Path, progress: bool = False) -> dict:
    """Run the cell described by cell_dir/config.json; returns what it writes to result.json. `progress`: the
    steps, the evaluation and the benchmark report their progress (main() relays it as "progress: ..." lines)."""
    cell_dir = Path(cell_dir)
    cfg = read_config(cell_dir)
    if cfg.get("threads"):  # the recipe's `threads` (else torch's default: OMP_NUM_THREADS or every core)
        import torch

        torch.set_num_threads(int(cfg["threads"]))

    if cfg.get("runtime"):  # a llama.cpp cell where llama-cpp-python is missing: one line, before any work
        from budgetlm.experiments.runtime import require

        require(cfg["runtime"])
    from budgetlm.evaluation.harness import evaluate
    from budgetlm.hardware.memory import PeakRSS
    from budgetlm.methods.base import StepContext, apply_steps
    from budgetlm.models.handle import load_folder
    from budgetlm.models.sources import load

    phases: dict[str, dict[str, Metric]] = {}
    memory: dict[str, Metric] = {}
    seconds: dict[str, Metric] = {}
    env = environment()
    atomic_write_json(cell_dir / "env.json", env)

    prior = compressed_model(cell_dir, cfg)
    t0 = time.perf_counter()
    with PeakRSS("load") as peak:
        if prior is not None:  # the steps ran before (this cell, interrupted later, or a sibling): not again
            source_cell, saved = prior
            whose = "this cell's" if source_cell == cell_dir else f"cell {source_cell.name}'s"
            status(f"loading {whose} compressed model (same model, steps and seed)")
            handle = load_folder(source_cell / "model")
            step_dicts, changed = saved["reports"], True
        else:
            status(f"loading {cfg['model']}")
            handle = load(cfg["model"], seed=cfg["seed"])
            applied_before = len(handle.provenance)
            reports = []
            if cfg["steps"]:
                status(f"applying {' -> '.join(s['method'] for s in cfg['steps'])}")
                reports = apply_steps(handle, cfg["steps"], StepContext(seed=cfg["seed"], progress=progress))
            step_dicts, changed = [r.to_dict() for r in reports], len(handle.provenance) > applied_before
    memory["peak_rss_load"] = peak.metric()
    reused = {"compressed_in": prior[0].name} if prior is not None else {}
    seconds["seconds_load"] = Metric(time.perf_counter() - t0, unit="s", extra=dict(reused))
    phases.update(_step_phases(cfg["steps"], step_dicts))

    model_folder = gguf = lm = None
    runtime = cfg.get("runtime")  # "llama.cpp": scored and measured there (experiments/runtime.py)
    threads = cfg.get("threads")
    if runtime:
        from budgetlm.experiments import runtime as rt

        status(f"writing {rt.GGUF_FILE} for {runtime}")
        with PeakRSS("export") as peak:
            gguf = rt.export_cell(handle, cell_dir)
        memory["peak_rss_export"] = peak.metric()
        lm = rt.make_lm(handle, gguf, threads)
    elif prior is not None:
        if prior[0] != cell_dir:
            status(f"linking cell {prior[0].name}'s model files")
            link_model(prior[0] / "model", cell_dir / "model")
        model_folder = str(cell_dir / "model")
    elif changed:
        status("saving the model")
        model_folder = str(handle.save(cell_dir / "model"))
    atomic_write_json(
        cell_dir / "steps.json",
        {"steps": cfg["steps"], "reports": step_dicts, "model_folder": model_folder, "source": handle.source}
        | ({"runtime": runtime, "gguf": gguf} if runtime else {})
        | reused,
    )

    if cfg["tasks"]:
        status(f"evaluating {', '.join(cfg['tasks'])}")
        t0 = time.perf_counter()
        reference_dir = Path(cfg["study_dir"]) / "references" if cfg.get("study_dir") else None
        with PeakRSS("evaluation") as peak:
            results = evaluate(
                handle,
                cfg["tasks"],
                limit=cfg["limit"],
                seed=cfg["seed"],
                data_dir=cfg["data_dir"],
                reference_dir=reference_dir,
                out_dir=cell_dir,
                batch_size=cfg["eval_batch_size"],
                progress=progress,
                decoding=cfg.get("decoding"),
                lm=lm,
            )
        memory["peak_rss_evaluation"] = peak.metric()
        seconds["seconds_evaluation"] = Metric(time.perf_counter() - t0, unit="s")
        phases.update(results)

    if cfg.get("latent"):  # the recipe's `latent:` (experiments/latent.py)
        from budgetlm.experiments.latent import PHASE, run_latent
        from budgetlm.experiments.recipe import BASELINE

        status("latent space: final hidden states and t-SNE")
        phases[PHASE] = run_latent(handle, cfg, cell_dir, baseline=cfg["pipeline"] == BASELINE)

    if lm is not None:
        lm.close()  # the benchmark loads the file afresh
    bench = cfg["bench"]
    if bench["enabled"] and runtime:
        status(f"benchmarking in {runtime}")
        t0 = time.perf_counter()
        results = rt.bench_cell(gguf, bench, threads, progress)
        memory.update(results.pop("memory"))  # peak_rss_benchmark: llama.cpp's phase
        seconds["seconds_benchmark"] = Metric(time.perf_counter() - t0, unit="s")
        phases.update(results)
    elif bench["enabled"]:
        from budgetlm.hardware.bench import measure

        status("benchmarking")
        t0 = time.perf_counter()
        with PeakRSS("benchmark") as peak:
            results = measure(
                handle,
                prefill=tuple(bench["prefill"]),
                decode_tokens=bench["decode_tokens"],
                repeats=bench["repeats"],
                warmup=bench["warmup"],
                folder=model_folder,
                progress=progress,
            )
        memory["peak_rss_benchmark"] = peak.metric()
        seconds["seconds_benchmark"] = Metric(time.perf_counter() - t0, unit="s")
        phases.update(results)

    phases["memory"] = memory
    phases["time"] = seconds
    if runtime:
        rt.stamp(phases, runtime, gguf)
    result = (
        {
            "phases": {p: {m: _as_dict(v) for m, v in ms.items()} for p, ms in phases.items()},
            "env": env,
            "model_folder": model_folder,
            "source": handle.source,
        }
        | ({"runtime": runtime, "gguf": gguf} if runtime else {})
        | reused
    )
    atomic_write_json(cell_dir / RESULT, result)  # last: its presence means the cell finished
    status("done")
    return result


def compressed_model(cell_dir: Path, cfg: dict) -> tuple[Path, dict] | None:
    """A compressed model this cell can start from instead of applying its steps again, as (cell folder, its
    steps.json): its own, saved by a run interrupted after the steps (the driver keeps `model/` and steps.json when
    it cleans an unfinished cell), else that of another cell of the study with the same model, steps, seed and
    budgetlm version (a pipeline with and without HSD, a torch cell and its llama.cpp sibling). A model folder is
    complete once steps.json names it (saved atomically before steps.json is written)."""
    from budgetlm.models.handle import is_budgetlm_folder

    if not cfg["steps"]:
        return None
    others = []
    if cfg.get("study_dir") and (Path(cfg["study_dir"]) / "cells").is_dir():
        me = cell_dir.resolve()
        others = sorted(p for p in (Path(cfg["study_dir"]) / "cells").iterdir() if p.is_dir() and p.resolve() != me)
    for folder in [cell_dir, *others]:
        try:
            saved = json.loads((folder / "steps.json").read_text(encoding="utf-8"))
            other = json.loads((folder / CONFIG).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        same = all(other.get(k) == cfg.get(k) for k in ("model", "seed", "budgetlm"))
        if (
            same
            and isinstance(saved, dict)
            and saved.get("steps") == cfg["steps"]
            and saved.get("model_folder")
            and isinstance(saved.get("reports"), list)
            and is_budgetlm_folder(folder / "model")
        ):
            return folder, saved
    return None


def link_model(source: Path, dest: Path) -> None:
    """`dest` becomes a model folder with `source`'s files, hard-linked where the file system allows (no bytes
    copied; each folder stays whole if the other is removed), else copied; atomically."""
    import shutil

    from budgetlm.models.handle import MANIFEST
    from budgetlm.utils import atomic_dir

    with atomic_dir(dest, marker=MANIFEST) as tmp:
        for f in source.iterdir():
            try:
                os.link(f, tmp / f.name)
            except OSError:
                shutil.copy2(f, tmp / f.name)


REQUIRED = ("model", "pipeline", "steps", "tasks", "limit", "seed", "data_dir", "eval_batch_size", "bench")


def read_config(cell_dir: Path) -> dict:
    path = Path(cell_dir) / CONFIG
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise BudgetLMError(f"cannot read the cell config {path}: {exc}") from None
    missing = [k for k in REQUIRED if not isinstance(cfg, dict) or k not in cfg]
    if missing:
        raise BudgetLMError(f"the cell config {path} lacks {', '.join(missing)}; the study driver writes it")
    return cfg


def _step_phases(steps: list[dict], reports: list[dict]) -> dict[str, dict[str, Metric]]:
    """A phase per step ("step1-rtn"): seconds, peak RSS and the report's scalar statistics."""
    phases = {}
    for i, (step, rep) in enumerate(zip(steps, reports)):
        metrics = {"seconds": Metric(float(rep.get("seconds") or 0.0), unit="s")}
        if rep.get("peak_rss") is not None:
            metrics["peak_rss"] = Metric(float(rep["peak_rss"]), unit="B")
        stats = rep.get("stats") or {}
        total = stats.get("total")  # an adapter's totals: trainable params, train time and peak RSS
        scalars = {**stats, **total} if isinstance(total, dict) else stats
        for key, value in scalars.items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                metrics[key] = Metric(float(value))
        phases[f"step{i + 1}-{step['method']}"] = metrics
    return phases


def _as_dict(m) -> dict:
    return m.to_dict() if hasattr(m, "to_dict") else dict(m)


# ---------------------------------------------------------------------------------------------- environment


def environment() -> dict:
    """Versions, CPU, threads and the git commit every figure of the cell was measured with."""
    import torch

    def version(pkg: str) -> str | None:
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return None

    commit, dirty = git_commit()
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": version("transformers"),
        "budgetlm": __version__,
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "git_commit": commit,
        "git_dirty": dirty,
    }


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> tuple[str | None, bool | None]:
    """HEAD of the budgetlm checkout this package runs from (None when installed from a wheel)."""
    pkg = Path(__file__).resolve().parent.parent  # src/budgetlm

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(pkg), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    top = git("rev-parse", "--show-toplevel")
    if not top or (Path(top) / "src" / "budgetlm").resolve() != pkg:
        return None, None  # not a budgetlm checkout (e.g. a virtualenv inside some other repository)
    status_out = git("status", "--porcelain", "--untracked-files=no")
    return git("rev-parse", "HEAD"), (bool(status_out) if status_out is not None else None)


# ---------------------------------------------------------------------------------------------- entry point


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or not (Path(argv[0]) / CONFIG).is_file():
        print(f"error: usage: python -m budgetlm.experiments.cell CELL_DIR (a folder with {CONFIG})", file=sys.stderr)
        return 2
    try:
        with relay_lines():  # the layers, tasks and benchmark runs, as "progress: ..." lines for the driver
            run_cell(Path(argv[0]), progress=True)
    except BudgetLMError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    except Exception as exc:  # noqa: BLE001 - report any crash in one line after the traceback
        traceback.print_exc()
        text = " ".join(str(exc).split())
        print(f"error: {type(exc).__name__}: {text}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
