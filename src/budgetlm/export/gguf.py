"""GGUF export: write a budgetlm model as a .gguf file that llama.cpp runs as it is.

Tensor types (`--gguf TYPE`): F32, F16, BF16 (floats) and the ggml block types Q8_0, Q5_1, Q5_0, Q4_1, Q4_0
(blocks of 32 weights along a row, one fp16 scale each, Q4_1/Q5_1 also an fp16 offset). The gguf package reads
k-quants (Q2_K..Q6_K) but cannot write them: export F16 or Q8_0 and run llama.cpp's `llama-quantize` for those.

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

Float tensors are quantised with gguf.quants (the reference ggml rounding). Like llama.cpp's converter, 1-D
tensors (norms, biases) stay F32 and a matrix whose row width is not a multiple of 32 falls back to F16 with a
note. A quantised input embedding (QuantEmbedding, `embeddings: true`) is written like a QuantLinear from its
codes; a tied one, which reads the lm_head's codes, is written once, as token_embd. Like llama-quantize, the output
matrix (`output.weight`, or `token_embd` when the embeddings are tied) of a
float model is written as Q8_0 when a 4/5-bit type is requested (llama-quantize uses Q6_K there, which the
writer cannot produce, and Q8_0 itself when rows are not multiples of 256); `pure=True` turns this off.

Architectures: llama (tiny-random, SmolLM2; q_proj/k_proj rows permuted the way llama.cpp's converter does for
its rope, which transformers' GGUF loader undoes) and gemma3 (Gemma 3 text; norm weights stored as 1 + w, as
llama.cpp's converter does for Gemma3RMSNorm's (1 + w) scaling). Tokenizer: copied field for field (every
`tokenizer.*` key, and the descriptive `general.*` ones) from the GGUF the model was loaded from when the handle
names one (bundled smollm2-135m/gemma3-270m, or a .gguf path); otherwise written from the Hugging Face tokenizer
as a byte-level BPE ("gpt2") vocabulary with its merges. tiny-random's byte vocabulary has no merges: the file
holds an empty merges array, which llama.cpp requires to exist and transformers reads back (gguf's writer refuses
empty arrays, so `_writer` writes that one itself). Other architectures, scaled ropes and non-byte-level Hugging
Face tokenizers are one-line errors before anything is written. Files are written to a temporary sibling and
renamed, so a failed export leaves no file (and an existing one untouched).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from budgetlm.errors import ConfigError, ModelError
from budgetlm.models.handle import ModelHandle

BLOCK = 32
FLOAT_TYPES = ("F32", "F16", "BF16")
BLOCK_TYPES = ("Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0")
TYPES = FLOAT_TYPES + BLOCK_TYPES
READ_ONLY_TYPES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_K", "IQ")
# integer range of k that each symmetric-offset block type holds as d·k
_SIGNED_RANGE = {"Q8_0": (-128, 127), "Q5_0": (-16, 15), "Q4_0": (-8, 7)}
# largest q of the affine block types (x = d·q + m)
_AFFINE_QMAX = {"Q4_1": 15, "Q5_1": 31}
_FILE_TYPE = {
    "F32": "ALL_F32",
    "F16": "MOSTLY_F16",
    "BF16": "MOSTLY_BF16",
    "Q8_0": "MOSTLY_Q8_0",
    "Q5_1": "MOSTLY_Q5_1",
    "Q5_0": "MOSTLY_Q5_0",
    "Q4_1": "MOSTLY_Q4_1",
    "Q4_0": "MOSTLY_Q4_0",
}


@dataclass(frozen=True)
class ArchSpec:
    gguf_arch: str  # llama.cpp's architecture name
    model_arch: str  # gguf.MODEL_ARCH member name
    permute_qk: bool  # llama.cpp's llama converter reorders q/k rows for its rope
    norm_shift: float  # added to every *norm.weight (Gemma's RMSNorm scales by 1 + w)


ARCHS = {
    "llama": ArchSpec("llama", "LLAMA", True, 0.0),
    "gemma3_text": ArchSpec("gemma3", "GEMMA3", False, 1.0),
}


@dataclass
class ExportReport:
    path: Path
    gguf_type: str
    file_bytes: int
    tensor_types: dict[str, int]  # ggml type -> number of tensors
    from_codes: list[str] = field(default_factory=list)  # tensors written from budgetlm's codes (no re-rounding)
    requantized: list[str] = field(default_factory=list)  # quantised layers rounded again (requantize=True)
    max_offset_error: float = 0.0  # largest |m_fp16 − (−o·s)| over Q4_1/Q5_1 blocks written from codes
    offset_blocks_exact: float = 1.0  # fraction of those blocks whose m is exact
    tokenizer: str = ""  # where the tokenizer fields came from
    notes: list[str] = field(default_factory=list)


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


def _qtype(name: str):
    import gguf

    return gguf.GGMLQuantizationType[name]


# ---------------------------------------------------------------------------------------------------------------
# which ggml types hold a quantised layer exactly


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
    out |= {t for t, qmax in _AFFINE_QMAX.items() if 2**bits - 1 <= qmax}
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
        qmax = _AFFINE_QMAX[type_name]
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


# ---------------------------------------------------------------------------------------------------------------
# tensors: names, roles and the plan of how each one is written


@dataclass
class _Tensor:
    hf_name: str
    name: str  # GGUF name
    source: Any  # torch.Tensor (float) or a replaced module
    heads: int | None = None  # rows are permuted for llama.cpp's rope with this many heads
    shift: float = 0.0
    ggml: str = "F32"
    mode: str = "float"  # float | codes | requantize


def _layer_weight(mod) -> torch.Tensor:
    for attr in ("effective_weight", "dequantized_weight"):
        if hasattr(mod, attr):
            return getattr(mod, attr)().detach().float()
    raise ModelError(f"cannot export a {mod.layer_kind} layer: it exposes no effective_weight()/dequantized_weight()")


def _arch(handle: ModelHandle) -> ArchSpec:
    cfg = handle.model.config
    mtype = getattr(cfg, "model_type", None)
    if mtype not in ARCHS:
        names = ", ".join(f"{a.gguf_arch} ({t})" for t, a in ARCHS.items())
        raise ConfigError(f"GGUF export does not support architecture '{mtype}'; it writes: {names}")
    spec = ARCHS[mtype]
    if spec.gguf_arch == "gemma3":
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        scalar = getattr(cfg, "query_pre_attn_scalar", head_dim)
        if scalar != head_dim:
            raise ConfigError(
                f"this Gemma 3 scales attention by 1/sqrt({scalar}) but llama.cpp's gemma3 uses 1/sqrt(head_dim = "
                f"{head_dim}); the GGUF would compute something else, so it is not written"
            )
    for layer_type in ("full_attention", "sliding_attention") if spec.gguf_arch == "gemma3" else (None,):
        _rope(cfg, layer_type)  # a scaled rope is a one-line error before anything is written
    return spec


def _collect(handle: ModelHandle, spec: ArchSpec) -> list[_Tensor]:
    import gguf

    model, cfg = handle.model, handle.model.config
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH[spec.model_arch], cfg.num_hidden_layers)
    replaced = {n: m for n, m in model.named_modules() if getattr(m, "layer_kind", None)}
    sources: list[tuple[str, Any]] = []
    for pname, p in model.named_parameters():
        owner = pname.rpartition(".")[0]
        if owner in replaced and pname.endswith(".weight"):
            continue
        sources.append((pname, p.detach()))
    # a tied quantised embedding reads its lm_head's codes: written once, as token_embd (llama.cpp's output
    # falls back to it when there is no output.weight, as for a float model with tied weights)
    tied_heads = {m.tied_to for m in replaced.values() if getattr(m, "tied_to", None)}
    for mname, mod in replaced.items():
        if mname in tied_heads:
            continue
        if getattr(mod, "tied_to", None):
            mod = mod.store()
        sources.append((mname + ".weight", mod))
    heads = {"attn_q": cfg.num_attention_heads, "attn_k": cfg.num_key_value_heads}
    out = []
    for hf_name, src in sources:
        base, _, suffix = hf_name.rpartition(".")
        gname = name_map.get_name(base)
        if gname is None:
            raise ConfigError(f"GGUF export cannot name tensor '{hf_name}' for architecture {spec.gguf_arch}")
        t = _Tensor(hf_name, f"{gname}.{suffix}", src)
        role = gname.rpartition(".")[2]
        if spec.permute_qk and role in heads:
            t.heads = heads[role]
        if spec.norm_shift and hf_name.endswith("norm.weight"):
            t.shift = spec.norm_shift
        out.append(t)
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    out.sort(key=lambda t: (_block_id(t.name), order.get(t.hf_name.rpartition(".")[0], len(order)), t.name))
    return out


def _block_id(name: str) -> int:
    parts = name.split(".")
    return int(parts[1]) if parts[0] == "blk" else (-1 if name.startswith("token_embd") else 1 << 30)


def _shape(t: _Tensor) -> tuple[int, ...]:
    if isinstance(t.source, torch.Tensor):
        return tuple(t.source.shape)
    return (t.source.out_features, t.source.in_features)


def cannot_hold(type_name: str, what: str, common: set[str], fix: str) -> ConfigError:
    fits = [x for x in BLOCK_TYPES if x in common] + list(FLOAT_TYPES)
    return ConfigError(
        f"{what} cannot be written as {type_name} without rounding the weights again; types that hold every "
        f"quantised layer of this model: {', '.join(fits)} (floats dequantised); {fix}"
    )


def common_exact(tensors: list[_Tensor]) -> set[str]:
    """Block types that hold every quantised layer among `tensors` exactly."""
    common = set(BLOCK_TYPES)
    for t in tensors:
        if not isinstance(t.source, torch.Tensor):
            common &= exact_types(t.source)
    return common


def _plan(tensors: list[_Tensor], type_name: str, requantize: bool, pure: bool) -> list[str]:
    """Decide each tensor's ggml type and how it is produced; raise before anything is written."""
    notes = []
    names = {t.name for t in tensors}
    output_name = "output.weight" if "output.weight" in names else "token_embd.weight"
    promote = type_name in ("Q5_1", "Q5_0", "Q4_1", "Q4_0") and not pure
    quantised = [t for t in tensors if not isinstance(t.source, torch.Tensor)]
    if type_name in BLOCK_TYPES and quantised and not requantize:
        bad = [t for t in quantised if type_name not in exact_types(t.source)]
        if bad:
            extra = f" and {len(bad) - 1} more layers" if len(bad) > 1 else ""
            what = f"{bad[0].hf_name}{extra} ({grid_name(bad[0].source)})"
            raise cannot_hold(
                type_name, what, common_exact(quantised), f"or pass --requantize to round them to {type_name}"
            )
    fallback = []
    for t in tensors:
        shape = _shape(t)
        if len(shape) == 1:
            t.ggml = "F32"
            continue
        t.ggml = type_name
        if type_name in BLOCK_TYPES and shape[-1] % BLOCK:
            t.ggml = "F16"
            fallback.append(t.name)
            continue
        if not isinstance(t.source, torch.Tensor):
            if type_name in BLOCK_TYPES:
                t.mode = "codes" if type_name in exact_types(t.source) else "requantize"
        elif promote and t.name == output_name:
            t.ggml = "Q8_0"
            notes.append(
                f"{t.name} (the output matrix) written as Q8_0, as llama-quantize keeps it at higher precision; "
                "pass --pure to write it as " + type_name
            )
    if fallback:
        notes.append(
            f"{len(fallback)} tensors have rows that are not a multiple of {BLOCK} and were written as F16, "
            f"as llama.cpp's converter does: {', '.join(fallback[:4])}{' ...' if len(fallback) > 4 else ''}"
        )
    return notes


