"""The `budgetlm` command: a thin typer wrapper over budgetlm.api. User errors print one line, exit 2."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import warnings
from pathlib import Path
from typing import Annotated

import typer
import typer.core

from budgetlm.errors import PENDING_SIGNALS, BudgetLMError, ConfigError, Interrupted
from budgetlm.utils import yaml_load

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain click help: flags without a value, no box drawing cut at 80 columns in a pipe
    help="Put language models on a budget: compress, evaluate, measure and compare them on your own hardware.",
)
FORCE_HELP = "replace an earlier budgetlm output at --out; anything else there is moved aside (kept), never deleted"
DRAFT_HELP = (
    "draft models for speculative decoding, cheapest first (D1[,D2]): model names, folders, GGUF files, layers:K "
    "(the model's first K layers with its final norm and head), or copy:METHOD[:key=value...] (the model copied "
    "and compressed here, e.g. copy:rtn:bits=8:embeddings=true)"
)
TAU_HELP = "entropy gate in nats per draft (one value, or one per draft; inf: no gate)"
MODE_HELP = (
    "exact: output identical to the model's own decoding; gated: drafted tokens below tau are accepted unverified "
    "(HOLA's gate; faster, lossy)"
)
MAX_DRAFT_HELP = "tokens a draft proposes per round at most"
DRAFT_KV_HELP = (
    "the drafts' key/value caches: bf16 (half the bytes a draft step's attention reads), fp32, or auto (bf16 in exact "
    "greedy decoding for float32 drafts on budgetlm's lean runtime: the output is unchanged, only guesses move)"
)
DRAFT_WINDOW_HELP = (
    "drafts attend to the first 4 positions and the last N only (MagicDec's sparse-KV draft: cheaper draft steps at "
    "long contexts; exact output unchanged); 0: all"
)
# what `interrupted: ...` says, per command (set by the command that runs)
_on_interrupt = ["nothing was written"]


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        print(f"budgetlm {version('budgetlm')}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="print the version and exit")
    ] = False,
) -> None:
    """Put language models on a budget: compress, evaluate, measure and compare them on your own hardware."""


class StepsCommand(typer.core.TyperCommand):
    """A command whose method steps (--method NAME [--set key=value ...], repeated, in order) are parsed from its
    extra arguments; its help lists them with the options."""

    def format_options(self, ctx, formatter) -> None:
        super().format_options(ctx, formatter)
        with formatter.section("Method steps (repeat for a pipeline; applied in order)"):
            formatter.write_dl(
                [
                    ("--method NAME", "a method from `budgetlm methods`"),
                    ("--set key=value", "a setting of the --method before it (YAML value: --set bits=4)"),
                ]
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


# metric -> what the human table calls it; --json keeps the metric names
LABELS = {
    "bpw": "bpw, whole model",
    "linear_bpw": "bpw, Linear layers",
    "linear_memory_bpw": "bpw in memory, Linear layers",
}
SIDE_BY_SIDE = {"bpw": "linear_bpw", "linear_bpw": "linear_memory_bpw"}  # each shown right after the first


def _fmt(m) -> str:
    """A metric for people (MB, s / min, thousands), '*' when its speed was measured on a busy machine."""
    from budgetlm.hardware.contention import contended
    from budgetlm.units import format_value

    return format_value(m.value, m.stderr, m.unit) + (" *" if contended([m.extra]) else "")


def _ordered(metrics: dict) -> list[str]:
    pos = {k: float(i) for i, k in enumerate(metrics)}
    for first, second in SIDE_BY_SIDE.items():
        if first in pos and second in pos:
            pos[second] = pos[first] + 0.1
    return sorted(metrics, key=pos.__getitem__)


def _print_results(results: dict, as_json: bool, runtime: dict | None = None) -> None:
    """The human table on stdout (or {task: {metric: raw value}} with --json); a metric's warning (an
    implausible perplexity, say) as one `warning: ...` line on stderr after it either way. `runtime` (bench): what
    ran the model, a "runtime" object first in --json, a line under the table."""
    from budgetlm.results import flatten

    warnings = [
        f"warning: {task} {name}: {m.extra['warning']}"
        for task, ms in results.items()
        for name, m in ms.items()
        if m.extra.get("warning")
    ]
    if as_json:
        print(json.dumps({"runtime": runtime, **flatten(results)} if runtime else flatten(results), indent=2))
    else:
        _print_table(results)
        for line in _runtime_lines(runtime) if runtime else []:
            print(line)
    sys.stdout.flush()
    for line in warnings:
        print(line, file=sys.stderr)


def _print_table(results: dict) -> None:
    from budgetlm.hardware.contention import contended

    rows = [
        [t, LABELS.get(k, k), _fmt(ms[k]), f"{ms[k].n:,}" if ms[k].n else ""]
        for t, ms in results.items()
        for k in _ordered(ms)
    ]
    _table("results", ["task/phase", "metric", "value", "n"], rows)
    for task, ms in results.items():  # where each task's items came from and how many were used
        extra = next((m.extra for m in ms.values() if m.extra.get("data")), None)
        if extra:
            print(f"data: {task}: {extra['data']}; used {extra['items_used']:,}: {extra['sampling']}")
    busy = contended([m.extra for ms in results.values() for m in ms.values()])
    if busy:
        print(f"* measured on a busy machine ({busy}): speed figures are low and noisy; rerun when it is idle")


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
    from budgetlm.data.tasks.bundled import data_note

    for name in registry.names():
        task = registry.get(name)
        note = data_note(task)
        print(f"{name:14s} {task.kind:16s} {task.description}" + (f" [data: {note}]" if note else ""))


@app.command("eval")
def eval_cmd(
    model: ModelArg,
    tasks: Annotated[str, typer.Option("--tasks", help="comma-separated task names")] = "text-ppl,text-cloze",
    limit: Annotated[int | None, typer.Option(help="sample N items per task with the seed")] = None,
    seed: Annotated[int, typer.Option()] = 0,
    out: Annotated[Path | None, typer.Option(help="folder for eval.json and per-item logs")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="local dataset files in the hub's schema")] = None,
    batch_size: Annotated[
        int | None, typer.Option(min=1, help="rows per forward pass (default: by token budget)")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print {task: {metric: value}} on stdout")] = False,
    force: Annotated[bool, typer.Option("--force", help=FORCE_HELP)] = False,
    allow_contamination: Annotated[
        bool,
        typer.Option(
            "--allow-contamination",
            help="score a task even though the model's provenance records training on data made from its test "
            "items (gsm8k after gsm_symbolic); the result says so",
        ),
    ] = False,
    draft: Annotated[str | None, typer.Option("--draft", help=DRAFT_HELP + " (generation tasks)")] = None,
    tau: Annotated[str | None, typer.Option("--tau", help=TAU_HELP)] = None,
    mode: Annotated[str, typer.Option("--mode", help=MODE_HELP)] = "exact",
    max_draft: Annotated[int, typer.Option("--max-draft", help=MAX_DRAFT_HELP)] = 8,
    draft_window: Annotated[int, typer.Option("--draft-window", help=DRAFT_WINDOW_HELP)] = 0,
    draft_kv: Annotated[str, typer.Option("--draft-kv", help=DRAFT_KV_HELP)] = "auto",
) -> None:
    """Evaluate a model on tasks (see `budgetlm tasks`)."""
    from budgetlm.api import evaluate, load
    from budgetlm.evaluation.harness import resolve_tasks

    names = [t.strip() for t in tasks.split(",") if t.strip()]
    resolve_tasks(names)
    if limit is not None and limit <= 0:
        raise ConfigError(f"--limit must be a positive number of items (got {limit})")
    _check_data_dir(data_dir)
    decoding = _decoding(draft, tau, mode, max_draft, draft_window, draft_kv)
    with _output_folder(out, "an evaluation", "eval.json", force) as folder:
        handle = load(model)
        results = evaluate(
            handle,
            names,
            limit=limit,
            seed=seed,
            out_dir=folder,
            data_dir=data_dir,
            batch_size=batch_size,
            progress=True,  # on stderr: stdout stays the table or the --json document
            allow_contamination=allow_contamination,
            decoding=decoding,
        )
    _print_results(results, as_json)


def _decoding(
    draft: str | None, tau: str | None, mode: str, max_draft: int, draft_window: int = 0, draft_kv: str = "auto"
) -> dict | None:
    """The speculative-decoding settings, checked before any model loads (None: no draft)."""
    from budgetlm.decode.drafts import parse_specs, parse_taus
    from budgetlm.decode.generate import check_settings

    check_settings(1, mode, max_draft, 0.0, 1.0, draft_window, draft_kv)
    specs = parse_specs(draft)
    parse_taus(tau, len(specs))
    if not specs:
        if mode != "exact" or max_draft != 8 or draft_window or draft_kv != "auto":
            raise ConfigError(
                "--mode, --max-draft, --draft-window and --draft-kv apply to speculative decoding; give --draft too"
            )
        return None
    out = {"drafts": specs, "tau": tau, "mode": mode, "max_draft": max_draft}
    if draft_window:
        out["draft_window"] = draft_window
    if draft_kv != "auto":
        out["draft_kv"] = draft_kv
    return out


def _check_data_dir(data_dir: Path | None) -> None:
    if data_dir is not None and not data_dir.is_dir():
        what = "is a file, not a folder" if data_dir.exists() else "does not exist"
        raise ConfigError(f"--data-dir {data_dir} {what}; give the folder holding <task>/<split>.jsonl files")


@contextlib.contextmanager
def _output_folder(out: Path | None, what: str, marker: str, force: bool):
    """Check --out before any work, then yield a temporary folder that replaces --out only when the command
    succeeds (None when there is no --out): a failed or interrupted command leaves nothing behind."""
    if out is None:
        yield None
        return
    from budgetlm.utils import atomic_dir, check_output

    check_output(out, what, marker=marker, force=force)
    with atomic_dir(out, marker=marker, aside=force) as tmp:
        yield tmp


RUNTIME_HELP = (
    "torch, or llama.cpp: the model written to a temporary GGUF file by budgetlm's exporter and run by llama.cpp "
    "(needs llama-cpp-python: pip install -e '.[llamacpp]'); both with torch's thread count"
)
GGUF_TYPE_HELP = (
    "with --runtime llama.cpp, the GGUF type: F32, F16, BF16, Q8_0, Q5_1, Q5_0, Q4_1, Q4_0 (default: the type that "
    "keeps the model's own numbers: its float type, or the smallest block type holding its quantised codes exactly)"
)


@app.command()
def bench(
    model: ModelArg,
    out: Annotated[Path | None, typer.Option(help="write bench.json here")] = None,
    repeats: Annotated[int, typer.Option(min=1)] = 3,
    decode_tokens: Annotated[int, typer.Option(min=1)] = 64,
    runtime: Annotated[str, typer.Option("--runtime", help=RUNTIME_HELP)] = "torch",
    gguf_type: Annotated[str | None, typer.Option("--gguf-type", help=GGUF_TYPE_HELP)] = None,
    requantize: Annotated[
        bool,
        typer.Option(
            "--requantize", help="with --gguf-type, round quantised layers again when the type cannot hold their codes"
        ),
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print {phase: {metric: value}} on stdout")] = False,
    force: Annotated[bool, typer.Option("--force", help=FORCE_HELP)] = False,
) -> None:
    """Measure size, peak memory, prefill/decode speed and energy (when RAPL is readable)."""
    from budgetlm.api import load, measure
    from budgetlm.hardware.llamacpp import check_runtime

    runtime = check_runtime(runtime)
    if runtime == "llama.cpp":
        from budgetlm.export.gguf import parse_type
        from budgetlm.hardware.llamacpp import require_llama_cpp

        gguf_type = None if gguf_type is None else parse_type(gguf_type)
        require_llama_cpp()
    elif gguf_type is not None or requantize:
        flag = "--gguf-type" if gguf_type is not None else "--requantize"
        raise ConfigError(f"{flag} applies to --runtime llama.cpp; the torch runtime measures the model as loaded")
    with _output_folder(out, "a benchmark", "bench.json", force) as folder:
        if runtime == "llama.cpp":
            from budgetlm.hardware.llamacpp import bench_model

            results, info = bench_model(
                lambda: load(model),
                gguf_type=gguf_type,
                requantize=requantize,
                repeats=repeats,
                decode_tokens=decode_tokens,
                progress=True,
            )
        else:
            results, info = _bench_torch(model, load, measure, repeats, decode_tokens)
        if folder is not None:
            doc = {p: {k: m.to_dict() for k, m in ms.items()} for p, ms in results.items()}
            (folder / "bench.json").write_text(json.dumps({"runtime": info, **doc}, indent=2))
    _print_results(results, as_json, runtime=info)


@app.command()
def generate(
    model: ModelArg,
    prompt: Annotated[str | None, typer.Argument(help="the prompt (default: read from stdin)")] = None,
    chat: Annotated[bool, typer.Option("--chat", help="wrap the prompt in the model's chat template")] = False,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="tokens to generate at most")] = 256,
    draft: Annotated[str | None, typer.Option("--draft", help=DRAFT_HELP)] = None,
    tau: Annotated[str | None, typer.Option("--tau", help=TAU_HELP)] = None,
    mode: Annotated[str, typer.Option("--mode", help=MODE_HELP)] = "exact",
    max_draft: Annotated[int, typer.Option("--max-draft", help=MAX_DRAFT_HELP)] = 8,
    draft_window: Annotated[int, typer.Option("--draft-window", help=DRAFT_WINDOW_HELP)] = 0,
    draft_kv: Annotated[str, typer.Option("--draft-kv", help=DRAFT_KV_HELP)] = "auto",
    temperature: Annotated[float, typer.Option(help="0: greedy; above: sampling")] = 0.0,
    top_p: Annotated[float, typer.Option("--top-p", help="nucleus sampling")] = 1.0,
    seed: Annotated[int, typer.Option(help="seed of the sampling")] = 0,
    as_json: Annotated[
        bool, typer.Option("--json", help="print the text and the counters as one JSON document")
    ] = False,
) -> None:
    """Generate text: streamed to stdout, tokens per second (and, with --draft, each level's acceptance) on stderr."""
    from budgetlm.api import generate as run_generate
    from budgetlm.api import load
    from budgetlm.decode.drafts import parse_specs, parse_taus
    from budgetlm.decode.generate import check_settings

    check_settings(max_new_tokens, mode, max_draft, temperature, top_p, draft_window, draft_kv)
    specs = parse_specs(draft)
    parse_taus(tau, len(specs))
    if not specs and mode != "exact":
        raise ConfigError("--mode gated applies to speculative decoding; give --draft too")
    if not specs and draft_window:
        raise ConfigError("--draft-window needs --draft: the window is a draft model's view of the context")
    if not specs and draft_kv != "auto":
        raise ConfigError("--draft-kv needs --draft: it is the draft models' key/value cache")
    if prompt is None:
        if sys.stdin.isatty():
            raise ConfigError("no prompt: give PROMPT as an argument or pipe it on stdin")
        prompt = sys.stdin.read()
    handle = load(model)

    def stream(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    out = run_generate(
        handle,
        prompt,
        chat=chat,
        max_new_tokens=max_new_tokens,
        drafts=specs,
        tau=tau,
        mode=mode,
        max_draft=max_draft,
        draft_window=draft_window,
        draft_kv=draft_kv,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        on_text=None if as_json else stream,
    )
    summary = {
        "model": handle.source,
        "mode": mode if specs else "plain",
        "drafts": specs,
        "text": out.text,
        "prompt_tokens": out.prompt_tokens,
        "new_tokens": len(out.tokens),
        "stop": out.stop,
        "seconds": out.seconds,
        "tokens_per_second": out.tokens_per_second,
        "levels": out.levels if specs else [],
    }
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    print()
    line = f"{len(out.tokens)} tokens in {out.seconds:.2f} s: {out.tokens_per_second:.1f} tok/s (stop: {out.stop})"
    print(line, file=sys.stderr)
    for lv in out.levels[1:] if specs else []:
        acc = "-" if lv["acceptance"] is None else f"{lv['acceptance']:.1%}"
        mean = "-" if lv["mean_accepted"] is None else f"{lv['mean_accepted']:.2f}"
        print(
            f"  {lv['model']}: {lv['rounds']} rounds, {lv['proposed']} proposed, {acc} accepted, "
            f"{mean} accepted per round",
            file=sys.stderr,
        )
    shares = ", ".join(f"{lv['model']} {lv['time_share']:.0%}" for lv in out.levels if lv["time_share"] is not None)
    if specs:
        print(f"  time share: {shares}", file=sys.stderr)


def _bench_torch(model: str, load, measure, repeats: int, decode_tokens: int) -> tuple[dict, dict]:
    import torch

    from budgetlm.hardware.host import memory_bandwidth
    from budgetlm.hardware.memory import PeakRSS
    from budgetlm.hardware.speed import compute_dtype
    from budgetlm.results import Metric

    with PeakRSS("load") as rss_load:
        handle = load(model)
    model_folder = model if Path(model).is_dir() else None
    memory_bandwidth()  # measured once per process: its 512 MB of buffers stay out of the benchmark's peak RSS
    with PeakRSS("benchmark") as rss_bench:
        results = measure(handle, repeats=repeats, decode_tokens=decode_tokens, folder=model_folder, progress=True)
    results["memory"] = {
        "peak_rss_load": Metric(float(rss_load.peak_bytes), unit="B"),
        "peak_rss_benchmark": Metric(float(rss_bench.peak_bytes), unit="B"),
    }
    from budgetlm.decode.lean import runtime_for

    info = {"name": "torch", "torch": torch.__version__, "threads": torch.get_num_threads()}
    info["dtype"] = compute_dtype(handle.model)
    info["decoder"] = runtime_for(handle.model).label
    return results, info


def _runtime_lines(info: dict) -> list[str]:
    """The line under a benchmark's table that says what ran the model (and the GGUF export's notes)."""
    threads = f"{info['threads']} thread{'s' if info['threads'] != 1 else ''}"
    if info["name"] != "llama.cpp":
        decoder = f", {info['decoder']} forward" if info.get("decoder") else ""
        return [f"runtime: torch {info['torch']}, {info['dtype']}, {threads}{decoder}"]
    types = ", ".join(f"{n} {t}" for t, n in sorted(info["tensor_types"].items(), key=lambda kv: -kv[1]))
    codes = f"; {info['tensors_from_codes']} written from budgetlm's codes" if info["tensors_from_codes"] else ""
    lines = [
        f"runtime: llama.cpp (llama-cpp-python {info['llama_cpp_python']}), {threads}; GGUF {info['gguf_type']} "
        f"({info['gguf_type_why']}); tensors: {types}{codes}"
    ]
    return lines + [f"note: {n}" for n in info["notes"]]


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
                steps[-1][k] = _yaml_value(value, v)
        else:
            raise ConfigError(f"unexpected argument '{arg}'; use --method NAME [--set key=value ...] --out DIR")
        i += 1
    if not steps:
        raise ConfigError("no --method given; see `budgetlm methods`")
    return steps


GGUF_HELP = "GGUF tensor type: F32, F16, BF16, Q8_0, Q5_1, Q5_0, Q4_1, Q4_0"


@app.command(cls=StepsCommand, context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def compress(
    ctx: typer.Context,
    model: ModelArg,
    out: Annotated[Path, typer.Option(help="folder to write the compressed model to (new or empty)")],
    seed: Annotated[int, typer.Option()] = 0,
    gguf: Annotated[
        str | None, typer.Option("--gguf", help=GGUF_HELP + "; also export the result to <out>.<TYPE>.gguf")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help=FORCE_HELP)] = False,
) -> None:
    """Apply method steps in order: --method NAME [--set key=value ...] [--method NAME2 ...] --out DIR."""
    from budgetlm.api import apply, load
    from budgetlm.methods.base import StepContext, parse_config
    from budgetlm.models.handle import MANIFEST
    from budgetlm.utils import check_output

    steps = parse_steps(list(ctx.args))
    configs = [parse_config(s["method"], {k: v for k, v in s.items() if k != "method"}) for s in steps]
    check_output(out, "a compressed model", marker=MANIFEST, force=force)
    gguf_path, gguf_aside = None, False
    if gguf is not None:
        from budgetlm.export.gguf import is_budgetlm_gguf, parse_type

        gguf = parse_type(gguf)
        gguf_path = out.parent / f"{out.name}.{gguf}.gguf"
        ours = check_output(
            gguf_path, "a GGUF file", marker=is_budgetlm_gguf, force=force, folder=False, flag="--gguf file"
        )
        gguf_aside = force and not ours
    handle = load(model)
    if gguf_path is not None:  # the grids the steps will make must fit the type: refuse now, not after the work
        from budgetlm.export.gguf import BLOCK_TYPES, cannot_hold, planned_exact_types

        exact = planned_exact_types(handle.model, configs) if gguf in BLOCK_TYPES else None
        if exact is not None and gguf not in exact:
            what = " -> ".join(s["method"] for s in steps)
            fix = f"or compress without --gguf, then `budgetlm export {out} --gguf {gguf} --out F.gguf --requantize`"
            raise cannot_hold(gguf, f"the codes {what} makes", exact, fix)
    reports = apply(handle, steps, StepContext(seed=seed, progress=True))
    for r in reports:
        print(f"{r.method}: {r.seconds:.1f} s; " + "; ".join(r.notes))
    export_report = None
    if gguf_path is not None:  # first: a type that cannot hold the codes fails before anything is written
        from budgetlm.api import export as run_export

        export_report = run_export(handle, gguf_path, gguf, aside=gguf_aside)
    try:
        handle.save(out, aside=force)
    except BaseException:
        if gguf_path is not None:
            gguf_path.unlink(missing_ok=True)  # this command's own file: all or nothing
        raise
    print(f"saved {out}")
    if export_report is not None:
        _print_export(export_report)


TRAIN_HELP = (
    "Train an adapter or the whole model: --method NAME (an adapter, or full) [--set key=value ...] "
    "[--set train.key=value ...] --out DIR; checkpoints go to DIR/checkpoints, the trained adapter to DIR in "
    "peft's format (with --merge: the merged model as a budgetlm model folder). `budgetlm eval DIR` evaluates it."
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


@app.command(
    cls=StepsCommand, context_settings={"allow_extra_args": True, "ignore_unknown_options": True}, help=TRAIN_HELP
)
def train(
    ctx: typer.Context,
    model: ModelArg,
    out: Annotated[Path, typer.Option(help="run folder: train.json, checkpoints/ and the trained adapter")],
    train_config: Annotated[
        Path | None, typer.Option("--train-config", help="YAML file of TrainConfig keys (steps, lr, data, ...)")
    ] = None,
    merge: Annotated[
        bool,
        typer.Option("--merge", help="save the merged full model (adapter folded in), not the adapter"),
    ] = False,
    resume: Annotated[
        bool, typer.Option("--resume", help="continue the run in --out from its newest checkpoint")
    ] = False,
    seed: Annotated[int, typer.Option(help="seeds the adapter's initialisation (the training seed is train.seed)")] = 0,
    force: Annotated[
        bool, typer.Option("--force", help="start afresh: an earlier run or other files at --out are moved aside")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print {phase: {metric: value}} on stdout")] = False,
) -> None:
    from budgetlm.api import train as run_train
    from budgetlm.results import Metric
    from budgetlm.train.run import check_run, plan_run

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
        base = _read_yaml(train_config, "--train-config")
        if not isinstance(base, dict):
            raise ConfigError(f"--train-config {train_config}: expected a mapping of TrainConfig keys (steps, lr, ...)")
    run = plan_run(model, method, settings, _deep_merge(base, train_settings), seed)
    check_run(run, out, resume, merge, force)  # before loading or writing anything
    _, result, notes = run_train(
        model, method, out, settings, run.train.resolved(), resume, seed, progress=not as_json, merge=merge, force=force
    )
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
    _print_results(phases, as_json)


def _yaml_value(setting: str, text: str):
    """The value of --set key=TEXT as YAML (`4` is a number, `[32, null]` a list); empty is null."""
    import yaml

    try:
        return yaml_load(text) if text else None
    except yaml.YAMLError:
        raise ConfigError(
            f"--set {setting}: the value is not valid YAML; quote it, e.g. --set 'targets=[\"*proj\"]'"
        ) from None


def _read_yaml(path: Path, flag: str):
    """A YAML file a user names; unreadable text or invalid YAML is a one-line ConfigError naming the file."""
    import yaml

    try:
        return yaml_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{flag} {path} is not UTF-8 text (byte {exc.start}: {exc.reason}); save it as UTF-8"
        ) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{flag} {path}: invalid YAML{where}: {problem}") from None


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
        bool,
        typer.Option("--requantize", help="round quantised layers again when the type cannot hold their codes exactly"),
    ] = False,
    pure: Annotated[
        bool,
        typer.Option("--pure", help="write the output matrix in TYPE too (by default 4/5-bit types keep it at Q8_0)"),
    ] = False,
    force: Annotated[bool, typer.Option("--force", help=FORCE_HELP)] = False,
) -> None:
    """Write a model as a GGUF file that llama.cpp runs (tokenizer and metadata included)."""
    from budgetlm.api import export as run_export
    from budgetlm.api import load
    from budgetlm.export.gguf import is_budgetlm_gguf, parse_type
    from budgetlm.utils import check_output

    gguf = parse_type(gguf)
    ours = check_output(out, "a GGUF file", marker=is_budgetlm_gguf, force=force, folder=False)
    handle = load(model)
    _print_export(run_export(handle, out, gguf, requantize=requantize, pure=pure, aside=force and not ours))


# -- budgetlm rag: AdaComp-RAG (index documents; ask a model through gated retrieval + compression) ---------------
rag_app = typer.Typer(
    no_args_is_help=True, rich_markup_mode=None, help="Retrieval: index documents, ask a model through AdaComp-RAG."
)
app.add_typer(rag_app, name="rag")


@rag_app.command("index")
def rag_index_cmd(
    docs: Annotated[
        list[str],
        typer.Argument(help="text/markdown/jsonl files or folders, or a bundled corpus: sciq-support, boolq-passages"),
    ],
    out: Annotated[Path, typer.Option(help="the index folder to write")],
    chunk_tokens: Annotated[
        int | None, typer.Option(help="encoder tokens per chunk, whole sentences (default 128, at most 254)")
    ] = None,
    bm25: Annotated[bool, typer.Option("--bm25", help="also a BM25 index, fused with the dense ranking")] = False,
    force: Annotated[bool, typer.Option("--force", help=FORCE_HELP)] = False,
) -> None:
    """Chunk documents by sentences, embed them with the bundled MiniLM and write an exact search index."""
    from budgetlm.rag.api import build

    index, found = build(docs, out, chunk_tokens, bm25, force, progress=True)
    m = index.manifest
    print(
        f"index {out}: {m['chunks']:,} chunks of <= {m['chunk_tokens']} tokens ({m['sentences']:,} sentences) from "
        f"{len(found.passages):,} passages, {m['kind']}; {m['duplicate_chunks_dropped']:,} duplicate chunks dropped, "
        f"{len(found.skipped)} files skipped (not UTF-8), {found.ignored} other files ignored"
    )


@rag_app.command("ask")
def rag_ask_cmd(
    index: Annotated[Path, typer.Argument(help="an index folder (budgetlm rag index)")],
    model: ModelArg,
    question: Annotated[str, typer.Argument(help="the question")],
    k: Annotated[int, typer.Option(min=1, help="passages to retrieve")] = 3,
    gate: Annotated[str, typer.Option(help="always, never, grad, entropy or margin (these three need --threshold)")] = (
        "always"
    ),
    threshold: Annotated[float | None, typer.Option(help="retrieve when the gate's score is at least this")] = None,
    budget: Annotated[
        int | None, typer.Option(min=1, help="compress the context to this many model tokens (default: no compression)")
    ] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="answer tokens at most")] = 64,
    as_json: Annotated[bool, typer.Option("--json", help="print the result as JSON")] = False,
) -> None:
    """Answer a question: gate, retrieve, compress, generate; prints each step and its latency."""
    from budgetlm.api import load
    from budgetlm.rag.api import ask
    from budgetlm.rag.index import load_index
    from budgetlm.rag.pipeline import Setting

    setting = Setting(gate=gate, k=k, budget=budget, threshold=threshold)
    idx = load_index(index)
    res = ask(idx, load(model), question, setting, max_new_tokens)
    if as_json:
        print(json.dumps(res.to_dict(), indent=2))
        return
    score = "" if res.score is None else f", score {res.score:.4g} vs threshold {threshold:.4g}"
    print(f"decision: {'retrieve' if res.retrieved else 'no retrieval'} ({res.setting}{score})")
    if res.passages:
        _table(
            "passages",
            ["rank", "source", "cosine"],
            [[str(i + 1), p["source"], f"{p['score']:.3f}"] for i, p in enumerate(res.passages)],
        )
    for note in res.notes:
        print(f"note: {note}")
    print(f"context ({res.prompt_tokens:,} prompt tokens):\n{res.context or '(none)'}")
    print(f"answer: {res.answer}")
    parts = ", ".join(f"{name[:-2]} {v * 1e3:.0f} ms" for name, v in res.seconds.items())
    print(f"latency: {parts}")


