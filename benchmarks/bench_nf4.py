"""NF4 on CPU: budgetlm's dequantise + fp32 GEMM against bitsandbytes' 4-bit kernel, on SmolLM2-135M's Linear shapes.

    /work/venv-bnb/bin/python benchmarks/bench_nf4.py [--repeats 15 --threads 1 2 --tokens 1 4 16 64 512
        --decode --json out.json]

Needs bitsandbytes (the `bnb` extra of pyproject.toml; pinned). Runs offline: budgetlm imports bitsandbytes with its
hub kernel path closed (methods/quant/nf4.py `_bnb_module`), so bitsandbytes uses the kernel bundled in its wheel.

One NF4 weight per shape (budgetlm's `nf4` method: block 64, double-quantised absmax), random N(0, 0.02^2) values.
Every bitsandbytes variant holds *the same* NF4 codes and the same decoded block absmax (budgetlm's codes handed to a
bnb.nn.Linear4bit; bitsandbytes' codebook, block order and absmax rule are budgetlm's, checked per shape on the
non-double-quantised weight: `codes equal`). Variants, all timed with fp32 input and output:
- `nf4_dequant`: NF4Linear.forward_exact, budgetlm's forward before the fast path: byte-LUT dequantise of the whole
  weight to fp32, then F.linear (exact);
- `nf4_auto`: NF4Linear.forward_bnb, the fast path that NF4Linear.forward now takes under no_grad / inference_mode
  when bitsandbytes is importable and measured faster (bnb's kernel + budgetlm's call overhead);
- `bnb_bf16`: bnb.nn.Linear4bit(compute_dtype=bf16), in eval mode without autograd: on an AVX512-BF16 CPU its fused
  kernel (weights repacked once, absmax and activations rounded to bf16, fp32 accumulation, bf16 output);
- `bnb_fp32`: bnb.nn.Linear4bit(compute_dtype=fp32): the same fused kernel on this CPU (it only computes in bf16);
- `bnb_dq_fp32`: the fused path turned off: bitsandbytes' C++ dequantise to fp32 + F.linear (what it does in
  training or on a CPU without AVX512-BF16; exact);
- `fp32`: nn.Linear with the dequantised weight in fp32 (the reference; no 4-bit storage).
Times are medians of `--repeats` rounds; each round times every variant once in turn (the machine is shared and
noisy: interleaving spreads the noise over all variants alike; the load average is printed). Error columns: max abs
difference against the exact product of the dequantised weight (float64), and `bf16 ref`, the same for
F.linear(x.bf16(), W.bf16()) (the yardstick for "bf16 precision"); `ok` says whether every bnb output is within
nf4.bf16_tolerance (2^-7 * sum_j |x_j w_j|) of the exact product.

--decode also times whole-model greedy decode (ms/token, hardware/speed.py decode_speed) of SmolLM2-135M after
budgetlm's `nf4` method with NF4Linear forced exact, with its bnb fast path, with every NF4Linear swapped for a
bnb.nn.Linear4bit over the same codes, and the fp32 model.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F

from budgetlm.methods.quant import nf4

SHAPES = {  # name -> (out_features, in_features)
    "q/o 576x576": (576, 576),
    "k/v 192x576": (192, 576),
    "gate/up 1536x576": (1536, 576),
    "down 576x1536": (576, 1536),
    "lm_head 49152x576": (49152, 576),
}
VARIANTS = ["nf4_dequant", "nf4_auto", "bnb_bf16", "bnb_fp32", "bnb_dq_fp32", "fp32"]


def build(out_f: int, in_f: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) * 0.02
    layer = nf4.NF4Linear.from_weight(w, None, 64, True)
    codes, absmax = layer.codes(), layer.block_absmax()
    wd = layer.dequantized_weight()
    fp32 = torch.nn.Linear(in_f, out_f, bias=False)
    fp32.weight.data.copy_(wd)
    fns = {
        "nf4_dequant": layer.forward_exact,
        "nf4_auto": layer.forward_bnb,
        "bnb_bf16": nf4._to_bnb_linear(codes, absmax, 64, torch.bfloat16),
        "bnb_fp32": nf4._to_bnb_linear(codes, absmax, 64, torch.float32),
        "bnb_dq_fp32": nf4._to_bnb_linear(codes, absmax, 64, torch.float32, fused=False),
        "fp32": fp32,
    }
    return w, layer, wd, fns


def same_codes(w: torch.Tensor) -> bool:
    """bitsandbytes' own NF4 quantisation (block 64, no double quantisation) gives budgetlm's codes and absmax."""
    bnb = nf4._bnb_module()
    q, state = bnb.functional.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
    q = q.reshape(-1)
    bnb_codes = torch.stack([q >> 4, q & 15], 1).reshape(-1)
    ours = nf4.NF4Linear.from_weight(w, None, 64, False)
    return torch.equal(bnb_codes, ours.codes().reshape(-1)) and torch.equal(state.absmax, ours.absmax)


def time_cell(fns: dict, x: torch.Tensor, repeats: int, budget_s: float) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn(x)  # warm-up
    start = time.perf_counter()
    for r in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn(x)
            times[name].append(time.perf_counter() - t0)
        if r >= 4 and time.perf_counter() - start > budget_s:
            break
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def layer_rows(args) -> list[dict]:
    rows = []
    for i, (shape_name, (out_f, in_f)) in enumerate(SHAPES.items()):
        w, layer, wd, fns = build(out_f, in_f, args.seed + i)
        codes_ok = same_codes(w)
        g = torch.Generator().manual_seed(args.seed + 100 + i)
        for m in args.tokens:
            x = torch.randn(m, in_f, generator=g)
            with torch.inference_mode():
                ref = x.double() @ wd.double().t()
                bf16_ref = F.linear(x.bfloat16(), wd.bfloat16()).double()
                tol = nf4.bf16_tolerance(x, wd).double()
                err, ok = {}, True
                for name, fn in fns.items():
                    d = (fn(x).double() - ref).abs()
                    err[name] = float(d.max())
                    if name.startswith("bnb") or name == "nf4_auto":
                        ok = ok and bool((d <= tol).all())
                for th in args.threads:
                    torch.set_num_threads(th)
                    ms = time_cell(fns, x, args.repeats, args.budget)
                    rows.append(
                        {
                            "shape": shape_name,
                            "tokens": m,
                            "threads": th,
                            "ms": ms,
                            "max_abs_err": err,
                            "bf16_ref_err": float((bf16_ref - ref).abs().max()),
                            "ref_max": float(ref.abs().max()),
                            "bnb_within_bf16_tol": ok,
                            "codes_equal": codes_ok,
                            "loadavg": os.getloadavg()[0],
                        }
                    )
                    print(row_line(rows[-1]), flush=True)
    return rows


def header() -> str:
    cols = " ".join(f"{v:>11}" for v in VARIANTS)
    return (
        f"{'shape':<18} {'M':>4} {'thr':>3} {cols} {'x dequant':>9} "
        f"{'err dequant':>11} {'err bnb':>8} {'bf16 ref':>8} {'ok':>3} {'codes':>5} {'load':>4}"
    )


def row_line(r: dict) -> str:
    ms = r["ms"]
    cols = " ".join(f"{ms[v]:>11.3f}" for v in VARIANTS)
    speedup = ms["nf4_dequant"] / ms["nf4_auto"]
    return (
        f"{r['shape']:<18} {r['tokens']:>4} {r['threads']:>3} {cols} {speedup:>9.1f} "
        f"{r['max_abs_err']['nf4_dequant']:>11.1e} {r['max_abs_err']['bnb_bf16']:>8.1e} {r['bf16_ref_err']:>8.1e} "
        f"{'yes' if r['bnb_within_bf16_tol'] else 'NO':>3} {'yes' if r['codes_equal'] else 'NO':>5} "
        f"{r['loadavg']:>4.1f}"
    )


def swap_for_bnb(model: torch.nn.Module) -> int:
    """Replace every NF4Linear by a bnb.nn.Linear4bit over the same codes (bias kept in a wrapper)."""

    class WithBias(torch.nn.Module):
        def __init__(self, lin, bias):
            super().__init__()
            self.lin, self.bias = lin, bias

        def forward(self, x):
            y = self.lin(x)
            return y if self.bias is None else y + self.bias

    names = [n for n, m in model.named_modules() if isinstance(m, nf4.NF4Linear)]
    for name in names:
        old = model.get_submodule(name)
        lin = nf4._to_bnb_linear(old.codes(), old.block_absmax(), old.block_size, torch.bfloat16)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, WithBias(lin, old.bias))
    return len(names)


def decode_rows(args) -> list[dict]:
    from budgetlm.api import apply, load
    from budgetlm.hardware.speed import decode_speed

    rows = []
    fp32 = load("smollm2-135m")
    quant = load("smollm2-135m")
    apply(quant, [{"method": "nf4"}])
    swapped = load("smollm2-135m")
    apply(swapped, [{"method": "nf4"}])
    n = swap_for_bnb(swapped.model)
    runs = [("nf4 exact", quant, "exact"), ("nf4 auto (bnb)", quant, "auto"), (f"bnb Linear4bit x{n}", swapped, "")]
    runs.append(("fp32", fp32, ""))
    for th in args.threads:
        torch.set_num_threads(th)
        for name, handle, mode in runs:
            if mode:
                os.environ[nf4.KERNEL_ENV] = mode
            dec = decode_speed(handle, args.decode_tokens, 32, args.decode_repeats, 1, seed=args.seed)
            os.environ.pop(nf4.KERNEL_ENV, None)
            rows.append(
                {
                    "model": name,
                    "threads": th,
                    "ms_median": dec.extra["median"],
                    "ms_mean": dec.value,
                    "ms_sd": dec.extra["sd"],
                    "loadavg": dec.extra["loadavg_before"][0],
                }
            )
            r = rows[-1]
            figures = f"{r['ms_median']:>9.2f} {r['ms_mean']:>9.2f} {r['ms_sd']:>7.2f} {r['loadavg']:>5.1f}"
            print(f"{name:<22} {th:>3} {figures}")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=15, help="rounds per cell (fewer when --budget runs out)")
    ap.add_argument("--budget", type=float, default=4.0, help="seconds per cell after the 5th round")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 4, 16, 64, 512])
    ap.add_argument("--decode", action="store_true", help="also whole-model decode of SmolLM2-135M")
    ap.add_argument("--decode-only", action="store_true", help="only the whole-model decode")
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--decode-repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write every figure to this file")
    args = ap.parse_args()
    bnb = nf4._bnb_module()
    if bnb is None:
        raise SystemExit("bitsandbytes is not importable: install budgetlm's `bnb` extra")
    fused = bnb.functional.has_avx512bf16()
    print(
        f"torch {torch.__version__}, bitsandbytes {bnb.__version__}, fused AVX512-BF16 kernel: {bool(fused)}, "
        f"load average {os.getloadavg()[0]:.2f}; ms per call (median), errors are max abs vs the exact product"
    )
    result = {"torch": torch.__version__, "bitsandbytes": bnb.__version__, "fused": bool(fused)}
    if not args.decode_only:
        print(header())
        result["layers"] = layer_rows(args)
    if args.decode or args.decode_only:
        print(f"\n{'decode SmolLM2-135M':<22} {'thr':>3} {'ms/tok med':>9} {'mean':>9} {'sd':>7} {'load':>5}")
        result["decode"] = decode_rows(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
