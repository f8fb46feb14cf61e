"""`budgetlm bench --runtime llama.cpp` (hardware/llamacpp.py): the GGUF type it picks, the size it reads from the
GGUF's tensor table, the plumbing of the runs (a fake llama_cpp module records what llama.cpp was asked to do), the
one-line errors, and one real run on tiny-random when llama-cpp-python is installed."""

from __future__ import annotations

import ctypes
import importlib.machinery
import importlib.util
import json
import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from budgetlm.api import apply, export, load
from budgetlm.errors import ConfigError
from budgetlm.export.gguf import read_layout
from budgetlm.hardware import llamacpp
from budgetlm.hardware.size import model_size
from budgetlm.hardware.speed import _tokens
from budgetlm.methods.quant import native

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HAVE_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None


@pytest.fixture
def tiny():
    return load("tiny-random")


def quantised(steps: list[dict]):
    handle = load("tiny-random")
    apply(handle, steps)
    return handle


# ------------------------------------------------------------------------------------------------ a fake llama_cpp


class FakeLlama:
    """What budgetlm asks of llama_cpp.Llama; records every call. The logits of the last evaluated position put
    their maximum at (last token + 1) % vocab, so greedy decoding is a chain the test can predict."""

    made: list[FakeLlama] = []

    def __init__(self, model_path, **kwargs):
        _, tensors = read_layout(Path(model_path))
        self.vocab = next(t for t in tensors if t.name == "token_embd.weight").shape[-1]
        self.path, self.kwargs = model_path, kwargs
        self.ctx = object()
        self.n_tokens = 0
        self.evals: list[list[int]] = []
        self.resets = 0
        self.closed = False
        self.logits = (ctypes.c_float * self.vocab)()
        FakeLlama.made.append(self)

    def n_vocab(self):
        return self.vocab

    def reset(self):
        self.n_tokens = 0
        self.resets += 1

    def eval(self, tokens):
        tokens = list(tokens)
        assert len(tokens) <= self.kwargs["n_batch"]
        assert self.n_tokens + len(tokens) <= self.kwargs["n_ctx"]
        assert all(0 <= t < self.vocab for t in tokens)
        self.evals.append(tokens)
        self.n_tokens += len(tokens)
        for i in range(self.vocab):
            self.logits[i] = 0.0
        self.logits[(tokens[-1] + 1) % self.vocab] = 1.0

    def close(self):
        self.closed = True


def fake_module() -> types.ModuleType:
    mod = types.ModuleType("llama_cpp")
    mod.__spec__ = importlib.machinery.ModuleSpec("llama_cpp", None)
    mod.__version__ = "0.0-fake"
    mod.Llama = FakeLlama
    mod.llama_get_logits_ith = lambda ctx, i: ctypes.cast(
        next(m for m in FakeLlama.made if m.ctx is ctx).logits, ctypes.POINTER(ctypes.c_float)
    )
    mod.llama_synchronize = lambda ctx: None
    mod.llama_print_system_info = lambda: b"CPU : FAKE = 1 | "
    return mod


@pytest.fixture
def fake(monkeypatch):
    FakeLlama.made = []
    monkeypatch.setitem(sys.modules, "llama_cpp", fake_module())
    return FakeLlama


@pytest.fixture
def no_llama_cpp(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, p=None: None if n == "llama_cpp" else real(n, p))


def run_cli(capsys, *args) -> tuple[int, str, list[str]]:
    from budgetlm.cli import main

    with pytest.raises(SystemExit) as exc:
        main(list(args))
    out, err = capsys.readouterr()
    return exc.value.code, out, [ln for ln in err.splitlines() if ln.strip()]


def error_line(err: list[str]) -> str:
    assert len(err) == 1, err
    assert err[0].startswith("error: "), err
    return err[0]


# ------------------------------------------------------------------------------------------------ the GGUF type


def test_runtime_names():
    assert llamacpp.check_runtime("torch") == "torch"
    assert llamacpp.check_runtime("llama.cpp") == "llama.cpp"
    assert llamacpp.check_runtime("llamacpp") == llamacpp.check_runtime("llama-cpp") == "llama.cpp"
    with pytest.raises(ConfigError, match="unknown runtime 'onnx'; --runtime is one of: torch, llama.cpp"):
        llamacpp.check_runtime("onnx")