@app.command()
def run(
    recipe: Annotated[Path | None, typer.Argument(help="recipe YAML (default: the bundled quickstart)")] = None,
    out: Annotated[Path | None, typer.Option(help="study folder (default: runs/<recipe name>)")] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="validate the recipe and list its cells; run nothing")
    ] = False,
    force: Annotated[
        bool, typer.Option("--force", help="start afresh: an existing study or other files at --out are moved aside")
    ] = False,
    max_cells: Annotated[
        int | None, typer.Option("--max-cells", help="refuse a plan of more cells (lists of settings multiply)")
    ] = None,
    runner: Annotated[
        str,
        typer.Option(
            "--runner",
            help="local: one cell process after another; ray: the same processes as Ray tasks side by side, each "
            "reserving the recipe's `threads` CPUs (pip install 'budgetlm[ray]')",
        ),
    ] = "local",
    address: Annotated[
        str | None,
        typer.Option(
            "--address",
            help="with --runner ray: an existing Ray cluster (HOST:PORT; --out must then be a path every node "
            "shares); default: a local Ray instance",
        ),
    ] = None,
) -> None:
    """Run a study: every model x pipeline cell is compressed, evaluated and measured; resumes if interrupted."""
    from budgetlm.experiments.study import check_runner, run_study, summary_table

    if dry_run:
        check_runner(runner, address)
        _print_plan(recipe, max_cells)
        return
    _on_interrupt[0] = "finished cells are kept; rerun the same command to resume"
    folder = run_study(recipe, out, progress=True, force=force, max_cells=max_cells, runner=runner, address=address)
    _console().print(summary_table(folder))
    print(f"results in {folder}; `budgetlm report {folder}` writes report.html, report.md, results.csv and pareto.png")


