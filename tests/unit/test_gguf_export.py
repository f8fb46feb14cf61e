"""GGUF export: files read back with gguf's own reader and dequantiser, compared with budgetlm's weights; transformers
reloads them to the same logits; quantised codes are written without a second rounding; bad input fails cleanly."""

import gguf
import numpy as np
import pytest
import torch

from budgetlm.api import apply, export
from budgetlm.errors import ConfigError
from budgetlm.export.gguf import parse_type
from budgetlm.models.handle import ModelHandle
from budgetlm.models.sources import load, tiny_tokenizer

# llama.cpp's tensor names for a Llama decoder layer, written out here rather than taken from gguf's tables
LAYER_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def rope_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter stores each head's rows as pairs (j, j + d/2): new row h·d + m is old row
    h·d + (m mod 2)·d/2 + m div 2."""
    d = w.shape[0] // heads
    return w[[h * d + (m % 2) * (d // 2) + m // 2 for h in range(heads) for m in range(d)]]


def expected_weights(handle) -> dict[str, np.ndarray]:
    """{GGUF name: weight as llama.cpp should hold it} for a Llama handle (quantised layers dequantised)."""
    model, cfg = handle.model, handle.model.config
    out = {
        "token_embd.weight": model.model.embed_tokens.weight,
        "output_norm.weight": model.model.norm.weight,
    }
    if not cfg.tie_word_embeddings:
        out["output.weight"] = model.lm_head.weight
    for i, layer in enumerate(model.model.layers):
        for hf, name in LAYER_NAMES.items():
            mod = layer.get_submodule(hf)
            w = mod.dequantized_weight() if hasattr(mod, "dequantized_weight") else mod.weight
            w = w.detach().float().numpy()
            if name == "attn_q":
                w = rope_rows(w, cfg.num_attention_heads)
            if name == "attn_k":
                w = rope_rows(w, cfg.num_key_value_heads)
            out[f"blk.{i}.{name}.weight"] = w
    return {k: v if isinstance(v, np.ndarray) else v.detach().float().numpy() for k, v in out.items()}


def read_back(path):
    reader = gguf.GGUFReader(str(path))
    tensors = {
        t.name: (gguf.quants.dequantize(t.data, t.tensor_type).reshape(list(reversed(t.shape.tolist()))), t)
        for t in reader.tensors
    }
    return reader, tensors


def field(reader, key):
    return reader.fields[key].contents()


def logits_of(model, ids):
    with torch.no_grad():
        return model(ids).logits


def transformers_load(path):
    from transformers import AutoModelForCausalLM, GgufConfig

    return AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, quantization_config=GgufConfig(dequantize=True), dtype=torch.float32
    ).eval()


IDS = torch.randint(0, 259, (2, 16), generator=torch.Generator().manual_seed(3))


def test_type_names():
    assert parse_type("q4_1") == "Q4_1" and parse_type(" bf16 ") == "BF16"
    with pytest.raises(ConfigError, match="unknown GGUF type 'Q3'.*F16.*Q8_0.*Q4_1.*Q4_0"):
        parse_type("Q3")
    with pytest.raises(ConfigError, match="llama-quantize"):
        parse_type("Q4_K_M")


@pytest.mark.parametrize("qtype", ["F32", "F16", "BF16", "Q8_0", "Q4_0"])
def test_float_model_reads_back(tmp_path, qtype):
    h = load("tiny-random")
    report = export(h, tmp_path / "m.gguf", qtype, pure=True)
    reader, tensors = read_back(tmp_path / "m.gguf")
    want = expected_weights(h)
    assert set(tensors) == set(want)  # tied embeddings: no output.weight
    cfg = h.model.config
    assert field(reader, "general.architecture") == "llama"
    for key, value in {
        "llama.block_count": 2,
        "llama.embedding_length": 128,
        "llama.feed_forward_length": 256,
        "llama.attention.head_count": 4,
        "llama.attention.head_count_kv": 2,
        "llama.context_length": 1024,
        "llama.vocab_size": 259,
        "llama.rope.dimension_count": 32,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.bos_token_id": h.tokenizer.bos_token_id,
        "tokenizer.ggml.eos_token_id": h.tokenizer.eos_token_id,
        "tokenizer.ggml.padding_token_id": h.tokenizer.pad_token_id,
    }.items():
        assert field(reader, key) == value, key
    assert field(reader, "llama.rope.freq_base") == pytest.approx(cfg.rope_parameters["rope_theta"])
    assert field(reader, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(cfg.rms_norm_eps)
    assert field(reader, "general.file_type") == int(
        gguf.LlamaFileType["ALL_F32" if qtype == "F32" else f"MOSTLY_{qtype}"]
    )
    for name, w in want.items():
        got, info = tensors[name]
        assert got.shape == w.shape, name
        if w.ndim == 1:  # norms stay F32, as llama.cpp's converter writes them
            assert info.tensor_type.name == "F32" and np.array_equal(got, w), name
            continue
        assert info.tensor_type.name == qtype, name
        assert list(info.shape) == [w.shape[1], w.shape[0]]  # ggml order: row width first
        if qtype == "F32":
            assert np.array_equal(got, w), name
        elif qtype == "F16":
            assert np.array_equal(got, w.astype(np.float16).astype(np.float32)), name
        elif qtype == "BF16":
            assert np.abs(got - w).max() <= 2**-8 * np.abs(w).max(), name
        else:  # one scale d per 32 weights: error at most half a step (a whole one where Q4_0 clips at +7),
            # plus q times the fp16 rounding of d (2^-11 relative)
            blocks = w.reshape(w.shape[0], -1, 32)
            qmax, slack = (127, 0.5) if qtype == "Q8_0" else (8, 1.0)
            step = np.abs(blocks).max(-1, keepdims=True) / qmax
            err = np.abs(got.reshape(blocks.shape) - blocks)
            assert (err <= step * (slack + qmax * 2**-11) * 1.001 + 1e-9).all(), name
    assert sum(report.tensor_types.values()) == len(want)


def test_output_matrix_keeps_q8_0_unless_pure(tmp_path):
    h = load("tiny-random")
    report = export(h, tmp_path / "a.gguf", "Q4_1")
    _, tensors = read_back(tmp_path / "a.gguf")
    assert tensors["token_embd.weight"][1].tensor_type.name == "Q8_0"  # tied: the embedding is the output matrix
    assert tensors["blk.0.ffn_up.weight"][1].tensor_type.name == "Q4_1"
    assert any("output matrix" in n for n in report.notes)
    export(h, tmp_path / "b.gguf", "Q4_1", pure=True)
    assert read_back(tmp_path / "b.gguf")[1]["token_embd.weight"][1].tensor_type.name == "Q4_1"


def test_transformers_reloads_to_the_same_logits(tmp_path):
    """An independent reader (transformers undoes llama.cpp's q/k row order) gives back the model's logits."""
    h = load("tiny-random")
    ref = logits_of(h.model, IDS)
    for qtype, tol in (("F32", 1e-5), ("F16", 3e-3), ("Q8_0", 4e-2)):
        export(h, tmp_path / f"{qtype}.gguf", qtype)
        got = logits_of(transformers_load(tmp_path / f"{qtype}.gguf"), IDS)
        assert (got - ref).abs().max() < tol * ref.abs().max(), qtype
    # transformers also rebuilds the byte-level tokenizer from the file, token for token
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path, gguf_file="F16.gguf")
    text = "Hello, wörld! 12 +  tabs\tand\nnewlines"
    assert tok(text)["input_ids"] == h.tokenizer(text)["input_ids"]


def _untied_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tiny_tokenizer()
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        rope_theta=5000.0,
    )
    torch.manual_seed(1)
    return ModelHandle(LlamaForCausalLM(cfg).eval(), tok, "untied", [], "untied")


def _tiny_gemma3():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    tok = tiny_tokenizer()
    cfg = Gemma3TextConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=256,  # transformers' GGUF loader assumes query_pre_attn_scalar = 256, as Gemma 3 270M has
        query_pre_attn_scalar=256,
        sliding_window=8,
        max_position_embeddings=512,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(2)
    model = Gemma3ForCausalLM(cfg).eval()
    with torch.no_grad():  # Gemma norms start at 0 (scale 1 + w); make them matter
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(torch.randn_like(p) * 0.3)
    return ModelHandle(model, tok, "tiny-gemma3", [], "tiny-gemma3")


@pytest.mark.parametrize("build", [_untied_llama, _tiny_gemma3])
def test_other_shapes_round_trip(tmp_path, build):
    h = build()
    path = tmp_path / "m.gguf"
    export(h, path, "F32")
    reader, tensors = read_back(path)
    if h.model.config.model_type == "gemma3_text":
        assert field(reader, "general.architecture") == "gemma3"
        assert field(reader, "gemma3.attention.key_length") == 256
        assert field(reader, "gemma3.attention.sliding_window") == 8
        # llama.cpp's converter stores Gemma norms as 1 + w (Gemma3RMSNorm scales by 1 + w)
        w = h.model.model.layers[1].self_attn.q_norm.weight.detach().numpy()
        assert np.array_equal(tensors["blk.1.attn_q_norm.weight"][0], w + 1)
        assert "blk.0.post_ffw_norm.weight" in tensors and "output.weight" not in tensors
    else:
        assert "output.weight" in tensors and field(reader, "llama.rope.freq_base") == 5000.0
    ref = logits_of(h.model, IDS)
    assert (logits_of(transformers_load(path), IDS) - ref).abs().max() < 1e-4 * ref.abs().max()


@pytest.mark.parametrize(
    "bits,group,sym,qtype",
    [
        (8, 32, True, "Q8_0"),
        (8, None, True, "Q8_0"),  # per-channel (the int8 kernel layout): the row scale repeats per block
        (4, 32, True, "Q4_0"),
        (4, 32, False, "Q5_0"),  # a 4-bit asymmetric grid fits Q5_0's signed 5-bit range: bit-exact
        (4, 64, False, "Q8_0"),
        (3, 32, False, "Q4_1"),  # lower bit widths embed in wider types without rounding
        (2, 64, True, "Q4_0"),
    ],
)
def test_codes_written_bit_exact(tmp_path, bits, group, sym, qtype):
    h = load("tiny-random")
    apply(h, [{"method": "rtn", "bits": bits, "group_size": group, "symmetric": sym}])
    report = export(h, tmp_path / "q.gguf", qtype)
    _, tensors = read_back(tmp_path / "q.gguf")
    want = expected_weights(h)
    assert len(report.from_codes) == 14 and not report.requantized
    for name in report.from_codes:
        got, info = tensors[name]
        assert info.tensor_type.name == qtype
        assert np.array_equal(got, want[name]), name  # exactly budgetlm's dequantized_weight, permuted for rope


@pytest.mark.parametrize("group", [32, 64])
def test_q4_1_from_codes_has_no_second_rounding(tmp_path, group):
    """4-bit asymmetric -> Q4_1: d = s and q are exact; only the offset m = -o·s is rounded to fp16."""
    h = load("tiny-random")
    float_w = expected_weights(h)
    apply(h, [{"method": "rtn", "bits": 4, "group_size": group, "symmetric": False}])
    report = export(h, tmp_path / "q.gguf", "Q4_1")
    _, tensors = read_back(tmp_path / "q.gguf")
    want = expected_weights(h)
    worst = 0.0
    for name in report.from_codes:
        got, w = tensors[name][0], want[name]
        blocks = w.reshape(w.shape[0], -1, 32)
        # |m| <= 15·s, half an fp16 ulp is 2^-11 relative, and s <= (max - min) of its group
        s = (w.reshape(w.shape[0], -1, group).max(-1) - w.reshape(w.shape[0], -1, group).min(-1)) / 15
        bound = 2**-11 * 15 * np.repeat(s, group // 32, axis=1)[..., None] + 1e-6 * np.abs(blocks)
        assert (np.abs(got.reshape(blocks.shape) - blocks) <= bound + 1e-12).all(), name
        worst = max(worst, float(np.abs(got - w).max()))
        assert np.abs(got - float_w[name]).max() > 100 * np.abs(got - w).max()  # the quantised model, not the float
        if group == 64:  # ggml's own Q4_1 rounding of the dequantised weights picks other per-block grids
            again = gguf.quants.dequantize(gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q4_1), 3)
            assert np.abs(again - w).max() > 20 * np.abs(got - w).max(), name
    assert report.max_offset_error == pytest.approx(worst, rel=1e-3) and 0 < report.offset_blocks_exact < 1
    assert any("Q5_0 and Q8_0 hold these codes with no rounding" in n for n in report.notes)


def test_grids_a_type_cannot_hold(tmp_path):
    path = tmp_path / "m.gguf"
    h = load("tiny-random")
    apply(h, [{"method": "rtn", "bits": 8, "group_size": 32, "symmetric": False}])
    with pytest.raises(ConfigError, match=r"8-bit asymmetric, group 32\) cannot be written as Q8_0.*F32, F16, BF16"):
        export(h, path, "Q8_0")
    h = load("tiny-random")
    apply(h, [{"method": "rtn", "bits": 4, "group_size": 32, "symmetric": False}])
    with pytest.raises(ConfigError, match="cannot be written as Q4_0.*: Q8_0, Q5_1, Q5_0, Q4_1, F32") as err:
        export(h, path, "Q4_0")
    assert "\n" not in str(err.value) and "--requantize" in str(err.value)
    h = load("tiny-random")
    apply(h, [{"method": "rtn", "bits": 4, "group_size": 16, "symmetric": False}])
    path.write_bytes(b"old file")
    with pytest.raises(ConfigError, match="group 16"):
        export(h, path, "Q4_1")
    assert path.read_bytes() == b"old file" and sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]
    report = export(h, path, "Q4_1", requantize=True)
    assert len(report.requantized) == 14 and not report.from_codes
    _, tensors = read_back(path)
    assert tensors["blk.0.ffn_up.weight"][1].tensor_type.name == "Q4_1"
    export(h, path, "F16")  # floats always hold a quantised model
    got = read_back(path)[1]["blk.1.ffn_down.weight"][0]
    assert np.array_equal(got, expected_weights(h)["blk.1.ffn_down.weight"].astype(np.float16).astype(np.float32))


@pytest.mark.parametrize(
    "steps",
    [
        [{"method": "rtn", "bits": 8}],
        [{"method": "rtn", "bits": 4, "group_size": 32, "symmetric": True}],
        [{"method": "rtn", "bits": 3, "group_size": 64, "symmetric": False}],
        [{"method": "rtn", "bits": 4, "group_size": 16}],
        [{"method": "gptq", "bits": 4, "group_size": 32, "act_order": True}],
        [{"method": "gptq", "bits": 4, "group_size": 32, "act_order": True, "static_groups": True}],
        [{"method": "awq", "bits": 4, "group_size": 64}],
        [{"method": "lobi", "target_bits": 6.0, "candidates": [4, 8], "group_size": 32}],
        [{"method": "lobi", "target_bits": 4.0, "candidates": [2, 4], "rank": 4}],
        [{"method": "wanda", "pattern": "2:4"}, {"method": "rtn", "bits": 4, "group_size": 32}],
        [{"method": "nf4"}],
    ],
    ids=lambda steps: "+".join(f"{s['method']}{s.get('bits', '')}" for s in steps),
)
def test_planned_types_are_the_types_the_result_fits(steps):
    """compress --gguf refuses a type before the work from the configs alone: the prediction must be exactly what
    the export's own check finds in the quantised model (every type that holds every layer, and no other)."""
    from budgetlm.export.gguf import BLOCK_TYPES, exact_types, planned_exact_types
    from budgetlm.methods.base import parse_config

    h = load("tiny-random")
    configs = [parse_config(s["method"], {k: v for k, v in s.items() if k != "method"}) for s in steps]
    planned = planned_exact_types(h.model, configs)
    apply(h, steps)
    actual = set(BLOCK_TYPES)
    for mod in h.model.modules():
        if getattr(mod, "layer_kind", None) in ("quant_linear", "nf4_linear"):
            actual &= exact_types(mod)
    assert planned == actual


def test_tokenizer_copied_from_the_source_gguf(tmp_path, monkeypatch):
    monkeypatch.setenv("BUDGETLM_CACHE", str(tmp_path / "cache"))
    first = tmp_path / "first.gguf"
    export(load("tiny-random"), first, "F32")
    h = load(str(first))  # a model loaded from a GGUF file names it as its source
    report = export(h, tmp_path / "second.gguf", "Q8_0")
    assert report.tokenizer.startswith("copied from first.gguf")
    a, b = gguf.GGUFReader(str(first)), gguf.GGUFReader(str(tmp_path / "second.gguf"))
    keys = [k for k in a.fields if k.startswith("tokenizer.")]
    assert "tokenizer.ggml.merges" in keys and "tokenizer.ggml.tokens" in keys
    assert keys == [k for k in b.fields if k.startswith("tokenizer.")]
    for k in keys:
        assert a.fields[k].contents() == b.fields[k].contents() and a.fields[k].types == b.fields[k].types, k


def cli(run_main, *args) -> tuple[int, str, str]:
    proc = run_main(*args)
    return proc.returncode, proc.stdout, proc.stderr


def test_cli(tmp_path, run_main):
    out = tmp_path / "m.gguf"
    code, stdout, err = cli(run_main, "export", "tiny-random", "--gguf", "q8_0", "--out", str(out))
    assert code == 0, err
    assert "wrote" in stdout and gguf.GGUFReader(str(out)).tensors
    missing = str(tmp_path / "no" / "model")
    for args, needle in (
        (["tiny-random", "--gguf", "Q3", "--out", str(tmp_path / "x.gguf")], "Q4_1"),
        ([missing, "--gguf", "Q8_0", "--out", str(tmp_path / "y.gguf")], "not found"),
        (["tiny-random", "--gguf", "Q8_0", "--out", str(tmp_path)], "is a folder"),
    ):
        code, _, err = cli(run_main, "export", *args)
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert code == 2 and len(lines) == 1 and needle in lines[0], err
    code, stdout, err = cli(
        run_main,
        "compress",
        "tiny-random",
        "--method",
        "rtn",
        "--set",
        "bits=4",
        "--set",
        "group_size=32",
        "--set",
        "symmetric=false",
        "--out",
        str(tmp_path / "q"),
        "--gguf",
        "Q5_0",
    )
    assert code == 0, err
    assert "14 tensors written from budgetlm's codes" in stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "q", "q.Q5_0.gguf"]


