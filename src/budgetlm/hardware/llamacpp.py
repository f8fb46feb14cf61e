"""`budgetlm bench --runtime llama.cpp`: the same measurements as hardware/bench.py, with llama.cpp running the model.

budgetlm writes the model as a GGUF file with its own exporter (export/gguf.py) into a temporary folder (deleted
afterwards, also on an error or Ctrl-C) and runs it with llama.cpp's CPU kernels through llama-cpp-python
(imported only here, only when asked for).

GGUF type (`default_gguf_type`, unless the user names one):
- a model with quantised layers: the smallest ggml block type that holds every quantised layer's own integer
  codes exactly (export.gguf.exact_types; a 4-bit symmetric g32 grid -> Q4_0, a 4-bit asymmetric one -> Q4_1,
  8-bit symmetric -> Q8_0), so the file holds budgetlm's codes, not a second rounding. As llama-quantize does, the
  exporter writes the output matrix (the embedding, when tied) of such a file as Q8_0. A model no block type
  holds (NF4, groups of 16, act-order with groups, a low-rank correction, pruned layers beside quantised ones) is
  a one-line error that names the layer; `--gguf-type F32|F16` then measures it dequantised to floats.
- a float model: its own float type (fp32 -> F32, bf16 -> BF16, fp16 -> F16), the same numbers torch computes with.

Metrics, in the structure and with the names of hardware.bench.measure:
  size    stored_bytes, params, bpw, linear_bytes, linear_bpw, read_bytes_per_token, disk_bytes: from the GGUF
          file's tensor table (the Linear layers are the decoder's attn_q/k/v/output and ffn_gate/up/down weights
          and a separate output.weight; a tied output is the embedding, as in hardware/size.py); disk_bytes is the
          GGUF file's size; extra: the GGUF type and tensor types
  host    mem_bandwidth_gb_s
  speed   prefill_tok_s@N, decode_ms_per_token, decode_tok_s, decode_roofline_ms, decode_pct_roofline
  energy  as measure(), where RAPL is readable
Inputs match the torch runtime: the same seeded random token ids, prefill at the same lengths (one llama_decode of
N tokens into an empty KV cache, logits of the last position only), decode of the same number of new tokens after
the same prompt (greedy: the argmax of the last logits, batch 1), warm-up and repeats alike; n_threads (and
n_threads_batch) = torch's thread count, so the two runtimes compare. Every speed metric's extra says
runtime "llama.cpp", the GGUF type, the llama-cpp-python version and llama.cpp's system info.
"""

from __future__ import annotations

import gc
import importlib.util
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

from budgetlm.errors import ConfigError
from budgetlm.results import Metric

RUNTIMES = ("torch", "llama.cpp")
INSTALL = "pip install -e '.[llamacpp]'"
BUILD_NOTE = "it compiles llama.cpp, 10-40 min on 2 cores; build flags in README, `bench`"
# bits per weight of each block type: the order in which an exact type is preferred (smallest file first)
BLOCK_BPW = {"Q4_0": 4.5, "Q4_1": 5.0, "Q5_0": 5.5, "Q5_1": 6.0, "Q8_0": 8.5}
FLOAT_GGUF = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
LINEAR_ROLES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def check_runtime(name: str) -> str:
    """The runtime's canonical name, or a one-line ConfigError listing them."""
    key = str(name).strip().lower()
    if key in RUNTIMES:
        return key
    if key.replace("-", "").replace("_", "").replace(".", "") == "llamacpp":
        return "llama.cpp"
    raise ConfigError(f"unknown runtime '{name}'; --runtime is one of: {', '.join(RUNTIMES)}")


def require_llama_cpp() -> None:
    """A one-line ConfigError naming the install command when llama-cpp-python is not installed (checked with
    find_spec: nothing is imported)."""
    if importlib.util.find_spec("llama_cpp") is None:
        raise ConfigError(
            f"--runtime llama.cpp needs llama-cpp-python, which is not installed: {INSTALL} ({BUILD_NOTE})"
        )


