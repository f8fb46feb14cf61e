"""The ggml block types of the GGUF export and how budgetlm's integer codes go into them: the type names
(`parse_type`), which block types hold a quantised layer's codes with no second rounding (`exact_types`, and
`planned_exact_types` from a pipeline's configs before it runs), and the per-type encoders that write a QuantLinear's
(or QuantEmbedding's) codes as ggml blocks (`encode_codes`). Float tensors are not encoded here (gguf.quants does it,
see gguf_tensors.materialise).

Quantised layers are written from budgetlm's own integer codes whenever the requested block type can hold them,
so the export adds no second rounding. A QuantLinear stores x = s·k per group, with k = code − zero (asymmetric)
or k = code − 2^(b−1) (symmetric) and s in fp16. A ggml block of 32 weights takes that exactly when every block
lies inside one group (group size and row width multiples of 32) and k fits the block's integer range:
  Q8_0  x = d·q, q ∈ [−128, 127]      d = s, q = k     symmetric ≤ 8 bits, asymmetric ≤ 4 bits: exact
  Q4_0  x = d·(q − 8), q ∈ [0, 15]    d = s, q = k + 8   symmetric ≤ 4 bits, asymmetric ≤ 3 bits: exact
  Q5_0  x = d·(q − 16), q ∈ [0, 31]   d = s, q = k + 16  symmetric ≤ 5 bits, asymmetric ≤ 4 bits: exact
  Q4_1  x = d·q + m, q ∈ [0, 15]      d = s, q = k + o, m = −o·s rounded to fp16     any grid of ≤ 4 bits
  Q5_1  x = d·q + m, q ∈ [0, 31]      as Q4_1                                         any grid of ≤ 5 bits
The offset o of an affine block is free within the range that keeps q valid; the writer picks, per block, the o
whose −o·s is closest to an fp16 number (exact when one is), the grid's own zero point on ties. d·q is exact in
every case; only m can carry an fp16 rounding, at most half an fp16 ulp of |o·s| (`max_offset_error` reports it).
Lower-bit grids embed losslessly in wider types (a 3-bit model written as Q4_1 is exact, at 5 bits per weight).
A grid no requested type can hold (8-bit asymmetric, groups of 16, act-order with groups, a low-rank correction,
NF4) is a one-line error naming the layer and the types that can hold every quantised layer of the model (F32,
F16 and BF16 always can, as dequantised floats), unless `requantize` rounds the dequantised weights again.
"""

from __future__ import annotations

import numpy as np
import torch

from budgetlm.errors import ConfigError

BLOCK = 32
FLOAT_TYPES = ("F32", "F16", "BF16")
BLOCK_TYPES = ("Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0")
TYPES = FLOAT_TYPES + BLOCK_TYPES
READ_ONLY_TYPES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_K", "IQ")
# integer range of k that each symmetric-offset block type holds as d·k
_SIGNED_RANGE = {"Q8_0": (-128, 127), "Q5_0": (-16, 15), "Q4_0": (-8, 7)}
# largest q of the affine block types (x = d·q + m)
AFFINE_QMAX = {"Q4_1": 15, "Q5_1": 31}


def parse_type(name: str) -> str:
    """The canonical tensor type name, or a one-line ConfigError listing the types the export writes."""
    t = str(name).strip().upper()
    if t in TYPES:
        return t
    if t in READ_ONLY_TYPES or t.startswith(READ_ONLY_TYPES):
        raise ConfigError(
            f"GGUF type '{name}' is one the gguf package can read but not write (k-quants, i-quants); export F16 "
            f"or Q8_0 and run llama.cpp's llama-quantize for it, or pick one of: {', '.join(TYPES)}"
        )
    raise ConfigError(f"unknown GGUF type '{name}'; the export writes: {', '.join(TYPES)}")