def _print_plan(recipe: Path | None, max_cells: int | None = None) -> None:
    from budgetlm.experiments.plan import model_label, plan
    from budgetlm.experiments.recipe import load_recipe
    from budgetlm.experiments.runtime import check_runtimes, skip_line, split_unavailable, unavailable
    from budgetlm.experiments.study import check_max_cells

    def text(step: dict) -> str:
        keys = [k for k in step if k not in ("method", "targets", "ignore", "train")]
        train = step.get("train")
        extra = [f"train {train['steps']} steps on {train['data']['task']}"] if train else []
        return f"{step['method']}(" + ", ".join([*(f"{k}={step[k]}" for k in keys), *extra]) + ")"

    rec = load_recipe(recipe)
    cells = plan(rec)
    check_max_cells(rec, cells, max_cells)
    check_runtimes(rec)

    def steps(cell) -> str:
        out = " -> ".join(map(text, cell.config["steps"])) or "-"
        dec = cell.config.get("decoding")
        out += f"; decoding: drafts {', '.join(dec['drafts'])}, {dec['mode']}" if dec else ""
        if cell.config.get("runtime"):  # a `<p>@llama.cpp` cell (experiments/runtime.py)
            why = unavailable(cell.config["runtime"])
            out += f"; runtime {cell.config['runtime']}" + (f" (skipped here: {why})" if why else "")
        return out

    rows = [[model_label(c.model), c.pipeline, c.id, steps(c)] for c in cells]
    _table(
        f"{rec.name}: {len(cells)} cells; tasks {', '.join(rec.tasks)}", ["model", "pipeline", "cell", "steps"], rows
    )
    skipped = split_unavailable(cells)[1]
    if skipped:
        print("note: " + skip_line(skipped, "`run` would skip"))