def default_gguf_type(model) -> tuple[str, str]:
    """(GGUF type, why) that keeps the model's own numbers: see the module docstring."""
    from budgetlm.export.gguf import exact_types, grid_name
    from budgetlm.hardware.speed import compute_dtype

    replaced = {n: m for n, m in model.named_modules() if getattr(m, "layer_kind", None)}
    coded = {n: m for n, m in replaced.items() if m.layer_kind != "sparse_linear"}
    if not coded:
        dtype = compute_dtype(model)
        if dtype not in FLOAT_GGUF:
            raise ConfigError(f"no GGUF type for a {dtype} model; pass --gguf-type (F32, F16, BF16, Q8_0 ...)")
        pruned = " (pruned layers written dense)" if replaced else ""
        return FLOAT_GGUF[dtype], f"the model's own float type ({dtype}){pruned}"
    common = set(BLOCK_BPW)
    for name, mod in replaced.items():
        fits = exact_types(mod) & set(BLOCK_BPW)
        if not fits:
            what = grid_name(mod) if mod.layer_kind != "sparse_linear" else "pruned, beside quantised layers"
            raise ConfigError(
                f"no GGUF block type holds the codes of {name} ({what}); pass --gguf-type F32 or F16 to measure the "
                "model dequantised to floats, or a block type with --requantize to round its weights again"
            )
        common &= fits
    if not common:
        raise ConfigError(
            "no one GGUF block type holds the codes of every quantised layer (their grids differ); pass --gguf-type "
            "F32 or F16 to measure the model dequantised to floats, or a block type with --requantize"
        )
    best = min(common, key=BLOCK_BPW.__getitem__)
    others = sorted(common - {best}, key=BLOCK_BPW.__getitem__)
    also = f"; also exact: {', '.join(others)}" if others else ""
    return best, f"the smallest block type holding every quantised layer's codes exactly{also}"


# ---------------------------------------------------------------------------------------------------------------
# size from the GGUF's tensor table


def _is_linear(name: str) -> bool:
    parts = name.split(".")
    return name == "output.weight" or (
        len(parts) == 4 and parts[0] == "blk" and parts[2] in LINEAR_ROLES and parts[3] == "weight"
    )


def gguf_size(path: Path | str, gguf_type: str = "") -> dict[str, Metric]:
    """The size metrics of hardware/size.py, for a GGUF file (payload bytes of its tensors, header excluded)."""
    from budgetlm.export.gguf import read_layout

    path = Path(path)
    _, tensors = read_layout(path)
    total = sum(t.n_bytes for t in tensors)
    params = sum(t.n_elements for t in tensors)
    lin = [t for t in tensors if _is_linear(t.name)]
    lin_bytes, lin_weights = sum(t.n_bytes for t in lin), sum(t.n_elements for t in lin)
    types: dict[str, int] = {}
    lin_types: dict[str, int] = {}
    for t in tensors:
        types[t.ggml_type] = types.get(t.ggml_type, 0) + 1
    for t in lin:
        lin_types[t.ggml_type] = lin_types.get(t.ggml_type, 0) + 1
    by_name = {t.name: t for t in tensors}
    emb = by_name.get("token_embd.weight")
    tied = "output.weight" not in by_name
    read = total
    if emb is not None and not tied:  # one row of the embedding is read; a tied one is read whole as the output
        read -= emb.n_bytes - emb.n_bytes // emb.shape[-1]
    lm_head = (
        "tied to the input embedding (no output.weight): counted once, with the embedding, not in linear_*"
        if tied
        else "output.weight: counted in linear_*"
    )
    how = {"gguf_type": gguf_type, "tensor_types": types, "lm_head": lm_head}
    if emb is not None:
        how["token_embd"] = emb.ggml_type
        if not tied:
            how["output"] = by_name["output.weight"].ggml_type
    return {
        "stored_bytes": Metric(float(total), unit="B", extra={"from": "GGUF tensor table", **how}),
        "params": Metric(float(params), unit="count", extra=how),
        "bpw": Metric(total * 8 / params if params else float("nan"), unit="bits", extra=how),
        "linear_bytes": Metric(float(lin_bytes), unit="B", extra={"linear_types": lin_types, **how}),
        "linear_bpw": Metric(
            lin_bytes * 8 / lin_weights if lin_weights else float("nan"),
            n=lin_weights,
            unit="bits",
            extra={"linear_types": lin_types, "linear_weights": lin_weights, **how},
        ),
        "linear_memory_bpw": Metric(
            lin_bytes * 8 / lin_weights if lin_weights else float("nan"),
            n=lin_weights,
            unit="bits",
            extra={"note": "llama.cpp computes on the file's block types as they are (memory-mapped)", **how},
        ),
        "read_bytes_per_token": Metric(
            float(read), unit="B", extra={"note": "weights only; KV-cache reads excluded", **how}
        ),
        "disk_bytes": Metric(
            float(path.stat().st_size), unit="B", extra={"file": "the GGUF file budgetlm wrote (temporary)", **how}
        ),
    }