def _is_quant_linear(mod) -> bool:
    """QuantLinear, or a QuantEmbedding holding its own codes in the same format (`codes()`, `scales`, `zeros`)."""
    return getattr(mod, "layer_kind", None) in ("quant_linear", "quant_embedding")


def _permuted(mod) -> bool:
    """Whether the layer's codes are stored in act-order (a tied QuantEmbedding holds no `perm` of its own)."""
    flag = getattr(mod, "permuted", None)
    return bool(flag) if flag is not None else getattr(mod, "perm", None) is not None


def grid_name(mod) -> str:
    if not _is_quant_linear(mod):
        return f"{mod.layer_kind} layer"
    kind = "symmetric" if mod.symmetric else "asymmetric"
    group = "per-channel" if mod.group_size == mod.in_features else f"group {mod.group_size}"
    extra = (", act-order" if _permuted(mod) else "") + (f", rank-{mod.rank} correction" if mod.rank else "")
    return f"{mod.bits}-bit {kind}, {group}{extra}"


def exact_types(mod) -> set[str]:
    """Block types that hold this replaced layer's codes with no second rounding (floats always can)."""
    if not _is_quant_linear(mod):
        return set()
    return grid_exact_types(mod.bits, mod.symmetric, mod.group_size, mod.in_features, _permuted(mod), mod.rank)


def grid_exact_types(
    bits: int, symmetric: bool, group_size: int | None, in_features: int, permuted: bool = False, rank: int = 0
) -> set[str]:
    """Block types that hold the codes of such a grid exactly (group_size None: per channel)."""
    grouped = group_size is not None and group_size != in_features
    if rank or (permuted and grouped) or in_features % BLOCK or (grouped and group_size % BLOCK):
        return set()
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (-(2**bits - 1), 2**bits - 1)
    out = {t for t, (a, z) in _SIGNED_RANGE.items() if a <= lo and hi <= z}
    out |= {t for t, qmax in AFFINE_QMAX.items() if 2**bits - 1 <= qmax}
    return out


NO_CODES = ("magnitude", "wanda", "shortgpt")  # steps that leave float weights (pruned or removed)


def planned_exact_types(model: torch.nn.Module, configs: list) -> set[str] | None:
    """Before a pipeline runs: the block types that will hold the codes of every Linear it quantises, from each
    step's grid settings (bits or candidate bits, group size(s), symmetry, act-order with groups, a low-rank
    correction) and the model's widths. None when a step's outcome cannot be told from its config (an adapter,
    say): the export's own check after the work then decides."""
    from budgetlm.methods.base import select_linears

    common = set(BLOCK_TYPES)
    for cfg in configs:
        name = cfg.method_name
        if name in NO_CODES or (hasattr(cfg, "bits") and cfg.bits is None):
            continue
        if name == "nf4":
            return set()  # NF4 indices are no ggml block type
        bits = getattr(cfg, "candidates", None) or ([cfg.bits] if hasattr(cfg, "bits") else None)
        if bits is None or not (hasattr(cfg, "group_size") and hasattr(cfg, "symmetric")):
            return None
        groups = getattr(cfg, "candidate_groups", None) or [cfg.group_size]
        permuted = getattr(cfg, "act_order", False) and not getattr(cfg, "static_groups", False)
        rank = getattr(cfg, "rank", 0)
        widths = [lin.in_features for _, lin in select_linears(model, cfg)]
        if getattr(cfg, "embeddings", False):  # the embedding matrix: rows as wide as the hidden size
            widths.append(int(model.get_input_embeddings().embedding_dim))
        for width in widths:
            for b in bits:
                for g in groups:
                    common &= grid_exact_types(b, cfg.symmetric, g, width, permuted, rank)
    return common


