"""SparseLinear: a pruned Linear that computes with its dense weight (zeros where pruned) and saves only the weights
it keeps, in one of two formats.

- "nm" (N:M compressed, the layout of semi-structured 2:4 sparsity): every group of M consecutive inputs of a
  row keeps exactly M−N values, stored in the weight's dtype (`values` [out, in/M, M−N]), plus the position of
  each kept value inside its group, packed densely in ceil(log2 M) bits (`positions`: 2 bits for 2:4, so a 2:4
  fp32 layer stores 2 × (32 + 2) bits per 4 weights: 17 bits per weight). A group may hold fewer than M−N
  non-zeros (a kept weight that is 0); it then stores some zeros.
- "bitmask" (unstructured): 1 bit per weight, packed 8 per byte in row-major order (`mask`), plus the kept
  values in row-major order (`values` [nnz]); the dense weight is a row-major boolean scatter, so no per-row
  offset table is needed (and none is stored).

In memory the layer is an nn.Linear with the dense weight: there is no sparse matrix kernel for this CPU in torch,
and rebuilding the dense weight from the compressed tensors at every call measured 7-11 ms per 1536x576 layer —
hundreds of ms per decoded token for SmolLM2 — so the compressed form exists only in the saved file
(`_save_to_state_dict` writes it, `_load_from_state_dict` expands it). The model then runs at dense speed (no
speed-up, no slow-down), takes dense memory, and `storage_bytes()` — what hardware.size reports as stored bytes
— is the bytes the format writes. Being an nn.Linear, a pruned layer is also a target for a later step (prune then
quantise: rtn keeps exact zeros, gptq keeps them when told the mask).

"Kept" means non-zero *bit pattern* (a −0.0 handed in is stored, so reconstruction is bitwise exact;
common.store_pruned turns pruned −0.0 into +0 first); values keep the weight's dtype — nothing is silently cast
to fp16. A saved model reloads the same module (layer kind "sparse_linear", `layer_meta` + `rebuild`) without
pruning again.
"""

from __future__ import annotations

import math

import torch

from budgetlm.errors import ModelError
from budgetlm.methods.quant.quantizer import pack, packed_numel, unpack

FORMATS = ("nm", "bitmask")


def position_bits(m: int) -> int:
    """Bits per stored position inside a group of m inputs: ceil(log2 m) (2 for m = 4)."""
    return max(1, math.ceil(math.log2(m)))


def nonzero_bits(w: torch.Tensor) -> torch.Tensor:
    """True where the bit pattern of w is not all zeros (so −0.0 counts as a value to keep)."""
    return w.contiguous().view(torch.uint8).reshape(*w.shape, w.element_size()).ne(0).any(-1)