# ---------------------------------------------------------------------------------------------------------------
# speed


def _context_length(kv: dict) -> int | None:
    arch = kv.get("general.architecture", (b"",))[0]
    arch = arch.decode() if isinstance(arch, bytes) else str(arch)
    value = kv.get(f"{arch}.context_length")
    return int(value[0]) if value else None


def _vocab(kv: dict, tensors) -> int:
    emb = next((t for t in tensors if t.name == "token_embd.weight"), None)
    if emb is not None:
        return int(emb.shape[-1])
    return len(kv["tokenizer.ggml.tokens"][0])


def _tokens(vocab: int, n: int, seed: int) -> list[int]:
    """The torch runtime's inputs exactly (hardware/speed.py `_tokens`): seeded random ids of the vocabulary."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (1, n), generator=g)[0].tolist()


class _Runner:
    """One llama.cpp model and context; `prefill` and `decode` time what speed.py times for torch."""

    def __init__(self, path: Path, n_ctx: int, n_batch: int, threads: int):
        import llama_cpp
        from llama_cpp import Llama

        self.lib = llama_cpp
        self.llm = Llama(
            model_path=str(path),
            n_ctx=n_ctx,
            n_batch=n_batch,
            n_ubatch=n_batch,  # one llama_decode computes the whole prompt, as torch's one forward does
            n_threads=threads,
            n_threads_batch=threads,
            logits_all=False,
            verbose=False,
        )
        self.n_vocab = self.llm.n_vocab()

    def _last_argmax(self) -> int:
        import numpy as np

        logits = np.ctypeslib.as_array(self.lib.llama_get_logits_ith(self.llm.ctx, -1), shape=(self.n_vocab,))
        return int(logits.argmax())

    def _eval(self, ids: list[int]) -> None:
        self.llm.eval(ids)
        self.lib.llama_synchronize(self.llm.ctx)

    def prefill(self, ids: list[int]) -> float:
        """Seconds of one prefill of `ids` into an empty KV cache."""
        self.llm.reset()
        t0 = time.perf_counter()
        self._eval(ids)
        self._last_argmax()  # the logits of the last position, as torch's logits_to_keep=1 returns them
        return time.perf_counter() - t0

    def decode(self, prompt: list[int], n_new: int, meter=None) -> tuple[float, list[float]]:
        """(ms per token, each step's ms) of n_new greedy steps after `prompt` (its prefill not timed)."""
        self.llm.reset()
        self._eval(prompt)
        nxt = self._last_argmax()
        steps = []
        with meter or nullcontext():
            t0 = time.perf_counter()
            for _ in range(n_new):
                ts = time.perf_counter()
                self._eval([nxt])
                nxt = self._last_argmax()
                steps.append((time.perf_counter() - ts) * 1e3)
            total = time.perf_counter() - t0
        return total * 1e3 / n_new, steps

    def close(self) -> None:
        self.llm.close()


def _info(threads: int, gguf_type: str, n_ctx: int, n_batch: int) -> dict:
    import llama_cpp

    from budgetlm.hardware.contention import usable_cpus
    from budgetlm.hardware.host import cpu_model

    return {
        "runtime": "llama.cpp",
        "threads": threads,
        "dtype": gguf_type,
        "gguf_type": gguf_type,
        "cpu_model": cpu_model(),
        "batch_size": 1,
        "llama_cpp_python": llama_cpp.__version__,
        "llama_cpp_system": llama_cpp.llama_print_system_info().decode(errors="replace").strip(" |"),
        "n_ctx": n_ctx,
        "n_batch": n_batch,
        "flash_attn": False,
        "loadavg_before": list(os.getloadavg()),
        "cpus": usable_cpus(),
    }


def measure_gguf(
    path: Path | str,
    *,
    threads: int | None = None,
    gguf_type: str = "",
    prefill=(128, 512),
    decode_tokens: int = 64,
    repeats: int = 3,
    warmup: int = 1,
    decode_prompt: int = 32,
    seed: int = 0,
    energy: bool = True,
    progress: bool = False,
) -> dict[str, dict[str, Metric]]:
    """size, host, speed (and energy) of a GGUF file run by llama.cpp, as hardware.bench.measure gives them."""
    import torch

    from budgetlm.export.gguf import read_layout
    from budgetlm.hardware.bench import _energy_metric, add_decode_metrics, host_bandwidth, prefill_lengths
    from budgetlm.hardware.energy import EnergyMeter, energy_available
    from budgetlm.hardware.memory import PeakRSS
    from budgetlm.hardware.speed import _energy_extra, _gc_paused, _metric, summarize
    from budgetlm.progress import Progress

    path = Path(path)
    threads = threads or torch.get_num_threads()
    kv, tensors = read_layout(path)
    limit = _context_length(kv)
    lengths = prefill_lengths(prefill, limit)
    prompt_len = max(1, min(decode_prompt, limit - decode_tokens)) if limit else decode_prompt
    if limit is not None and prompt_len + decode_tokens > limit:
        raise ConfigError(
            f"prompt + decode tokens = {prompt_len + decode_tokens} exceed the model's context of {limit} positions"
        )
    vocab = _vocab(kv, tensors)
    n_batch = max([used for used, _ in lengths] + [prompt_len])  # every prompt in one llama_decode
    n_ctx = max(n_batch, prompt_len + decode_tokens)
    energy = energy and energy_available()[0]
    joule = " + RAPL energy" if energy else ""
    with Progress("bench", 4 + len(lengths), enabled=progress, throttled=True) as bar:
        bar.status("size of the GGUF file")
        size = gguf_size(path, gguf_type)
        bar.advance("size done")
        host = host_bandwidth(bar)
        bw = host["mem_bandwidth_gb_s"]
        bar.status(f"llama.cpp loads {path.name}")
        with PeakRSS("benchmark") as rss:  # llama.cpp's own phase: its model, context and runs
            t0 = time.perf_counter()
            runner = _Runner(path, n_ctx, n_batch, threads)
            load_s = time.perf_counter() - t0
            bar.advance("llama.cpp model loaded")
            try:
                speed: dict[str, Metric] = {}
                joules: dict[str, Metric] = {}
                for used, asked in lengths:
                    what = f"llama.cpp prefill {used} tokens{joule}"
                    ids = _tokens(vocab, used, seed)
                    info = _info(threads, gguf_type, n_ctx, n_batch)
                    rates, meters = [], []
                    with _gc_paused():
                        for w in range(warmup):
                            bar.status(f"{what}, warm-up {w + 1}/{warmup}")
                            runner.prefill(ids)
                        for r in range(repeats):
                            bar.status(f"{what}, repeat {r + 1}/{repeats}")
                            meter = EnergyMeter() if energy else None
                            with meter or nullcontext():
                                dt = runner.prefill(ids)
                            if meter is not None:
                                meters.append(meter)
                            rates.append(used / dt)
                    ex = _energy_extra(meters, used * repeats) if energy else {}
                    m = _metric(rates, "tok/s", info, ex, n_tokens=used, warmup=warmup, seed=seed, load_seconds=load_s)
                    if used != asked:
                        m.extra["requested"] = asked
                    speed[f"prefill_tok_s@{used}"] = m
                    if "joules_per_token" in m.extra:
                        joules[f"prefill_j_per_token@{used}"] = _energy_metric(m)
                    bar.advance(f"{what} done")

                what = f"llama.cpp decode {decode_tokens} tokens after a {prompt_len}-token prompt{joule}"
                prompt = _tokens(vocab, prompt_len, seed)
                info = _info(threads, gguf_type, n_ctx, n_batch)
                per_token, all_steps, meters = [], [], []
                with _gc_paused():
                    for w in range(warmup):
                        bar.status(f"{what}, warm-up {w + 1}/{warmup}")
                        runner.decode(prompt, decode_tokens)
                    for r in range(repeats):
                        bar.status(f"{what}, repeat {r + 1}/{repeats}")
                        meter = EnergyMeter() if energy else None
                        ms, steps = runner.decode(prompt, decode_tokens, meter)
                        if meter is not None:
                            meters.append(meter)
                        per_token.append(ms)
                        all_steps.extend(steps)
                bar.advance(f"{what} done")
            finally:
                runner.close()
        ex = _energy_extra(meters, decode_tokens * repeats) if energy else {}
        s = summarize(per_token)
        dec = _metric(
            per_token,
            "ms/token",
            info,
            ex,
            tok_s=1e3 / s["mean"],
            tok_s_median=1e3 / s["median"],
            step_median_ms=statistics.median(all_steps),
            n_new=decode_tokens,
            prompt_len=prompt_len,
            warmup=warmup,
            seed=seed,
            kv_cache="llama.cpp KV cache",
            decoding="greedy",
        )
        add_decode_metrics(speed, joules, dec, size["read_bytes_per_token"].value, bw.value)
    mem = rss.metric()
    mem.extra["note"] = (
        "llama.cpp's phase: loading the GGUF (memory-mapped), prefill and decode runs; start_bytes is the process "
        "before it, delta_bytes what llama.cpp added"
    )
    out = {"size": size, "host": host, "speed": speed}
    if joules:
        out["energy"] = joules
    out["memory"] = {"peak_rss_benchmark": mem}
    return out


# ---------------------------------------------------------------------------------------------------------------
# the whole run: export to a temporary folder, measure, clean up


def temp_folder() -> Path:
    """A new folder for the temporary GGUF (under $TMPDIR); the caller deletes it."""
    return Path(tempfile.mkdtemp(prefix="budgetlm-bench-gguf-"))


def export_for_bench(handle, folder: Path, gguf_type: str | None = None, requantize: bool = False):
    """Write `handle` as folder/model.<TYPE>.gguf; returns (ExportReport, why this type)."""
    from budgetlm.export.gguf import export_gguf, parse_type

    if gguf_type is None:
        gguf_type, why = default_gguf_type(handle.model)
    else:
        gguf_type, why = parse_type(gguf_type), "--gguf-type"
    report = export_gguf(handle, folder / f"model.{gguf_type}.gguf", gguf_type, requantize=requantize)
    return report, why


def describe(report, why: str, threads: int) -> dict:
    """The `runtime` record of a llama.cpp benchmark (bench.json, --json, the line under the table)."""
    import llama_cpp

    return {
        "name": "llama.cpp",
        "llama_cpp_python": llama_cpp.__version__,
        "threads": threads,
        "gguf_type": report.gguf_type,
        "gguf_type_why": why,
        "tensor_types": dict(report.tensor_types),
        "tensors_from_codes": len(report.from_codes),
        "requantized": len(report.requantized),
        "notes": list(report.notes),
    }


def bench_model(
    load: Callable[[], object],
    *,
    gguf_type: str | None = None,
    requantize: bool = False,
    threads: int | None = None,
    progress: bool = False,
    **measure_kwargs,
) -> tuple[dict[str, dict[str, Metric]], dict]:
    """`budgetlm bench --runtime llama.cpp`: load (peak RSS "load"), export the GGUF into a temporary folder (peak
    RSS "export"), drop the torch model, then measure with llama.cpp (peak RSS "benchmark": llama.cpp's model,
    context and runs, in a process that still holds Python and torch; the host bandwidth buffers are outside it).
    Returns (results with a "memory" phase, the runtime record). The temporary folder is deleted whatever
    happens."""
    import torch

    from budgetlm.hardware.memory import PeakRSS, release_freed_heap

    require_llama_cpp()
    threads = threads or torch.get_num_threads()
    with PeakRSS("load") as rss_load:
        handle = load()
    folder = temp_folder()
    try:
        with PeakRSS("export") as rss_export:
            report, why = export_for_bench(handle, folder, gguf_type, requantize)
        del handle  # the torch model: llama.cpp's phase is measured without it
        gc.collect()
        release_freed_heap()
        results = measure_gguf(
            report.path, threads=threads, gguf_type=report.gguf_type, progress=progress, **measure_kwargs
        )
        results["memory"] = {
            "peak_rss_load": Metric(float(rss_load.peak_bytes), unit="B", extra={"phase": "loading the torch model"}),
            "peak_rss_export": rss_export.metric(),
            **results["memory"],  # peak_rss_benchmark: llama.cpp's phase, the torch model freed
        }
        return results, describe(report, why, threads)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def measure_llamacpp(
    handle,
    *,
    gguf_type: str | None = None,
    requantize: bool = False,
    folder: Path | str | None = None,
    **measure_kwargs,
) -> dict[str, dict[str, Metric]]:
    """hardware.bench.measure's phases for `handle` run by llama.cpp (the API's `measure(handle,
    runtime="llama.cpp")`): exported to a temporary GGUF, measured, the file deleted. `folder` (measure()'s saved
    model folder) is not used: disk_bytes is the GGUF file's size."""
    del folder
    require_llama_cpp()
    folder = temp_folder()
    try:
        report, why = export_for_bench(handle, folder, gguf_type, requantize)
        results = measure_gguf(report.path, gguf_type=report.gguf_type, **measure_kwargs)
        for metric in results["size"].values():
            metric.extra["gguf_type_why"] = why
        return results
    finally:
        shutil.rmtree(folder, ignore_errors=True)
