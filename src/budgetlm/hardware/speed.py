"""Prefill and decode speed, llama-bench style: warm-up, then repeats, mean and spread of the repeats.

Inputs are random token ids drawn with a seed from the model's vocabulary (the content does not change the
work of a dense model), batch 1 unless asked, everything under torch.inference_mode().
- prefill: one forward pass over n tokens that fills a KV cache and computes the last position's logits only
  (as generation does); value = tokens/s.
- decode: a prompt is prefilled into a KV cache (not timed), then n_new greedy steps of one token each are
  timed; value = ms per token.
Both run through budgetlm's decode runtime (decode/lean.py: the lean forward for Llama-architecture models at
batch 1, transformers' forward otherwise), the one `budgetlm generate` and speculative decoding use; the runtime is
named in every figure's extra.
Each Metric carries the mean over repeats as value, the standard error of that mean as stderr (schema
convention), and in extra: sd, median, every repeat, threads, dtype, CPU model, batch size, load average before
and after and the CPUs usable (a busy machine slows 2-thread torch 10x: hardware/contention.py flags a figure
measured with a load average above the CPU count).
"""

from __future__ import annotations

import gc
import inspect
import math
import os
import statistics
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext

import torch

from budgetlm.decode.lean import HFRuntime, runtime_for
from budgetlm.hardware.contention import usable_cpus
from budgetlm.hardware.energy import EnergyMeter
from budgetlm.hardware.host import cpu_model
from budgetlm.results import Metric


def _quiet(_text: str) -> None:
    pass


def _module(model) -> torch.nn.Module:
    """Accept a ModelHandle or a bare module."""
    return model if isinstance(model, torch.nn.Module) else model.model


def compute_dtype(model: torch.nn.Module) -> str:
    for p in model.parameters():
        if p.is_floating_point():
            return str(p.dtype).removeprefix("torch.")
    return "unknown"


def context_limit(model: torch.nn.Module) -> int | None:
    cfg = getattr(model, "config", None)
    return getattr(cfg, "max_position_embeddings", None)


def _kinds(model: torch.nn.Module) -> dict[str, int]:
    """Counts of method-replaced layer kinds (a quantised Linear computes in its own format, not in `dtype`)."""
    out: dict[str, int] = {}
    for mod in model.modules():
        kind = getattr(mod, "layer_kind", None)
        if kind:
            out[kind] = out.get(kind, 0) + 1
    return out


def run_info(model: torch.nn.Module, batch_size: int = 1) -> dict:
    """What a speed figure was measured with."""
    return {
        "runtime": "torch",  # hardware/llamacpp.py records "llama.cpp"
        "threads": torch.get_num_threads(),
        "dtype": compute_dtype(model),
        "cpu_model": cpu_model(),
        "batch_size": batch_size,
        "replaced_layers": _kinds(model),
        "torch": torch.__version__,
        "loadavg_before": list(os.getloadavg()),
        "cpus": usable_cpus(),
    }


def summarize(values: list[float]) -> dict:
    """mean, sd (sample), stderr of the mean, median."""
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else float("nan")
    return {"mean": mean, "sd": sd, "stderr": sd / math.sqrt(len(values)), "median": statistics.median(values)}


def _tokens(model: torch.nn.Module, batch: int, n: int, seed: int) -> torch.Tensor:
    vocab = int(getattr(model.config, "vocab_size", 0) or model.get_input_embeddings().num_embeddings)
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, n), generator=g)


def _last_logits_kwargs(model: torch.nn.Module) -> dict:
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


def _check(n: int, what: str, limit: int | None) -> None:
    if n < 1:
        raise ValueError(f"{what} must be >= 1, got {n}")
    if limit is not None and n > limit:
        raise ValueError(f"{what} = {n} exceeds the model's context of {limit} positions")


def _metric(values: list[float], unit: str, info: dict, energy: dict, **extra) -> Metric:
    s = summarize(values)
    info = {**info, "loadavg_after": list(os.getloadavg())}
    return Metric(
        s["mean"],
        stderr=s["stderr"],
        n=len(values),
        unit=unit,
        extra={
            "sd": s["sd"],
            "median": s["median"],
            "repeats": [round(v, 4) for v in values],
            **info,
            **extra,
            **energy,
        },
    )


