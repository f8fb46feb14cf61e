"""nf4 (QLoRA NormalFloat-4) and its packed storage, against references written independently here."""

import numpy as np
import pytest
import torch
from scipy.stats import norm

from budgetlm.errors import ConfigError
from budgetlm.methods.base import apply_steps
from budgetlm.methods.quant.nf4 import (
    NF4_CODEBOOK,
    NF4Linear,
    nf4_quantize_weight,
    pack_nibbles,
    to_nf4_linear,
    unpack_nibbles,
)
from budgetlm.methods.quant.quantizer import pack
from budgetlm.models.sources import load

# the 16 values listed in METHODS.md (QLoRA's NF4 codebook as float32)
METHODS_MD = [
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
]


def qlora_codebook() -> np.ndarray:
    """QLoRA's construction (paper, section 3 "4-bit NormalFloat"): quantiles of N(0, 1) for an asymmetric 4-bit
    type with an exact zero: 2^(k-1) = 8 quantiles for the positive half and 2^(k-1) - 1 = 7 for the negative
    half, each taken between probability 1/2 and the outermost level delta = 1/2*((1 - 1/(2*15)) + (1 - 1/(2*16)))
    (the mean of the outermost quantile levels of a 15- and a 16-level equal-area split, which keeps the
    extremes finite), plus 0, normalised to [-1, 1] by the largest magnitude."""
    delta = 0.5 * ((1 - 1 / 30) + (1 - 1 / 32))
    pos = norm.ppf(np.linspace(delta, 0.5, 9)[:-1])
    neg = -norm.ppf(np.linspace(delta, 0.5, 8)[:-1])
    v = np.sort(np.concatenate([pos, [0.0], neg]))
    return v / np.abs(v).max()


CB = torch.tensor(METHODS_MD, dtype=torch.float64)


def ref_absmax_dq(a: torch.Tensor) -> torch.Tensor:
    """Linear symmetric 8-bit quantisation of the mean-centred constants, per 256, decoded (float64)."""
    a = a.double()
    mean = a.mean()
    c = a - mean
    out = torch.empty_like(a)
    for k0 in range(0, a.numel(), 256):
        blk = c[k0 : k0 + 256]
        s = blk.abs().max() / 127
        s = s if s > 0 else torch.tensor(1.0, dtype=torch.float64)
        out[k0 : k0 + 256] = torch.round(blk / s).clamp(-127, 127) * s + mean
    return out


def ref_nf4(w: torch.Tensor, block: int, double_quant: bool) -> torch.Tensor:
    """Blocks of `block` consecutive values of the flattened weight (last one shorter); nearest code value."""
    flat = w.double().reshape(-1)
    starts = list(range(0, flat.numel(), block))
    absmax = torch.stack([flat[s : s + block].abs().max() for s in starts])
    if double_quant:
        absmax = ref_absmax_dq(absmax)
    out = torch.empty_like(flat)
    for s, a in zip(starts, absmax):
        x = flat[s : s + block]
        recon = CB[None, :] * a  # every representable value of this block
        idx = (x[:, None] - recon).abs().argmin(1)
        out[s : s + block] = recon[0, idx]
    return out.reshape(w.shape)


def test_codebook_is_methods_md_and_the_qlora_construction():
    assert NF4_CODEBOOK.dtype == torch.float32 and NF4_CODEBOOK.numel() == 16
    assert NF4_CODEBOOK.tolist() == torch.tensor(METHODS_MD, dtype=torch.float32).tolist()
    built = qlora_codebook()
    assert np.abs(NF4_CODEBOOK.numpy().astype(np.float64) - built).max() < 1e-6
    assert (NF4_CODEBOOK == 0).sum() == 1 and (NF4_CODEBOOK > 0).sum() == 8 and (NF4_CODEBOOK < 0).sum() == 7