def test_default_type_keeps_the_models_own_numbers(tiny):
    assert llamacpp.default_gguf_type(tiny.model)[0] == "F32"
    assert llamacpp.default_gguf_type(tiny.model.to(torch.bfloat16))[0] == "BF16"
    assert llamacpp.default_gguf_type(quantised([{"method": "rtn", "bits": 4, "group_size": 32}]).model)[0] == "Q4_0"
    asym = quantised([{"method": "rtn", "bits": 4, "group_size": 32, "symmetric": False}])
    assert llamacpp.default_gguf_type(asym.model)[0] == "Q4_1"
    assert llamacpp.default_gguf_type(quantised([{"method": "rtn", "bits": 8}]).model)[0] == "Q8_0"
    assert llamacpp.default_gguf_type(quantised([{"method": "rtn", "bits": 3, "group_size": 32}]).model)[0] == "Q4_0"
    pruned = quantised([{"method": "magnitude", "sparsity": 0.5}])
    assert llamacpp.default_gguf_type(pruned.model)[0] == "F32"


@pytest.mark.parametrize(
    "steps, needle",
    [
        ([{"method": "nf4"}], "nf4_linear layer"),
        ([{"method": "rtn", "bits": 4, "group_size": 16}], "4-bit symmetric, group 16"),
    ],
)
def test_no_block_type_is_one_line_naming_the_layer_and_the_way_out(steps, needle):
    with pytest.raises(ConfigError) as exc:
        llamacpp.default_gguf_type(quantised(steps).model)
    msg = str(exc.value)
    assert "no GGUF block type holds the codes of model.layers.0" in msg and needle in msg
    assert "--gguf-type F32 or F16" in msg and "\n" not in msg


# ------------------------------------------------------------------------------------------------ size


def test_gguf_size_of_a_float_export_is_the_torch_models_size(tiny, tmp_path):
    export(tiny, tmp_path / "t.gguf", "F32")
    g, t = llamacpp.gguf_size(tmp_path / "t.gguf", "F32"), model_size(tiny)
    for name in ("stored_bytes", "params", "linear_bytes", "read_bytes_per_token"):
        assert g[name].value == t[name].value, name
    assert g["bpw"].value == g["linear_bpw"].value == 32.0
    assert g["disk_bytes"].value == (tmp_path / "t.gguf").stat().st_size > g["stored_bytes"].value
    assert g["stored_bytes"].extra["tensor_types"] == {"F32": 20}


def test_gguf_size_of_a_q4_0_export_counts_its_blocks(tmp_path):
    handle = quantised([{"method": "rtn", "bits": 4, "group_size": 32}])
    report = export(handle, tmp_path / "q.gguf", "Q4_0")
    g = llamacpp.gguf_size(tmp_path / "q.gguf", "Q4_0")
    assert g["linear_bpw"].value == 4.5  # 32 codes of 4 bits + one fp16 scale per block
    assert g["linear_bpw"].extra["linear_types"] == {"Q4_0": 14}
    assert len(report.from_codes) == 14
    # the tied embedding is the output matrix: Q8_0 (8.5 bits), read whole by a decode step
    assert g["stored_bytes"].extra["token_embd"] == "Q8_0"
    assert g["read_bytes_per_token"].value == g["stored_bytes"].value
    emb = 259 * 128 * 8.5 / 8
    norms = (2 * 2 + 1) * 128 * 4
    assert g["stored_bytes"].value == g["linear_bytes"].value + emb + norms
    assert g["params"].value == model_size(handle)["params"].value


def test_an_untied_output_is_a_linear_and_only_one_embedding_row_is_read(tmp_path):
    handle = load("tiny-random")
    model = handle.model
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    model.config.tie_word_embeddings = False
    export(handle, tmp_path / "u.gguf", "F32")
    g, t = llamacpp.gguf_size(tmp_path / "u.gguf", "F32"), model_size(handle)
    assert g["linear_bytes"].value == t["linear_bytes"].value
    assert g["read_bytes_per_token"].value == t["read_bytes_per_token"].value
    assert "output.weight" in g["linear_bpw"].extra["lm_head"]


# ------------------------------------------------------------------------------------------------ the runs (fake)


