"""The `budgetlm` command: a thin typer wrapper over budgetlm.api. User errors print one line, exit 2."""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path
from typing import Annotated

import typer

from budgetlm.errors import BudgetLMError, ConfigError
from budgetlm.utils import yaml_load

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Put language models on a budget: compress, evaluate, measure and compare them on your own hardware.",
)

ModelArg = Annotated[str, typer.Argument(help="bundled name (see `budgetlm models`), GGUF file or model folder")]


def _console():
    """Console for results on stdout: on a terminal its width; in a file or a pipe wide enough that no table is
    cut or wrapped (rich would assume 80 columns). Progress goes to stderr (budgetlm.progress)."""
    from rich.console import Console

    console = Console()
    return console if console.is_terminal else Console(width=100_000)


def _table(title: str, columns: list[str], rows: list[list[str]]) -> None:
    from rich.table import Table

    table = Table(title=title)
    for c in columns:
        table.add_column(c)
    for r in rows:
        table.add_row(*r)
    _console().print(table)


def _fmt(m) -> str:
    v = f"{m.value:.4g}"
    if m.stderr is not None and m.stderr == m.stderr:
        v += f" ± {m.stderr:.2g}"
    return v + (f" {m.unit}" if m.unit else "")


def _print_results(results: dict, as_json: bool) -> None:
    from budgetlm.results import flatten

    if as_json:
        print(json.dumps(flatten(results), indent=2))
        return
    rows = [[t, k, _fmt(m), str(m.n or "")] for t, ms in results.items() for k, m in ms.items()]
    _table("results", ["task/phase", "metric", "value", "n"], rows)


@app.command()
def models() -> None:
    """List the bundled and test models."""
    from budgetlm.models.sources import BUNDLED

    for name, (desc, _) in BUNDLED.items():
        print(f"{name:14s} {desc}")
    print(f"{'PATH':14s} any Hugging Face model folder, budgetlm model folder or .gguf file")


@app.command()
def methods() -> None:
    """List the registered compression and adaptation methods."""
    from budgetlm.methods.base import methods as registry

    for name in registry.names():
        print(f"{name:14s} {registry.get(name).describe()}")


@app.command()
def tasks() -> None:
    """List the evaluation tasks."""
    from budgetlm.data.tasks import tasks as registry

    for name in registry.names():
        task = registry.get(name)
        print(f"{name:14s} {task.kind:16s} {task.description}")


@app.command("eval")
def eval_cmd(
    model: ModelArg,
    tasks: Annotated[str, typer.Option("--tasks", help="comma-separated task names")] = "text-ppl,text-cloze",
    limit: Annotated[int | None, typer.Option(help="sample N items per task with the seed")] = None,
    seed: Annotated[int, typer.Option()] = 0,
    out: Annotated[Path | None, typer.Option(help="folder for eval.json and per-item logs")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="local dataset files in the hub's schema")] = None,
    batch_size: Annotated[int | None, typer.Option(help="rows per forward pass (default: by token budget)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print {task: {metric: value}} on stdout")] = False,
) -> None:
    """Evaluate a model on tasks (see `budgetlm tasks`)."""
    from budgetlm.api import evaluate, load
    from budgetlm.evaluation.harness import resolve_tasks

    names = [t.strip() for t in tasks.split(",") if t.strip()]
    resolve_tasks(names)
    if limit is not None and limit <= 0:
        raise ConfigError(f"--limit must be a positive number of items (got {limit})")
    handle = load(model)
    results = evaluate(
        handle,
        names,
        limit=limit,
        seed=seed,
        out_dir=out,
        data_dir=data_dir,
        batch_size=batch_size,
        progress=True,  # on stderr: stdout stays the table or the --json document
    )
    _print_results(results, as_json)


