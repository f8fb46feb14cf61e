"""nf4: QLoRA's 4-bit NormalFloat weight quantisation (Dettmers et al., arXiv 2305.14314), with optional double
quantisation of the block constants, into real packed storage.

Format of one layer (weight W [out, in], flattened row-major into n = out*in values):
- blocks of `block_size` consecutive values of the flattened weight (as in QLoRA / bitsandbytes). A block may
  span the end of one row and the start of the next, so `block_size` need not divide `in_features`; when it does
  not divide n the last block is shorter (its absmax is over its own values). This is the documented rule for
  widths such as 576 with block 128: nothing is rejected but a non-positive block size.
- absmax a_b = max |w| of block b; every value gets the index of the nearest of the 16 NF4 codebook values to
  w / a_b; dequantised w = NF4[idx] * a_b.
- `qweight` uint8 [ceil(n/2)]: the 4-bit indices, two per byte, value 2j in the low nibble and 2j+1 in the high
  nibble (the same byte layout as quantizer.pack(codes, 4)); an odd n leaves the last high nibble 0.
- without double quantisation: `absmax` fp32 [n_blocks]  -> 4 + 32/64 = 4.5 bits/weight at block 64.
- with double quantisation (QLoRA section 3): the absmax values are mean-centred, c_b = a_b - mean(a), and c is
  quantised to 8 bits in blocks of 256 constants: s_k = max |c| over the block / 127, q_b = round(c_b / s_k) in
  [-127, 127], stored as uint8 q_b + 128 (`absmax_q`), with `absmax_scale` fp32 [ceil(n_blocks/256)] and
  `absmax_mean` fp32 [1]; the decoded absmax is mean + s_k*q_b, within s_k/2 of a_b.
  4 + 8/64 + 32/(64*256) ≈ 4.127 bits/weight at block 64 (+ 32 bits of mean per layer).
  Departure from the paper: QLoRA quantises the centred constants with 8-bit *floats* (bitsandbytes' dynamic
  map); here the 8-bit grid is linear (symmetric int8), which gives a hard error bound of half a step on every
  absmax and the same storage.
- the 4-bit index of a value is chosen against the absmax the layer will decode with (the double-quantised one
  when double quantisation is on), so it is the nearest representable value; without double quantisation this is
  exactly QLoRA's round(w / a_b) to the nearest code.

Forward: two computations of the same codes.
- exact (`forward_exact`): dequantise the whole weight (byte-LUT gather * block absmax) to fp32, then F.linear. Taken
  whenever autograd is on (training, QLoRA), for a layer bitsandbytes cannot hold (out_features not a multiple of 32,
  in_features not a multiple of block_size), with BUDGETLM_NF4_KERNEL=exact, without bitsandbytes, and where it lost
  the probe below.
- bitsandbytes (`forward_bnb`; optional extra `bnb`, pinned 0.50.2), only under torch.no_grad / inference_mode: the
  layer's codes and decoded absmax (double quantisation already undone) go once into a bnb.nn.Linear4bit kept beside
  the module (not a submodule, not saved, rebuilt when the stored tensors change; ~0.5 byte per weight more in
  memory). On an AVX512-BF16 CPU its CPU path repacks the codes for a fused kernel bundled in its wheel that reads
  the 4-bit weights directly: absmax and activations rounded to bf16, fp32 accumulation, bf16 output, so it is *not*
  exact but within bf16 rounding: every output within 2^-7 * sum_j |x_j w_j| of the exact product (`bf16_tolerance`;
  measured max abs error 5e-3 to 1.5e-2 on outputs of magnitude 2-3.5, as large as F.linear in bf16 on the
  dequantised weight). bitsandbytes' NF4 codebook, block order and absmax rule are budgetlm's (its quantize_4bit
  gives the very codes and absmax of double_quant=False; its own double quantisation uses an 8-bit float map, so
  budgetlm hands it the decoded absmax instead). On import its CPU backend asks the `kernels` package for a kernel
  from the Hugging Face hub; `_bnb_module` closes that import, so it runs offline on the bundled kernel.
  Which path serves a no-grad call is measured, never read from CPU flags: the first such call of the process probes
  a 1536x576 layer (1 token for calls of <= DECODE_TOKENS tokens, 128 tokens for larger ones; 9 interleaved rounds,
  after checking the agreement above) and caches the verdict; BUDGETLM_NF4_KERNEL=auto|exact|bnb overrides it.
  Figures (benchmarks/bench_nf4.py, AMD EPYC with AVX512-BF16, 1 thread, a shared machine at load average ~5; ms per
  call, dequantise+GEMM -> bitsandbytes fused, fp32 nn.Linear for reference):
      576x576    1 token 0.60 -> 0.075 (fp32 0.12)   64 tokens 1.8 -> 0.48 (0.65)   512 tokens 8.5 -> 3.2 (7.7)
      1536x576   1 token 1.9  -> 0.11  (0.35)        64 tokens 2.9 -> 1.06 (1.56)   512 tokens 14.3 -> 7.5 (10.9)
      576x1536   1 token 1.5  -> 0.10  (0.29)        64 tokens 2.9 -> 0.91 (1.42)   512 tokens 18.9 -> 11.7 (15.2)
      49152x576  1 token 371  -> 1.3   (33.5)        64 tokens 665 -> 93  (259)     512 tokens 2844 -> 1206 (2046)
  so the fused kernel is 5-100x faster for decode and 1.2-2.6x for 512-token prefill, and faster than fp32 too;
  whole-model greedy decode of SmolLM2-135M after `nf4` (1 thread, load average ~8): 557 ms/token exact, 105 with
  the bnb path, 83 with bnb.nn.Linear4bit modules swapped in (no budgetlm wrapper), 138 for the fp32 model.
  No faster *exact* path was found: torch's own gathers cost 1-3 ns per weight (dequantising in row chunks that
  stay in cache helps only the 49152-row lm_head, 2-3x, still far slower than fp32), and torch's
  _weight_int4pack_mm_for_cpu takes uniform int4 codes with a scale and zero per group, which cannot represent NF4's
  non-uniform codebook exactly.
"""

