"""budgetlm's decode runtime (decode/lean.py) and its C glue (methods/quant/native/ops.c) against transformers'
forward and against the formulas written here."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from budgetlm.decode import lean
from budgetlm.decode.lean import CGlue, HFRuntime, LeanLlama, StaticKV, TorchGlue, runtime_for
from budgetlm.methods.quant import native
from budgetlm.models.sources import tiny_config

needs_lib = pytest.mark.skipif(native.library() is None, reason=f"C library not built: {native.status()}")
GLUES = ["torch", pytest.param("c", marks=needs_lib)]


def llama(seed: int = 0, layers: int = 3, heads: int = 4, kv_heads: int = 2):
    from transformers import LlamaForCausalLM

    cfg = tiny_config()
    cfg.num_hidden_layers, cfg.initializer_range = layers, 0.2
    cfg.num_attention_heads, cfg.num_key_value_heads = heads, kv_heads
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


def glue(name: str) -> TorchGlue:
    return TorchGlue() if name == "torch" else CGlue(native.library(), native.simd())


def full_logits(model, ids: list[int]) -> torch.Tensor:
    """Every position's logits from one cache-free forward of the whole sequence (the reference)."""
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


@pytest.mark.parametrize("name", GLUES)
@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_lean_forward_equals_transformers(name, kv_heads):
    model = llama(kv_heads=kv_heads)
    rt = LeanLlama(model, glue(name))
    g = torch.Generator().manual_seed(kv_heads)
    seq = torch.randint(0, 250, (40,), generator=g).tolist()
    want = full_logits(model, seq)
    cache = rt.new_cache()
    got = [rt(torch.tensor([seq[:20]]), 0, cache, 20)[0]]  # a prompt, every row kept
    got.append(rt(torch.tensor([seq[20:21]]), 20, cache, 1)[0])  # one token
    got.append(rt(torch.tensor([seq[21:25]]), 21, cache, 4)[0])  # a proposal of four
    cache.crop(-2)  # two rejected: roll back to 23 positions
    got.append(rt(torch.tensor([seq[23:40]]), 23, cache, 17)[0])
    got = torch.cat(got)
    want = torch.cat([want[:25], want[23:]])  # rows of the positions fed, 23 and 24 twice
    assert got.shape == want.shape
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    assert torch.equal(got.argmax(-1), want.argmax(-1))


@pytest.mark.parametrize("name", GLUES)
def test_lean_runs_quantised_layers_through_their_own_forward(name, monkeypatch):
    from budgetlm.methods.base import apply_steps
    from budgetlm.methods.quant import kernels
    from budgetlm.models.sources import tiny_random

    handle = tiny_random(1)
    apply_steps(handle, [{"method": "rtn", "bits": 4, "group_size": 32, "embeddings": True}])
    model = handle.model
    seq = list(range(5, 35))
    with kernels.kernels_enabled(False):
        want = full_logits(model, seq)
        rt = LeanLlama(model, glue(name))
        cache = rt.new_cache()
        got = torch.cat([rt(torch.tensor([seq[:29]]), 0, cache, 29)[0], rt(torch.tensor([seq[29:]]), 29, cache, 1)[0]])
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_static_kv_grows_crops_and_copies():
    kv = StaticKV(2, 1, 4, torch.float32, capacity=2)
    k = torch.arange(12.0).view(1, 1, 3, 4)
    kv.reserve(3)
    assert kv.capacity >= 4  # at least doubled
    kv.write(0, 0, k, -k)
    kv.write(1, 0, k + 1, -k - 1)
    kv.length = 3
    assert kv.capacity == 3 + StaticKV.HEADROOM  # room for the tokens after a prompt: no regrowth at the next one
    kv.reserve(kv.capacity + 1)  # grows again, doubled: the valid part is kept
    assert kv.capacity == 2 * (3 + StaticKV.HEADROOM)
    assert torch.equal(lean.cached_kv(kv, 0)[0], k) and torch.equal(lean.cached_kv(kv, 1)[1], -k - 1)
    kv.reserve(5 * kv.capacity)  # a jump past double: what was asked for, plus the room
    assert kv.capacity == 10 * (3 + StaticKV.HEADROOM) + StaticKV.HEADROOM
    kv.crop(-1)
    assert kv.get_seq_length() == 2 and lean.cached_kv(kv, 0)[0].shape[2] == 2
    kv.crop(5)  # keep the first five: there are only two
    assert kv.length == 2
    other = StaticKV(2, 1, 4, torch.float32, capacity=1)
    other.copy_from(kv, 1, 0, 2)
    assert other.length == 2 and torch.equal(lean.cached_kv(other, 0)[0], k[:, :, :2])


def test_small_m_linear_is_the_same_product():
    layer = torch.nn.Linear(48, 32)
    for m in (1, 2, 3, 5, 9):
        x = torch.randn(1, m, 48)
        got = lean.small_m_linear(layer, x, rows=8)
        assert got.shape == (1, m, 32)
        torch.testing.assert_close(got, layer(x), rtol=1e-5, atol=1e-5)


