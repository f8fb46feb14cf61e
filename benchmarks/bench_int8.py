"""Which int8 weight path is faster on this CPU: the int8 matrix-product kernels torch has, or dequantise-then-
matmul in fp32? Measured on SmolLM2-135M's Linear shapes, for decode (1 token) and prefill (512 tokens), all
variants interleaved in one run (the machine is noisy: medians of `--repeats` rounds, each round timing every
variant once in turn).

    .venv/bin/python benchmarks/bench_int8.py [--repeats 30 --threads 2 --json out.json]

Variants (one weight: int8 codes per output channel with an fp16 scale, budgetlm's rtn-int8 storage):
- `int8pack_mm`: torch._weight_int8pack_mm — int8 weights, bf16 activations and output (weight-only int8 kernel;
  reads 1 byte per weight, never materialises the fp32 weight);
- `dequant_fp32`: codes → fp32 weight (codes · scale) then F.linear in fp32: what QuantLinear does for every other
  grid;
- `int_mm_w8a8`: torch._int_mm — a real int8 × int8 → int32 product after quantising the activations per token
  to int8 (W8A8: also rounds the activations, so it is a different, lossier method; shown for speed only);
- `fp32`: the fp32 weight as it is (the reference, no dequantisation cost).
The relative output error of each variant against the fp32 product of the dequantised weight is printed too.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

SHAPES = {"q/o (576→576)": (576, 576), "gate/up (576→1536)": (576, 1536), "down (1536→576)": (1536, 576)}
TOKENS = {"decode": 1, "prefill": 512}


def variants(w_codes: torch.Tensor, scale: torch.Tensor):
    w_deq = w_codes.float() * scale.float()[:, None]
    scale_bf16 = scale.to(torch.bfloat16)
    w_t = w_codes.t().contiguous()  # [in, out] for _int_mm

    def int8pack(x):
        return torch._weight_int8pack_mm(x.to(torch.bfloat16), w_codes, scale_bf16).float()

    def dequant(x):
        return F.linear(x, w_codes.float() * scale.float()[:, None])

    def w8a8(x):
        s_x = x.abs().amax(1, keepdim=True).clamp_min(1e-8) / 127
        xq = torch.round(x / s_x).to(torch.int8)
        m = xq.shape[0]
        if m <= 16:  # _int_mm needs more than 16 rows: pad (what a decode step would have to do)
            xq = torch.cat([xq, xq.new_zeros(17 - m, xq.shape[1])])
        return torch._int_mm(xq, w_t)[:m].float() * s_x * scale.float()[None, :]

    def fp32(x):
        return F.linear(x, w_deq)

    return {"int8pack_mm": int8pack, "dequant_fp32": dequant, "int_mm_w8a8": w8a8, "fp32": fp32}, w_deq


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    out = []
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for shape_name, (in_f, out_f) in SHAPES.items():
        w = torch.randn(out_f, in_f, generator=g) * 0.02
        scale = (w.abs().amax(1) / 127).half()
        codes = torch.round(w / scale.float()[:, None]).clamp(-127, 127).to(torch.int8)
        fns, w_deq = variants(codes, scale)
        for regime, m in TOKENS.items():
            x = torch.randn(m, in_f, generator=g)
            ref = x @ w_deq.t()
            times: dict[str, list[float]] = {k: [] for k in fns}
            for fn in fns.values():  # warm-up
                fn(x)
            for _ in range(args.repeats):
                for k, fn in fns.items():
                    t0 = time.perf_counter()
                    fn(x)
                    times[k].append(time.perf_counter() - t0)
            for k, fn in fns.items():
                err = float((fn(x) - ref).norm() / ref.norm())
                med = statistics.median(times[k]) * 1e6
                row = {"shape": shape_name, "regime": regime, "variant": k, "us_median": med, "rel_error": err}
                out.append(row)
            base = statistics.median(times["dequant_fp32"])
            print(
                f"{shape_name:20s} {regime:8s} "
                + "  ".join(
                    f"{k} {statistics.median(v) * 1e6:8.1f} us ({statistics.median(v) / base:4.2f}x)"
                    for k, v in times.items()
                )
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