@app.command()
def bench(
    model: ModelArg,
    out: Annotated[Path | None, typer.Option(help="write bench.json here")] = None,
    repeats: Annotated[int, typer.Option(min=1)] = 3,
    decode_tokens: Annotated[int, typer.Option(min=1)] = 64,
    as_json: Annotated[bool, typer.Option("--json", help="print {phase: {metric: value}} on stdout")] = False,
) -> None:
    """Measure size, peak memory, prefill/decode speed and energy (when RAPL is readable)."""
    from budgetlm.api import load, measure
    from budgetlm.hardware.memory import PeakRSS
    from budgetlm.results import Metric
    from budgetlm.utils import atomic_write_json

    with PeakRSS("load") as rss_load:
        handle = load(model)
    folder = model if Path(model).is_dir() else None
    with PeakRSS("benchmark") as rss_bench:
        results = measure(handle, repeats=repeats, decode_tokens=decode_tokens, folder=folder, progress=True)
    results["memory"] = {
        "peak_rss_load": Metric(float(rss_load.peak_bytes), unit="B"),
        "peak_rss_benchmark": Metric(float(rss_bench.peak_bytes), unit="B"),
    }
    if out is not None:
        atomic_write_json(out / "bench.json", {p: {k: m.to_dict() for k, m in ms.items()} for p, ms in results.items()})
    _print_results(results, as_json)


def parse_steps(args: list[str]) -> list[dict]:
    """--method NAME [--set key=value ...] repeated, in order -> [{"method": NAME, key: value, ...}]."""

    steps: list[dict] = []
    i = 0
    while i < len(args):
        arg = args[i]
        key, _, inline = arg.partition("=")
        if key in ("--method", "--set"):
            if inline:
                value = inline
            elif i + 1 < len(args):
                value, i = args[i + 1], i + 1
            else:
                raise ConfigError(f"{key} needs a value")
            if key == "--method":
                steps.append({"method": value})
            elif not steps:
                raise ConfigError(f"--set {value} comes before any --method; write --method NAME --set key=value")
            else:
                k, eq, v = value.partition("=")
                if not eq or not k:
                    raise ConfigError(f"--set {value}: expected key=value, e.g. --set bits=4")
                steps[-1][k] = yaml_load(v) if v else None
        else:
            raise ConfigError(f"unexpected argument '{arg}'; use --method NAME [--set key=value ...] --out DIR")
        i += 1
    if not steps:
        raise ConfigError("no --method given; see `budgetlm methods`")
    return steps


GGUF_HELP = "GGUF tensor type: F32, F16, BF16, Q8_0, Q5_1, Q5_0, Q4_1, Q4_0"


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def compress(
    ctx: typer.Context,
    model: ModelArg,
    out: Annotated[Path, typer.Option(help="folder to write the compressed model to")],
    seed: Annotated[int, typer.Option()] = 0,
    gguf: Annotated[
        str | None, typer.Option("--gguf", help=GGUF_HELP + "; also export the result to <out>.<TYPE>.gguf")
    ] = None,
) -> None:
    """Apply method steps in order: --method NAME [--set key=value ...] [--method NAME2 ...] --out DIR."""
    from budgetlm.api import apply, load
    from budgetlm.methods.base import parse_config

    steps = parse_steps(list(ctx.args))
    for s in steps:  # validate everything before loading the model
        parse_config(s["method"], {k: v for k, v in s.items() if k != "method"})
    if gguf is not None:
        from budgetlm.export.gguf import parse_type

        gguf = parse_type(gguf)
    from budgetlm.methods.base import StepContext

    handle = load(model)
    reports = apply(handle, steps, StepContext(seed=seed, progress=True))
    handle.save(out)
    for r in reports:
        print(f"{r.method}: {r.seconds:.1f} s; " + "; ".join(r.notes))
    print(f"saved {out}")
    if gguf is not None:
        from budgetlm.api import export as run_export

        _print_export(run_export(handle, out.parent / f"{out.name}.{gguf}.gguf", gguf))


TRAIN_HELP = (
    "Train an adapter or the whole model: --method NAME (an adapter, or full) [--set key=value ...] "
    "[--set train.key=value ...] --out DIR; checkpoints go to DIR/checkpoints, the trained model to DIR."
)