from __future__ import annotations

import logging
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from pydantic import field_validator

from budgetlm.errors import ConfigError, ModelError
from budgetlm.methods.base import (
    MethodConfig,
    StepContext,
    StepReport,
    implements,
    register_method,
    select_linears,
    set_module,
)
from budgetlm.methods.quant import kernels
from budgetlm.models.handle import ModelHandle
from budgetlm.progress import track

# QLoRA's NormalFloat-4 codebook: quantiles of N(0, 1) (8 positive, 7 negative, an exact zero), scaled to [-1, 1].
NF4_CODEBOOK = torch.tensor(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=torch.float32,
)
_MIDPOINTS = (NF4_CODEBOOK[1:] + NF4_CODEBOOK[:-1]) / 2
# byte -> the code values of its low and high nibble: dequantising is one gather per byte
_BYTE_LUT = torch.stack([NF4_CODEBOOK[torch.arange(256) & 15], NF4_CODEBOOK[torch.arange(256) >> 4]], dim=1)
DQ_BLOCK = 256  # absmax constants per second-level block


@register_method("nf4")
class NF4(MethodConfig):
    """QLoRA NormalFloat-4 weight quantisation (absmax blocks, optional 8-bit double quantisation of the scales)."""

    block_size: int = 64  # consecutive weights of the flattened [out, in] weight per absmax
    double_quant: bool = True  # 8-bit, mean-centred absmax in blocks of 256

    @field_validator("block_size")
    @classmethod
    def _block(cls, v: int) -> int:
        if v <= 0:
            raise ValueError("block_size must be a positive integer (64 is QLoRA's)")
        return v


# ---------------------------------------------------------------------------------------------- primitives


def nf4_codes(x: torch.Tensor) -> torch.Tensor:
    """Index (uint8, 0..15) of the nearest NF4 codebook value to each entry of x (x normally in [-1, 1]);
    a value exactly half-way between two codes takes the lower one."""
    return torch.bucketize(x.float().contiguous(), _MIDPOINTS, right=False).to(torch.uint8)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes per byte: codes[2j] in the low nibble, codes[2j+1] in the high nibble."""
    flat = codes.reshape(-1).to(torch.uint8)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    pairs = flat.reshape(-1, 2)
    return pairs[:, 0] | (pairs[:, 1] << 4)


def unpack_nibbles(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of pack_nibbles: the first `numel` codes (uint8)."""
    out = torch.stack([packed & 0x0F, packed >> 4], dim=1).reshape(-1)
    return out[:numel]


