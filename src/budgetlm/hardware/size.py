"""Model size: bytes that exist, parameters a user would count, bits per Linear weight.

Metrics of `model_size` (phase "size"):
  stored_bytes   bytes of the serialised state: unique tensors of the state dict, tied weights once; exactly the
                 payload safetensors writes (its 8-byte length prefix and JSON header excluded)        unit "B"
  disk_bytes     sum of the file sizes of a saved folder (only when a folder is given)                  unit "B"
  params         logical parameter count: a quantised layer counts in_features*out_features (+ bias),
                 not its packed bytes; tied weights once                                                 unit "count"
  bpw            stored_bytes*8 / params: bits per parameter over the whole model                       unit "bits"
  linear_bytes   storage of the Linear-like weights (packed codes + scales + zeros; biases excluded)     unit "B"
  linear_bpw     linear_bytes*8 / logical Linear weight count                                             unit "bits"
  linear_memory_bpw  the same over the bytes the Linears hold in memory to compute (`memory_bytes()`: the 4-bit
                 kernel's layout of a 2/3-bit grid, a pruned layer's dense weight)                         unit "bits"
  read_bytes_per_token  bytes a decode step reads: every stored tensor except the input embedding matrix
                 (one row of it is read), which counts once as the lm_head when the two are tied        unit "B"

Linear-like modules are nn.Linear (weight.numel()*element_size) and modules a compression method put in
place, which expose `layer_kind`, `in_features`, `out_features` and `storage_bytes()`; a quantised input
embedding (QuantEmbedding, kind "quant_embedding") is not one: its packed bytes are the "embedding" part of
stored_bytes and count in bpw (whole model), not in linear_*. An lm_head tied to the input embedding is the
embedding's storage, float or quantised (then the QuantEmbedding reads the lm_head QuantLinear's codes): it is
reported (extra "lm_head") but never counted twice, and it is left out of linear_bytes/linear_bpw because its
bytes are the embedding's.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from budgetlm.results import Metric


def _module(handle) -> nn.Module:
    return getattr(handle, "model", handle)


def _key(t: torch.Tensor) -> tuple:
    """Identity of a tensor view: two state-dict entries with the same key are the same bytes."""
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def is_replaced(mod: nn.Module) -> bool:
    return bool(getattr(mod, "layer_kind", None))


def is_quant_embedding(mod: nn.Module) -> bool:
    return getattr(mod, "layer_kind", None) == "quant_embedding"


def _tied_quant_embedding(mod: nn.Module) -> bool:
    """A QuantEmbedding holding no tensors of its own (it reads its tied lm_head's codes)."""
    return is_quant_embedding(mod) and getattr(mod, "tied_to", None) is not None


def linear_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Linear-like modules by name: nn.Linear, transformers' Conv1D and method-replaced layers (not inside one)."""
    out: dict[str, nn.Module] = {}
    skip: list[str] = []
    for name, mod in model.named_modules():
        if any(name.startswith(p + ".") for p in skip):
            continue
        if is_quant_embedding(mod):
            skip.append(name)
        elif is_replaced(mod):
            out[name] = mod
            skip.append(name)
        elif isinstance(mod, nn.Linear) or (
            type(mod).__name__ == "Conv1D" and getattr(mod, "weight", None) is not None
        ):
            out[name] = mod
    return out


def linear_storage(mod: nn.Module) -> tuple[int, int]:
    """(weight storage bytes, logical weight count) of one Linear-like module, bias excluded."""
    if is_replaced(mod):
        return int(mod.storage_bytes()), int(mod.in_features) * int(mod.out_features)
    return _nbytes(mod.weight), mod.weight.numel()


def stored_bytes(model: nn.Module) -> int:
    """Payload bytes of the state dict with shared tensors once (what safetensors writes)."""
    seen: set[tuple] = set()
    total = 0
    for t in model.state_dict().values():
        k = _key(t)
        if k not in seen:
            seen.add(k)
            total += _nbytes(t)
    return total


def param_count(model: nn.Module) -> int:
    """Logical parameters: replaced layers count in*out (+ bias numel); tied parameters once."""
    replaced = {n: m for n, m in model.named_modules() if is_replaced(m)}
    seen: set[tuple] = set()
    total = 0
    for mod in replaced.values():
        if _tied_quant_embedding(mod):
            continue  # its matrix is the tied lm_head's, counted there
        total += int(mod.in_features) * int(mod.out_features)
        bias = getattr(mod, "bias", None)
        if isinstance(bias, torch.Tensor):
            seen.add(_key(bias))
            total += bias.numel()
    for name, p in model.named_parameters(remove_duplicate=True):
        if any(name.startswith(r + ".") for r in replaced):
            continue
        k = _key(p)
        if k not in seen:
            seen.add(k)
            total += p.numel()
    return total


def _tied_lm_head(model: nn.Module) -> bool:
    inp = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if inp is not None and _tied_quant_embedding(inp):
        return out is not None and inp.store() is out
    w_in, w_out = getattr(inp, "weight", None), getattr(out, "weight", None)
    if not isinstance(w_in, torch.Tensor) or not isinstance(w_out, torch.Tensor):
        return False
    return _key(w_in) == _key(w_out)


def read_bytes_per_token(model: nn.Module) -> int:
    """Bytes of weights one decode step reads: the whole state minus the input embedding matrix, plus one row
    of it (a quantised table: one row's share of its packed bytes); a tied embedding stays in (it is read whole as
    the lm_head). A layer saved compressed that computes
    with a dense weight (`memory_bytes()`: SparseLinear) counts its dense weight, which is what the step reads."""
    total = stored_bytes(model)
    for mod in model.modules():  # layers stored compressed but computing with a dense weight (pruned Linears)
        memory = getattr(mod, "memory_bytes", None)
        if callable(memory):
            total += int(memory()) - int(mod.storage_bytes())
    inp = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    w = getattr(inp, "weight", None)
    if isinstance(w, torch.Tensor) and not _tied_lm_head(model):
        total -= _nbytes(w) - _nbytes(w[0])
    return total


def folder_bytes(folder: str | Path) -> int:
    folder = Path(folder)
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def model_size(handle, folder: Path | str | None = None) -> dict[str, Metric]:
    """Size metrics of a ModelHandle (or bare module); disk_bytes too when its saved folder is given."""
    model = _module(handle)
    tied = _tied_lm_head(model)
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    lin_bytes = lin_weights = lin_memory = 0
    kinds: dict[str, int] = {}
    for _name, mod in linear_modules(model).items():
        if tied and mod is out_emb:
            continue
        b, n = linear_storage(mod)
        lin_bytes += b
        lin_weights += n
        held = getattr(mod, "memory_bytes", None)  # what the layer holds to compute (e.g. 4-bit kernel layout)
        lin_memory += int(held()) if callable(held) else b
        kind = getattr(mod, "layer_kind", None) or type(mod).__name__
        kinds[kind] = kinds.get(kind, 0) + 1
    stored = stored_bytes(model)
    params = param_count(model)
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is not None and is_quant_embedding(emb):
        emb_bytes = int(emb.storage_bytes())  # packed codes + scales (+ zeros): the tied lm_head's when tied
    else:
        emb_bytes = _nbytes(emb.weight) if isinstance(getattr(emb, "weight", None), torch.Tensor) else 0
    if out_emb is None:
        lm_head = "none"
    elif tied:
        lm_head = "tied to the input embedding: counted once, with the embedding, not in linear_*"
    else:
        lm_head = "separate: counted in linear_*"
    breakdown = {"linear": lin_bytes, "embedding": emb_bytes, "other": stored - lin_bytes - emb_bytes}
    how = {"lm_head": lm_head}
    res = {
        "stored_bytes": Metric(float(stored), unit="B", extra={"breakdown": breakdown, **how}),
        "params": Metric(float(params), unit="count", extra=how),
        "bpw": Metric(stored * 8 / params if params else float("nan"), unit="bits"),
        "linear_bytes": Metric(float(lin_bytes), unit="B", extra={"modules": kinds, **how}),
        "linear_bpw": Metric(
            lin_bytes * 8 / lin_weights if lin_weights else float("nan"),
            n=lin_weights,
            unit="bits",
            extra={"modules": kinds, "linear_weights": lin_weights, **how},
        ),
        "linear_memory_bpw": Metric(
            lin_memory * 8 / lin_weights if lin_weights else float("nan"),
            n=lin_weights,
            unit="bits",
            extra={
                "note": "as the Linear layers hold their weights to compute: a 2- or 3-bit grid on the 4-bit "
                "kernel holds 4 bits per weight (plus its bf16 scale table); a pruned layer its dense weight"
            },
        ),
        "read_bytes_per_token": Metric(
            float(read_bytes_per_token(model)), unit="B", extra={"note": "weights only; KV-cache reads excluded"}
        ),
    }
    if folder is not None:
        res["disk_bytes"] = Metric(float(folder_bytes(folder)), unit="B", extra={"folder": str(folder)})
    return res