class SparseLinear(torch.nn.Linear):
    """An nn.Linear holding a pruned weight (zeros where pruned) that saves and loads in a compressed format."""

    layer_kind = "sparse_linear"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        format: str,
        dtype: torch.dtype,
        bias: bool,
        n: int = 0,
        m: int = 0,
    ):
        super().__init__(in_features, out_features, bias=bias, dtype=dtype, device="meta")
        if format not in FORMATS:
            raise ValueError(f"SparseLinear format must be one of {FORMATS}, got {format!r}")
        if format == "nm" and (not 1 <= n < m or in_features % m):
            raise ValueError(f"N:M storage needs 1 <= n < m and m dividing {in_features}; got {n}:{m}")
        self.format, self.n, self.m = format, n, m
        self.weight = torch.nn.Parameter(torch.zeros(out_features, in_features, dtype=dtype))
        if bias:
            self.bias = torch.nn.Parameter(torch.zeros(out_features, dtype=dtype))

    @classmethod
    @torch.no_grad()
    def from_dense(
        cls, weight: torch.Tensor, bias: torch.Tensor | None, format: str, nm: tuple[int, int] | None = None
    ) -> SparseLinear:
        """Hold `weight` (pruned entries 0) for `format`; "nm" needs (n, m) and at most m−n non-zeros per group."""
        out_f, in_f = weight.shape
        if format == "nm" and nm is None:
            raise ValueError("SparseLinear 'nm' storage needs the (n, m) pattern")
        n, m = nm if format == "nm" else (0, 0)
        layer = cls(in_f, out_f, format, weight.dtype, bias is not None, n, m)
        layer.weight.data.copy_(weight.detach())
        if bias is not None:
            layer.bias.data.copy_(bias.detach().to(weight.dtype))
        layer.compressed()  # fail now, not at save time, when the weight does not fit the format
        return layer

    @torch.no_grad()
    def compressed(self) -> dict[str, torch.Tensor]:
        """The tensors the format stores for the current weight: {"values", "positions"} (nm) or {"values",
        "mask"} (bitmask). A weight that no longer fits its N:M pattern (changed after pruning, e.g. by a full
        fine-tune) is a ModelError naming the fix."""
        w = self.weight.detach()
        out_f, in_f = w.shape
        keep = nonzero_bits(w)
        if self.format == "bitmask":
            return {"values": w[keep].clone(), "mask": pack(keep.to(torch.uint8), 1)}
        n, m = self.n, self.m
        groups = keep.reshape(out_f, in_f // m, m)
        if groups.numel() and int(groups.sum(-1).max()) > m - n:
            raise ModelError(
                f"weight is not {n}:{m} sparse any more (a group of {m} holds more than {m - n} non-zeros), so it "
                "cannot be stored in N:M format; prune again, or keep the mask fixed while training"
            )
        # the non-zeros of each group first (stable: in index order), topped up with zeros; then ascending
        pos = torch.sort((~groups).to(torch.uint8), dim=-1, stable=True).indices[..., : m - n]
        pos = torch.sort(pos, dim=-1).values
        values = torch.gather(w.reshape(out_f, in_f // m, m), -1, pos)
        return {"values": values, "positions": pack(pos, position_bits(m))}

    def _decompress(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        """The dense weight [out, in] from the stored tensors, bitwise equal to the one saved."""
        out_f, in_f = self.out_features, self.in_features
        values = parts["values"]
        if self.format == "nm":
            m, kept = self.m, self.m - self.n
            if tuple(values.shape) != (out_f, in_f // m, kept):
                raise ModelError(f"N:M values of shape {tuple(values.shape)} do not fit a {out_f}x{in_f} {self.n}:{m}")
            pos = unpack(parts["positions"], position_bits(m), values.numel()).reshape(out_f, in_f // m, kept)
            w = torch.zeros(out_f, in_f // m, m, dtype=values.dtype)
            w.scatter_(-1, pos.long(), values)
            return w.reshape(out_f, in_f)
        keep = unpack(parts["mask"], 1, in_f * out_f).reshape(out_f, in_f).bool()
        if int(keep.sum()) != values.numel():
            raise ModelError(f"bitmask holds {int(keep.sum())} kept weights but {values.numel()} values are stored")
        return torch.zeros(out_f, in_f, dtype=values.dtype).masked_scatter_(keep, values)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        for name, t in self.compressed().items():
            destination[prefix + name] = t
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        names = ("values", "positions") if self.format == "nm" else ("values", "mask")
        if all(prefix + k in state_dict for k in names):
            parts = {k: state_dict.pop(prefix + k) for k in names}
            state_dict[prefix + "weight"] = self._decompress(parts)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)

    def effective_weight(self) -> torch.Tensor:
        """The dense weight [out, in] the layer computes with (zeros where pruned)."""
        return self.weight.detach()

    def storage_bytes(self) -> int:
        """Bytes of the saved weight tensors: kept values + packed positions or bitmask (bias excluded)."""
        w = self.weight
        if self.format == "nm":
            kept = w.numel() // self.m * (self.m - self.n)
            return kept * w.element_size() + packed_numel(kept, position_bits(self.m))
        nnz = int(nonzero_bits(w.detach()).sum())
        return nnz * w.element_size() + packed_numel(w.numel(), 1)

    def memory_bytes(self) -> int:
        """Bytes of the weight the layer holds and reads in memory (dense), bias excluded."""
        return self.weight.numel() * self.weight.element_size()

    def layer_meta(self) -> dict:
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "format": self.format,
            "dtype": str(self.weight.dtype).removeprefix("torch."),
            "bias": self.bias is not None,
            "n": self.n,
            "m": self.m,
        }

    def extra_repr(self) -> str:
        pattern = f", {self.n}:{self.m}" if self.format == "nm" else ""
        return f"in={self.in_features}, out={self.out_features}, format={self.format}{pattern}, {self.weight.dtype}"


def rebuild(_old: torch.nn.Module, meta: dict) -> SparseLinear:
    """An empty SparseLinear of the saved shape, format and dtype (its tensors are loaded next)."""
    meta = {k: v for k, v in meta.items() if k != "nnz"}  # folders saved before the dense-in-memory layout
    return SparseLinear(**{**meta, "dtype": getattr(torch, meta["dtype"])})