def n_blocks(numel: int, block_size: int) -> int:
    return -(-numel // block_size)


def double_quantize(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes uint8 [n], scales fp32 [ceil(n/256)], mean fp32 [1]) of the mean-centred absmax constants."""
    absmax = absmax.float()
    mean = absmax.mean().reshape(1)
    c = absmax - mean
    nb = absmax.numel()
    n_dq = n_blocks(nb, DQ_BLOCK)
    padded = torch.cat([c, c.new_zeros(n_dq * DQ_BLOCK - nb)]).reshape(n_dq, DQ_BLOCK)
    scale = padded.abs().amax(1) / 127
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.clamp(torch.round(padded / scale[:, None]), -127, 127)
    codes = (q + 128).to(torch.uint8).reshape(-1)[:nb]
    return codes, scale, mean


def double_dequantize(codes: torch.Tensor, scale: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    q = codes.float() - 128
    s = scale.float().repeat_interleave(DQ_BLOCK)[: codes.numel()]
    return q * s + mean.float()


# ---------------------------------------------------------------------------------------------- layer


class NF4Linear(torch.nn.Module):
    """A Linear whose weight is stored as packed NF4 indices plus (optionally double-quantised) block absmax."""

    layer_kind = "nf4_linear"

    def __init__(
        self, in_features: int, out_features: int, block_size: int = 64, double_quant: bool = True, bias: bool = False
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.block_size, self.double_quant = block_size, double_quant
        numel = in_features * out_features
        nb = n_blocks(numel, block_size)
        self.register_buffer("qweight", torch.zeros((numel + 1) // 2, dtype=torch.uint8))
        if double_quant:
            self.register_buffer("absmax", None)
            self.register_buffer("absmax_q", torch.zeros(nb, dtype=torch.uint8))
            self.register_buffer("absmax_scale", torch.zeros(n_blocks(nb, DQ_BLOCK), dtype=torch.float32))
            self.register_buffer("absmax_mean", torch.zeros(1, dtype=torch.float32))
        else:
            self.register_buffer("absmax", torch.zeros(nb, dtype=torch.float32))
            self.register_buffer("absmax_q", None)
            self.register_buffer("absmax_scale", None)
            self.register_buffer("absmax_mean", None)
        self.bias = torch.nn.Parameter(torch.zeros(out_features)) if bias else None

    @property
    def n_blocks(self) -> int:
        return n_blocks(self.in_features * self.out_features, self.block_size)

    @classmethod
    @torch.no_grad()
    def from_weight(
        cls,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        block_size: int = 64,
        double_quant: bool = True,
    ) -> NF4Linear:
        """Quantise a [out, in] weight (and keep an optional bias in fp32)."""
        if weight.dim() != 2:
            raise ValueError(f"nf4 quantises 2-D [out, in] weights; got shape {tuple(weight.shape)}")
        out_f, in_f = weight.shape
        layer = cls(in_f, out_f, block_size, double_quant, bias is not None)
        flat = weight.detach().float().reshape(-1)
        numel = flat.numel()
        nb = layer.n_blocks
        blocks = torch.cat([flat, flat.new_zeros(nb * block_size - numel)]).reshape(nb, block_size)
        absmax = blocks.abs().amax(1)
        if double_quant:
            q, s, m = double_quantize(absmax)
            layer.absmax_q.copy_(q)
            layer.absmax_scale.copy_(s)
            layer.absmax_mean.copy_(m)
            decoded = double_dequantize(q, s, m)
        else:
            layer.absmax.copy_(absmax)
            decoded = absmax
        # nearest representable value NF4[k] * decoded: the nearest code to w / decoded (any sign); 0 -> code 0.0
        denom = torch.where(decoded != 0, decoded, torch.ones_like(decoded))
        x = torch.where(decoded[:, None] != 0, blocks / denom[:, None], torch.zeros_like(blocks))
        codes = nf4_codes(x).reshape(-1)[:numel]
        layer.qweight.copy_(pack_nibbles(codes))
        if bias is not None:
            layer.bias.data.copy_(bias.detach().float())
        return layer

    def codes(self) -> torch.Tensor:
        """The 4-bit indices [out, in] (uint8)."""
        n = self.in_features * self.out_features
        return unpack_nibbles(self.qweight, n).reshape(self.out_features, self.in_features)

    def block_absmax(self) -> torch.Tensor:
        """The absmax each block decodes with (fp32 [n_blocks]; double-dequantised when double_quant)."""
        if self.double_quant:
            return double_dequantize(self.absmax_q, self.absmax_scale, self.absmax_mean)
        return self.absmax.float()

    def dequantized_weight(self) -> torch.Tensor:
        """The quantised weight [out, in] in fp32: NF4[idx] * absmax of its block."""
        n = self.in_features * self.out_features
        nb, bs = self.n_blocks, self.block_size
        lut = _BYTE_LUT.to(self.qweight.device)
        values = lut.index_select(0, self.qweight.to(torch.int32)).view(-1)  # both nibbles of every byte, in order
        if values.numel() < nb * bs:
            values = torch.cat([values, values.new_zeros(nb * bs - values.numel())])
        values = values[: nb * bs].view(nb, bs).mul_(self.block_absmax()[:, None])
        return values.view(-1)[:n].view(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _use_bnb(self, x):
            return self.forward_bnb(x)
        return self.forward_exact(x)

    def forward_exact(self, x: torch.Tensor) -> torch.Tensor:
        """The exact product: dequantise the whole weight to fp32, then F.linear in x's dtype."""
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized_weight().to(x.dtype), bias)

    def forward_bnb(self, x: torch.Tensor) -> torch.Tensor:
        """bitsandbytes' fused CPU kernel on these very codes (bf16 activations, bf16 absmax, bf16 output; see the
        module docstring). Only without autograd; callers check `bnb_supported` first."""
        y = self._bnb_linear()(x)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def bnb_supported(self) -> bool:
        """Whether bitsandbytes' fused CPU kernel can hold this layer: its repacking wants out_features a multiple
        of 32 and whole blocks per row (in_features a multiple of block_size, and even)."""
        return (
            self.out_features % 32 == 0
            and self.in_features % self.block_size == 0
            and self.in_features % 2 == 0
            and self.qweight.device.type == "cpu"
            and _bnb_module() is not None
        )

    def _bnb_linear(self) -> torch.nn.Module:
        """A bnb.nn.Linear4bit holding this layer's codes and decoded absmax, built on first use and rebuilt when the
        stored tensors change (load_state_dict, .to()). Kept out of the module tree: not a submodule, not saved."""
        tensors = (self.qweight, self.absmax, self.absmax_q, self.absmax_scale, self.absmax_mean)
        key = tuple((t.data_ptr(), -1 if t.is_inference() else t._version) for t in tensors if t is not None)
        cached = self.__dict__.get("_bnb_cache")
        if cached is not None and cached[0] == key:
            return cached[1]
        self.__dict__["_bnb_cache"] = None
        lin = _to_bnb_linear(self.codes(), self.block_absmax(), self.block_size)
        self.__dict__["_bnb_cache"] = (key, lin)
        return lin

    def storage_bytes(self) -> int:
        """Bytes of the stored weight: packed indices + block constants (bias excluded)."""
        tensors = [self.qweight, self.absmax, self.absmax_q, self.absmax_scale, self.absmax_mean]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def bits_per_weight(self) -> float:
        return self.storage_bytes() * 8 / (self.in_features * self.out_features)

    def layer_meta(self) -> dict:
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "block_size": self.block_size,
            "double_quant": self.double_quant,
            "dq_block_size": DQ_BLOCK,
            "bias": self.bias is not None,
        }

    def __getstate__(self):
        state = super().__getstate__()
        state.pop("_bnb_cache", None)  # a copy rebuilds its own on first use
        return state

    def extra_repr(self) -> str:
        dq = ", double_quant" if self.double_quant else ""
        return f"in={self.in_features}, out={self.out_features}, block={self.block_size}{dq}"