def gemma(window: int, dtype=torch.float32, softcap=None):
    """A tiny Gemma 3: sliding-window layers (window shorter than the sequences) and full ones, logit soft-cap."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    kinds = ["sliding_attention", "full_attention", "sliding_attention"]
    cfg = Gemma3TextConfig(
        vocab_size=259, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, sliding_window=window, layer_types=kinds, max_position_embeddings=512,
        initializer_range=0.2, final_logit_softcapping=30.0, attn_logit_softcapping=softcap,
    )  # fmt: skip
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(cfg).eval().to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0, 0.3)  # Gemma's norms start at 0 (x (1 + 0)): give them something to get wrong
    return model


@pytest.mark.parametrize("name", GLUES)
def test_lean_gemma3_equals_transformers(name):
    model = gemma(window=6)
    rt = lean.LeanGemma3(model, glue(name))
    seq = torch.randint(0, 250, (30,), generator=torch.Generator().manual_seed(7)).tolist()
    want = full_logits(model, seq)
    cache = rt.new_cache()
    got = [rt(torch.tensor([seq[:10]]), 0, cache, 10)[0], rt(torch.tensor([seq[10:11]]), 10, cache, 1)[0]]
    got.append(rt(torch.tensor([seq[11:14]]), 11, cache, 3)[0][:2])  # a proposal of three, the last rejected
    cache.crop(-1)
    got.append(rt(torch.tensor([seq[13:30]]), 13, cache, 17)[0])  # 17 rows: torch's attention, windowed mask
    got = torch.cat(got)
    # transformers computes Gemma's norms in float32 whatever the model's dtype; the lean forward in the model's
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_runtime_choice():
    assert isinstance(runtime_for(llama()), LeanLlama)
    assert isinstance(runtime_for(gemma(window=4)), lean.LeanGemma3)
    assert isinstance(runtime_for(gemma(window=4, softcap=50.0)), HFRuntime)  # attention soft-cap: not lean
    model = llama()
    model.model.layers[1].register_forward_hook(lambda *a: None)
    assert lean.lean_reason(model) == "forward hooks"
    assert isinstance(runtime_for(model.train()), HFRuntime)


def test_lean_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("BUDGETLM_LEAN", "0")
    assert isinstance(runtime_for(llama()), HFRuntime)
    monkeypatch.setenv("BUDGETLM_LEAN", "1")
    monkeypatch.setenv("BUDGETLM_LEAN_C", "0")
    assert type(runtime_for(llama()).glue) is TorchGlue


# -- the C glue against the formulas -------------------------------------------------------------------------
def rope_ref(x, cos, sin):
    """x [M, heads, D] rotated: x * cos + rotate_half(x) * sin, with cos/sin [M, D]."""
    half = x.shape[-1] // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x * cos[:, None] + rot * sin[:, None]


def attention_ref(q, keys, values, start, window=0, sinks=0):
    """q [M, H, D]; keys, values [KV, L, D]; token m sees positions 0..start+m (the last `window` of them if > 0,
    and the first `sinks`); head h reads kv head h // (H/KV)."""
    m_rows, heads, d = q.shape
    group = heads // keys.shape[0]
    out = torch.zeros_like(q)
    for m in range(m_rows):
        first = max(0, start + m + 1 - window) if window else 0
        seen = list(range(min(sinks, first))) + list(range(first, start + m + 1))
        for h in range(heads):
            k, v = keys[h // group, seen], values[h // group, seen]
            p = torch.softmax(q[m, h] @ k.t() / math.sqrt(d), -1)
            out[m, h] = p @ v
    return out


@needs_lib
@pytest.mark.parametrize("simd", [0, 1])
@pytest.mark.parametrize(
    "m,start,heads,kv,window,sinks",
    [(1, 0, 4, 2, 0, 0), (1, 9, 9, 3, 0, 0), (3, 5, 4, 4, 0, 0), (5, 0, 6, 1, 0, 0), (4, 9, 4, 2, 5, 0),
     (4, 9, 4, 2, 5, 3), (1, 20, 4, 2, 6, 4), (20, 5, 4, 2, 6, 2)],
)  # fmt: skip
def test_c_rope_store_and_attention(simd, m, start, heads, kv, window, sinks):
    if simd and not native.simd():
        pytest.skip("no AVX2 path on this CPU")
    d, cap = 16, 32
    g = torch.Generator().manual_seed(m * 100 + start)
    q = torch.randn(1, m, heads * d, generator=g)
    k = torch.randn(1, m, kv * d, generator=g)
    v = torch.randn(1, m, kv * d, generator=g)
    ang = torch.randn(m, d // 2, generator=g)
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    cache = StaticKV(1, kv, d, torch.float32, capacity=cap)
    old_k, old_v = torch.randn(1, kv, start, d, generator=g), torch.randn(1, kv, start, d, generator=g)
    cache.keys[0][:, :, :start], cache.values[0][:, :, :start] = old_k, old_v
    cache.length = start
    c = CGlue(native.library(), simd)
    out = c.attend(q.clone(), k, v, cos[None], sin[None], cache, 0, start, d, d**-0.5, window, sinks)
    k_rot = rope_ref(k.view(m, kv, d), cos, sin)
    torch.testing.assert_close(cache.keys[0][0, :, start : start + m], k_rot.transpose(0, 1), rtol=1e-5, atol=1e-5)
    assert torch.equal(cache.values[0][0, :, start : start + m], v.view(m, kv, d).transpose(0, 1))
    keys = torch.cat([old_k[0], k_rot.transpose(0, 1)], 1)
    values = torch.cat([old_v[0], v.view(m, kv, d).transpose(0, 1)], 1)
    want = attention_ref(rope_ref(q.view(m, heads, d), cos, sin), keys, values, start, window, sinks)
    torch.testing.assert_close(out.view(m, heads, d), want, rtol=1e-5, atol=1e-5)


@needs_lib
@pytest.mark.parametrize("heads,kv,d", [(9, 3, 64), (4, 1, 256), (6, 2, 40)])
@pytest.mark.parametrize("threads", [1, 2])
def test_c_attention_long_context_rows_alone(heads, kv, d, threads):
    """The tiled AVX2 attention (head sizes a multiple of 8) over contexts that cross its 64-key tiles and 8-key
    blocks: within float32 rounding of a float64 softmax, and each new token's output bitwise equal to that token
    attended alone on one thread (what keeps a speculative verification's logits those of plain decoding)."""
    if not native.simd():
        pytest.skip("no AVX2 path on this CPU")
    import ctypes

    lib, ptr = native.library(), ctypes.c_void_p
    g = torch.Generator().manual_seed(heads * d + threads)
    for start, m, window, sinks in [(0, 5, 0, 0), (61, 9, 0, 0), (200, 16, 0, 0), (130, 7, 70, 0), (150, 9, 40, 4),
                                    (300, 3, 90, 70)]:  # fmt: skip
        cap = start + m + 5
        keys, values = torch.randn(kv, cap, d, generator=g), torch.randn(kv, cap, d, generator=g)
        q = torch.randn(m, heads, d, generator=g) * 3
        out = torch.empty(m, heads, d)
        scale = d**-0.5
        args = (kv, d, cap, start, ctypes.c_float(scale), window, sinks)
        assert lib.lean_attention(ptr(q.data_ptr()), ptr(keys.data_ptr()), ptr(values.data_ptr()), m, heads, *args,
                                  ptr(out.data_ptr()), 1, threads) == 0  # fmt: skip
        want = attention_ref(q.double(), keys.double(), values.double(), start, window, sinks).float()
        torch.testing.assert_close(out, want, rtol=1e-5, atol=2e-5)
        for i in range(m):
            one, alone = q[i : i + 1].contiguous(), torch.empty(1, heads, d)
            args = (kv, d, cap, start + i, ctypes.c_float(scale), window, sinks)
            for alone_threads in {1, threads}:  # on 2 threads one token's queries are cut one per unit
                lib.lean_attention(ptr(one.data_ptr()), ptr(keys.data_ptr()), ptr(values.data_ptr()), 1, heads,
                                   *args, ptr(alone.data_ptr()), 1, alone_threads)  # fmt: skip
                assert torch.equal(alone[0], out[i]), (start, m, window, i, alone_threads)


@needs_lib
@pytest.mark.parametrize("simd", [0, 1])
def test_c_norms_and_silu(simd):
    if simd and not native.simd():
        pytest.skip("no AVX2 path on this CPU")
    c = CGlue(native.library(), simd)
    norm = torch.nn.Module()
    norm.weight, norm.variance_epsilon = torch.randn(40), 1e-5
    x, delta = torch.randn(1, 3, 40), torch.randn(1, 3, 40)

    def rms(t):
        return norm.weight * (t / torch.sqrt(t.pow(2).mean(-1, keepdim=True) + 1e-5))

    torch.testing.assert_close(c.rms(x, norm.weight, 1e-5), rms(x), rtol=1e-5, atol=1e-6)
    h = x.clone()
    torch.testing.assert_close(c.add_rms(h, delta, norm.weight, 1e-5), rms(x + delta), rtol=1e-5, atol=1e-6)
    assert torch.equal(h, x + delta)  # the residual stream updated in place
    gate, up = torch.randn(1, 2, 50), torch.randn(1, 2, 50)
    torch.testing.assert_close(c.silu_mul(gate, up), gate / (1 + torch.exp(-gate)) * up, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(c.silu_mul(gate, up), F.silu(gate) * up, rtol=1e-5, atol=1e-6)