def split_train_settings(settings: dict) -> tuple[dict, dict]:
    """{"r": 8, "train.steps": 10, "train.data.task": "arith"} -> ({"r": 8}, {"steps": 10, "data": {"task": ...}})."""
    method, train = {}, {}
    for key, value in settings.items():
        if key == "train":
            if not isinstance(value, dict):
                raise ConfigError(f"--set train={value!r}: expected a mapping; write --set train.steps=100")
            train.update(value)
        elif key.startswith("train."):
            *parents, leaf = key.split(".")[1:]
            node = train
            for p in parents:
                node = node.setdefault(p, {})
                if not isinstance(node, dict):
                    raise ConfigError(f"--set {key}: train.{p} is not a mapping")
            node[leaf] = value
        else:
            method[key] = value
    return method, train


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True}, help=TRAIN_HELP)
def train(
    ctx: typer.Context,
    model: ModelArg,
    out: Annotated[Path, typer.Option(help="run folder: checkpoints/, train.json and the trained model")],
    train_config: Annotated[
        Path | None, typer.Option("--train-config", help="YAML file of TrainConfig keys (steps, lr, data, ...)")
    ] = None,
    resume: Annotated[bool, typer.Option(help="continue the run in --out from its newest checkpoint")] = False,
    seed: Annotated[int, typer.Option(help="seeds the adapter's initialisation (the training seed is train.seed)")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="print {phase: {metric: value}} on stdout")] = False,
) -> None:
    from budgetlm.api import train as run_train
    from budgetlm.results import Metric
    from budgetlm.train.run import check_out_dir, plan_run

    steps = parse_steps(list(ctx.args))
    if len(steps) != 1:
        raise ConfigError(f"budgetlm train takes one --method (got {len(steps)}); train one adapter per run")
    settings = dict(steps[0])
    method = settings.pop("method")
    settings, train_settings = split_train_settings(settings)
    if train_config is None and not train_settings:
        raise ConfigError("no training run given: pass --train-config FILE.yaml or --set train.steps=N (and more)")
    base = {}
    if train_config is not None:
        if not train_config.is_file():
            raise ConfigError(f"--train-config {train_config}: no such file")
        base = yaml_load(train_config.read_text(encoding="utf-8")) or {}
        if not isinstance(base, dict):
            raise ConfigError(f"--train-config {train_config}: expected a mapping of TrainConfig keys (steps, lr, ...)")
    run = plan_run(model, method, settings, _deep_merge(base, train_settings), seed)
    check_out_dir(run, out, resume)  # before loading anything
    _, result, notes = run_train(model, method, out, settings, run.train.resolved(), resume, seed, not as_json)
    losses = result.losses
    phases = {
        "train": {
            "steps": Metric(float(result.steps)),
            "trainable_params": Metric(float(result.trainable_params)),
            "loss_first": Metric(losses[0] if losses else float("nan")),
            "loss_last": Metric(losses[-1] if losses else float("nan")),
            "seconds": Metric(float(sum(result.step_times)), unit="s"),
            "peak_rss": Metric(float(result.peak_rss_bytes), unit="B"),
        }
    }
    if result.resumed_from is not None:
        phases["train"]["resumed_from_step"] = Metric(float(result.resumed_from))
    for task, metrics in (result.evals.get(result.steps) or {}).items():
        phases[task] = {k: Metric(**m) for k, m in metrics.items()}
    if not as_json:
        for note in notes:
            print(f"note: {note}")
        print(f"saved {out} (checkpoints in {out / 'checkpoints'})")
    _print_results(phases, as_json)


def _deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _print_export(report) -> None:
    for note in report.notes:
        print(f"note: {note}")
    types = ", ".join(f"{n} {t}" for t, n in sorted(report.tensor_types.items(), key=lambda kv: -kv[1]))
    exact = f"; {len(report.from_codes)} tensors written from budgetlm's codes" if report.from_codes else ""
    size = f"{report.file_bytes / 1e6:.1f} MB"
    print(f"wrote {report.path} ({size}; tensors: {types}{exact}; tokenizer {report.tokenizer})")


