"""Uniform integer quantisation grids (shared by RTN and later GPTQ/AWQ) and dense bit packing.

Asymmetric, per group of g input weights: scale = (max - min) / (2^b - 1), zero = round(-min / scale),
q = clamp(round(w / scale) + zero, 0, 2^b - 1), w ~ (q - zero) * scale; the range always includes 0.
Symmetric: scale = max|w| / (2^(b-1) - 1), q = clamp(round(w / scale), -2^(b-1), 2^(b-1) - 1), stored
offset by 2^(b-1) so every code is an unsigned b-bit integer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SUPPORTED_BITS = (2, 3, 4, 8)
UNPACK_CHUNK_WORDS = 1 << 18  # 3-bit unpacking works on this many 8-code words at a time


@dataclass
class Grid:
    scales: torch.Tensor  # [out, n_groups] fp32
    zeros: torch.Tensor | None  # [out, n_groups] integer-valued fp32 (asymmetric) or None (symmetric)
    bits: int
    group_size: int  # columns per group (in_features for per-channel)

    @property
    def qmax(self) -> int:
        return 2**self.bits - 1

    def expand(self, t: torch.Tensor, cols: int) -> torch.Tensor:
        return t.repeat_interleave(self.group_size, dim=1)[:, :cols]


def find_grid(w: torch.Tensor, bits: int, group_size: int | None, symmetric: bool) -> Grid:
    """Per-group scales (and zeros) of a [out, in] weight."""
    out_f, in_f = w.shape
    g = group_size or in_f
    wg = w.float().reshape(out_f, in_f // g, g)
    if symmetric:
        amax = wg.abs().amax(-1)
        scale = amax / (2 ** (bits - 1) - 1)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        return Grid(scale, None, bits, g)
    wmin = wg.amin(-1).clamp(max=0)
    wmax = wg.amax(-1).clamp(min=0)
    scale = (wmax - wmin) / (2**bits - 1)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.round(-wmin / scale)
    return Grid(scale, zero, bits, g)


def quantize(w: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Unsigned integer codes [out, in] (uint8) of w on the grid."""
    cols = w.shape[1]
    scale = grid.expand(grid.scales, cols)
    if grid.zeros is None:
        half = 2 ** (grid.bits - 1)
        q = torch.clamp(torch.round(w.float() / scale), -half, half - 1) + half
    else:
        q = torch.clamp(torch.round(w.float() / scale) + grid.expand(grid.zeros, cols), 0, grid.qmax)
    return q.to(torch.uint8)


def dequantize(codes: torch.Tensor, grid: Grid) -> torch.Tensor:
    rows, cols = codes.shape
    if cols % grid.group_size == 0:  # broadcast per group instead of materialising expanded scales
        q = codes.reshape(rows, cols // grid.group_size, grid.group_size).float()  # a new tensor: in place below
        if grid.zeros is None:
            q.sub_(2 ** (grid.bits - 1))
        else:
            q.sub_(grid.zeros.unsqueeze(-1))
        return q.mul_(grid.scales.unsqueeze(-1)).reshape(rows, cols)
    scale = grid.expand(grid.scales, cols)
    if grid.zeros is None:
        return (codes.float() - 2 ** (grid.bits - 1)) * scale
    return (codes.float() - grid.expand(grid.zeros, cols)) * scale


def fake_quantize(w: torch.Tensor, bits: int, group_size: int | None, symmetric: bool) -> torch.Tensor:
    grid = find_grid(w, bits, group_size, symmetric)
    return dequantize(quantize(w, grid), grid)


def packed_numel(n_codes: int, bits: int) -> int:
    """Bytes that n b-bit codes take when packed."""
    return n_codes if bits == 8 else (n_codes + 7) // 8 * bits


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned b-bit codes densely into bytes: every 8 codes take b bytes (little-endian bit order)."""
    flat = codes.reshape(-1).to(torch.int64)
    if bits == 8:
        return flat.to(torch.uint8)
    pad = (-flat.numel()) % 8
    flat = torch.cat([flat, flat.new_zeros(pad)]).reshape(-1, 8)
    word = torch.zeros(flat.shape[0], dtype=torch.int64)
    for i in range(8):
        word |= flat[:, i] << (bits * i)
    out = torch.stack([(word >> (8 * j)) & 0xFF for j in range(bits)], dim=1)
    return out.reshape(-1).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    if bits == 8:
        return packed[:numel]
    if bits in (1, 2, 4):  # whole codes per byte: shift and mask bytes directly (the decode path's fast case)
        per = 8 // bits
        mask = (1 << bits) - 1
        codes = torch.stack([(packed >> (bits * i)) & mask for i in range(per)], dim=1)
        return codes.reshape(-1)[:numel]
    out = torch.empty(packed.numel() // bits * 8, dtype=torch.uint8)
    chunk = UNPACK_CHUNK_WORDS * bits  # bytes per chunk: int32 temporaries stay a few MB whatever the layer's size
    mask = (1 << bits) - 1
    for start in range(0, packed.numel(), chunk):
        by = packed[start : start + chunk].to(torch.int32).reshape(-1, bits)  # 8 codes of 3 bits: int32 words
        word = by[:, 0].clone()
        for j in range(1, bits):
            word |= by[:, j] << (8 * j)
        codes = torch.stack([(word >> (bits * i)) & mask for i in range(8)], dim=1)
        out[start // bits * 8 : start // bits * 8 + codes.numel()] = codes.reshape(-1).to(torch.uint8)
    return out[:numel]
