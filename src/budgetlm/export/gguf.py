"""GGUF export: write a budgetlm model as a .gguf file that llama.cpp runs as it is.

Tensor types (`--gguf TYPE`): F32, F16, BF16 (floats) and the ggml block types Q8_0, Q5_1, Q5_0, Q4_1, Q4_0
(blocks of 32 weights along a row, one fp16 scale each, Q4_1/Q5_1 also an fp16 offset). The gguf package reads
k-quants (Q2_K..Q6_K) but cannot write them: export F16 or Q8_0 and run llama.cpp's `llama-quantize` for those.

This module is the writer: `export_gguf` (checks and plans everything before a file exists, then writes it
atomically), the file's metadata (general.*, the architecture's keys, the tokenizer) and its report. What goes into
it lives beside it: the block types and the encoders of budgetlm's codes in gguf_codes.py, the tensor names and
each tensor's type in gguf_tensors.py, the reading of GGUF files in gguf_read.py; their public names stay
importable from here.

Quantised layers are written from budgetlm's own integer codes whenever the requested block type can hold them, so
the export adds no second rounding (gguf_codes.py says when that is); float tensors with gguf.quants' rounding.
Tokenizer: copied field for field (every `tokenizer.*` key, and the descriptive `general.*` ones) from the GGUF the
model was loaded from when the handle names one (bundled smollm2-135m/gemma3-270m, or a .gguf path); otherwise
written from the Hugging Face tokenizer as a byte-level BPE ("gpt2") vocabulary with its merges. tiny-random's byte
vocabulary has no merges: the file holds an empty merges array, which llama.cpp requires to exist and transformers
reads back (gguf's writer refuses empty arrays, so `_writer` writes that one itself). Non-byte-level Hugging Face
tokenizers are one-line errors before anything is written. Files are written to a temporary sibling and renamed, so
a failed export leaves no file (and an existing one untouched).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from budgetlm.errors import ConfigError
from budgetlm.export.gguf_codes import AFFINE_QMAX, parse_type
from budgetlm.export.gguf_codes import BLOCK as BLOCK
from budgetlm.export.gguf_codes import BLOCK_TYPES as BLOCK_TYPES
from budgetlm.export.gguf_codes import FLOAT_TYPES as FLOAT_TYPES
from budgetlm.export.gguf_codes import NO_CODES as NO_CODES
from budgetlm.export.gguf_codes import READ_ONLY_TYPES as READ_ONLY_TYPES
from budgetlm.export.gguf_codes import TYPES as TYPES
from budgetlm.export.gguf_codes import encode_codes as encode_codes
from budgetlm.export.gguf_codes import exact_types as exact_types
from budgetlm.export.gguf_codes import grid_exact_types as grid_exact_types
from budgetlm.export.gguf_codes import grid_name as grid_name
from budgetlm.export.gguf_codes import planned_exact_types as planned_exact_types
from budgetlm.export.gguf_read import QUANTIZED_BY, WRITER, read_kv, source_gguf
from budgetlm.export.gguf_read import TensorInfo as TensorInfo
from budgetlm.export.gguf_read import is_budgetlm_gguf as is_budgetlm_gguf
from budgetlm.export.gguf_read import read_layout as read_layout
from budgetlm.export.gguf_tensors import ARCHS as ARCHS
from budgetlm.export.gguf_tensors import (
    ArchSpec,
    arch_spec,
    collect_tensors,
    common_exact,
    materialise,
    plan_types,
    rope_theta,
)
from budgetlm.export.gguf_tensors import cannot_hold as cannot_hold
from budgetlm.models.handle import ModelHandle

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
        w.add_rope_freq_base(rope_theta(cfg))
        w.add_rope_dimension_count(int(head_dim))
        if head_dim != cfg.hidden_size // heads:
            w.add_key_length(int(head_dim))
            w.add_value_length(int(head_dim))
    elif spec.gguf_arch == "gemma3":
        w.add_rope_freq_base(rope_theta(cfg, "full_attention"))
        w.add_rope_freq_base_swa(rope_theta(cfg, "sliding_attention"))
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
    spec = arch_spec(handle)
    tensors = collect_tensors(handle, spec)
    notes = plan_types(tensors, type_name, requantize, pure)
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
            arr, raw, err = materialise(t)
            w.add_tensor(t.name, arr, raw_dtype=raw)
            report.tensor_types[t.ggml] = report.tensor_types.get(t.ggml, 0) + 1
            if t.mode == "codes":
                report.from_codes.append(t.name)
                if t.ggml in AFFINE_QMAX:
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