@app.command("export")
def export_cmd(
    model: ModelArg,
    gguf: Annotated[str, typer.Option("--gguf", help=GGUF_HELP)],
    out: Annotated[Path, typer.Option(help="the .gguf file to write")],
    requantize: Annotated[
        bool, typer.Option(help="round quantised layers again when the type cannot hold their codes exactly")
    ] = False,
    pure: Annotated[
        bool, typer.Option(help="write the output matrix in TYPE too (by default 4/5-bit types keep it at Q8_0)")
    ] = False,
) -> None:
    """Write a model as a GGUF file that llama.cpp runs (tokenizer and metadata included)."""
    from budgetlm.api import export as run_export
    from budgetlm.api import load
    from budgetlm.export.gguf import parse_type

    gguf = parse_type(gguf)
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder; give the .gguf file to write")
    handle = load(model)
    _print_export(run_export(handle, out, gguf, requantize=requantize, pure=pure))


@app.command()
def run(
    recipe: Annotated[Path | None, typer.Argument(help="recipe YAML (default: the bundled quickstart)")] = None,
    out: Annotated[Path | None, typer.Option(help="study folder (default: runs/<recipe name>)")] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="validate the recipe and list its cells; run nothing")
    ] = False,
) -> None:
    """Run a study: every model x pipeline cell is compressed, evaluated and measured; resumes if interrupted."""
    from budgetlm.experiments.study import run_study, summary_table

    if dry_run:
        _print_plan(recipe)
        return
    folder = run_study(recipe, out, progress=True)
    _console().print(summary_table(folder))
    print(f"results in {folder}; `budgetlm report {folder}` writes report.md, results.csv and pareto.png")


def _print_plan(recipe: Path | None) -> None:
    from budgetlm.experiments.plan import model_label, plan
    from budgetlm.experiments.recipe import load_recipe

    def text(step: dict) -> str:
        keys = [k for k in step if k not in ("method", "targets", "ignore", "train")]
        train = step.get("train")
        extra = [f"train {train['steps']} steps on {train['data']['task']}"] if train else []
        return f"{step['method']}(" + ", ".join([*(f"{k}={step[k]}" for k in keys), *extra]) + ")"

    rec = load_recipe(recipe)
    cells = plan(rec)
    rows = [[model_label(c.model), c.pipeline, c.id, " -> ".join(map(text, c.config["steps"])) or "-"] for c in cells]
    _table(
        f"{rec.name}: {len(cells)} cells; tasks {', '.join(rec.tasks)}", ["model", "pipeline", "cell", "steps"], rows
    )


@app.command()
def report(directory: Annotated[Path, typer.Argument(help="a study folder")]) -> None:
    """Write report.md, results.csv and pareto.png for a study folder."""
    from budgetlm.api import report as build

    for kind, path in build(directory).items():
        print(f"{kind}: {path}")


@app.command()
def compare(
    dir_a: Annotated[Path, typer.Argument(help="evaluation folder A (budgetlm eval --out)")],
    dir_b: Annotated[Path, typer.Argument(help="evaluation folder B")],
) -> None:
    """Paired comparison of two evaluations: McNemar for accuracies, paired bootstrap for the rest."""
    from budgetlm.evaluation.compare import compare as run_compare
    from budgetlm.evaluation.compare import format_table

    print(format_table(run_compare(dir_a, dir_b)))


def main() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore")
    try:
        app(standalone_mode=False)
    except BudgetLMError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: finished results are kept; rerun the same command to resume", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:  # click's usage errors carry their own exit code
        import click

        if isinstance(exc, click.exceptions.ClickException):
            print(f"error: {exc.format_message()}", file=sys.stderr)
            sys.exit(2)
        if isinstance(exc, click.exceptions.Exit):
            sys.exit(exc.exit_code)
        raise


if __name__ == "__main__":
    main()