@app.command()
def report(directory: Annotated[Path, typer.Argument(help="a study folder")]) -> None:
    """Write report.md, results.csv, pareto.png and report.html (one self-contained page) for a study folder."""
    from budgetlm.api import report as build

    for kind, path in build(directory).items():
        print(f"{kind}: {path}")


@app.command()
def solve(
    directory: Annotated[Path, typer.Argument(help="a study folder (`budgetlm run`)")],
    max_size: Annotated[
        str | None, typer.Option("--max-size", help="stored size at most, with a unit: 100MB, 1.5GiB")
    ] = None,
    max_ms_per_token: Annotated[
        str | None,
        typer.Option("--max-ms-per-token", help="decode ms per token at most (measured here; projected with --device)"),
    ] = None,
    max_rss: Annotated[
        str | None,
        typer.Option("--max-rss", help="peak RSS at most, with a unit (measured; with --device the projected need)"),
    ] = None,
    device: Annotated[
        str | None,
        typer.Option("--device", help="project decode and memory onto this device (`budgetlm devices`); must fit"),
    ] = None,
    task: Annotated[str | None, typer.Option("--task", help="task to maximise (default: the study's first)")] = None,
    context: Annotated[
        int | None, typer.Option("--context", help="KV cache tokens of a --device projection (default 2048)")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
    run: Annotated[bool, typer.Option("--run", help="evaluate the proposals as new cells of the study first")] = False,
) -> None:
    """The most accurate cell of a study within a budget, its Pareto neighbours, and pipelines worth running next."""
    from budgetlm.api import solve as solve_budget
    from budgetlm.solve.show import print_solution, to_dict

    if run:
        resume = f"budgetlm run {directory / 'recipe.solve.yaml'} --out {directory}"
        _on_interrupt[0] = f"finished cells are kept; `{resume}` resumes"
    solution = solve_budget(directory, max_size, max_ms_per_token, max_rss, device, task, context, run, progress=True)
    if as_json:
        print(json.dumps(to_dict(solution), indent=2))
        return
    if run:
        ran = ", ".join(solution.ran) or "nothing (no proposal)"
        print(f"ran: {ran}")
    given = [("--max-size", max_size), ("--max-ms-per-token", max_ms_per_token), ("--max-rss", max_rss),
             ("--device", device), ("--task", task), ("--context", context)]  # fmt: skip
    command = " ".join(["budgetlm solve", str(directory), *(f"{k} {v}" for k, v in given if v is not None)])
    print_solution(solution, _console(), command)


@app.command()
def compare(
    dir_a: Annotated[Path, typer.Argument(help="evaluation folder A (budgetlm eval --out)")],
    dir_b: Annotated[Path, typer.Argument(help="evaluation folder B")],
) -> None:
    """Paired comparison of two evaluations: McNemar for accuracies, paired bootstrap for the rest."""
    from budgetlm.evaluation.compare import compare as run_compare
    from budgetlm.evaluation.compare import format_table

    print(format_table(run_compare(dir_a, dir_b)))


@app.command()
def devices(
    target: Annotated[
        str | None,
        typer.Argument(
            metavar="MODEL_OR_RESULT_DIR",
            help="a model (as for bench) or a study's cell folder (its result.json); none: list the device profiles",
        ),
    ] = None,
    context: Annotated[
        int | None, typer.Option("--context", help="KV cache tokens projected (default 2048, or the model's window)")
    ] = None,
    device: Annotated[str | None, typer.Option("--device", help="comma-separated device names (default: all)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the profiles or the projection as JSON")] = False,
) -> None:
    """Device profiles, or a model's projected fit, decode and prefill speed on each (a roofline, not measured)."""
    from budgetlm.hardware import devices as dv

    chosen = dv.select(device, dv.load_devices())
    if target is None:
        if context is not None:
            raise ConfigError("--context applies to a projection; give a model or a cell folder")
        _print_devices(chosen, as_json)
        return
    if context is not None:
        dv.check_context(context, None)  # a bad number is refused before any model loads
    if (Path(target) / "results.sqlite").is_file():
        raise ConfigError(f"{target} is a study folder; give one of its cells ({Path(target) / 'cells'}/<cell>)")
    if (Path(target) / "result.json").is_file():
        work = dv.workload_from_cell(Path(target), context)
    else:
        from budgetlm.api import load

        work = dv.workload_from_model(load(target), context)
    _print_projection(work, dv.project_all(work, chosen), as_json)


def _print_devices(profiles: dict, as_json: bool) -> None:
    from budgetlm.units import number

    if as_json:
        print(json.dumps({n: d.model_dump(exclude_none=True) for n, d in profiles.items()}, indent=2))
        return
    rows = [
        [
            n,
            d.label,
            f"{number(d.memory_gib.value)} GiB",
            f"{number(d.bandwidth_gb_s.value)} GB/s",
            ", ".join(f"{p} {number(f.value)}" for p, f in d.peak_gops.items()),
        ]
        for n, d in profiles.items()
    ]
    _table("device profiles", ["name", "device", "memory", "bandwidth", "peak GOP/s"], rows)
    for n, d in profiles.items():
        figures = [("memory", d.memory_gib), ("bandwidth", d.bandwidth_gb_s)]
        figures += [(f"peak {p}", f) for p, f in d.peak_gops.items()]
        for what, f in figures:
            derived = f"; derived: {f.derived}" if f.derived else ""
            print(f"source: {n} {what}: {f.source}{derived}")


def _print_projection(work, projected: dict, as_json: bool) -> None:
    from budgetlm.units import format_value, human_bytes, number

    first = next(iter(projected.values()))
    cal = first["fits"].extra["calibration"]
    if as_json:
        doc = {
            "projected": True,
            "model": work.label,
            "context": work.context,
            "calibration": cal,
            "devices": {n: {k: m.to_dict() for k, m in ms.items()} for n, ms in projected.items()},
        }
        print(json.dumps(doc, indent=2))
        return
    rows = [
        [
            n,
            ("yes" if ms["fits"].value else "no") + f" (of {number(ms['fits'].extra['memory_bytes'] / 2**30)} GiB)",
            format_value(ms["memory_needed"].value, None, "B"),
            format_value(ms["decode_ms_per_token"].value, None, "ms/token"),
            ms["decode_ms_per_token"].extra["bound"],
            format_value(ms["prefill_tok_s"].value, None, "tok/s"),
        ]
        for n, ms in projected.items()
    ]
    columns = ["device", "fits (memory)", "needs", "decode (projected)", "bound", "prefill (projected)"]
    _table(f"{work.label}: projected at {work.context:,} tokens of context", columns, rows)
    parts = first["memory_needed"].extra
    print(
        f"projected, not measured: needs = weights {human_bytes(parts['weights'])} + KV cache "
        f"{human_bytes(parts['kv_cache'])} at {work.context:,} tokens + runtime "
        f"{human_bytes(parts['runtime_overhead'])} (stated, not measured)"
    )
    if isinstance(cal, dict):
        print(
            f"calibration: decode x {cal['ratio']:.2f}, this host's measured decode {cal['measured_decode_ms']:.3g} ms "
            f"/ its roofline {cal['roofline_decode_ms']:.3g} ms (measured in {cal['where']})"
        )
    else:
        print(f"calibration: {cal}; a cell folder (budgetlm run) calibrates by its measured decode")


def main(argv: list[str] | None = None) -> None:
    """The console entry point: every user error ends as one `error: ...` line on stderr and exit code 2; SIGINT
    and SIGTERM as one `interrupted: ...` line and exit 130 / 143."""
    _quiet_libraries()
    _on_interrupt[0] = "nothing was written"
    PENDING_SIGNALS.clear()
    previous = {s: signal.signal(s, _raise_interrupted) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = app(args=argv, prog_name="budgetlm", standalone_mode=False)
    except BudgetLMError as exc:
        _fail(f"error: {exc}", 2)
    except Interrupted as exc:
        _fail(f"interrupted ({exc}): {_on_interrupt[0]}", exc.exit_code)
    except (typer.Abort, EOFError):
        _fail(f"interrupted: {_on_interrupt[0]}", 130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the reader left: exit quietly
        sys.exit(1)
    except _CLICK_ERROR as exc:
        _fail(f"error: {exc.format_message()}" + _usage_hint(exc), 2)
    except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, UnicodeDecodeError) as exc:
        _fail(f"error: {_os_message(exc)}", 2)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        pending = list(PENDING_SIGNALS)
        PENDING_SIGNALS.clear()  # handled here: nothing later in this process re-raises them
    if code == 130:  # a KeyboardInterrupt the framework caught itself
        _fail(f"interrupted: {_on_interrupt[0]}", 130)
    if pending:  # the handler's exception was dropped where it landed and no progress step came after it
        exc = Interrupted(pending[0])
        _fail(f"interrupted ({exc}) as the command finished: its output is complete", exc.exit_code)
    sys.exit(code if isinstance(code, int) else 0)


def _quiet_libraries() -> None:
    """The libraries' own log lines and progress bars (transformers' "Loading weights", datasets' warnings) would
    turn a one-line error into several: silence them through their environment variables before they are imported,
    and through their APIs when they already are (the CLI called in-process)."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("DATASETS_VERBOSITY", "error")
    warnings.filterwarnings("ignore")
    if "transformers" in sys.modules:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    if "datasets" in sys.modules:
        import datasets

        datasets.logging.set_verbosity_error()
        datasets.utils.disable_progress_bars()


# the usage-error base class of the click typer runs on (typer 0.29 ships its own copy of click)
_CLICK_ERROR = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


def _raise_interrupted(signum, frame) -> None:
    PENDING_SIGNALS.append(signum)  # kept in case the exception is dropped where it lands (errors.check_interrupted)
    raise Interrupted(signum)


def _fail(line: str, code: int) -> None:
    print(" ".join(line.split()), file=sys.stderr)
    sys.exit(code)


def _usage_hint(exc) -> str:
    ctx = getattr(exc, "ctx", None)
    name = ctx.command_path if ctx is not None else "budgetlm"
    return f" (see `{name} --help`)"


def _os_message(exc: OSError | UnicodeDecodeError) -> str:
    if isinstance(exc, UnicodeDecodeError):
        return f"a file is not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8"
    where = f" {exc.filename}" if exc.filename else ""
    return f"cannot use{where}: {exc.strerror or type(exc).__name__}"


if __name__ == "__main__":
    main()
