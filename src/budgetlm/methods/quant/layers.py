"""QuantLinear: a Linear whose weight is stored as packed integer codes plus fp16 scales (and zeros).

Storage is real: `qweight` holds the packed codes (8 codes in b bytes), `scales` fp16 [out, groups],
`zeros` uint8 [out, groups] for asymmetric grids. The forward pass:
- 8-bit symmetric per-channel weights use torch's int8 weight-only kernel (`_weight_int8pack_mm`) for up to
  INT8_KERNEL_MAX_TOKENS tokens (decode): it reads 1 byte per weight and never materialises an fp32 weight; it
  takes bf16 activations, which costs SmolLM2 about 0.1% perplexity against exact dequantisation (13.153 vs
  13.142; fp32 weights 13.109). For more tokens (prefill, scoring) they dequantise and multiply in fp32, which
  measured faster on this CPU (benchmarks/bench_int8.py: the int8 kernel is 1.1-1.7x slower at 512 tokens, 2-4x
  faster for one token on most shapes; torch._int_mm, a W8A8 int8 x int8 product, was 14-40x slower than
  either, so it is not used);
- every other grid dequantises the weight to fp32 for the matmul (exact w.r.t. the stored grid).

Two optional parts (both saved and counted in `storage_bytes`):
- `perm` (int32 [in]): GPTQ act-order without static groups quantises the columns in the order `perm`, so the
  codes and groups are stored for W[:, perm]; `dequantized_weight()` returns the weight in the original order.
- a low-rank correction of rank r (Lo-Bi): `lr_u` fp16 [out, r] and `lr_v` fp16 [r, in]; the layer computes
  y = Q(W) x + lr_u (lr_v x), i.e. the effective weight is Q(W) + lr_u lr_v.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from budgetlm.methods.quant.quantizer import Grid, dequantize, pack, packed_numel, unpack

INT8_KERNEL_MAX_TOKENS = 8  # at most this many tokens per call take the int8 kernel (see the module docstring)


class QuantLinear(torch.nn.Module):
    layer_kind = "quant_linear"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int,
        symmetric: bool,
        bias: bool,
        permuted: bool = False,
        rank: int = 0,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric
        self.register_buffer("perm", torch.arange(in_features, dtype=torch.int32) if permuted else None)
        n_groups = in_features // group_size
        n_codes = in_features * out_features
        if self.int8_kernel:
            self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
        else:
            self.register_buffer("qweight", torch.zeros(packed_numel(n_codes, bits), dtype=torch.uint8))
        self.register_buffer("scales", torch.zeros(out_features, n_groups, dtype=torch.float16))
        zeros = None if symmetric else torch.zeros(out_features, n_groups, dtype=torch.uint8)
        self.register_buffer("zeros", zeros)
        self.bias = torch.nn.Parameter(torch.zeros(out_features)) if bias else None
        self.rank = rank
        self.register_buffer("lr_u", torch.zeros(out_features, rank, dtype=torch.float16) if rank else None)
        self.register_buffer("lr_v", torch.zeros(rank, in_features, dtype=torch.float16) if rank else None)

    @property
    def int8_kernel(self) -> bool:
        return self.bits == 8 and self.symmetric and self.group_size == self.in_features and self.perm is None

    @classmethod
    def from_codes(
        cls,
        codes: torch.Tensor,
        grid: Grid,
        bias: torch.Tensor | None,
        perm: torch.Tensor | None = None,
        correction: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> QuantLinear:
        """A layer holding `codes` on `grid` (for W[:, perm] when `perm` is given), plus an optional low-rank
        correction (U [out, r], V [r, in])."""
        out_f, in_f = codes.shape
        rank = correction[0].shape[1] if correction is not None else 0
        layer = cls(
            in_f, out_f, grid.bits, grid.group_size, grid.zeros is None, bias is not None, perm is not None, rank
        )
        if perm is not None:
            layer.perm.copy_(perm.to(torch.int32))
        if correction is not None:
            layer.lr_u.copy_(correction[0].to(torch.float16))
            layer.lr_v.copy_(correction[1].to(torch.float16))
        if layer.int8_kernel:
            layer.qweight.copy_((codes.to(torch.int16) - 128).to(torch.int8))
        else:
            layer.qweight.copy_(pack(codes, grid.bits))
        layer.scales.copy_(grid.scales.to(torch.float16))
        if grid.zeros is not None:
            layer.zeros.copy_(grid.zeros.to(torch.uint8))
        if bias is not None:
            layer.bias.data.copy_(bias.detach().float())
        return layer

    def grid(self) -> Grid:
        zeros = None if self.zeros is None else self.zeros.float()
        return Grid(self.scales.float(), zeros, self.bits, self.group_size)

    def codes(self) -> torch.Tensor:
        if self.int8_kernel:
            return (self.qweight.to(torch.int16) + 128).to(torch.uint8)
        n = self.in_features * self.out_features
        return unpack(self.qweight, self.bits, n).reshape(self.out_features, self.in_features)

    def dequantized_weight(self) -> torch.Tensor:
        """The quantised weight Q(W) [out, in] in the original column order (without the correction)."""
        w = dequantize(self.codes(), self.grid())
        if self.perm is not None:
            w = w[:, torch.argsort(self.perm.long())]
        return w

    def effective_weight(self) -> torch.Tensor:
        """The weight the layer computes with: Q(W) plus the low-rank correction if any."""
        w = self.dequantized_weight()
        if self.rank:
            w = w + self.lr_u.float() @ self.lr_v.float()
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.int8_kernel and x.numel() <= INT8_KERNEL_MAX_TOKENS * self.in_features:
            flat = x.reshape(-1, self.in_features).to(torch.bfloat16)
            scales = self.scales[:, 0].to(torch.bfloat16)
            y = torch._weight_int8pack_mm(flat, self.qweight, scales).to(x.dtype)
            y = y.reshape(*x.shape[:-1], self.out_features)
            y = y + self.bias if self.bias is not None else y
        else:
            y = F.linear(x, self.dequantized_weight().to(x.dtype), self.bias)
        if self.rank:
            y = y + F.linear(F.linear(x, self.lr_v.to(x.dtype)), self.lr_u.to(x.dtype))
        return y

    def storage_bytes(self) -> int:
        """Bytes of the stored weight: packed codes + scales + zeros + permutation + correction (bias excluded)."""
        tensors = [self.qweight, self.scales, self.zeros, self.perm, self.lr_u, self.lr_v]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def layer_meta(self) -> dict:
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bits": self.bits,
            "group_size": self.group_size,
            "symmetric": self.symmetric,
            "bias": self.bias is not None,
            "permuted": self.perm is not None,
            "rank": self.rank,
        }

    def extra_repr(self) -> str:
        extra = (", act-order" if self.perm is not None else "") + (f", rank={self.rank}" if self.rank else "")
        return f"in={self.in_features}, out={self.out_features}, bits={self.bits}, group={self.group_size}{extra}"


def rebuild(_old: torch.nn.Module, meta: dict) -> QuantLinear:
    """An empty QuantLinear of the saved shape and grid (its tensors are loaded next)."""
    return QuantLinear(
        meta["in_features"],
        meta["out_features"],
        meta["bits"],
        meta["group_size"],
        meta["symmetric"],
        meta["bias"],
        meta.get("permuted", False),
        meta.get("rank", 0),
    )
