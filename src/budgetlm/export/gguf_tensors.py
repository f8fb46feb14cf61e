"""The tensors of a GGUF export and how each is written: the supported architectures (ArchSpec: llama.cpp's
name, the q/k row permutation for its rope, the norm shift; rope settings checked), the mapping of the model's
parameters and replaced layers to GGUF tensor names (gguf's name map), the plan of each tensor's ggml type (from
codes, re-rounded, float, or an F16 fallback) decided before anything is written, and the arrays themselves.

Float tensors are quantised with gguf.quants (the reference ggml rounding). Like llama.cpp's converter, 1-D
tensors (norms, biases) stay F32 and a matrix whose row width is not a multiple of 32 falls back to F16 with a
note. A quantised input embedding (QuantEmbedding, `embeddings: true`) is written like a QuantLinear from its
codes; a tied one, which reads the lm_head's codes, is written once, as token_embd. Like llama-quantize, the output
matrix (`output.weight`, or `token_embd` when the embeddings are tied) of a
float model is written as Q8_0 when a 4/5-bit type is requested (llama-quantize uses Q6_K there, which the
writer cannot produce, and Q8_0 itself when rows are not multiples of 256); `pure=True` turns this off.

Architectures: llama (tiny-random, SmolLM2; q_proj/k_proj rows permuted the way llama.cpp's converter does for
its rope, which transformers' GGUF loader undoes) and gemma3 (Gemma 3 text; norm weights stored as 1 + w, as
llama.cpp's converter does for Gemma3RMSNorm's (1 + w) scaling). Other architectures and scaled ropes are one-line
errors before anything is written.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from budgetlm.errors import ConfigError, ModelError
from budgetlm.export.gguf_codes import BLOCK, BLOCK_TYPES, FLOAT_TYPES, encode_codes, exact_types, grid_name
from budgetlm.models.handle import ModelHandle


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


def _qtype(name: str):
    import gguf

    return gguf.GGMLQuantizationType[name]


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


def arch_spec(handle: ModelHandle) -> ArchSpec:
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
        rope_theta(cfg, layer_type)  # a scaled rope is a one-line error before anything is written
    return spec


def collect_tensors(handle: ModelHandle, spec: ArchSpec) -> list[_Tensor]:
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


def plan_types(tensors: list[_Tensor], type_name: str, requantize: bool, pure: bool) -> list[str]:
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


def materialise(t: _Tensor) -> tuple[np.ndarray, Any, np.ndarray | None]:
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


def rope_theta(cfg, layer_type: str | None = None) -> float:
    params = getattr(cfg, "rope_parameters", None) or {}
    if layer_type and isinstance(params.get(layer_type), dict):
        params = params[layer_type]
    rtype = params.get("rope_type", "default")
    if rtype != "default":
        raise ConfigError(
            f"GGUF export supports unscaled rope only; this model uses rope_type '{rtype}' ({cfg.model_type})"
        )
    return float(params.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))
