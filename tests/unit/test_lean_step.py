"""The lean runtime's one-call decode step (decode/lean_step.py, methods/quant/native/step.c) against the per-layer
lean path and transformers' forward: float32 and quantised (4-bit, 8-bit, mixed) tiny Llamas, 1, 2 and 4 key/value
heads, tied and untied heads, steps of 1..17 tokens with rollbacks, a prompt-sized call and one over STEP_ROWS, greedy
generation, and the fallbacks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from budgetlm.decode.lean import LeanLlama, runtime_for
from budgetlm.decode.lean_step import STEP_ROWS, LeanStepLlama
from budgetlm.methods.quant import kernels, native
from budgetlm.methods.quant.layers import QuantLinear
from budgetlm.methods.quant.quantizer import find_grid, quantize
from budgetlm.models.sources import tiny_config

pytestmark = pytest.mark.skipif(native.library() is None, reason=f"C library not built: {native.status()}")


def llama(kv_heads: int = 2, tied: bool = True, seed: int = 0):
    """A tiny Llama whose every projection the 4-bit kernel can take (256 tokens, head_dim 64)."""
    from transformers import LlamaForCausalLM

    cfg = tiny_config()
    cfg.num_hidden_layers, cfg.initializer_range, cfg.vocab_size, cfg.pad_token_id = 3, 0.2, 256, 0
    cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim = 4, kv_heads, 64
    cfg.tie_word_embeddings = tied
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


def quantise(model, plan) -> None:
    """Replace every Linear `name` for which plan(name) gives 4 or 8 by a QuantLinear of that grid (4-bit groups of
    32 with zero points; 8-bit symmetric per channel: the int8 codes)."""
    for name, module in list(model.named_modules()):
        bits = plan(name) if type(module) is torch.nn.Linear else None
        if not bits:
            continue
        w = module.weight.data
        grid = find_grid(w, bits, 32 if bits == 4 else None, bits == 8)
        parent, _, leaf = name.rpartition(".")
        layer = QuantLinear.from_codes(quantize(w, grid), grid, None)
        setattr(model.get_submodule(parent) if parent else model, leaf, layer)


PLANS = {
    "fp32": lambda name: None,
    "q4": lambda name: 4,
    "q8": lambda name: 8,
    "mixed": lambda name: {0: 4, 1: 8}.get(int(name.split(".")[2]), None) if ".layers." in name else 8,
}


@pytest.fixture
def kernels_on(monkeypatch):
    """The 4-bit layers on budgetlm's kernel, the 8-bit ones on its 8-bit kernel, the kernels taken up to 64 tokens
    (as if the host's probes found that)."""
    monkeypatch.setattr(kernels, "_enabled", True)
    monkeypatch.setattr(kernels, "crossover", lambda kind: 64)
    monkeypatch.setattr(kernels, "four_bit", lambda: "q4")
    monkeypatch.setattr(kernels, "eight_bit", lambda n, k: "q8")


class Counting:
    """The C library with its lean_step calls counted."""

    def __init__(self, lib):
        self.lib, self.steps = lib, 0

    def __getattr__(self, name):
        return getattr(self.lib, name)

    def lean_step(self, *args):
        self.steps += 1
        return self.lib.lean_step(*args)


def step_runtime(model) -> LeanStepLlama:
    rt = runtime_for(model)
    assert type(rt) is LeanStepLlama and rt.label.startswith("lean-c"), getattr(rt, "no_step", None)
    rt.lib = Counting(rt.lib)
    return rt


def full_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


# (start, end, rows kept) of each call, then the rollback before the next (positions dropped)
# then a prompt-sized call (one C call too) and a long one (more than STEP_ROWS tokens: LeanLlama's per-layer path)
CALLS = [(0, 5, 5, 0), (5, 6, 1, 0), (6, 9, 3, 0), (9, 25, 16, 3), (22, 23, 1, 0), (23, 40, 17, 0), (40, 44, 2, 0)]
CALLS += [(44, 105, 3, 0), (105, 106 + STEP_ROWS, 2, 0), (106 + STEP_ROWS, 108 + STEP_ROWS, 2, 0)]
SEQ_LEN = CALLS[-1][1]
STEPPED = sum(end - start <= STEP_ROWS for start, end, *_ in CALLS)  # calls that are one C call each


def run_calls(rt, seq: list[int], calls: list[tuple] = CALLS) -> torch.Tensor:
    cache = rt.new_cache()
    out = []
    for start, end, keep, drop in calls:
        assert cache.length == start
        out.append(rt(torch.tensor([seq[start:end]]), start, cache, keep)[0])
        if drop:
            cache.crop(-drop)
    return torch.cat(out)


def wanted_rows(full: torch.Tensor) -> torch.Tensor:
    return torch.cat([full[end - keep : end] for _, end, keep, _ in CALLS])


def close(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal to float32 rounding: 2e-5 of the largest logit (over CALLS' 366 positions the kernels' other summation
    orders reach ~1e-5; a dropped norm, window or rotary table moves them by 0.04-0.77)."""
    assert got.shape == want.shape
    assert (got - want).abs().max() <= 2e-5 * want.abs().max()
    assert torch.equal(got.argmax(-1), want.argmax(-1))


@pytest.mark.parametrize("plan", list(PLANS))
@pytest.mark.parametrize("kv_heads", [1, 2, 4])
@pytest.mark.parametrize("tied", [True, False])
def test_step_equals_the_layer_path_and_transformers(plan, kv_heads, tied, kernels_on):
    model = llama(kv_heads, tied)
    quantise(model, PLANS[plan])
    seq = torch.randint(0, 256, (SEQ_LEN,), generator=torch.Generator().manual_seed(kv_heads)).tolist()
    rt = step_runtime(model)
    got = run_calls(rt, seq)
    assert rt.lib.steps == STEPPED  # every call of at most STEP_ROWS tokens: one C call each
    close(got, run_calls(LeanLlama(model), seq))
    close(got, wanted_rows(full_logits(model, seq)))


def test_step_with_an_embedding_it_does_not_gather(kernels_on):
    class Embedding(torch.nn.Embedding):  # not nn.Embedding itself: the step takes its output from Python
        pass

    model = llama()
    old = model.model.embed_tokens
    model.model.embed_tokens = Embedding(old.num_embeddings, old.embedding_dim, _weight=old.weight.data)
    quantise(model, PLANS["q4"])
    rt = step_runtime(model)
    assert not rt.descriptor().md.embed
    seq = [(3 + i) % 256 for i in range(SEQ_LEN)]
    close(run_calls(rt, seq), wanted_rows(full_logits(model, seq)))


@pytest.mark.parametrize("plan", ["fp32", "mixed"])
def test_greedy_generation_is_token_identical(plan, kernels_on):
    model = llama(kv_heads=2, tied=False)
    quantise(model, PLANS[plan])

    def greedy(rt, n: int = 24) -> list[int]:
        seq, cache = [7, 8, 9], rt.new_cache()
        logits = rt(torch.tensor([seq]), 0, cache, 1)
        for _ in range(n):
            seq.append(int(logits[0, -1].argmax()))
            logits = rt(torch.tensor([seq[-1:]]), len(seq) - 1, cache, 1)
        return seq

    rt = step_runtime(model)
    got = greedy(rt)
    assert rt.lib.steps == 25
    assert got == greedy(LeanLlama(model))
    with torch.no_grad():
        want = model.generate(torch.tensor([[7, 8, 9]]), max_new_tokens=24, do_sample=False, pad_token_id=0)
    assert got == want[0].tolist()


def test_the_fallbacks_are_taken_and_named(monkeypatch, kernels_on):
    model = llama()
    quantise(model, PLANS["q8"])
    assert type(runtime_for(model)) is LeanStepLlama
    monkeypatch.setenv("BUDGETLM_LEAN_STEP", "0")
    rt = runtime_for(model)
    assert type(rt) is LeanLlama and rt.no_step == "BUDGETLM_LEAN_STEP=0" and rt.label == "lean (C glue)"
    monkeypatch.delenv("BUDGETLM_LEAN_STEP")

    model.model.layers[1].mlp.up_proj.register_forward_hook(lambda *a: None)
    assert runtime_for(model).no_step == "forward hooks on a projection"
    model = llama()
    att = model.model.layers[2].self_attn
    att.o_proj = torch.nn.Linear(att.o_proj.in_features, att.o_proj.out_features, bias=True)
    assert runtime_for(model).no_step == "a Linear with a bias or not float32"
    model = llama()
    quantise(model, PLANS["q4"])
    monkeypatch.setattr(kernels, "four_bit", lambda: "int4")  # torch's 4-bit kernel: no pointers the step can call
    rt = runtime_for(model)
    assert type(rt) is LeanLlama and "int4" in rt.no_step


def test_q4a8_layers_run_inside_the_step_by_the_layers_own_rule(monkeypatch, kernels_on):
    """A 4-bit layer on "q4a8" (int8 activations, lossy) takes it for calls of at most ACT8_TOKENS rows and the exact
    "q4" above, inside the one C call as on the per-layer path."""
    model = llama(kv_heads=2, tied=False)
    quantise(model, PLANS["mixed"])
    seq = torch.randint(0, 256, (SEQ_LEN,), generator=torch.Generator().manual_seed(5)).tolist()
    exact = run_calls(step_runtime(model), seq)
    monkeypatch.setattr(kernels, "four_bit", lambda: "q4a8")
    rt = step_runtime(model)
    assert rt.descriptor().reason is None and rt.descriptor().layers[0].q.act8 == kernels.ACT8_TOKENS
    got = run_calls(rt, seq)
    assert rt.lib.steps == STEPPED
    close(got, run_calls(LeanLlama(model), seq))  # the per-layer path: each layer's own q4a8 / q4 choice
    rows, lossy = 0, []
    for start, end, keep, _ in CALLS:
        if end - start <= kernels.ACT8_TOKENS:  # int8 activations: near the exact kernel's rows, not equal
            part = slice(rows, rows + keep)
            lossy.append(float((got[part] - exact[part]).abs().max() / exact[part].abs().max()))
        rows += keep
    assert torch.allclose(got[:5], exact[:5], rtol=0, atol=1e-5 * exact[:5].abs().max())  # 5 tokens: exact q4
    assert len(lossy) == 5 and all(1e-6 < d < 0.2 for d in lossy), lossy


def test_q4bf_layers_run_inside_the_step_as_on_their_own_path(monkeypatch, kernels_on):
    """A 4-bit layer on "q4bf" (bfloat16 activations, lossy) takes it at every row count inside the one C call, as on
    the per-layer path: the same logits as LeanLlama's, near (not equal to) the exact kernel's."""
    from budgetlm.decode.lean_step import Q4BF

    model = llama(kv_heads=2, tied=False)
    quantise(model, PLANS["mixed"])
    seq = torch.randint(0, 256, (SEQ_LEN,), generator=torch.Generator().manual_seed(6)).tolist()
    short = CALLS[:5]  # calls of 1..16 tokens, where the per-layer path's glue is ops.c's too (see the q8bf test)
    exact = run_calls(step_runtime(model), seq, short)
    monkeypatch.setattr(kernels, "four_bit", lambda: "q4bf")
    rt = step_runtime(model)
    desc = rt.descriptor()
    assert desc.reason is None and desc.layers[0].q.kind == Q4BF and desc.layers[1].q.kind != Q4BF  # 8-bit layer 1
    got = run_calls(rt, seq, short)
    assert rt.lib.steps == len(short)
    close(got, run_calls(LeanLlama(model), seq, short))  # the per-layer path: each layer's own q4bf call
    rows = 0
    for start, end, keep, _ in short:  # every call, 1 to 16 rows, saw bf16 activations: near exact, not equal
        part = slice(rows, rows + keep)
        d = float((got[part] - exact[part]).abs().max() / exact[part].abs().max())
        assert 1e-7 < d < 0.05, (start, end, d)
        rows += keep


def test_q8bf_layers_run_inside_the_step_as_on_their_own_path(monkeypatch, kernels_on):
    """An 8-bit layer on "q8bf" (its two 4-bit halves on q4bf, bfloat16 activations) runs inside the one C call with
    the same logits as the per-layer path's, near (not equal to) the exact 8-bit kernel's."""
    from budgetlm.decode.lean_step import Q8BF

    model = llama(kv_heads=2, tied=False)
    quantise(model, PLANS["mixed"])
    seq = torch.randint(0, 256, (SEQ_LEN,), generator=torch.Generator().manual_seed(8)).tolist()
    # the calls of 1..16 tokens: from 17 the per-layer path's glue is torch's (not ops.c's, as in the step), and its
    # other float32 roundings flip bf16 roundings of activations as described below, by 2e-3 of the logits
    short = CALLS[:5]
    exact = run_calls(step_runtime(model), seq, short)  # 8-bit layers on "q8" (float32 activations)
    monkeypatch.setattr(kernels, "eight_bit", lambda n, k: "q8bf")
    rt = step_runtime(model)
    desc = rt.descriptor()
    assert desc.reason is None and desc.layers[1].q.kind == Q8BF and desc.layers[0].q.kind != Q8BF  # layer 0: 4-bit
    assert desc.md.head.kind == Q8BF
    got = run_calls(rt, seq, short)
    assert rt.lib.steps == len(short)
    # the per-layer path (each layer's own q8bf call): its glue may differ from the step's in the last float32 bit,
    # which can flip an activation's bf16 rounding, and the high half's scale (16 s) makes such a flip count; so not
    # to 1e-5 as the exact kernels, but 20x nearer than the exact q8 path is (measured: 0 to 2.6e-5 against 5.7e-3)
    per_layer = run_calls(LeanLlama(model), seq, short)
    d = float((got - exact).abs().max() / exact.abs().max())
    assert 1e-7 < d < 0.05, d
    assert float((got - per_layer).abs().max() / per_layer.abs().max()) < d / 20


def test_the_descriptor_follows_the_kernels_state(kernels_on):
    model = llama()
    quantise(model, PLANS["mixed"])
    rt = step_runtime(model)
    seq = [(10 + i) % 256 for i in range(SEQ_LEN)]
    want = wanted_rows(full_logits(model, seq))
    first = rt.descriptor()
    with kernels.kernels_enabled(False):  # no fast paths: every call runs the layers' exact dequantisation
        close(run_calls(rt, seq), want)
        assert rt.lib.steps == 0 and rt.descriptor() is not first and rt.descriptor().reason is not None
    close(run_calls(rt, seq), want)  # back on the kernels: one call per step again
    assert rt.lib.steps == STEPPED and rt.descriptor().reason is None
    mlp = model.model.layers[2].mlp  # a projection replaced, a weight replaced: described again
    mlp.up_proj = torch.nn.Linear(mlp.up_proj.in_features, mlp.up_proj.out_features, bias=False)
    model.model.layers[2].input_layernorm.weight = torch.nn.Parameter(torch.rand(model.config.hidden_size) + 0.5)
    close(run_calls(rt, seq), wanted_rows(full_logits(model, seq)))
    assert rt.lib.steps == 2 * STEPPED


@pytest.mark.parametrize("simd", [0, pytest.param(1, marks=pytest.mark.skipif(not native.simd(), reason="no AVX2"))])
@pytest.mark.parametrize("m", [1, 2, 3, 16])
@pytest.mark.parametrize("n,k,threads", [(70, 64, 1), (64, 36, 1), (5, 8, 1), (301, 64, 2), (301, 64, 3)])
def test_dense_few_row_product(simd, m, n, k, threads):
    lib = native.library()
    g = torch.Generator().manual_seed(m)
    x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)
    y = torch.full((m, n), float("nan"))
    lib.step_dense_mm(x.data_ptr(), m, k, w.data_ptr(), n, y.data_ptr(), threads, simd)
    torch.testing.assert_close(y, F.linear(x, w), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("simd", [0, pytest.param(1, marks=pytest.mark.skipif(not native.simd(), reason="no AVX2"))])
@pytest.mark.parametrize("threads", [1, 2])
def test_dense_rows_do_not_depend_on_how_many_came_together(simd, threads):
    """Each row of x gives bitwise the same y row whether it came alone or with 1..15 others (passes of 3, 2 or 1 rows
    of x): a speculative verification's float32 products are plain decoding's."""
    lib = native.library()
    n, k = 300, 64
    g = torch.Generator().manual_seed(threads)
    x, w = torch.randn(16, k, generator=g), torch.randn(n, k, generator=g)
    alone = torch.empty(16, n)
    for i in range(16):
        lib.step_dense_mm(x[i].data_ptr(), 1, k, w.data_ptr(), n, alone[i].data_ptr(), threads, simd)
    for m in range(2, 17):
        y = torch.empty(m, n)
        lib.step_dense_mm(x.data_ptr(), m, k, w.data_ptr(), n, y.data_ptr(), threads, simd)
        assert torch.equal(y, alone[:m]), m


@pytest.mark.parametrize("faster", ["step", "layers"])
def test_own_kernels_are_taken_where_the_whole_step_times_faster(monkeypatch, faster):
    """The per-layer probes chose torch's kernels (int4 for 4 bits, the int4x2 halves for 8 bits), which keep the
    step from running: the runtime times both ways on the model and keeps the faster for the process."""
    from budgetlm.decode import lean_step

    if not kernels._layout_matches():
        pytest.skip("torch's 4-bit layout is not one budgetlm's kernels read")
    monkeypatch.setattr(kernels, "_enabled", True)
    monkeypatch.setattr(kernels, "crossover", lambda kind: 64)
    monkeypatch.setattr(kernels, "_four_bit", lambda threads, act8=False, own=False: "q4" if own else "int4")
    monkeypatch.setattr(kernels, "_eight_bit", lambda n, k, threads, own_only=False: "q8" if own_only else "int4x2")
    monkeypatch.setattr(lean_step, "_timed", {})
    timed = []

    def step_ms(runtime, steps, vocab):
        one_call = type(runtime) is LeanStepLlama
        timed.append("step" if one_call else "layers")
        return {"step": 5.0, "layers": 9.0}[faster] if one_call else 7.0

    monkeypatch.setattr(lean_step, "_step_ms", step_ms)
    model = llama(kv_heads=2, tied=False)
    quantise(model, PLANS["mixed"])
    seq = [(10 + i) % 256 for i in range(SEQ_LEN)]
    with kernels.kernels_enabled(False):
        want = wanted_rows(full_logits(model, seq))  # exact dequantisation
    rt = runtime_for(model)
    assert timed == ["layers", "step", "step", "layers"]
    if faster == "step":
        assert type(rt) is LeanStepLlama and kernels.own_preferred()
        assert rt.label.endswith("on budgetlm's kernels 5.0 ms, per layer on torch's 7.0 ms")
        assert {m.kernel for m in model.modules() if isinstance(m, QuantLinear)} == {"q4", "q8"}
        rt.lib = Counting(rt.lib)
        close(run_calls(rt, seq), want)  # the 8-bit layers' codes rebuilt from their halves: exact again
        assert rt.lib.steps == STEPPED
    else:
        assert type(rt) is LeanLlama and not kernels.own_preferred()
        assert "int4" in rt.no_step and rt.no_step.endswith("9.0 ms, per layer on torch's 7.0 ms)")
        assert {m.kernel for m in model.modules() if isinstance(m, QuantLinear)} == {"int4", "int4x2"}
    timed.clear()
    runtime_for(model)  # measured once per process, model shape, grids and thread count
    assert timed == []


# -- Gemma 3 ------------------------------------------------------------------------------------------------------
def gemma(kv_heads: int = 2, window: int = 6, softcap: float | None = 30.0, act: str = "gelu_pytorch_tanh"):
    """A tiny Gemma 3 every projection of which the 4-bit kernel can take: sliding-window layers (window shorter than
    the sequences) with their own rotary base and a full one, random norms (Gemma's start at 0: x (1 + 0))."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    cfg = Gemma3TextConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=kv_heads, head_dim=64, sliding_window=window, max_position_embeddings=512,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"], initializer_range=0.2,
        final_logit_softcapping=softcap, query_pre_attn_scalar=24, hidden_activation=act, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(kv_heads)
    model = Gemma3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0, 0.3)
    return model


def gemma_step(model):
    from budgetlm.decode.lean_step import LeanStepGemma3

    rt = runtime_for(model)
    assert type(rt) is LeanStepGemma3 and rt.label.startswith("lean-c"), getattr(rt, "no_step", None)
    rt.lib = Counting(rt.lib)
    return rt


@pytest.mark.parametrize("plan", list(PLANS))
@pytest.mark.parametrize("kv_heads", [1, 2])
@pytest.mark.parametrize("softcap", [30.0, None])
def test_gemma_step_equals_the_layer_path_and_transformers(plan, kv_heads, softcap, kernels_on):
    """Gemma 3 in the one C call: per-head q/k norms, norms after attention and MLP, GELU-tanh, sliding layers with
    their own rotary table and window, the scaled embedding, the final soft-cap; against LeanGemma3 and transformers
    over steps of 1..17 tokens with rollbacks, past the window, and a call over STEP_ROWS."""
    from budgetlm.decode.lean import LeanGemma3

    model = gemma(kv_heads, softcap=softcap)
    quantise(model, PLANS[plan])
    seq = torch.randint(0, 256, (SEQ_LEN,), generator=torch.Generator().manual_seed(kv_heads)).tolist()
    rt = gemma_step(model)
    desc = rt.descriptor()
    assert [desc.layers[i].window for i in range(3)] == [6, 0, 6] and desc.md.act == 1
    assert [desc.layers[i].rope for i in range(3)] == [1, 0, 1]  # rope_kinds sorted: full, sliding
    got = run_calls(rt, seq)
    assert rt.lib.steps == STEPPED
    close(got, run_calls(LeanGemma3(model), seq))
    close(got, wanted_rows(full_logits(model, seq)))


def test_gemma_step_sparse_view_matches_the_layer_path(kernels_on):
    """A draft's sparse view (window, sinks) on Gemma: narrower than the sliding layers' own window, and on the full
    layers; the step combines them as the per-layer path does."""
    from budgetlm.decode.lean import LeanGemma3

    model = gemma(window=12)
    quantise(model, PLANS["q4"])
    seq = torch.randint(0, 256, (SEQ_LEN,), generator=torch.Generator().manual_seed(3)).tolist()
    for sparse in ((8, 2), (20, 1)):  # narrower than 12 (every layer), wider (the full layer only)
        rt, ref = gemma_step(model), LeanGemma3(model)
        rt.sparse = ref.sparse = sparse
        got = run_calls(rt, seq)
        assert rt.lib.steps == STEPPED
        close(got, run_calls(ref, seq))
        assert not torch.allclose(got, wanted_rows(full_logits(model, seq)), atol=1e-3)  # the view changed them


def test_gemma_greedy_generation_is_token_identical(kernels_on):
    model = gemma(kv_heads=1)
    quantise(model, PLANS["mixed"])
    rt = gemma_step(model)
    seq, cache = [7, 8, 9], rt.new_cache()
    logits = rt(torch.tensor([seq]), 0, cache, 1)
    for _ in range(24):
        seq.append(int(logits[0, -1].argmax()))
        logits = rt(torch.tensor([seq[-1:]]), len(seq) - 1, cache, 1)
    assert rt.lib.steps == 25
    with torch.no_grad():
        want = model.generate(torch.tensor([[7, 8, 9]]), max_new_tokens=24, do_sample=False, pad_token_id=0)
    assert seq == want[0].tolist()


def test_gemma_with_another_activation_stays_per_layer(kernels_on):
    from budgetlm.decode.lean import LeanGemma3

    rt = runtime_for(gemma(act="gelu"))
    assert type(rt) is LeanGemma3 and rt.no_step.startswith("activation gelu ")


def test_gelu_tanh_mul_is_torchs_tanh_gelu():
    lib = native.library()
    gate = torch.cat([torch.linspace(-30, 30, 6001), torch.randn(4000, generator=torch.Generator().manual_seed(0))])
    up = torch.randn(gate.numel(), generator=torch.Generator().manual_seed(1))
    out = torch.full_like(gate, float("nan"))
    lib.lean_gelu_tanh_mul(gate.data_ptr(), up.data_ptr(), gate.numel(), out.data_ptr())
    want = F.gelu(gate.double(), approximate="tanh") * up.double()
    torch.testing.assert_close(out.double(), want, rtol=2e-6, atol=1e-7)


def test_gemma_replaced_norm_weights_are_read_again(kernels_on):
    """A Gemma norm weight replaced after the runtime was made: the step (its descriptor rebuilt) and the per-layer
    path make their 1 + w copies again, so both follow transformers' forward with the new weights."""
    from budgetlm.decode.lean import LeanGemma3

    model = gemma(kv_heads=1)
    quantise(model, PLANS["q4"])
    seq = torch.randint(0, 256, (SEQ_LEN,), generator=torch.Generator().manual_seed(4)).tolist()
    rt, ref = gemma_step(model), LeanGemma3(model)
    before = run_calls(rt, seq)
    close(run_calls(ref, seq), before)
    y = model.model.layers[1]
    for norm in (y.post_feedforward_layernorm, y.self_attn.k_norm, model.model.norm):
        norm.weight = torch.nn.Parameter(torch.rand(norm.weight.shape) - 0.5)
    want = wanted_rows(full_logits(model, seq))
    assert not torch.allclose(want, before, atol=1e-2)  # the new weights change the logits
    got = run_calls(rt, seq)
    assert rt.lib.steps == 2 * STEPPED
    close(got, want)
    close(run_calls(ref, seq), want)