def test_hand_made_block_gets_the_nearest_code():
    row = torch.tensor([0.5, -0.3, 0.0, 2.0, 0.04, -1.98, 0.2, -0.1, 1.5, -0.75, 0.33, 0.9, -0.01, 0.61, -1.2, 1.1])
    lay = NF4Linear.from_weight(row.reshape(2, 8), block_size=8, double_quant=False)
    codes = lay.codes().reshape(-1)
    for b in range(2):
        blk = row[8 * b : 8 * b + 8].double()
        a = blk.abs().max()
        assert lay.absmax[b] == a.float()
        expect = (blk[:, None] / a - CB[None, :]).abs().argmin(1)
        assert codes[8 * b : 8 * b + 8].tolist() == expect.tolist()
    # 2.0 / 2.0 = 1 -> code 15; 0.0 -> code 7 (the exact zero); 0.04/2 = 0.02 is nearest 0.0
    assert codes[3] == 15 and codes[2] == 7 and codes[4] == 7
    assert torch.allclose(
        lay.dequantized_weight().reshape(-1).double(),
        CB[codes.long()] * torch.tensor([2.0] * 8 + [1.5] * 8, dtype=torch.float64),
        atol=1e-7,
    )


@pytest.mark.parametrize("shape,block,dq", [((24, 40), 64, False), ((24, 40), 48, True), ((7, 9), 10, False)])
def test_dequantised_weight_matches_reference(shape, block, dq):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(*shape, generator=g) * torch.rand(shape[0], 1, generator=g)
    lay = nf4_quantize_weight(w, block_size=block, double_quant=dq)
    assert lay.bias is None and lay.in_features == shape[1] and lay.out_features == shape[0]
    ref = ref_nf4(w, block, dq)
    assert (lay.dequantized_weight().double() - ref).abs().max() < 1e-6


def test_double_quantised_absmax_within_half_an_8bit_step():
    g = torch.Generator().manual_seed(2)
    # 600 blocks of 64 with very different scales: 3 second-level blocks, the last one partial (88 constants)
    w = torch.randn(600, 64, generator=g) * torch.exp(torch.randn(600, 1, generator=g))
    lay = NF4Linear.from_weight(w, block_size=64, double_quant=True)
    assert lay.absmax is None and lay.absmax_q.dtype == torch.uint8 and lay.absmax_q.numel() == 600
    assert lay.absmax_scale.dtype == torch.float32 and lay.absmax_scale.numel() == 3
    assert lay.absmax_mean.dtype == torch.float32 and lay.absmax_mean.numel() == 1
    true = w.double().abs().amax(1)
    centred = true - true.mean()
    step = torch.cat([centred[k : k + 256].abs().max().repeat(min(256, 600 - k)) / 127 for k in range(0, 600, 256)])
    got = lay.block_absmax().double()
    err = (got - true).abs()
    assert (err <= step / 2 * (1 + 1e-5) + 1e-7).all()
    assert err.max() > 0.01 * step.max()  # really quantised, not stored exactly
    # the stored tensors decode as mean + scale * (code - 128), written out here
    scale = lay.absmax_scale.double().repeat_interleave(256)[:600]
    decoded = lay.absmax_mean.double() + scale * (lay.absmax_q.double() - 128)
    assert torch.allclose(got, decoded, atol=1e-6)