def _permutation(rows: int, heads: int) -> np.ndarray:
    """Row order of llama.cpp's converter: within each head, interleave the two rotary halves."""
    idx = np.arange(rows)
    return idx.reshape(heads, 2, rows // heads // 2).swapaxes(1, 2).reshape(rows)


def _materialise(t: _Tensor) -> tuple[np.ndarray, Any, np.ndarray | None]:
    """(array, raw ggml type or None, per-block offset error or None) for the writer."""
    import gguf

    err = None
    if t.mode == "codes":
        arr, err = encode_codes(t.source, t.ggml)
        raw = _qtype(t.ggml)
    else:
        w = t.source if isinstance(t.source, torch.Tensor) else _layer_weight(t.source)
        w = w.detach().float().numpy()
        if t.shift:
            w = w + np.float32(t.shift)
        if t.ggml == "F32":
            arr, raw = np.ascontiguousarray(w, dtype=np.float32), None
        elif t.ggml == "F16":
            arr, raw = w.astype(np.float16), None
        else:
            arr, raw = gguf.quants.quantize(np.ascontiguousarray(w, dtype=np.float32), _qtype(t.ggml)), _qtype(t.ggml)
    if t.heads:
        arr = arr[_permutation(arr.shape[0], t.heads)]
    return np.ascontiguousarray(arr), raw, err


# ---------------------------------------------------------------------------------------------------------------
# metadata: architecture keys and tokenizer


def _rope(cfg, layer_type: str | None = None) -> float:
    params = getattr(cfg, "rope_parameters", None) or {}
    if layer_type and isinstance(params.get(layer_type), dict):
        params = params[layer_type]
    rtype = params.get("rope_type", "default")
    if rtype != "default":
        raise ConfigError(
            f"GGUF export supports unscaled rope only; this model uses rope_type '{rtype}' ({cfg.model_type})"
        )
    return float(params.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))


