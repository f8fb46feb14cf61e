"""QuantLinear: a Linear whose weight is stored as packed integer codes plus fp16 scales (and zeros).

Storage is real: `qweight` holds the packed codes (8 codes in b bytes; int8 [out, in] for 8-bit symmetric
per-channel grids), `scales` fp16 [out, groups], `zeros` uint8 [out, groups] for asymmetric grids. That is the
saved form (the true bits on disk) whatever the layer holds in memory.

The forward pass takes the fastest exact path for its call size (methods/quant/kernels.py: a probe measured on the
host picks the crossover between the kernels and dequantise + GEMM):
- grids of at most 4 bits with a group the 4-bit kernel can express (per-channel grids as repeated groups) take
  torch's int4 kernel for few tokens (decode). On first use the codes are repacked into the kernel's layout and
  the dense `qweight` is dropped from memory: a 2-, 3- or 4-bit layer then holds 4 bits per weight in memory,
  and its state dict (what is saved) is rebuilt from that layout, bit for bit the stored codes;
- 8-bit grids with such a group run as two 4-bit halves through the same kernel (c = 16 hi + lo, 1 byte per
  weight in memory); for 8-bit symmetric per-channel grids torch's int8 kernel is the alternative, and the probe
  takes whichever of the two is faster for one token on the host (on an AMD EPYC: the halves, 4x faster on the
  lm_head);
- every other call (many tokens, or a grid no kernel takes) dequantises the codes to fp32 a block of output rows
  at a time and multiplies in fp32: exact w.r.t. the stored grid.
The kernels take bf16 activations and bf16 scales: benchmarks/bench_decode.py reports the KL of each grid's
kernel path to exact dequantisation; `kernels.kernels_enabled(False)` or BUDGETLM_KERNELS=0 turns them off.
budgetlm's own "q4" and "q8" kernels are exact (float32 activations); "q4a8" (int8 activations, lossy) serves
calls of at most kernels.ACT8_TOKENS tokens only where the process opted in (BUDGETLM_ACT8=1,
`kernels.set_activation_bits(8)`) and the probe timed it fastest, or a block forced it
(`kernels.four_bit_kernel("q4a8")`); the layer's larger calls take "q4" or dequantisation as without it. "q4bf"
(bfloat16 activations, lossy like torch's int4 kernel, exact fp16 tables) is a candidate of the default probe like
"int4"; it serves every call below its own crossover (bf16 dot products: on an AVX-512 BF16 host about twice as
fast as float32 GEMM at every token count probed, so prefill and scoring take it too). "q8bf" (an 8-bit grid's two
4-bit halves on "q4bf", the products added) is a candidate of the 8-bit probe for every 8-bit grid whose halves the
layout takes.

Two optional parts (both saved and counted in `storage_bytes`), kept on every path:
- `perm` (int32 [in]): GPTQ act-order without static groups quantises the columns in the order `perm`, so the
  codes and groups are stored for W[:, perm]; the forward gathers the input's columns in that order (x W^T =
  x[:, perm] W[:, perm]^T) and `dequantized_weight()` returns the weight in the original order.
- a low-rank correction of rank r (Lo-Bi): `lr_u` fp16 [out, r] and `lr_v` fp16 [r, in]; the layer computes
  y = Q(W) x + lr_u (lr_v x), i.e. the effective weight is Q(W) + lr_u lr_v.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from budgetlm.methods.quant import kernels
from budgetlm.methods.quant.quantizer import Grid, dequantize, pack, packed_numel, unpack


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
        # the codes in the int4 kernel's layout with its table: (packed, table), or for 8-bit grids the two halves
        # (packed_hi, table_hi, packed_lo, table_lo); None until the first kernel call
        self._int4: tuple[torch.Tensor, ...] | None = None
        # budgetlm's own kernel's fp16 scale and zero-point tables [in/group, out] ("q4"); when it is the layer's
        # kernel, the bf16 table of torch's (_int4[1]) is dropped and rebuilt only if torch's is chosen again
        self._q4: tuple[torch.Tensor, torch.Tensor] | None = None
        # the decode fast path: (kernels.state() it was chosen under, crossover, bound kernel call) for a layer
        # with no permutation, bias or correction whose kernel is "q4"; rebuilt when the state changes
        self._fast: tuple | None = None
        self._int4_group = kernels.int4_group(bits, group_size, out_features, in_features)

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
        if self._int4 is not None:
            n, k = self.out_features, self.in_features
            if len(self._int4) == 4:
                return kernels.int8_split_codes(self._int4, n, k)
            return kernels.int4_codes(self._int4[0], self.zeros, self.bits, self.group_size, n, k)
        if self.int8_kernel:
            return (self.qweight.to(torch.int16) + 128).to(torch.uint8)
        n = self.in_features * self.out_features
        return unpack(self.qweight, self.bits, n).reshape(self.out_features, self.in_features)

    def row_codes(self, ids: torch.Tensor) -> torch.Tensor:
        """Codes uint8 [len(ids), in] of the output rows `ids` (1-D), read from those rows only (a tied embedding's
        lookup, methods/quant/embedding.py)."""
        if self._int4 is not None:
            if len(self._int4) == 4:
                return kernels.int8_split_row_codes(self._int4, ids, self.out_features, self.in_features)
            args = (self.zeros, self.bits, self.group_size, self.out_features, self.in_features)
            return kernels.int4_row_codes(self._int4[0], ids, *args)
        return packed_row_codes(self.qweight, ids, self.out_features, self.in_features, self.bits)

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

    # -- the forward paths (methods/quant/kernels.py) -----------------------------------------------------------
    @property
    def kernel(self) -> str | None:
        """The kernel this layer's grid takes: "q4" (budgetlm's own 4-bit kernel), "int4" (torch's), "q4bf"
        (budgetlm's with bfloat16 activations) or, opted in, "q4a8" (budgetlm's with int8 activations), whichever
        the host probe measured fastest, for 2-4 bits; for 8-bit grids "int4x2" (two 4-bit halves on torch's
        kernel) or "q8bf" (the halves on q4bf), and for 8-bit symmetric per-channel grids also "int8" (torch's int8
        kernel) and "q8" (budgetlm's own), whichever the probe measured fastest; None (dequantisation only)."""
        if self.bits == 8 and self.int8_kernel:
            kind = kernels.eight_bit(self.out_features, self.in_features)
            if kind == "q8bf" and self._int4_group is None:
                kind = "int8"  # no halves for this shape
            if kind in ("q8", "q8bf") or self._int4 is None or len(self._int4) != 4:
                return kind
            return "int4x2"  # the two halves are packed (the int8 codes dropped): they serve until "q8" is chosen
        if self.bits == 8:
            if self._int4_group is None:
                return None
            # a grouped or asymmetric 8-bit grid: its halves on q4bf where the host's 8-bit probe chose that
            return "q8bf" if kernels.eight_bit(self.out_features, self.in_features) == "q8bf" else "int4x2"
        if self._int4 is not None and len(self._int4) == 4:
            return "int4x2"
        if self._int4_group is None:
            return None
        kind = kernels.four_bit()
        return kind if kind in ("q4", "q4a8", "q4bf") else "int4"

    def _kernel_and_crossover(self) -> tuple[str | None, int]:
        """The kernel in use (None when kernels are off) and the token count from which dense wins."""
        kind = self.kernel if kernels.enabled() else None
        return kind, (kernels.crossover(kind) if kind else 0)

    def path(self, tokens: int) -> str:
        """The path a call with `tokens` tokens takes: "q4", "q4a8", "q4bf", "int4", "q8", "q8bf", "int4x2", "int8"
        or "dense"."""
        kind, cross = self._kernel_and_crossover()
        return _act8_limit(kernels.choose(kind, tokens, cross), tokens)

    def _int4_ready(self) -> bool:
        """Repack the codes into the 4-bit kernel's layout (once) and drop the dense copy from memory."""
        if self._int4 is None:
            if not kernels._layout_matches():
                return False
            self._int4 = self._repack()
            self.qweight = torch.empty(0, dtype=self.qweight.dtype)  # the state dict rebuilds it (_save_to_state_dict)
        return True

    def _int8_codes(self) -> torch.Tensor:
        """The int8 codes "q8" reads: rebuilt from the two 4-bit halves where those served before and dropped them
        (the choice moved to "q8": kernels.prefer_own_kernels)."""
        if self._int4 is not None:
            self.qweight = (self.codes().to(torch.int16) - 128).to(torch.int8)
            self._int4 = self._q4 = None
        return self.qweight

    def _q8bf_tables(self) -> tuple[torch.Tensor, ...]:
        """The "q8bf" kernel's fp16 tables of the two halves (built once); torch's bf16 tables of the halves are
        dropped while it serves (rebuilt by _split_tables if "int4x2" is chosen again)."""
        if self._q4 is None or len(self._q4) != 4:
            self._q4 = kernels.q8bf_tables(self.scales, self.zeros)
            self._int4 = (self._int4[0], None, self._int4[2], None)
        return self._q4

    def _split_tables(self) -> tuple[torch.Tensor, ...]:
        """The halves with torch's bf16 tables, for "int4x2" (rebuilt if q8bf served before and dropped them)."""
        if self._int4[1] is None:
            hi, lo = kernels.int8_split_tables(self.scales, self.zeros, self.group_size, self._int4_group)
            self._int4, self._q4, self._fast = (self._int4[0], hi, self._int4[2], lo), None, None
        return self._int4

    def _q4_tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """budgetlm's kernel's tables (built once); torch's bf16 table is dropped while this kernel serves."""
        if self._q4 is None:
            self._q4 = kernels.q4_table(self.scales, self.zeros, self.bits)
            self._int4 = (self._int4[0], None)
        return self._q4

    def _int4_table(self) -> torch.Tensor:
        """torch's kernel's bf16 table (rebuilt if budgetlm's kernel served before and dropped it)."""
        if self._int4[1] is None:
            table = kernels.int4_table(self.scales, self.zeros, self.bits, self.group_size, self._int4_group)
            self._int4, self._q4, self._fast = (self._int4[0], table), None, None
        return self._int4[1]

    def _repack(self) -> tuple[torch.Tensor, ...]:
        """The kernel's form of the stored codes, built a block of rows at a time (a few MB of temporaries, not
        several bytes per weight of the whole layer: for a 49152-row lm_head that was ~150 MB)."""
        n, k, g = self.out_features, self.in_features, self._int4_group
        b = kernels.block_n()
        step = max(b, kernels.DENSE_BLOCK_WEIGHTS // k // b * b)
        out: list = []
        for r0 in range(0, n, step):
            r1 = min(n, r0 + step)
            codes = packed_row_codes(self.qweight, torch.arange(r0, r1), n, k, self.bits)
            zeros = None if self.zeros is None else self.zeros[r0:r1]
            if self.bits == 8:
                part = kernels.int8_split(codes, self.scales[r0:r1], zeros, self.group_size, g)
            else:
                part = kernels.int4_pack_grid(codes, self.scales[r0:r1], zeros, self.bits, self.group_size, g)
            if not out:  # layouts: [n, k/2] uint8 filled block by block; tables [k/g, n, 2] gathered per block
                out = [torch.empty(n, k // 2, dtype=torch.uint8) if i % 2 == 0 else [] for i in range(len(part))]
            for i, t in enumerate(part):
                if i % 2 == 0:
                    out[i][r0:r1] = t
                else:
                    out[i].append(t)
        return tuple(t if i % 2 == 0 else torch.cat(t, dim=1) for i, t in enumerate(out))

    def _rows(self):
        """weight_rows(r0, r1) for kernels.dense_mm: rows r0:r1 of Q(W) (in the stored column order), float32,
        dequantised from what the layer holds (the int4 layout, int8 codes, or packed codes unpacked once)."""
        k = self.in_features
        if self._int4 is not None and len(self._int4) == 2:
            packed, scales, zeros = self._int4[0], self.scales, self.zeros

            def rows(r0: int, r1: int) -> torch.Tensor:
                z = None if zeros is None else zeros[r0:r1]
                return kernels.int4_dequantize(packed[r0:r1], scales[r0:r1], z, self.bits, self.group_size, r1 - r0, k)

        elif self._int4 is not None:  # the two halves of an 8-bit grid, a block of rows at a time
            parts, grid = self._int4, self.grid()

            def rows(r0: int, r1: int) -> torch.Tensor:
                block = tuple(t[r0:r1] if i % 2 == 0 else t for i, t in enumerate(parts))
                z = None if grid.zeros is None else grid.zeros[r0:r1]
                codes = kernels.int8_split_codes(block, r1 - r0, k)
                return dequantize(codes, Grid(grid.scales[r0:r1], z, grid.bits, grid.group_size))

        elif self.int8_kernel:

            def rows(r0: int, r1: int) -> torch.Tensor:
                return self.qweight[r0:r1].float().mul_(self.scales[r0:r1].float())

        else:
            codes, grid = self.codes(), self.grid()

            def rows(r0: int, r1: int) -> torch.Tensor:
                z = None if grid.zeros is None else grid.zeros[r0:r1]
                return dequantize(codes[r0:r1], Grid(grid.scales[r0:r1], z, grid.bits, grid.group_size))

        return rows

    def _fast_path(self):
        """(state, crossover, call) of the decode fast path, or None where the layer has none (see __init__)."""
        key = kernels.state()
        fast = self._fast
        if fast is not None and fast[0] == key:
            return fast
        self._fast = None
        if self.perm is not None or self.bias is not None or self.rank:
            return None
        kind, cross = self._kernel_and_crossover()
        if kind not in ("q4", "q4a8", "q4bf", "q8", "q8bf") or cross <= 0:
            return None
        if kind == "q8":
            call = kernels.bind_q8(self._int8_codes(), self.scales)
        elif kind == "q8bf" and self._int4_ready():
            call = kernels.bind_q8bf(self._int4, self._q8bf_tables(), self.group_size)
        elif kind == "q4bf" and self._int4_ready():
            call = kernels.bind_q4bf(self._int4[0], *self._q4_tables(), self.group_size)
        elif self._int4_ready():
            call = kernels.bind_q4(self._int4[0], *self._q4_tables(), self.group_size)
            if kind == "q4a8":  # int8 activations for a few tokens, the exact kernel above (below the crossover)
                lossy = kernels.bind_q4a8(self._int4[0], *self._q4, self.group_size)
                exact, few = call, kernels.ACT8_TOKENS

                def call(x: torch.Tensor, exact=exact, lossy=lossy, few=few) -> torch.Tensor:
                    return lossy(x) if x.shape[0] <= few else exact(x)

        else:
            return None
        self._fast = (key, cross, call) if call is not None else None
        return self._fast

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        flat = x.reshape(-1, self.in_features)
        fast = self._fast_path()
        if fast is not None and flat.shape[0] < fast[1] and not (torch.is_grad_enabled() and flat.requires_grad):
            return fast[2](flat).to(x.dtype).view(*lead, self.out_features)
        if self.perm is not None:  # codes are stored for W[:, perm]: x W^T = x[:, perm] W[:, perm]^T
            flat = flat.index_select(1, self.perm.long())
        kind, cross = self._kernel_and_crossover()
        if kind in ("int4", "int4x2", "q4", "q4a8", "q4bf", "q8bf") and cross > 0 and self._int4 is None:
            self._int4_ready()  # the first call of a layer whose kernel pays: every later call, dense too, reads it
        path = _act8_limit(kernels.choose(kind, flat.shape[0], cross), flat.shape[0])
        if torch.is_grad_enabled() and flat.requires_grad:
            path = "dense"  # the kernels have no backward: a gradient through the layer takes the exact path
        if path in ("q4", "q4a8", "q4bf") and self._int4_ready():
            y = kernels.q4_mm(flat, self._int4[0], self._q4_tables(), self.group_size, act8=path == "q4a8",
                              bf16=path == "q4bf")  # fmt: skip
        elif path == "int4" and self._int4_ready():
            y = kernels.int4_mm(flat, self._int4[0], self._int4_group, self._int4_table())
        elif path == "q8bf" and self._int4_ready():
            y = kernels.q8bf_mm(flat, self._int4, self._q8bf_tables(), self.group_size)
        elif path == "int4x2" and self._int4_ready():
            y = kernels.int8_split_mm(flat, self._split_tables(), self._int4_group)
        elif path == "q8" and (call := kernels.bind_q8(self._int8_codes(), self.scales)) is not None:
            y = call(flat).to(x.dtype)
        elif path == "int8":
            y = kernels.int8_mm(flat, self.qweight, self.scales[:, 0].to(torch.bfloat16))
        else:
            y = kernels.dense_mm(flat, self._rows(), self.out_features, self.in_features)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        if self.rank:
            y = y + F.linear(F.linear(x.reshape(-1, self.in_features), self.lr_v.to(x.dtype)), self.lr_u.to(x.dtype))
        return y.reshape(*lead, self.out_features)

    # -- saving: the dense codes, whatever the layer holds in memory ----------------------------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if self._int4 is None:
            return super()._save_to_state_dict(destination, prefix, keep_vars)
        dropped = self.qweight
        codes = self.codes()  # back in the stored form, in its place among the buffers: the same keys, same order
        self.qweight = (codes.to(torch.int16) - 128).to(torch.int8) if self.int8_kernel else pack(codes, self.bits)
        try:
            super()._save_to_state_dict(destination, prefix, keep_vars)
        finally:
            self.qweight = dropped

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if self._int4 is not None:  # back to the dense form the file holds; repacked on the next kernel call
            self._int4 = self._q4 = self._fast = None
            n, k = self.out_features, self.in_features
            if self.int8_kernel:
                self.qweight = torch.zeros(n, k, dtype=torch.int8)
            else:
                self.qweight = torch.zeros(packed_numel(n * k, self.bits), dtype=torch.uint8)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def storage_bytes(self) -> int:
        """Bytes of the stored weight (what the saved file holds): packed codes + scales + zeros + permutation +
        correction (bias excluded)."""
        n = self.in_features * self.out_features
        codes = n if self.int8_kernel else packed_numel(n, self.bits)
        tensors = [self.scales, self.zeros, self.perm, self.lr_u, self.lr_v]
        return codes + sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def memory_bytes(self) -> int:
        """Bytes of the weight a forward reads in memory: with a 4-bit kernel, its layout (4 bits per weight for
        2- and 3-bit grids too) and its table (torch's: bf16 scales and offsets per kernel group; budgetlm's: fp16
        scales and zero points per stored group) instead of the packed codes and fp16 scales/zeros; otherwise what
        is stored. hardware/size.py counts it in read_bytes_per_token."""
        if self._int4_group is None:
            return self.storage_bytes()
        n, k = self.out_features, self.in_features
        if self.kernel in ("int8", "q8"):
            return self.storage_bytes()
        halves = 2 if self.bits == 8 else 1
        q4 = self.kernel in ("q4", "q4a8", "q4bf", "q8bf")
        group = self.group_size if q4 else self._int4_group  # q4, q4a8, q4bf, q8bf: fp16 tables per stored group
        layout = halves * (n * k // 2 + (k // group) * n * 2 * 2)
        extra = [self.perm, self.lr_u, self.lr_v]
        return layout + sum(t.numel() * t.element_size() for t in extra if t is not None)

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


def _act8_limit(path: str, tokens: int) -> str:
    """The q4a8 kernel serves calls of at most kernels.ACT8_TOKENS tokens; a larger one below its crossover (that of
    "q4", kernels.crossover) takes the exact "q4" kernel, else dequantisation."""
    if path == "q4a8" and tokens > kernels.ACT8_TOKENS:
        return "q4" if tokens < kernels.crossover("q4") else "dense"
    return path


def packed_row_codes(qweight: torch.Tensor, ids: torch.Tensor, n: int, k: int, bits: int) -> torch.Tensor:
    """Codes uint8 [len(ids), k] of rows `ids` of a stored code tensor: int8 [n, k] (8-bit symmetric per channel)
    or codes packed 8 per `bits` bytes in row-major order (whole bytes per row)."""
    if qweight.dtype == torch.int8 and qweight.shape == (n, k):
        return (qweight[ids].to(torch.int16) + 128).to(torch.uint8)
    per_row = k * bits // 8
    if qweight.dtype == torch.uint8 and qweight.ndim == 1 and (k * bits) % 8 == 0 and qweight.numel() == n * per_row:
        rows = qweight.view(n, per_row)[ids]
        return unpack(rows.reshape(-1), bits, ids.numel() * k).reshape(-1, k)
    raise RuntimeError(
        f"cannot read rows of a {tuple(qweight.shape)} {qweight.dtype} code tensor for a {n}x{k} {bits}-bit grid"
    )


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