def test_pack_unpack_round_trip():
    g = torch.Generator().manual_seed(3)
    for n in (1, 2, 7, 64, 1001):
        codes = torch.randint(0, 16, (n,), generator=g).to(torch.uint8)
        packed = pack_nibbles(codes)
        assert packed.dtype == torch.uint8 and packed.numel() == (n + 1) // 2
        lst = codes.tolist() + [0]
        assert packed.tolist() == [lst[2 * j] + 16 * lst[2 * j + 1] for j in range((n + 1) // 2)]
        assert torch.equal(unpack_nibbles(packed, n), codes)
    codes = torch.randint(0, 16, (96,), generator=g).to(torch.uint8)
    assert torch.equal(pack_nibbles(codes), pack(codes, 4))  # the same layout as the shared 4-bit packer


def test_bits_per_weight_from_storage_bytes():
    g = torch.Generator().manual_seed(4)
    lin = torch.nn.Linear(576, 576, bias=True)  # smollm2-135m's q_proj shape
    torch.nn.init.normal_(lin.weight, std=0.02, generator=g)
    dq = to_nf4_linear(lin, 64, True)
    n = 576 * 576
    nb = n // 64
    assert dq.storage_bytes() == n // 2 + nb + 4 * (-(-nb // 256)) + 4
    assert abs(dq.storage_bytes() * 8 / n - 4.127) < 0.001
    plain = to_nf4_linear(lin, 64, False)
    assert plain.storage_bytes() * 8 / n == 4.5
    x = torch.randn(3, 576, generator=g)
    expect = x.double() @ dq.dequantized_weight().double().T + lin.bias.double()
    assert torch.allclose(dq(x).double(), expect, atol=1e-5)
    assert (dq(x) - lin(x)).abs().max() < 0.1 * lin(x).abs().max()


def test_apply_reports_bpw_and_reloads_identically(tiny, tmp_path):
    x = torch.randint(0, 250, (2, 12))
    before = tiny.model(x).logits
    w = tiny.model.model.layers[1].mlp.up_proj.weight.detach().clone()
    # block 48 does not divide the 128 input features: blocks run along the flattened weight
    reports = apply_steps(tiny, [{"method": "nf4", "block_size": 48, "double_quant": False}])
    lay = tiny.model.model.layers[1].mlp.up_proj
    assert isinstance(lay, NF4Linear)
    assert (lay.dequantized_weight().double() - ref_nf4(w, 48, False)).abs().max() < 1e-6
    stats = reports[0].stats["model.layers.1.mlp.up_proj"]
    n = w.numel()
    assert stats["bits_per_weight"] == ((n + 1) // 2 + 4 * -(-n // 48)) * 8 / n
    ref_err = (ref_nf4(w, 48, False) - w.double()).pow(2).mean() / w.double().pow(2).mean()
    assert abs(stats["rel_mse"] - float(ref_err)) < 1e-4 * float(ref_err)
    after = tiny.model(x).logits
    assert not torch.equal(after, before)
    tiny.save(tmp_path / "m")
    again = load(tmp_path / "m")
    assert isinstance(again.model.model.layers[1].mlp.up_proj, NF4Linear)
    assert torch.equal(again.model(x).logits, after)


def test_double_quant_default_reloads_identically(tiny, tmp_path):
    x = torch.randint(0, 250, (2, 12))
    reports = apply_steps(tiny, [{"method": "nf4"}])
    bpw = [s["bits_per_weight"] for s in reports[0].stats.values()]
    assert all(4.125 < b < 4.135 for b in bpw)  # tiny layers: 4.125 + one fp32 scale and mean per layer
    assert "bits/weight" in reports[0].notes[0]
    after = tiny.model(x).logits
    tiny.save(tmp_path / "m")
    again = load(tmp_path / "m")
    lay = again.model.model.layers[0].self_attn.q_proj
    assert isinstance(lay, NF4Linear) and lay.double_quant and lay.absmax is None
    assert torch.equal(again.model(x).logits, after)


def test_bad_config_is_one_line_config_error(tiny):
    for bad in (0, -64):
        with pytest.raises(ConfigError, match="block_size") as e:
            apply_steps(tiny, [{"method": "nf4", "block_size": bad}])
        assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="unknown setting 'bits'"):
        apply_steps(tiny, [{"method": "nf4", "bits": 4}])
    with pytest.raises(ConfigError, match="match no nn.Linear"):
        apply_steps(tiny, [{"method": "nf4", "targets": ["nothing.*"]}])
    assert isinstance(tiny.model.model.layers[0].self_attn.q_proj, torch.nn.Linear)  # nothing changed


@pytest.mark.slow
def test_smollm2_q_proj_layer0():
    h = load("smollm2-135m")
    lin = h.model.model.layers[0].self_attn.q_proj
    w = lin.weight.detach().float()
    for dq, bpw in ((True, 4.127), (False, 4.5)):
        lay = to_nf4_linear(lin, 64, dq)
        assert abs(lay.bits_per_weight() - bpw) < 0.001
        rel = (lay.dequantized_weight() - w).pow(2).mean() / w.pow(2).mean()
        assert rel < 0.02