def _arch_keys(w, handle: ModelHandle, spec: ArchSpec, notes: list[str]) -> None:
    cfg = handle.model.config
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    w.add_context_length(int(cfg.max_position_embeddings))
    w.add_embedding_length(int(cfg.hidden_size))
    w.add_block_count(int(cfg.num_hidden_layers))
    w.add_feed_forward_length(int(cfg.intermediate_size))
    w.add_head_count(int(heads))
    w.add_head_count_kv(int(kv))
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    w.add_vocab_size(int(handle.model.get_input_embeddings().num_embeddings))
    if spec.gguf_arch == "llama":
        w.add_rope_freq_base(_rope(cfg))
        w.add_rope_dimension_count(int(head_dim))
        if head_dim != cfg.hidden_size // heads:
            w.add_key_length(int(head_dim))
            w.add_value_length(int(head_dim))
    elif spec.gguf_arch == "gemma3":
        w.add_rope_freq_base(_rope(cfg, "full_attention"))
        w.add_rope_freq_base_swa(_rope(cfg, "sliding_attention"))
        w.add_key_length(int(head_dim))
        w.add_value_length(int(head_dim))
        if getattr(cfg, "final_logit_softcapping", None):
            w.add_final_logit_softcapping(float(cfg.final_logit_softcapping))
        w.add_sliding_window(int(cfg.sliding_window))
        layer_types = list(getattr(cfg, "layer_types", None) or [])
        swa = [lt == "sliding_attention" for lt in layer_types]
        if swa and swa != [(i + 1) % 6 != 0 for i in range(len(swa))]:
            w.add_sliding_window_pattern(swa)
            notes.append(
                "the layers' sliding/global pattern is not Gemma 3's every-6th-global one; it is written to "
                "gemma3.attention.sliding_window_pattern, which older llama.cpp builds ignore"
            )