def rebuild(_old: torch.nn.Module, meta: dict) -> NF4Linear:
    """An empty NF4Linear of the saved shape and format (its tensors are loaded next)."""
    if meta.get("dq_block_size", DQ_BLOCK) != DQ_BLOCK:
        raise ModelError(
            f"nf4_linear saved with absmax blocks of {meta['dq_block_size']}; this budgetlm reads {DQ_BLOCK}: "
            "re-quantise the model with this version"
        )
    return NF4Linear(meta["in_features"], meta["out_features"], meta["block_size"], meta["double_quant"], meta["bias"])


# ---------------------------------------------------------------------------------------------- bitsandbytes path

logger = logging.getLogger(__name__)
KERNEL_ENV = "BUDGETLM_NF4_KERNEL"  # auto (default): bnb where importable and measured faster; exact; bnb
DECODE_TOKENS = 16  # calls with at most this many tokens follow the 1-token probe, larger ones the 128-token probe
PROBE_SHAPE = (1536, 576)  # [out, in] of the probe layer: SmolLM2-135M's gate/up projection
_UNTRIED = object()
_bnb: object = _UNTRIED  # the bitsandbytes module, None when it cannot be imported
_faster: dict[bool, bool] = {}  # decode? -> the probe's verdict, once per process


def _bnb_module():
    """bitsandbytes, imported once with its hub kernel path closed, or None. On an AVX512-BF16 CPU its CPU backend
    runs `from kernels import get_kernel` at import and would fetch a kernel from the Hugging Face hub; with
    sys.modules["kernels"] = None that import fails at once and bitsandbytes keeps the kernel bundled in its wheel
    (its warning about it is silenced). Has no effect when bitsandbytes was already imported elsewhere."""
    global _bnb
    if _bnb is _UNTRIED:
        _bnb = None
        saved = sys.modules.get("kernels", _UNTRIED)
        quiet = logging.getLogger("bitsandbytes")
        level = quiet.level
        if "bitsandbytes" not in sys.modules:
            sys.modules["kernels"] = None
            quiet.setLevel(logging.ERROR)
        try:
            import bitsandbytes

            _bnb = bitsandbytes
        except Exception as exc:  # not installed, or a build that does not load here
            logger.debug("bitsandbytes unavailable: %s", exc)
        finally:
            quiet.setLevel(level)
            if saved is _UNTRIED:
                sys.modules.pop("kernels", None)
            else:
                sys.modules["kernels"] = saved
    return _bnb


