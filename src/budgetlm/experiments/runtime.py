"""Cells whose model runs in llama.cpp: a recipe's `runtime: {llama.cpp: [pipeline, ...]}`.

Each listed pipeline P gets a sibling pipeline `P@llama.cpp` with the same steps, placed right after P (so the
summary and the report name the runtime in the pipeline label). Its cell config adds `"runtime": "llama.cpp"`;
every other cell's config, and so its id, is what it was without the key. The resolved recipe keeps both the
`runtime` mapping and the generated pipelines and parses to itself (a `P@llama.cpp` already present must carry P's
steps; one whose P is not listed is refused: the suffix is reserved).

A llama.cpp cell (experiments/cell.py) applies the steps in torch, writes CELL_DIR/model.gguf (atomically, with
export/gguf.py in the GGUF type `budgetlm bench --runtime llama.cpp` chooses: hardware/llamacpp.default_gguf_type,
the smallest block type holding the quantised codes exactly, or the model's own float type), scores every task
through evaluation/llamacpp_lm.LlamaCppLM and benchmarks the file with hardware/llamacpp.measure_gguf; every
metric's extra names the runtime and the GGUF type. Speculative decoding (`decoding`) and `latent` are torch-only
and left out of llama.cpp cells. Where llama-cpp-python is not installed the driver skips these cells (status
"skipped", one line naming the install command) and runs the rest; a rerun after installing it runs them.
"""

from __future__ import annotations

import gc
import importlib.util
from pathlib import Path

from budgetlm.errors import ConfigError, UnknownNameError, suggest

RUNTIMES = ("llama.cpp",)  # the runtimes a recipe can name (torch runs every pipeline)
GGUF_FILE = "model.gguf"
SKIPPED = "skipped"


def sibling(pipeline: str, runtime: str) -> str:
    return f"{pipeline}@{runtime}"


def runtime_of(pipeline: str, runtimes: dict[str, list[str]] | None) -> str | None:
    """The runtime of a (resolved) recipe's pipeline: 'llama.cpp' for a generated `P@llama.cpp`, else None."""
    for name, listed in (runtimes or {}).items():
        if pipeline.endswith("@" + name) and pipeline[: -len(name) - 1] in listed:
            return name
    return None


def strip_siblings(runtimes: dict | None, pipelines: dict[str, list], origin: str) -> dict[str, list]:
    """The pipelines without the `P@<runtime>` siblings (a resolved recipe holds them; add_siblings makes them
    again after a generated study's expansion), each checked: P listed under the runtime, P's steps."""
    _reserved(pipelines, runtimes or {}, origin)
    return {name: steps for name, steps in pipelines.items() if runtime_of(name, runtimes) is None}


def add_siblings(
    runtimes: dict | None, pipelines: dict[str, list], decoding, origin: str
) -> tuple[dict | None, dict[str, list]]:
    """Check the recipe's `runtime` mapping against its (expanded) pipelines and add the `P@<runtime>` siblings."""
    if runtimes is None:
        return None, pipelines
    if not runtimes:
        raise ConfigError(f"{origin}: runtime: an empty mapping; give {{llama.cpp: [pipeline, ...]}} or remove the key")
    for key, listed in runtimes.items():
        if key not in RUNTIMES:
            raise UnknownNameError(
                f"{origin}: runtime: unknown runtime '{key}'{suggest(key, list(RUNTIMES))}; a recipe can name: "
                f"{', '.join(RUNTIMES)} (torch runs every pipeline)"
            )
        if not listed:
            raise ConfigError(f"{origin}: runtime.{key}: an empty list; name the pipelines to run in {key}")
        seen = set()
        for i, name in enumerate(listed):
            if name in seen:
                raise ConfigError(f"{origin}: runtime.{key}: '{name}' is listed twice")
            seen.add(name)
            if name not in pipelines:
                raise UnknownNameError(
                    f"{origin}: runtime.{key}[{i}]: no pipeline '{name}'{suggest(name, list(pipelines))}; pipelines: "
                    f"{', '.join(pipelines)}"
                )
    out: dict[str, list] = {}
    for name, steps in pipelines.items():
        out[name] = steps
        for key, listed in runtimes.items():
            if name in listed:
                out[sibling(name, key)] = steps
    if decoding is not None:
        for i, name in enumerate(decoding.pipelines or []):
            if runtime_of(name, runtimes) is not None:
                raise ConfigError(
                    f"{origin}: decoding.pipelines[{i}]: '{name}' runs in llama.cpp; speculative decoding runs in "
                    "torch only"
                )
    return {k: list(v) for k, v in runtimes.items()}, out


def _reserved(pipelines: dict[str, list], runtimes: dict, origin: str) -> None:
    """A pipeline named `X@<runtime>` is a generated sibling: X must be listed under the runtime and the steps
    must be X's."""
    for name, steps in pipelines.items():
        for key in RUNTIMES:
            if not name.endswith("@" + key):
                continue
            base = name[: -len(key) - 1]
            if base not in (runtimes.get(key) or []):
                raise ConfigError(
                    f"{origin}: pipelines.{name}: the suffix @{key} is reserved for the pipelines the recipe runs in "
                    f"{key}; list {base} under runtime: {{{key}: [...]}} instead"
                )
            if steps != pipelines.get(base):
                raise ConfigError(
                    f"{origin}: pipelines.{name}: its steps differ from {base}'s; a @{key} pipeline is {base} run in "
                    f"{key}: remove it (runtime: {{{key}: [{base}]}} makes it)"
                )