def source_gguf(handle: ModelHandle) -> Path | None:
    """The GGUF file this model was loaded from, if the handle names one that still exists."""
    from budgetlm.models.sources import BUNDLED

    for spec in dict.fromkeys([handle.base_id, handle.source]):
        if not spec:
            continue
        if spec in BUNDLED and BUNDLED[spec][1] is not None:
            try:
                return Path(BUNDLED[spec][1]())
            except ModelError:
                return None
        path = Path(spec)
        if path.suffix.lower() == ".gguf" and path.is_file():
            return path
    return None


_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def read_kv(path: Path) -> dict[str, tuple[Any, int, int | None]]:
    """A GGUF file's metadata as {key: (value, value type, array element type)}, strings as raw bytes.

    A direct walk of the key/value section (gguf.GGUFReader also maps every tensor and takes ~13 s on a
    49k-token vocabulary; this takes well under a second)."""
    return read_layout(path)[0]


@dataclass(frozen=True)
class TensorInfo:
    name: str
    ggml_type: str  # gguf.GGMLQuantizationType member name: F32, F16, Q4_0 ...
    shape: tuple[int, ...]  # ggml order: the row width first
    n_elements: int
    n_bytes: int  # payload bytes (blocks of the type)


def read_layout(path: Path) -> tuple[dict[str, tuple[Any, int, int | None]], list[TensorInfo]]:
    """(metadata as `read_kv` gives it, the tensor table: name, type, shape, element count and payload bytes)."""
    import mmap
    import struct

    import gguf

    def string(pos: int) -> tuple[bytes, int]:
        (n,) = struct.unpack_from("<Q", mm, pos)
        return mm[pos + 8 : pos + 8 + n], pos + 8 + n

    def value(pos: int, vtype: int) -> tuple[Any, int]:
        if vtype in _SCALAR:
            fmt = _SCALAR[vtype]
            return struct.unpack_from(fmt, mm, pos)[0], pos + struct.calcsize(fmt)
        if vtype == 8:
            return string(pos)
        raise ValueError(f"unexpected GGUF value type {vtype}")

    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        if mm[:4] != b"GGUF":
            raise ModelError(f"{path} is not a GGUF file")
        _version, n_tensors, n_kv = struct.unpack_from("<IQQ", mm, 4)
        pos, out = 24, {}
        for _ in range(n_kv):
            key, pos = string(pos)
            (vtype,) = struct.unpack_from("<I", mm, pos)
            pos += 4
            if vtype == 9:
                sub, count = struct.unpack_from("<IQ", mm, pos)
                pos += 12
                if sub in _SCALAR:
                    fmt = _SCALAR[sub]
                    items = list(struct.unpack_from(f"<{count}{fmt[1]}", mm, pos))
                    pos += count * struct.calcsize(fmt)
                else:
                    items = []
                    for _ in range(count):
                        item, pos = value(pos, sub)
                        items.append(item)
                out[key.decode()] = (items, vtype, sub)
            else:
                item, pos = value(pos, vtype)
                out[key.decode()] = (item, vtype, None)
        tensors = []
        for _ in range(n_tensors):
            name, pos = string(pos)
            (n_dims,) = struct.unpack_from("<I", mm, pos)
            shape = struct.unpack_from(f"<{n_dims}Q", mm, pos + 4)
            ttype, _offset = struct.unpack_from("<IQ", mm, pos + 4 + 8 * n_dims)
            pos += 4 + 8 * n_dims + 12
            qtype = gguf.GGMLQuantizationType(ttype)
            block, type_bytes = gguf.GGML_QUANT_SIZES[qtype]
            n = int(np.prod(shape, dtype=np.int64)) if shape else 1
            tensors.append(TensorInfo(name.decode(), qtype.name, tuple(shape), n, n // block * type_bytes))
    return out, tensors


def _copy_tokenizer(w, kv: dict, n_vocab: int) -> bool:
    import gguf

    tokens = kv.get("tokenizer.ggml.tokens")
    if tokens is None or len(tokens[0]) != n_vocab:
        return False
    for key, (value, vtype, sub) in kv.items():
        if key.startswith("tokenizer."):
            w.add_key_value(
                key, value, gguf.GGUFValueType(vtype), sub_type=None if sub is None else gguf.GGUFValueType(sub)
            )
    return True


def _pre_tokenizer(js: dict) -> str:
    """llama.cpp's name for the split rule of a byte-level BPE tokenizer.json (the two common ones)."""
    pre = js.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [(s.get("type"), s.get("individual_digits"), s.get("use_regex")) for s in steps]
    if kinds == [("ByteLevel", None, True)]:
        return "gpt2"
    if kinds == [("Digits", True, None), ("ByteLevel", None, True)]:
        return "smollm"
    return "default"


def _hf_tokenizer(w, handle: ModelHandle, n_vocab: int, notes: list[str]) -> None:
    import gguf

    tok = handle.tokenizer
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise ConfigError("GGUF export needs a fast (tokenizers) tokenizer to write the vocabulary; this one is not")
    js = json.loads(backend.to_str())
    model = js.get("model", {})
    decoder = js.get("decoder") or {}
    dec_types = [d.get("type") for d in decoder.get("decoders", [decoder])]
    if model.get("type") != "BPE" or model.get("byte_fallback") or "ByteLevel" not in dec_types:
        raise ConfigError(
            "GGUF export writes Hugging Face tokenizers only when they are byte-level BPE; this model's tokenizer "
            f"is {model.get('type')}{' with byte fallback' if model.get('byte_fallback') else ''}; export a model "
            "loaded from a GGUF file (its tokenizer is copied)"
        )
    vocab: dict[str, int] = model["vocab"]
    added = js.get("added_tokens", [])
    if max([*vocab.values(), *(a["id"] for a in added)]) >= n_vocab:
        raise ConfigError(f"the tokenizer has ids beyond the model's {n_vocab} embedding rows; cannot export it")
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    types = [int(gguf.TokenType.UNUSED)] * n_vocab
    for text, i in vocab.items():
        tokens[i], types[i] = text, int(gguf.TokenType.NORMAL)
    for a in added:
        tokens[a["id"]] = a["content"]
        types[a["id"]] = int(gguf.TokenType.CONTROL if a.get("special") else gguf.TokenType.USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    pre = _pre_tokenizer(js)
    if pre == "default" and len(merges) > 1:
        notes.append("tokenizer.ggml.pre 'default': the tokenizer's split rule is not one the export recognises")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    # llama.cpp requires the key for a "gpt2" vocabulary even when it has no merges (tiny-random's byte vocabulary)
    w.add_key_value(gguf.Keys.Tokenizer.MERGES, merges, gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.STRING)
    cfg = handle.model.config
    for attr, add in (
        ("bos_token_id", w.add_bos_token_id),
        ("eos_token_id", w.add_eos_token_id),
        ("unk_token_id", w.add_unk_token_id),
        ("pad_token_id", w.add_pad_token_id),
    ):
        value = getattr(tok, attr, None)
        value = getattr(cfg, attr, None) if value is None else value
        if isinstance(value, list):
            value = value[0] if value else None
        if value is not None:
            add(int(value))
    ids = tok("a")["input_ids"]
    w.add_add_bos_token(bool(ids) and tok.bos_token_id is not None and ids[0] == tok.bos_token_id)
    w.add_add_eos_token(bool(ids) and tok.eos_token_id is not None and ids[-1] == tok.eos_token_id)
    template = getattr(tok, "chat_template", None)
    if isinstance(template, str) and template:
        w.add_chat_template(template)


def _writer(path: Path | None, arch: str):
    import gguf

    class Writer(gguf.GGUFWriter):
        """gguf's writer refuses empty arrays; the GGUF format, llama.cpp's reader and transformers' accept them."""

        def _pack_val(self, val, vtype, add_vtype, sub_type=None):
            if vtype == gguf.GGUFValueType.ARRAY and sub_type is not None and len(val) == 0:
                head = self._pack("I", vtype) if add_vtype else b""
                return head + self._pack("I", sub_type) + self._pack("Q", 0)
            return super()._pack_val(val, vtype, add_vtype, sub_type)

    return Writer(None if path is None else str(path), arch)


QUANTIZED_BY = "general.quantized_by"
WRITER = "budgetlm"


def is_budgetlm_gguf(path: Path) -> bool:
    """A GGUF file this project wrote (its general.quantized_by says budgetlm); False for anything unreadable."""
    import gguf

    try:
        field = gguf.GGUFReader(str(path)).fields.get(QUANTIZED_BY)
        return field is not None and bytes(field.parts[field.data[0]]).decode() == WRITER
    except Exception:  # noqa: BLE001 - not a GGUF file, or a damaged one: not ours
        return False


def _general(w, handle: ModelHandle, kv: dict, type_name: str) -> None:
    import gguf

    name = Path(handle.base_id).stem if "/" in handle.base_id else handle.base_id
    if "general.name" in kv:
        name = kv["general.name"][0].decode("utf-8", "replace")
    own = {"general.architecture", "general.name", "general.type", "general.file_type", "general.alignment"}
    own |= {"general.quantization_version", QUANTIZED_BY}
    for key, (value, vtype, sub) in kv.items():  # descriptive fields of the source file: license, organisation...
        if key.startswith("general.") and key not in own:
            w.add_key_value(
                key, value, gguf.GGUFValueType(vtype), sub_type=None if sub is None else gguf.GGUFValueType(sub)
            )
    methods = [p.get("method") for p in handle.provenance if isinstance(p, dict) and p.get("method")]
    if methods:
        name += " (budgetlm: " + " + ".join(methods) + ")"
    w.add_name(name)
    w.add_type("model")
    w.add_string(QUANTIZED_BY, WRITER)
    w.add_file_type(int(gguf.LlamaFileType[_FILE_TYPE[type_name]]))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)


# ---------------------------------------------------------------------------------------------------------------


def export_gguf(
    handle: ModelHandle,
    path: str | Path,
    gguf_type: str = "Q8_0",
    requantize: bool = False,
    pure: bool = False,
    aside: bool = False,
) -> ExportReport:
    """Write `handle` to `path` as a GGUF file of tensor type `gguf_type` (atomically: all of it or nothing). A file
    already at `path` is replaced, or with `aside` first moved aside (kept)."""
    from budgetlm.utils import atomic_file

    type_name = parse_type(gguf_type)
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"--out {path} is a folder; give the .gguf file to write")
    spec = _arch(handle)
    tensors = _collect(handle, spec)
    notes = _plan(tensors, type_name, requantize, pure)
    n_vocab = int(handle.model.get_input_embeddings().num_embeddings)
    src = source_gguf(handle)
    kv = read_kv(src) if src is not None else {}
    report = ExportReport(path, type_name, 0, {})

    meta = _writer(None, spec.gguf_arch)  # every key/value first, so a bad tokenizer fails before any file exists
    _general(meta, handle, kv, type_name)
    _arch_keys(meta, handle, spec, notes)
    if kv and _copy_tokenizer(meta, kv, n_vocab):
        report.tokenizer = f"copied from {src.name}"
    else:
        if src is not None:
            notes.append(
                f"{src.name}'s vocabulary does not match the model's {n_vocab} rows; writing the model's own tokenizer"
            )
        _hf_tokenizer(meta, handle, n_vocab, notes)
        report.tokenizer = "written from the Hugging Face tokenizer (gpt2 byte-level BPE)"

    offset_err: list[np.ndarray] = []
    with torch.no_grad(), atomic_file(path, aside=aside) as tmp:
        w = _writer(tmp, spec.gguf_arch)
        for key, value in meta.kv_data[0].items():
            if key not in w.kv_data[0]:
                w.add_key_value(key, value.value, value.type, sub_type=value.sub_type)
        for t in tensors:
            arr, raw, err = _materialise(t)
            w.add_tensor(t.name, arr, raw_dtype=raw)
            report.tensor_types[t.ggml] = report.tensor_types.get(t.ggml, 0) + 1
            if t.mode == "codes":
                report.from_codes.append(t.name)
                if t.ggml in _AFFINE_QMAX:
                    offset_err.append(err.reshape(-1))
            elif t.mode == "requantize":
                report.requantized.append(t.name)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    if offset_err:
        errs = np.concatenate(offset_err)
        report.max_offset_error = float(errs.max())
        report.offset_blocks_exact = float((errs == 0).mean())
    if report.offset_blocks_exact < 1:
        exact = [x for x in ("Q5_0", "Q8_0") if x in common_exact(tensors)]
        notes.append(
            f"{type_name} blocks written from the codes: d·q is exact, the fp16 offset m = −o·s is exact in "
            f"{report.offset_blocks_exact:.1%} of blocks (largest error {report.max_offset_error:.3g})"
            + (f"; {' and '.join(exact)} hold these codes with no rounding at all" if exact else "")
        )
    if report.requantized:
        notes.append(f"{len(report.requantized)} quantised layers rounded again to {type_name} (--requantize)")
    report.file_bytes = path.stat().st_size
    report.notes = notes
    return report
