"""The public Python API; the CLI is a thin wrapper over these functions."""

from __future__ import annotations

from pathlib import Path

from budgetlm.models.handle import ModelHandle
from budgetlm.results import Metric


def load(spec: str = "smollm2-135m", seed: int = 0) -> ModelHandle:
    """A bundled model name, a GGUF file, a Hugging Face or budgetlm model folder, an adapter folder (`budgetlm
    train`'s output: the adapter on its base), or 'tiny-random'."""
    from budgetlm.models.sources import load as _load

    return _load(spec, seed=seed)


def apply(handle: ModelHandle, steps: list[dict], ctx=None) -> list:
    """Apply registered method steps ({"method": name, **config}) in order, in place."""
    from budgetlm.methods.base import apply_steps

    return apply_steps(handle, steps, ctx)


def evaluate(handle: ModelHandle, tasks: list[str], **kwargs) -> dict[str, dict[str, Metric]]:
    """Run tasks; see budgetlm.evaluation.harness.evaluate for the options."""
    from budgetlm.evaluation.harness import evaluate as _evaluate

    return _evaluate(handle, tasks, **kwargs)


def measure(handle: ModelHandle, runtime: str = "torch", **kwargs) -> dict[str, dict[str, Metric]]:
    """Size, speed, energy and host profile; see budgetlm.hardware.bench.measure. `runtime="llama.cpp"`: the model
    is written to a temporary GGUF file (`gguf_type`: the type that keeps its codes by default) and measured with
    llama.cpp through llama-cpp-python (budgetlm.hardware.llamacpp.measure_llamacpp)."""
    from budgetlm.hardware.llamacpp import check_runtime

    if check_runtime(runtime) == "llama.cpp":
        from budgetlm.hardware.llamacpp import measure_llamacpp

        return measure_llamacpp(handle, **kwargs)
    from budgetlm.hardware.bench import measure as _measure

    return _measure(handle, **kwargs)


def generate(
    handle: ModelHandle,
    prompt: str,
    *,
    chat: bool = False,
    max_new_tokens: int = 256,
    drafts: list[str] | None = None,
    tau: str | None = None,
    mode: str = "exact",
    max_draft: int = 8,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    until: list[str] | None = None,
    on_text=None,
    draft_window: int = 0,
    draft_kv: str = "auto",
):
    """Generate from a prompt; with `drafts` (cheapest first: model specs or "layers:K"), by hierarchical speculative
    decoding with an entropy gate τ per draft (budgetlm.decode.speculative). Returns a decode.generate.Output."""
    from budgetlm.decode.generate import build, check_settings, encode_prompt

    check_settings(max_new_tokens, mode, max_draft, temperature, top_p, draft_window, draft_kv)
    gen = build(handle, drafts, tau, mode, max_draft, temperature, top_p, seed, load, draft_window, draft_kv)
    ids = encode_prompt(handle, prompt, chat, max_new_tokens)
    return gen(ids, max_new_tokens, until, on_text)


def run(
    recipe: str | Path | None = None,
    out: str | Path | None = None,
    progress: bool = False,
    force: bool = False,
    max_cells: int | None = None,
    runner: str = "local",
    address: str | None = None,
) -> Path:
    """Run a study (None: the bundled quickstart); returns its folder. An existing study at `out` is resumed; with
    `force`, it (or anything else there) is moved aside and the study starts afresh. Lists of settings in a pipeline
    (`bits: [2, 3, 4]`) expand as a product; `max_cells` refuses a plan of more cells. `runner="ray"` runs the cells
    as Ray tasks on a local instance or the cluster at `address` (whose nodes must share the `out` path)."""
    from budgetlm.experiments.study import run_study

    return run_study(recipe, out, progress=progress, force=force, max_cells=max_cells, runner=runner, address=address)


def solve(
    directory: str | Path,
    max_size: float | str | None = None,
    max_ms_per_token: float | str | None = None,
    max_rss: float | str | None = None,
    device: str | None = None,
    task: str | None = None,
    context: int | None = None,
    run: bool = False,
    progress: bool = False,
):
    """The most accurate evaluated cell of a study within a budget (sizes in bytes or with a unit: "100MB",
    "1.5GiB"; decode in ms/token, measured here or, with `device`, projected there), its Pareto neighbours and
    proposals (pipelines not yet run: neighbouring settings of the best cells). With `run`, the proposals are
    evaluated as new cells of the study first and the solution is made again. Returns a budgetlm.solve.choose.Solution
    (`budgetlm.solve.show.to_dict` turns it into what `budgetlm solve --json` prints)."""
    from budgetlm.solve.choose import Limits
    from budgetlm.solve.choose import solve as choose
    from budgetlm.solve.propose import proposals, run_proposals
    from budgetlm.units import parse_bytes, parse_ms

    limits = Limits(
        _amount(max_size, parse_bytes, "--max-size"),
        _amount(max_ms_per_token, parse_ms, "--max-ms-per-token"),
        _amount(max_rss, parse_bytes, "--max-rss"),
        device,
        context,
    )
    solution = choose(directory, limits, task)
    todo = proposals(solution)
    if run and todo:
        run_proposals(directory, todo, progress=progress)
        solution = choose(directory, limits, task)
        proposals(solution)
        solution.ran = [p.name for p in todo]
    return solution


def _amount(value: float | str | None, parse, flag: str) -> float | None:
    """A limit given as text ("100MB", "30ms") or as a number (bytes, ms)."""
    from budgetlm.errors import ConfigError

    if value is None or isinstance(value, str):
        return value if value is None else parse(value, flag)
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0 or value == float("inf"):
        raise ConfigError(f"{flag} {value!r} must be a positive number")
    return float(value)


def report(directory: str | Path) -> dict[str, Path]:
    """Write report.md, results.csv, pareto.png and report.html for a study folder; returns their paths by kind."""
    from budgetlm.report.build import build_report

    return build_report(directory)


def train(
    model: str,
    method: str,
    out: str | Path,
    settings: dict | None = None,
    train: dict | None = None,
    resume: bool = False,
    seed: int = 0,
    progress: bool = False,
    merge: bool = False,
    force: bool = False,
):
    """Attach adapter `method` (or 'full' fine-tuning) with `settings`, train it with the TrainConfig `train`,
    checkpointing under out/checkpoints, and save into `out` the adapter in peft's format (`load(out)` reads it
    back onto its base), or with `merge` the merged model as a budgetlm model folder; see budgetlm.train.run.
    With `force`, what `out` holds (an earlier run, other files) is moved aside first. Returns (handle, TrainResult,
    notes)."""
    from budgetlm.train.run import plan_run, train_run

    run = plan_run(model, method, settings or {}, train or {}, seed)
    return train_run(run, out, resume=resume, progress=progress, merge=merge, force=force)


def export(
    handle: ModelHandle,
    path: str | Path,
    gguf_type: str = "Q8_0",
    requantize: bool = False,
    pure: bool = False,
    aside: bool = False,
):
    """Write the model as a GGUF file llama.cpp runs (F32, F16, BF16, Q8_0, Q5_1, Q5_0, Q4_1, Q4_0).

    Quantised layers are written from their own codes when the type holds them exactly; otherwise a one-line
    ConfigError names the types that do, unless `requantize`. Returns budgetlm.export.gguf.ExportReport."""
    from budgetlm.export.gguf import export_gguf

    return export_gguf(handle, path, gguf_type, requantize=requantize, pure=pure, aside=aside)