def _to_bnb_linear(
    codes: torch.Tensor,
    absmax: torch.Tensor,
    block_size: int,
    compute_dtype: torch.dtype = torch.bfloat16,
    fused: bool = True,
) -> torch.nn.Module:
    """A bnb.nn.Linear4bit (nf4, no bias) over NF4 indices [out, in] and their fp32 block absmax, in eval mode and
    already repacked for its fused CPU kernel (`fused=False` keeps bnb's dequantise + F.linear path instead; used by
    benchmarks/bench_nf4.py). bitsandbytes packs the first value of each pair in the *high* nibble (budgetlm: low);
    its NF4 codebook, block order and absmax rule are budgetlm's."""
    bnb = _bnb_module()
    out_f, in_f = codes.shape
    with torch.inference_mode(False), torch.no_grad():
        flat = codes.reshape(-1).to(torch.uint8)
        packed = ((flat[0::2] << 4) | flat[1::2]).reshape(-1, 1)
        state = bnb.functional.QuantState(
            absmax=absmax.float().contiguous().clone(),
            shape=torch.Size([out_f, in_f]),
            code=bnb.functional.get_4bit_type("nf4", device="cpu"),
            blocksize=block_size,
            quant_type="nf4",
            dtype=torch.bfloat16,
        )
        lin = bnb.nn.Linear4bit(
            in_f, out_f, False, compute_dtype, compress_statistics=False, quant_type="nf4", device="meta"
        )
        lin.weight = bnb.nn.Params4bit(
            packed,
            requires_grad=False,
            quant_state=state,
            blocksize=block_size,
            compress_statistics=False,
            quant_type="nf4",
            bnb_quantized=True,
            module=lin,
        )
        lin.quant_state = state
        lin.eval()
        lin.support_avx512bf16_for_cpu = lin.support_avx512bf16_for_cpu and fused
        lin(torch.zeros(1, in_f, dtype=compute_dtype))  # the first call repacks into the kernel's layout
    return lin


