"""rtn and its packed storage, against a quantiser written independently here."""

import pytest
import torch

from budgetlm.errors import ConfigError
from budgetlm.methods.base import apply_steps
from budgetlm.methods.quant.layers import QuantLinear
from budgetlm.methods.quant.quantizer import pack, packed_numel, unpack
from budgetlm.models.sources import load


def ref_rtn(w, bits, group, symmetric):
    out = torch.empty_like(w)
    g = group or w.shape[1]
    for r in range(w.shape[0]):
        for c0 in range(0, w.shape[1], g):
            x = w[r, c0 : c0 + g].double()
            if symmetric:
                s = x.abs().max() / (2 ** (bits - 1) - 1)
                s = s if s > 0 else 1.0
                q = torch.clamp(torch.round(x / s), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
                out[r, c0 : c0 + g] = (q * s).float()
            else:
                lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
                s = (hi - lo) / (2**bits - 1) or 1.0
                z = round(-lo / s)
                q = torch.clamp(torch.round(x / s) + z, 0, 2**bits - 1)
                out[r, c0 : c0 + g] = ((q - z) * s).float()
    return out


@pytest.mark.parametrize(
    "bits,group,sym", [(8, None, True), (8, 32, False), (4, 32, False), (3, 64, True), (2, 32, False)]
)
def test_rtn_matches_reference_and_packs(bits, group, sym):
    h = load("tiny-random")
    lin = h.model.model.layers[0].mlp.down_proj
    w = lin.weight.detach().clone()
    apply_steps(h, [{"method": "rtn", "bits": bits, "group_size": group, "symmetric": sym}])
    q = h.model.model.layers[0].mlp.down_proj
    assert isinstance(q, QuantLinear)
    ref = ref_rtn(w, bits, group, sym)
    # scales are stored in fp16, so compare with a tolerance of a few fp16 ulps of the step
    assert (q.dequantized_weight() - ref).abs().max() < 2e-3 * w.abs().max()
    n_groups = w.shape[1] // (group or w.shape[1])
    expected = w.numel() * bits // 8 + w.shape[0] * n_groups * 2 + (0 if sym else w.shape[0] * n_groups)
    assert q.storage_bytes() == expected


def test_pack_round_trip_all_widths():
    g = torch.Generator().manual_seed(0)
    for bits in (2, 3, 4, 8):
        codes = torch.randint(0, 2**bits, (37, 13), generator=g).to(torch.uint8)
        packed = pack(codes, bits)
        expected = codes.numel() if bits == 8 else -(-codes.numel() // 8) * bits  # 8 codes per b bytes
        assert packed.numel() == packed_numel(codes.numel(), bits) == expected
        assert torch.equal(unpack(packed, bits, codes.numel()).reshape(37, 13), codes)


def test_int8_saved_folder_is_smaller_and_reloads_identically(tmp_path, tiny):
    x = torch.randint(0, 250, (2, 12))
    before = tiny.model(x).logits
    tiny.save(tmp_path / "fp32")
    apply_steps(tiny, [{"method": "rtn"}])
    after = tiny.model(x).logits
    assert (after - before).abs().max() < 0.05 * before.abs().max()
    tiny.save(tmp_path / "int8")
    again = load(tmp_path / "int8")
    assert torch.equal(again.model(x).logits, after)
    assert again.provenance[0]["method"] == "rtn"
    fp32 = (tmp_path / "fp32" / "model.safetensors").stat().st_size
    int8 = (tmp_path / "int8" / "model.safetensors").stat().st_size
    assert int8 < 0.6 * fp32


def test_int8_decode_kernel_close_to_dequantised(tiny, monkeypatch):
    from budgetlm.methods.quant import kernels

    monkeypatch.setattr(kernels, "_enabled", True)
    monkeypatch.setattr(kernels, "crossover", lambda kind: 8)  # as if the host's probe found the crossover at 8
    apply_steps(tiny, [{"method": "rtn"}])
    q = tiny.model.model.layers[0].self_attn.q_proj
    x = torch.randn(1, 1, 128)
    fast = q(x)
    exact = torch.nn.functional.linear(x, q.dequantized_weight())
    assert (fast - exact).abs().max() < 2e-2 * exact.abs().max()
    assert not torch.equal(fast, exact)  # one token: the bf16-activation int8 kernel, not the fp32 product
    # many tokens (prefill): dequantise-then-matmul in fp32, exactly the dequantised product
    xs = torch.randn(2, 16, 128)
    assert torch.equal(q(xs), torch.nn.functional.linear(xs, q.dequantized_weight()))


def test_bad_group_size_is_one_line_config_error(tiny):
    with pytest.raises(ConfigError, match="does not divide"):
        apply_steps(tiny, [{"method": "rtn", "bits": 4, "group_size": 48}])
    with pytest.raises(ConfigError, match="bits"):
        apply_steps(tiny, [{"method": "rtn", "bits": 7}])
    with pytest.raises(ConfigError, match="unknown setting 'bitz'"):
        apply_steps(tiny, [{"method": "rtn", "bitz": 4}])