def test_measure_gguf_asks_llama_cpp_for_the_torch_runtimes_work(fake, tiny, tmp_path):
    export(tiny, tmp_path / "t.gguf", "F32")
    res = llamacpp.measure_gguf(
        tmp_path / "t.gguf", threads=3, gguf_type="F32", prefill=(16, 64, 64), decode_tokens=5, repeats=2, warmup=1
    )
    (llm,) = fake.made
    assert llm.kwargs["n_threads"] == llm.kwargs["n_threads_batch"] == 3
    assert llm.kwargs["n_batch"] == llm.kwargs["n_ubatch"] == 64 and llm.kwargs["logits_all"] is False
    assert llm.closed
    # prefill: warm-up + 2 repeats per length, each one llama_decode of the torch runtime's own token ids
    assert llm.evals[:3] == [_tokens(tiny.model, 1, 16, 0)[0].tolist()] * 3
    assert llm.evals[3:6] == [_tokens(tiny.model, 1, 64, 0)[0].tolist()] * 3
    # decode: a 32-token prompt, then 5 greedy steps each feeding the argmax of the last logits
    prompt = _tokens(tiny.model, 1, 32, 0)[0].tolist()
    runs = llm.evals[6:]
    assert len(runs) == 3 * 6
    first = runs[:6]
    assert first[0] == prompt
    assert [r[0] for r in first[1:]] == [(prompt[-1] + k) % 259 for k in range(1, 6)]
    assert llm.resets == 3 + 3 + 3  # every run starts from an empty KV cache

    assert set(res) == {"size", "host", "speed", "memory"}
    assert set(res["speed"]) == {
        "prefill_tok_s@16",
        "prefill_tok_s@64",
        "decode_ms_per_token",
        "decode_tok_s",
        "decode_roofline_ms",
        "decode_pct_roofline",
    }
    dec = res["speed"]["decode_ms_per_token"]
    assert dec.n == 2 and dec.extra["n_new"] == 5 and dec.extra["prompt_len"] == 32
    assert dec.extra["runtime"] == "llama.cpp" and dec.extra["gguf_type"] == "F32" and dec.extra["threads"] == 3
    assert dec.extra["llama_cpp_python"] == "0.0-fake" and dec.extra["decoding"] == "greedy"
    assert res["speed"]["prefill_tok_s@64"].extra["n_tokens"] == 64
    assert res["memory"]["peak_rss_benchmark"].unit == "B"


def test_prefill_lengths_and_decode_prompt_are_clamped_to_the_context(fake, tiny, tmp_path):
    tiny.model.config.max_position_embeddings = 40
    export(tiny, tmp_path / "t.gguf", "F32")
    res = llamacpp.measure_gguf(tmp_path / "t.gguf", prefill=(16, 512), decode_tokens=30, repeats=1, warmup=0)
    assert res["speed"]["prefill_tok_s@40"].extra["requested"] == 512
    assert res["speed"]["decode_ms_per_token"].extra["prompt_len"] == 10
    assert fake.made[0].kwargs["n_ctx"] == 40


def test_cli_bench_llama_cpp_json_and_bench_json(fake, capsys, tmp_path, monkeypatch):
    folders = []
    real = llamacpp.temp_folder
    monkeypatch.setattr(llamacpp, "temp_folder", lambda: folders.append(real()) or folders[-1])
    out = tmp_path / "b"
    args = ["bench", "tiny-random", "--runtime", "llama.cpp", "--repeats", "1", "--decode-tokens", "2"]
    code, stdout, _ = run_cli(capsys, *args, "--json", "--out", str(out))
    assert code == 0
    doc = json.loads(stdout)
    assert doc["runtime"]["name"] == "llama.cpp" and doc["runtime"]["gguf_type"] == "F32"
    assert doc["runtime"]["threads"] == torch.get_num_threads()
    assert doc["size"]["linear_bpw"] == 32.0 and doc["speed"]["decode_ms_per_token"] > 0
    assert set(doc["memory"]) == {"peak_rss_load", "peak_rss_export", "peak_rss_benchmark"}
    saved = json.loads((out / "bench.json").read_text())
    assert saved["runtime"] == doc["runtime"]
    assert saved["speed"]["decode_ms_per_token"]["extra"]["runtime"] == "llama.cpp"
    assert folders and not folders[0].exists()  # the temporary GGUF is gone

    code, stdout, _ = run_cli(capsys, *args)
    assert code == 0
    assert "runtime: llama.cpp (llama-cpp-python 0.0-fake)" in stdout and "GGUF F32" in stdout


