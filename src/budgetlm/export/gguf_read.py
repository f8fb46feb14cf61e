"""Reading GGUF files without loading them: the metadata and tensor table of a file by a direct walk of its
header (`read_kv`, `read_layout`; the llama.cpp bench sizes a model from the table), the GGUF file a model was
loaded from (`source_gguf`, whose tokenizer and descriptive fields the export copies), and whether a file is one
budgetlm wrote (`is_budgetlm_gguf`: its general.quantized_by).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from budgetlm.errors import ModelError
from budgetlm.models.handle import ModelHandle

QUANTIZED_BY = "general.quantized_by"
WRITER = "budgetlm"


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


def is_budgetlm_gguf(path: Path) -> bool:
    """A GGUF file this project wrote (its general.quantized_by says budgetlm); False for anything unreadable."""
    import gguf

    try:
        field = gguf.GGUFReader(str(path)).fields.get(QUANTIZED_BY)
        return field is not None and bytes(field.parts[field.data[0]]).decode() == WRITER
    except Exception:  # noqa: BLE001 - not a GGUF file, or a damaged one: not ours
        return False