def check_runtimes(recipe) -> None:
    """Before anything is written: each llama.cpp pipeline's codes, as its steps' settings will make them on each
    model (export.gguf.planned_exact_types on a weightless skeleton), fit one GGUF block type, so the cell can write
    them without a second rounding; otherwise a one-line error naming the pipeline (a gptq g64 grid, NF4, ...)."""
    from budgetlm.export.gguf import BLOCK_TYPES, planned_exact_types
    from budgetlm.methods.base import parse_config
    from budgetlm.models.sources import skeleton

    mine = {p: steps for p, steps in recipe.pipelines.items() if runtime_of(p, recipe.runtime) and steps}
    for spec in recipe.models if mine else []:
        model = skeleton(spec)
        for name, steps in mine.items() if model is not None else []:
            configs = [parse_config(s["method"], {k: v for k, v in s.items() if k != "method"}) for s in steps]
            exact = planned_exact_types(model, configs)
            if exact is not None and not exact & set(BLOCK_TYPES):
                model_name = Path(spec).name if "/" in spec else spec
                raise ConfigError(
                    f"runtime.llama.cpp: {name[: name.rindex('@')]} on {model_name}: no GGUF block type holds the "
                    f"codes its steps make ({', '.join(BLOCK_TYPES)} take blocks of 32 along a row, 8/5/4 bits, no "
                    "act-order with groups or low-rank correction, no NF4), so llama.cpp could not run them as they "
                    "are; remove it from runtime.llama.cpp"
                )


# ---------------------------------------------------------------------------------------------- the driver


def unavailable(runtime: str) -> str | None:
    """Why cells of `runtime` cannot run on this machine (None: they can). Checked with find_spec: nothing imported."""
    if runtime == "llama.cpp" and importlib.util.find_spec("llama_cpp") is None:
        return "llama-cpp-python is not installed"
    return None


def require(runtime: str) -> None:
    """A cell of `runtime` on a machine without it (a Ray node, say): a one-line error before any work."""
    why = unavailable(runtime)
    if why:
        raise ConfigError(f"this cell runs in {runtime}, but {why} here: {install_note(runtime)}")


def install_note(runtime: str) -> str:
    from budgetlm.hardware.llamacpp import BUILD_NOTE, INSTALL

    return f"{INSTALL} ({BUILD_NOTE})" if runtime == "llama.cpp" else ""


def split_unavailable(cells: list) -> tuple[list, list[tuple[object, str]]]:
    """(cells that can run here, [(cell, why not: the reason and the install command)] for the others)."""
    run, skip = [], []
    for cell in cells:
        rt = cell.config.get("runtime")
        why = unavailable(rt) if rt else None
        (skip.append((cell, f"{why}: {install_note(rt)}")) if why else run.append(cell))
    return run, skip


def skip_line(skipped: list[tuple[object, str]], verb: str = "skipped") -> str:
    """The driver's one line about the cells it skips."""
    names = ", ".join(c.pipeline for c, _ in skipped)
    whys = "; ".join(dict.fromkeys(why for _, why in skipped))
    return f"{verb} {len(skipped)} cell(s) ({names}): {whys}"


# ---------------------------------------------------------------------------------------------- the cell


def export_cell(handle, cell_dir: Path) -> dict:
    """Write CELL_DIR/model.gguf in the GGUF type that keeps the model's own numbers (as bench does); returns what
    steps.json and the metrics record of it."""
    from budgetlm.export.gguf import export_gguf
    from budgetlm.hardware.llamacpp import default_gguf_type

    gguf_type, why = default_gguf_type(handle.model)
    report = export_gguf(handle, Path(cell_dir) / GGUF_FILE, gguf_type)  # a temporary sibling renamed: atomic
    return {
        "path": str(report.path),
        "gguf_type": report.gguf_type,
        "gguf_type_why": why,
        "tensor_types": dict(report.tensor_types),
        "tensors_from_codes": len(report.from_codes),
        "notes": list(report.notes),
    }


def make_lm(handle, gguf: dict, threads: int | None):
    """The llama.cpp LM over the cell's GGUF; the torch module is dropped (llama.cpp computes from here on)."""
    from budgetlm.evaluation.llamacpp_lm import LlamaCppLM
    from budgetlm.hardware.memory import release_freed_heap

    lm = LlamaCppLM(handle, gguf["path"], threads=threads)
    handle.model = lm.model = None
    gc.collect()
    release_freed_heap()
    return lm


def bench_cell(gguf: dict, bench: dict, threads: int | None, progress: bool) -> dict:
    """hardware/llamacpp.measure_gguf on the cell's GGUF with the recipe's bench settings."""
    from budgetlm.hardware.llamacpp import measure_gguf

    results = measure_gguf(
        gguf["path"],
        threads=threads,
        gguf_type=gguf["gguf_type"],
        prefill=tuple(bench["prefill"]),
        decode_tokens=bench["decode_tokens"],
        repeats=bench["repeats"],
        warmup=bench["warmup"],
        progress=progress,
    )
    disk = results["size"].get("disk_bytes")
    if disk is not None:
        disk.extra["file"] = f"the cell's {GGUF_FILE}"
    return results


def stamp(phases: dict, runtime: str, gguf: dict) -> None:
    """Every metric of a llama.cpp cell names its runtime and GGUF type."""
    for metrics in phases.values():
        for m in metrics.values():
            m.extra = {**m.extra, "runtime": runtime, "gguf_type": gguf["gguf_type"]}