def test_cli_bench_llama_cpp_of_a_4_bit_model_writes_q4_0_from_its_codes(fake, capsys, tmp_path):
    handle = quantised([{"method": "rtn", "bits": 4, "group_size": 32}])
    handle.save(tmp_path / "q")
    args = ["bench", str(tmp_path / "q"), "--runtime", "llama.cpp", "--repeats", "1", "--decode-tokens", "2"]
    code, stdout, _ = run_cli(capsys, *args, "--json")
    assert code == 0
    doc = json.loads(stdout)
    assert doc["runtime"]["gguf_type"] == "Q4_0" and doc["runtime"]["tensors_from_codes"] == 14
    assert doc["size"]["linear_bpw"] == 4.5
    code, stdout, _ = run_cli(capsys, *args, "--gguf-type", "Q8_0", "--json")
    assert code == 0 and json.loads(stdout)["size"]["linear_bpw"] == 8.5


def test_torch_runtime_records_itself(capsys):
    code, stdout, _ = run_cli(capsys, "bench", "tiny-random", "--repeats", "1", "--decode-tokens", "2", "--json")
    assert code == 0
    doc = json.loads(stdout)
    assert doc["runtime"] == {"name": "torch", "torch": torch.__version__, "threads": torch.get_num_threads(),
                              "dtype": "float32", "decoder": "lean-c (one C call per step)" if native.library()
                              else "lean (torch glue)"}  # fmt: skip
    assert "prefill_tok_s@128" in doc["speed"]


def test_api_measure_runtime_llama_cpp(fake, tiny):
    from budgetlm.api import measure

    res = measure(tiny, runtime="llama.cpp", prefill=(16,), decode_tokens=2, repeats=1, folder="ignored")
    assert res["size"]["bpw"].value == 32.0 and res["size"]["bpw"].extra["gguf_type_why"].startswith("the model's")
    assert res["speed"]["decode_ms_per_token"].extra["runtime"] == "llama.cpp"
    torch_res = measure(tiny, prefill=(16,), decode_tokens=2, repeats=1)
    assert torch_res["speed"]["decode_ms_per_token"].extra["runtime"] == "torch"
    assert set(torch_res["speed"]) == set(res["speed"]) and set(torch_res["size"]) <= set(res["size"])


# ------------------------------------------------------------------------------------------------ bad input


def test_llama_cpp_not_installed_names_the_install_command(no_llama_cpp, capsys, tmp_path):
    out = tmp_path / "b"
    code, _, err = run_cli(capsys, "bench", "tiny-random", "--runtime", "llama.cpp", "--out", str(out))
    assert code == 2
    assert "pip install -e '.[llamacpp]'" in error_line(err) and "llama-cpp-python" in err[0]
    assert not out.exists()
    with pytest.raises(ConfigError, match="not installed"):
        llamacpp.measure_llamacpp(load("tiny-random"))


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--runtime", "onnx"], "unknown runtime 'onnx'"),
        (["--gguf-type", "Q4_0"], "--gguf-type applies to --runtime llama.cpp"),
        (["--requantize"], "--requantize applies to --runtime llama.cpp"),
        (["--runtime", "llama.cpp", "--gguf-type", "Q4_K"], "llama-quantize"),
        (["--runtime", "llama.cpp", "--gguf-type", "Q3"], "unknown GGUF type 'Q3'"),
    ],
)
def test_bad_runtime_options_are_one_line_before_any_work(fake, capsys, tmp_path, args, needle):
    out = tmp_path / "b"
    code, _, err = run_cli(capsys, "bench", "tiny-random", *args, "--out", str(out))
    assert code == 2 and needle in error_line(err)
    assert not out.exists() and not fake.made