@contextmanager
def _gc_paused():
    """Collect once, then keep Python's cycle collector out of the timed loops (as timeit does)."""
    was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _energy_extra(meters: list[EnergyMeter], tokens: int) -> dict:
    """joules and J/token of the timed regions, or the 'unavailable' note."""
    if not meters or any(m.joules is None for m in meters):
        note = meters[0].note if meters else "unavailable: not requested"
        return {"energy": note}
    joules = sum(m.joules for m in meters)
    return {"energy": meters[0].note, "joules": joules, "joules_per_token": joules / tokens}


@torch.inference_mode()
def prefill_speed(
    model,
    n_tokens: int = 128,
    repeats: int = 3,
    warmup: int = 1,
    *,
    batch_size: int = 1,
    seed: int = 0,
    energy: bool = False,
    status: Callable[[str], None] | None = None,
) -> Metric:
    """Prefill throughput in tokens/s (batch_size x n_tokens per pass). `status` hears "warm-up 1/1",
    "repeat 2/3" before each run (outside the timed region)."""
    status = status or _quiet
    model = _module(model)
    _check(n_tokens, "prefill length", context_limit(model))
    ids = _tokens(model, batch_size, n_tokens, seed)
    kw = _last_logits_kwargs(model)
    info = run_info(model, batch_size)
    rt = runtime_for(model) if batch_size == 1 else HFRuntime(model)

    def one_pass():
        if batch_size == 1:
            return rt(ids, 0, rt.new_cache(), 1)
        return model(input_ids=ids, use_cache=True, **kw)

    rates, meters = [], []
    with _gc_paused():
        for w in range(warmup):
            status(f"warm-up {w + 1}/{warmup}")
            one_pass()
        for r in range(repeats):
            status(f"repeat {r + 1}/{repeats}")
            meter = EnergyMeter() if energy else None
            with meter or nullcontext():
                t0 = time.perf_counter()
                one_pass()
                dt = time.perf_counter() - t0
            if meter is not None:
                meters.append(meter)
            rates.append(batch_size * n_tokens / dt)
    energy_x = _energy_extra(meters, batch_size * n_tokens * repeats) if energy else {}
    return _metric(rates, "tok/s", info, energy_x, n_tokens=n_tokens, warmup=warmup, seed=seed, decoder=rt.label)


@torch.inference_mode()
def decode_speed(
    model,
    n_new: int = 64,
    prompt_len: int = 32,
    repeats: int = 3,
    warmup: int = 1,
    *,
    seed: int = 0,
    energy: bool = False,
    status: Callable[[str], None] | None = None,
) -> Metric:
    """Greedy decode latency in ms per token at batch 1 with a KV cache; only the decode steps are timed.
    `status` hears "warm-up 1/1", "repeat 2/3" before each run (outside the timed region)."""
    status = status or _quiet
    model = _module(model)
    _check(n_new, "decode tokens", None)
    _check(prompt_len + n_new, "prompt + decode tokens", context_limit(model))
    prompt = _tokens(model, 1, prompt_len, seed)
    info = run_info(model, 1)
    rt = runtime_for(model)

    def one_run(meter: EnergyMeter | None) -> tuple[float, list[float]]:
        cache = rt.new_cache()
        nxt = rt(prompt, 0, cache, 1)[:, -1:].argmax(-1)
        pos = prompt_len
        steps = []
        with meter or nullcontext():
            t0 = time.perf_counter()
            for _ in range(n_new):
                ts = time.perf_counter()
                nxt = rt(nxt, pos, cache, 1)[:, -1:].argmax(-1)
                pos += 1
                steps.append((time.perf_counter() - ts) * 1e3)
            total = time.perf_counter() - t0
        return total * 1e3 / n_new, steps

    per_token, all_steps, meters = [], [], []
    with _gc_paused():
        for w in range(warmup):
            status(f"warm-up {w + 1}/{warmup}")
            one_run(None)
        for r in range(repeats):
            status(f"repeat {r + 1}/{repeats}")
            meter = EnergyMeter() if energy else None
            ms, steps = one_run(meter)
            if meter is not None:
                meters.append(meter)
            per_token.append(ms)
            all_steps.extend(steps)
    energy_x = _energy_extra(meters, n_new * repeats) if energy else {}
    s = summarize(per_token)
    return _metric(
        per_token,
        "ms/token",
        info,
        energy_x,
        tok_s=1e3 / s["mean"],
        tok_s_median=1e3 / s["median"],
        step_median_ms=statistics.median(all_steps),
        n_new=n_new,
        prompt_len=prompt_len,
        warmup=warmup,
        seed=seed,
        kv_cache=type(rt.new_cache()).__name__,
        decoder=rt.label,
        decoding="greedy",
    )