def bf16_tolerance(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Per output, 2^-7 * sum_j |x_j| |w_j|: four bf16 half-ulps (x, absmax and the output rounded to bf16, fp32
    accumulation), the bound the bnb path is held to against the exact product."""
    return (x.abs().float() @ weight.abs().float().t()) * 2.0**-7


def _probe(decode: bool) -> bool:
    """Whether bnb's path is faster than dequantise + GEMM on this host (median of interleaved rounds on a
    PROBE_SHAPE layer, 1 or 128 tokens) and agrees with the exact product within bf16_tolerance."""
    out_f, in_f = PROBE_SHAPE
    g = torch.Generator().manual_seed(0)
    layer = NF4Linear.from_weight(torch.randn(out_f, in_f, generator=g) * 0.02)
    if not layer.bnb_supported():
        return False
    x = torch.randn(1 if decode else 128, in_f, generator=g)
    with torch.inference_mode():
        try:
            fast = layer.forward_bnb(x)
        except Exception as exc:
            logger.info("nf4: bitsandbytes' kernel failed on this host (%s); dequantising", exc)
            return False
        exact = layer.forward_exact(x)
        if not bool(((fast - exact).abs() <= bf16_tolerance(x, layer.dequantized_weight())).all()):
            logger.info("nf4: bitsandbytes' output is off by more than bf16 rounding; dequantising")
            return False
        times: dict[str, list[float]] = {"exact": [], "bnb": []}
        for _ in range(9):
            for name, fn in (("exact", layer.forward_exact), ("bnb", layer.forward_bnb)):
                t0 = time.perf_counter()
                fn(x)
                times[name].append(time.perf_counter() - t0)
    exact_ms, bnb_ms = (statistics.median(times[k]) * 1e3 for k in ("exact", "bnb"))
    logger.info("nf4 probe (%d tokens): dequantise+GEMM %.3f ms, bitsandbytes %.3f ms", x.shape[0], exact_ms, bnb_ms)
    return bnb_ms < exact_ms


def kernel_mode() -> str:
    mode = os.environ.get(KERNEL_ENV, "auto").strip().lower() or "auto"
    if mode not in ("auto", "exact", "bnb"):
        raise ConfigError(f"{KERNEL_ENV}={mode!r}: use auto, exact or bnb")
    return mode


def _use_bnb(layer: NF4Linear, x: torch.Tensor) -> bool:
    """bnb's kernel serves a forward only without autograd (torch.no_grad / inference_mode), on CPU, for a layer it
    can hold, and (mode auto) when this process's probe for that token regime found it faster and close enough.
    BUDGETLM_KERNELS=0 (methods/quant/kernels.py: every quantised layer exact) turns it off too."""
    if torch.is_grad_enabled() or x.device.type != "cpu" or not x.is_floating_point():
        return False
    mode = kernel_mode()
    if mode == "exact" or not kernels.enabled() or not layer.bnb_supported():
        return False
    if mode == "bnb":
        return True
    decode = x.numel() <= DECODE_TOKENS * layer.in_features
    if decode not in _faster:
        _faster[decode] = _probe(decode)
    return _faster[decode]


# ---------------------------------------------------------------------------------------------- reusable helpers


def nf4_quantize_weight(
    w: torch.Tensor, block_size: int = 64, double_quant: bool = True, bias: torch.Tensor | None = None
) -> NF4Linear:
    """An NF4Linear holding the NF4 quantisation of a [out, in] weight (QLoRA's frozen base)."""
    return NF4Linear.from_weight(w, bias, block_size, double_quant)


def to_nf4_linear(linear: torch.nn.Linear, block_size: int = 64, double_quant: bool = True) -> NF4Linear:
    """The NF4 replacement of an nn.Linear (weight quantised, bias kept in fp32)."""
    return NF4Linear.from_weight(linear.weight, linear.bias, block_size, double_quant)


# ---------------------------------------------------------------------------------------------- method


@implements(NF4)
@torch.no_grad()
def apply(handle: ModelHandle, cfg: NF4, ctx: StepContext) -> StepReport:
    targets = select_linears(handle.model, cfg)
    stats = {}
    total_bytes = total_weights = 0
    for name, lin in track(targets, "nf4", label=lambda _, t: t[0], enabled=ctx.progress, throttled=True):
        w = lin.weight.data.float()
        layer = to_nf4_linear(lin, cfg.block_size, cfg.double_quant)
        err = (layer.dequantized_weight() - w).pow(2).mean() / w.pow(2).mean().clamp_min(1e-12)
        set_module(handle.model, name, layer)
        stats[name] = {"rel_mse": float(err), "bits_per_weight": layer.bits_per_weight()}
        total_bytes += layer.storage_bytes()
        total_weights += w.numel()
    bpw = total_bytes * 8 / total_weights
    dq = "with" if cfg.double_quant else "without"
    notes = [
        f"quantised {len(targets)} Linear modules to NF4, block {cfg.block_size}, {dq} double quantisation: "
        f"{bpw:.4f} bits/weight including the block constants"
    ]
    return StepReport("nf4", cfg.model_dump(), stats=stats, notes=notes)