def test_a_model_no_gguf_type_holds_is_one_line_and_leaves_nothing(fake, capsys, tmp_path, monkeypatch):
    folders = []
    real = llamacpp.temp_folder
    monkeypatch.setattr(llamacpp, "temp_folder", lambda: folders.append(real()) or folders[-1])
    quantised([{"method": "nf4"}]).save(tmp_path / "nf4")
    out = tmp_path / "b"
    base = ["bench", str(tmp_path / "nf4"), "--runtime", "llama.cpp", "--out", str(out)]
    code, _, err = run_cli(capsys, *base)
    assert code == 2 and "no GGUF block type holds the codes of model.layers.0" in error_line(err)
    code, _, err = run_cli(capsys, *base, "--gguf-type", "Q4_0")
    assert code == 2 and "--requantize" in error_line(err)  # the exporter's own line
    assert not out.exists() and not fake.made
    assert all(not f.exists() for f in folders)
    code, stdout, _ = run_cli(capsys, *base[:-2], "--gguf-type", "F16", "--repeats", "1", "--decode-tokens", "2")
    assert code == 0 and "GGUF F16 (--gguf-type)" in stdout


def test_an_exporter_error_after_the_work_began_removes_the_temporary_folder(fake, monkeypatch):
    from budgetlm.errors import ModelError

    folders = []
    real = llamacpp.temp_folder
    monkeypatch.setattr(llamacpp, "temp_folder", lambda: folders.append(real()) or folders[-1])

    def broken(handle, path, *a, **k):
        Path(path).write_bytes(b"partial")
        raise ModelError("cannot export a weird layer: it exposes no effective_weight()/dequantized_weight()")

    monkeypatch.setattr("budgetlm.export.gguf.export_gguf", broken)
    with pytest.raises(ModelError, match="weird layer"):
        llamacpp.bench_model(lambda: load("tiny-random"))
    assert folders and not folders[0].exists()


# ------------------------------------------------------------------------------------------------ llama.cpp itself


@pytest.mark.skipif(not HAVE_LLAMA_CPP, reason="llama-cpp-python is not installed (pip install -e '.[llamacpp]')")
def test_real_llama_cpp_runs_tiny_random_and_decodes_what_torch_decodes(tmp_path):
    import llama_cpp

    tiny = load("tiny-random")
    results, info = llamacpp.bench_model(
        lambda: load("tiny-random"), threads=1, repeats=1, warmup=0, decode_tokens=4, prefill=(16, 64)
    )
    assert info["name"] == "llama.cpp" and info["gguf_type"] == "F32" and info["threads"] == 1
    assert info["llama_cpp_python"] == llama_cpp.__version__
    speed = results["speed"]
    assert speed["prefill_tok_s@16"].value > 0 and speed["prefill_tok_s@64"].value > 0
    assert speed["decode_ms_per_token"].value > 0 and speed["decode_tok_s"].value > 0
    assert results["size"]["bpw"].value == 32.0
    assert results["memory"]["peak_rss_benchmark"].value > 0

    # the exported model computes what torch computes: the same greedy tokens after the same prompt
    export(tiny, tmp_path / "t.gguf", "F32")
    runner = llamacpp._Runner(tmp_path / "t.gguf", n_ctx=64, n_batch=64, threads=1)
    try:
        prompt = _tokens(tiny.model, 1, 16, 0)
        runner.llm.reset()
        runner._eval(prompt[0].tolist())
        ours = [runner._last_argmax()]
        for _ in range(3):
            runner._eval([ours[-1]])
            ours.append(runner._last_argmax())
        logits = np.ctypeslib.as_array(
            runner.lib.llama_get_logits_ith(runner.llm.ctx, -1), shape=(runner.n_vocab,)
        ).copy()
    finally:
        runner.close()
    with torch.no_grad():
        seq = prompt
        theirs = []
        for _ in range(4):
            out = tiny.model(seq).logits[0, -1]
            theirs.append(int(out.argmax()))
            seq = torch.cat([seq, torch.tensor([[theirs[-1]]])], dim=1)
    assert ours == theirs
    np.testing.assert_allclose(logits, out.numpy(), atol=1e-3, rtol=1e-3)


def test_default_type_of_a_whole_model_quantised(tiny):
    """A tied quantised embedding (no tensors of its own) takes its lm_head's block type."""
    from budgetlm.hardware.llamacpp import default_gguf_type
    from budgetlm.methods.base import apply_steps

    apply_steps(tiny, [{"method": "rtn", "bits": 4, "group_size": 32, "symmetric": True, "embeddings": True}])
    assert default_gguf_type(tiny.model)[0] == "Q4_0"