def _integer_grid(mod) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(k int16 [out, in], s fp16 [out, in/32], natural offset int16 [out, in/32]) with weight = s·k per block."""
    codes = mod.codes().numpy()
    out_f, in_f = codes.shape
    n_groups = mod.scales.shape[1]
    if mod.zeros is None:
        offset = np.full((out_f, n_groups), 2 ** (mod.bits - 1), dtype=np.int16)
    else:
        offset = mod.zeros.numpy().astype(np.int16)
    k = (codes.astype(np.int16).reshape(out_f, n_groups, -1) - offset[:, :, None]).reshape(out_f, in_f)
    if mod.perm is not None:  # per-channel only (exact_types): un-permuting columns keeps one scale per row
        k = k[:, np.argsort(mod.perm.numpy())]
    reps = in_f // BLOCK // n_groups
    scales = np.repeat(mod.scales.detach().numpy().astype(np.float16), reps, axis=1)
    return k, scales, np.repeat(offset, reps, axis=1)


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    """ggml nibble order: byte j of a block holds element j (low) and element j + 16 (high)."""
    lo, hi = q[..., : BLOCK // 2], q[..., BLOCK // 2 :]
    return ((lo & 0x0F) | ((hi & 0x0F) << 4)).astype(np.uint8)


def _high_bits(q: np.ndarray) -> np.ndarray:
    """Q5 blocks: bit 4 of element i at bit i of a little-endian uint32."""
    bits = ((q.astype(np.uint32) >> 4) & 1) << np.arange(BLOCK, dtype=np.uint32)
    return bits.sum(axis=-1, dtype=np.uint32)[..., None].astype("<u4").view(np.uint8)


def _choose_offsets(k: np.ndarray, s: np.ndarray, natural: np.ndarray, qmax: int) -> np.ndarray:
    """Per block, the offset o (q = k + o ∈ [0, qmax]) whose m = −o·s rounds to fp16 with the least error."""
    lo, hi = -k.min(axis=-1).astype(np.int64), qmax - k.max(axis=-1).astype(np.int64)
    best = natural.astype(np.int64)
    free = np.nonzero(hi > lo)  # blocks whose codes leave room for another offset
    if free[0].size == 0:
        return best
    s64 = s[free].astype(np.float64)
    o = best[free]
    err = np.abs((-o * s64).astype(np.float16).astype(np.float64) + o * s64)
    for cand in range(int(lo[free].min()), int(hi[free].max()) + 1):
        e = np.abs((-cand * s64).astype(np.float16).astype(np.float64) + cand * s64)
        better = (lo[free] <= cand) & (cand <= hi[free]) & (e < err)
        o, err = np.where(better, cand, o), np.where(better, e, err)
    best[free] = o
    return best


def encode_codes(mod, type_name: str) -> tuple[np.ndarray, np.ndarray]:
    """ggml blocks [out, bytes] of a QuantLinear written from its codes, and the |m| rounding error per block."""
    k, s, natural = _integer_grid(mod)
    rows, cols = k.shape
    k = k.reshape(rows, cols // BLOCK, BLOCK).astype(np.int64)
    d = s[..., None].view(np.uint8)  # [rows, nb, 2]
    err = np.zeros(s.shape)
    if type_name == "Q8_0":
        parts = [d, k.astype(np.int8).view(np.uint8)]
    elif type_name == "Q4_0":
        parts = [d, _pack_nibbles(k + 8)]
    elif type_name == "Q5_0":
        q = k + 16
        parts = [d, _high_bits(q), _pack_nibbles(q)]
    else:
        qmax = AFFINE_QMAX[type_name]
        o = _choose_offsets(k, s, natural, qmax)
        exact = -o * s.astype(np.float64)
        m = exact.astype(np.float16)
        err = np.abs(m.astype(np.float64) - exact)
        q = k + o[..., None]
        assert q.min() >= 0 and q.max() <= qmax
        parts = [d, m[..., None].view(np.uint8)]
        parts += [_pack_nibbles(q)] if qmax == 15 else [_high_bits(q), _pack_nibbles(q)]
    blocks = np.concatenate(parts, axis=-1)
    return blocks.reshape(rows, -1), err
