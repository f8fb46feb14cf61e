"""`measure`: the hardware cost of one model on this host, as {phase: {metric: Metric}}.

Phases and metric names (stable; the results store and reports key on them):
  size    stored_bytes, params, bpw, linear_bytes, linear_bpw, read_bytes_per_token [, disk_bytes]
          (see hardware/size.py)
  host    mem_bandwidth_gb_s           memory copy bandwidth, best of repeats (GB/s)
  speed   prefill_tok_s@N              prefill throughput at N tokens, batch 1 (tok/s), one per prefill length
          decode_ms_per_token          greedy decode latency with a KV cache, batch 1 (ms/token)
          decode_tok_s                 the same as tokens/s (tok/s)
          decode_roofline_ms           read_bytes_per_token / mem_bandwidth_gb_s: the memory-bound floor of
                                       a decode step (ms/token, source "projected")
          decode_pct_roofline          decode_roofline_ms / decode_ms_per_token x 100 (%, 100 = at the floor)
  energy  prefill_j_per_token@N, decode_j_per_token   RAPL package joules per token of the timed regions (J)
          The phase is ABSENT when RAPL cannot be read; every speed metric then says
          extra["energy"] = "unavailable: <reason>" (and "measured: RAPL ..." when it could be read).
Prefill lengths longer than the model's context are clamped to it (extra "requested" says so), and the decode
prompt is shortened so that prompt + decode tokens fit.
"""

from __future__ import annotations

import os
from pathlib import Path

from budgetlm.hardware.energy import energy_available
from budgetlm.hardware.host import cpu_profile, decode_roofline_ms, memory_bandwidth
from budgetlm.hardware.size import model_size
from budgetlm.hardware.speed import context_limit, decode_speed, prefill_speed, summarize
from budgetlm.progress import Progress
from budgetlm.results import Metric


def _module(handle):
    return getattr(handle, "model", handle)


def prefill_lengths(requested, limit: int | None) -> list[tuple[int, int]]:
    """(length used, length requested) per prefill setting, clamped to the context, duplicates dropped."""
    out, seen = [], set()
    for n in requested:
        used = min(int(n), limit) if limit else int(n)
        if used not in seen:
            seen.add(used)
            out.append((used, int(n)))
    return out


def host_bandwidth(bar) -> dict[str, Metric]:
    """The "host" phase of a benchmark (either runtime): the copy bandwidth, with the CPU profile, as a bar step."""
    bar.status("host memory bandwidth")
    bw = memory_bandwidth()
    bw.extra["cpu"] = cpu_profile()
    bar.advance("host memory bandwidth done")
    return {"mem_bandwidth_gb_s": bw}


def add_decode_metrics(speed: dict, joules: dict, dec: Metric, read_bytes: float, bandwidth_gb_s: float) -> None:
    """The decode figures of a run (torch or llama.cpp): ms/token `dec`, tok/s from its repeats, the roofline of
    `read_bytes` per token at the host's bandwidth and the % of it reached, energy per token where measured."""
    speed["decode_ms_per_token"] = dec
    tok_s = summarize([1e3 / ms for ms in dec.extra["repeats"]])
    speed["decode_tok_s"] = Metric(
        tok_s["mean"],
        stderr=tok_s["stderr"],
        n=dec.n,
        unit="tok/s",
        extra={"sd": tok_s["sd"], "median": tok_s["median"], "from": "decode_ms_per_token repeats", **_load(dec)},
    )
    roof = decode_roofline_ms(read_bytes, bandwidth_gb_s)
    speed["decode_roofline_ms"] = Metric(
        roof,
        unit="ms/token",
        source="projected",
        extra={
            "bytes_per_token": read_bytes,
            "bandwidth_gb_s": bandwidth_gb_s,
            "formula": "read_bytes_per_token / bandwidth",
        },
    )
    speed["decode_pct_roofline"] = Metric(
        roof / dec.value * 100,
        n=dec.n,
        unit="%",
        extra={
            "median": roof / dec.extra["median"] * 100,
            "roofline_ms": roof,
            "decode_ms_per_token": dec.value,
            "loadavg": list(os.getloadavg()),
        },
    )
    if "joules_per_token" in dec.extra:
        joules["decode_j_per_token"] = _energy_metric(dec)


def measure(
    handle,
    *,
    prefill=(128, 512),
    decode_tokens: int = 64,
    repeats: int = 3,
    warmup: int = 1,
    folder: Path | str | None = None,
    decode_prompt: int = 32,
    seed: int = 0,
    energy: bool = True,
    progress: bool = False,
) -> dict[str, dict[str, Metric]]:
    """Size, host bandwidth, prefill/decode speed (with % of roofline) and, where RAPL is readable, energy.
    `progress`: a bar, e.g. "bench: prefill 512 tokens, repeat 2/3" (off a terminal a line per phase and run, at
    most one a second)."""
    model = _module(handle)
    limit = context_limit(model)
    lengths = prefill_lengths(prefill, limit)
    joule = " + RAPL energy" if energy and energy_available()[0] else ""
    with Progress("bench", 3 + len(lengths), enabled=progress, throttled=True) as bar:
        bar.status("size of the weights")
        size = model_size(handle, folder)
        bar.advance("size done")
        host = host_bandwidth(bar)
        bw = host["mem_bandwidth_gb_s"]

        speed: dict[str, Metric] = {}
        joules: dict[str, Metric] = {}
        for used, asked in lengths:
            what = f"prefill {used} tokens{joule}"
            m = prefill_speed(model, used, repeats, warmup, seed=seed, energy=energy, status=_say(bar, what))
            bar.advance(f"{what} done")
            if used != asked:
                m.extra["requested"] = asked
            speed[f"prefill_tok_s@{used}"] = m
            if "joules_per_token" in m.extra:
                joules[f"prefill_j_per_token@{used}"] = _energy_metric(m)

        prompt = max(1, min(decode_prompt, limit - decode_tokens)) if limit else decode_prompt
        what = f"decode {decode_tokens} tokens after a {prompt}-token prompt{joule}"
        dec = decode_speed(
            model, decode_tokens, prompt, repeats, warmup, seed=seed, energy=energy, status=_say(bar, what)
        )
        bar.advance(f"{what} done")
        add_decode_metrics(speed, joules, dec, size["read_bytes_per_token"].value, bw.value)

        out = {"size": size, "host": host, "speed": speed}
        if joules:
            out["energy"] = joules
        return out


def _say(bar: Progress, what: str):
    return lambda text: bar.status(f"{what}, {text}")


def _energy_metric(m: Metric) -> Metric:
    return Metric(
        m.extra["joules_per_token"],
        n=m.n,
        unit="J/token",
        extra={
            "joules": m.extra["joules"],
            "source_note": m.extra["energy"],
            "scope": "whole CPU package during the timed regions (other processes included)",
            "threads": m.extra["threads"],
            "dtype": m.extra["dtype"],
            **_load(m),
        },
    )


def _load(m: Metric) -> dict:
    """The load average and CPU count a figure was measured with, for one derived from it (contention.py)."""
    return {k: m.extra[k] for k in ("loadavg_before", "loadavg_after", "cpus") if k in m.extra}
