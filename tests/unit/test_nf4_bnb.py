"""NF4Linear's optional bitsandbytes path: the same codes as bitsandbytes' own NF4, outputs within bf16 rounding of
the exact product, the exact path whenever autograd is on or it is asked for, and no hub download on import.
Skipped where bitsandbytes is not installed (it is the optional `bnb` extra)."""

import os
import subprocess
import sys

import pytest
import torch

from budgetlm.errors import ConfigError
from budgetlm.methods.quant import nf4
from budgetlm.methods.quant.nf4 import NF4Linear, bf16_tolerance

BNB = nf4._bnb_module()
needs_bnb = pytest.mark.skipif(BNB is None, reason="bitsandbytes is not installed (optional extra `bnb`)")


@pytest.fixture(autouse=True)
def _kernels_on(monkeypatch):
    """The suite computes quantised layers exactly (tests/conftest.py); these tests are about the kernel path."""
    from budgetlm.methods.quant import kernels

    monkeypatch.setattr(kernels, "_enabled", True)


def weight(out_f: int, in_f: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(seed)) * 0.02


@needs_bnb
def test_bnb_quantises_to_the_same_codes_and_absmax():
    w = weight(96, 128)
    q, state = BNB.functional.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
    q = q.reshape(-1)
    bnb_codes = torch.stack([q >> 4, q & 15], 1).reshape(-1)  # bitsandbytes: first value in the high nibble
    ours = NF4Linear.from_weight(w, block_size=64, double_quant=False)
    assert torch.equal(bnb_codes, ours.codes().reshape(-1))
    assert torch.equal(state.absmax, ours.absmax)
    assert torch.equal(BNB.functional.get_4bit_type("nf4", device="cpu").float(), nf4.NF4_CODEBOOK)


@needs_bnb
@pytest.mark.parametrize("block", [32, 64, 128])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("tokens", [1, 5, 40])
def test_bnb_path_within_bf16_of_exact(block, double_quant, tokens):
    lay = NF4Linear.from_weight(weight(192, 256, block), torch.randn(192), block, double_quant)
    assert lay.bnb_supported()
    x = torch.randn(2, tokens, 256)
    with torch.inference_mode():
        exact = lay.forward_exact(x)
        fast = lay.forward_bnb(x)
    assert fast.dtype == x.dtype and fast.shape == exact.shape
    tol = bf16_tolerance(x.reshape(-1, 256), lay.dequantized_weight()).reshape(exact.shape)
    assert ((fast - exact).abs() <= tol).all()
    assert not torch.equal(fast, exact)  # it really is another computation


@needs_bnb
def test_autograd_and_env_take_the_exact_path(monkeypatch):
    lay = NF4Linear.from_weight(weight(64, 128), None, 64, True)
    x = torch.randn(3, 128)
    exact = lay.forward_exact(x)
    assert torch.equal(lay(x), exact)  # grad mode on: exact
    monkeypatch.setenv(nf4.KERNEL_ENV, "exact")
    with torch.no_grad():
        assert torch.equal(lay(x), exact)
    monkeypatch.setenv(nf4.KERNEL_ENV, "bnb")
    with torch.no_grad():
        assert torch.equal(lay(x), lay.forward_bnb(x))
    monkeypatch.setenv(nf4.KERNEL_ENV, "fast")
    with torch.no_grad(), pytest.raises(ConfigError, match="auto, exact or bnb"):
        lay(x)


@needs_bnb
def test_unsupported_shapes_stay_exact(monkeypatch):
    monkeypatch.setenv(nf4.KERNEL_ENV, "bnb")
    lay = NF4Linear.from_weight(weight(40, 96), None, 64, True)  # 40 rows: not a multiple of 32; 96 % 64 != 0
    assert not lay.bnb_supported()
    x = torch.randn(2, 96)
    with torch.no_grad():
        assert torch.equal(lay(x), lay.forward_exact(x))


@needs_bnb
def test_cache_follows_loaded_tensors_and_is_never_saved():
    a = NF4Linear.from_weight(weight(64, 128, 1), None, 64, True)
    b = NF4Linear.from_weight(weight(64, 128, 2), None, 64, True)
    x = torch.randn(2, 128)
    with torch.no_grad():
        before = a.forward_bnb(x)
        a.load_state_dict(b.state_dict())
        after = a.forward_bnb(x)
        assert torch.equal(after, b.forward_bnb(x)) and not torch.equal(before, after)
    assert set(a.state_dict()) == {"qweight", "absmax_q", "absmax_scale", "absmax_mean"}
    assert list(a.children()) == []


def test_import_never_reaches_the_hub_kernel(tmp_path):
    """A stand-in `kernels` package whose get_kernel exits the process: budgetlm's import of bitsandbytes must not
    call it (a real one would download from the Hugging Face hub)."""
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (optional extra `bnb`)")
    (tmp_path / "kernels.py").write_text("import sys\n\ndef get_kernel(*a, **k):\n    sys.exit(17)\n")
    code = "from budgetlm.methods.quant import nf4; assert nf4._bnb_module() is not None; print('ok')"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-2000:]
    assert "kernels-community" not in run.stderr


@needs_bnb
def test_auto_follows_the_probe_per_token_regime(monkeypatch):
    monkeypatch.delenv(nf4.KERNEL_ENV, raising=False)
    lay = NF4Linear.from_weight(weight(64, 128), None, 64, True)
    one, many = torch.randn(1, 128), torch.randn(nf4.DECODE_TOKENS + 1, 128)
    monkeypatch.setattr(nf4, "_faster", {True: True, False: False})
    with torch.no_grad():
        assert torch.equal(lay(one), lay.forward_bnb(one))
        assert torch.equal(lay(many), lay.forward_exact(many))