def llama_cpp_run(path, ids, text=""):
    """(llama.cpp's tokens for `text`, its logits [len(ids), vocab] for `ids`)."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, logits_all=True, verbose=False, n_threads=2)
    try:
        tokens = llm.tokenize(text.encode(), add_bos=False, special=False) if text else []
        llm.eval(ids)
        return tokens, np.array(llm.scores[: len(ids)])
    finally:
        llm.close()


def test_llama_cpp_runs_the_tiny_export(tmp_path):
    """llama.cpp itself (when llama-cpp-python is installed) tokenizes like budgetlm and computes the same logits."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    h = load("tiny-random")
    export(h, tmp_path / "t.gguf", "F32")
    text = "Hello, wörld! 12 tabs\tand\nnewlines"
    ids = h.tokenizer(text)["input_ids"]
    tokens, got = llama_cpp_run(tmp_path / "t.gguf", ids, text)
    assert tokens == ids
    ref = logits_of(h.model, torch.tensor([ids]))[0].numpy()
    assert np.abs(got - ref).max() < 2e-3 * np.abs(ref).max()


@pytest.mark.slow
def test_smollm2_export_keeps_the_source_metadata_and_runs_in_llama_cpp(tmp_path):
    from budgetlm.models.sources import smollm2_path

    h = load("smollm2-135m")
    apply(h, [{"method": "rtn", "bits": 4, "group_size": 32, "symmetric": False}])
    path = tmp_path / "s.gguf"
    report = export(h, path, "Q4_1")
    assert len(report.from_codes) == 210 and report.max_offset_error < 3e-3
    src, out = gguf.GGUFReader(str(smollm2_path())), gguf.GGUFReader(str(path))
    for k, f in src.fields.items():
        if k.startswith(("tokenizer.", "llama.")):
            assert out.fields[k].contents() == f.contents() and out.fields[k].types == f.types, k
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    prompt = "The capital of France is Paris. The capital of Germany is"
    ids = h.tokenizer(prompt)["input_ids"]
    _, got = llama_cpp_run(path, ids)
    ref = torch.log_softmax(logits_of(h.model, torch.tensor([ids]))[0], -1)
    kl = (ref.exp() * (ref - torch.log_softmax(torch.tensor(got), -1))).sum(-1).mean()
    assert kl < 0.05  # measured 0.013: llama.cpp quantises activations for its Q4_1/Q8_0 dot products
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, verbose=False, n_threads=2)
    try:
        text = llm.create_completion(prompt, max_tokens=6, temperature=0)["choices"][0]["text"]
    finally:
        llm.close()
    assert "Berlin" in text
