"""Scoring in llama.cpp (evaluation/llamacpp_lm.py) against torch's HFLM on the same model, and a study with a
llama.cpp cell run end to end; skipped where llama-cpp-python is not installed (pip install -e '.[llamacpp]').
tests/unit/test_runtime_cells.py covers what needs no llama.cpp."""

from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip("llama_cpp")

from budgetlm.api import apply, export, load  # noqa: E402
from budgetlm.decode import query  # noqa: E402
from budgetlm.evaluation.llamacpp_lm import LlamaCppLM  # noqa: E402
from budgetlm.experiments import store as st  # noqa: E402
from budgetlm.models.lm import HFLM, GenArgs  # noqa: E402

REQUESTS = [  # contexts shared by several continuations, a context ending in spaces, an empty context
    ("The cat sat on the", " mat"),
    ("The cat sat on the", " hat and then slept"),
    ("The cat sat on the", " mat"),
    ("Question: 2 + 2 = ", "4"),
    ("Question: 2 + 2 = ", "five, said the model"),
    ("", "an empty context"),
    ("A longer context about llamas, alpacas and vicuñas, all of them camelids, which", " graze"),
]
TEXTS = [
    "Rolling perplexity covers every token once. " * 6,
    "short text",
    "Über große Höhen: ünïcödé bytes and numbers 12345.",
]


def quantised(steps):
    handle = load("tiny-random")
    apply(handle, steps)
    return handle


def pair(tmp_path, handle, gguf_type, max_length=None):
    """(torch's HFLM, llama.cpp's LM) over the same model; the GGUF in the type that holds its numbers."""
    path = tmp_path / f"m.{gguf_type}.gguf"
    export(handle, path, gguf_type)
    return HFLM(handle, max_length=max_length), LlamaCppLM(handle, path, threads=1, max_length=max_length)


def test_f32_loglikelihoods_rolling_and_token_logprobs_equal_torchs(tmp_path):
    torch_lm, cpp = pair(tmp_path, load("tiny-random"), "F32", max_length=48)  # 48: rolling texts need windows
    try:
        ours, theirs = cpp.loglikelihood(REQUESTS), torch_lm.loglikelihood(REQUESTS)
        for (a, ga), (b, gb) in zip(ours, theirs):
            assert abs(a - b) < 1e-3 and ga == gb
        assert ours[0] == ours[2]  # a repeated request: the same answer
        for stride in (None, 16):
            rolled, ref = cpp.loglikelihood_rolling(TEXTS, stride), torch_lm.loglikelihood_rolling(TEXTS, stride)
            for a, b in zip(rolled, ref):
                assert abs(a - b) < 1e-3 * max(1.0, abs(b) / 100)
        seqs = [torch_lm.encode(t)[:40] for t in TEXTS]
        for a, b in zip(cpp.token_logprobs(seqs), torch_lm.token_logprobs(seqs)):
            assert a.shape == b.shape
            torch.testing.assert_close(a, b, atol=1e-3, rtol=0)
        # one query at a time (the RAG tasks): llama.cpp computes these too, not the torch module
        assert query.loglikelihood(cpp, REQUESTS) == ours
        for a, b in zip(query.loglikelihood(cpp, REQUESTS), query.loglikelihood(torch_lm, REQUESTS)):
            assert abs(a[0] - b[0]) < 1e-3
        torch.testing.assert_close(
            query.next_token_logprobs(cpp, "The cat"), query.next_token_logprobs(torch_lm, "The cat"), atol=1e-3, rtol=0
        )
        assert cpp.session.tokens  # the last query's tokens are cached ...
        query.reset(cpp)
        assert cpp.session.tokens == [] and len(cpp.session.rows) == 0  # ... until the next query starts afresh
        assert query.loglikelihood(cpp, REQUESTS[:1]) == ours[:1]
    finally:
        cpp.close()


def lively():
    """tiny-random with its decoder weights x4: greedy generations that do not settle on one repeated token."""
    handle = load("tiny-random", seed=3)
    with torch.no_grad():
        for name, p in handle.model.named_parameters():
            if ".layers." in name and p.dim() == 2:
                p.mul_(4)
    return handle


def test_f32_greedy_generations_are_identical(tmp_path):
    torch_lm, cpp = pair(tmp_path, lively(), "F32")
    reqs = [
        ("Once upon a time", GenArgs(until=[], max_gen_toks=24, chat=False)),
        ("Q: what is 3 + 4?\nA:", GenArgs(until=["0"], max_gen_toks=24, chat=False)),
        ("The quick brown fox", GenArgs(until=["x", "**"], max_gen_toks=16, chat=True)),
        ("abc", GenArgs(until=[], max_gen_toks=1, chat=False)),
    ]
    try:
        ours = cpp.generate_until(reqs)
        theirs = [torch_lm.generate_until([r])[0] for r in reqs]  # one at a time: no left padding in torch
        assert ours == theirs
        assert len(set(ours[0])) > 5  # not one token repeated
        assert ours[1] and "1" in ours[1] and "0" not in ours[1]  # cut at the stop string
        assert "**" not in ours[2] and len(ours[3]) == 1
        assert cpp.tally.tokens > 0 and cpp.tally.seconds > 0
    finally:
        cpp.close()


# Q8_0 / Q4_0: the file holds budgetlm's own codes (export.gguf writes them, no second rounding), but llama.cpp
# computes differently: its quantised dot products round the activations to 8 bits per block of 32 (Q8_0 / Q8_1)
# and, as llama-quantize does, the exporter writes the tied output matrix / embedding as Q8_0 where torch keeps it
# in fp32. Measured on tiny-random: llama.cpp and torch differ by up to 0.016 nats per request (sequences of 10-80
# tokens) for both types, while the quantisation itself moves these requests by 0.001-0.01 (Q8_0) and 0.1-0.4 nats
# (Q4_0). Tolerance per request: 0.02 nats (the measured rounding with some margin) plus a quarter of the
# quantisation's own change; and for Q4_0, where the codes matter, llama.cpp's scores must be five times nearer
# torch's on the same codes than the unquantised model's (a wrong code or a second rounding would fail that).
@pytest.mark.parametrize(("bits", "gguf_type"), [(8, "Q8_0"), (4, "Q4_0")])
def test_quantised_scores_are_close_to_torchs_on_the_same_codes(tmp_path, bits, gguf_type):
    from budgetlm.hardware.llamacpp import default_gguf_type

    handle = quantised([{"method": "rtn", "bits": bits, "group_size": 32, "symmetric": True}])
    assert default_gguf_type(handle.model)[0] == gguf_type
    fp = HFLM(load("tiny-random")).loglikelihood(REQUESTS)
    torch_lm, cpp = pair(tmp_path, handle, gguf_type)
    try:
        ours, theirs = cpp.loglikelihood(REQUESTS), torch_lm.loglikelihood(REQUESTS)
    finally:
        cpp.close()
    for (a, _), (b, _), (f, _) in zip(ours, theirs, fp):
        assert abs(a - b) <= 0.25 * abs(b - f) + 0.02, (a, b, f)
    if gguf_type == "Q4_0":
        near = sum(abs(a - b) for (a, _), (b, _) in zip(ours, theirs))
        assert near < 0.2 * sum(abs(a - f) for (a, _), (f, _) in zip(ours, fp))


def test_a_study_with_a_llama_cpp_cell_runs_end_to_end(tmp_path, tiny_study_data):
    """Real cells (run_cell through the local InOrder pool, in this process so the stubbed data applies): the
    torch q4 cell and its llama.cpp sibling; the sibling's folder holds model.gguf, its rows say llama.cpp and
    Q4_0, its sizes come from the file, its scores are close to the torch cell's."""
    from budgetlm.experiments.cell import run_cell
    from budgetlm.experiments.study import run_study, summary_table
    from budgetlm.export.gguf import read_layout

    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "name: tiny\nmodels: [tiny-random]\n"
        "pipelines: {q4: [{method: rtn, bits: 4, group_size: 32, symmetric: true}]}\n"
        "runtime: {llama.cpp: [q4]}\ntasks: [text-ppl, arc_easy]\n"
        f"limit: {{text-ppl: 4, arc_easy: 6}}\ndata_dir: {tiny_study_data}\n"
        "bench: {prefill: [16], decode_tokens: 4, repeats: 1, warmup: 0}\n"
    )
    out = run_study(recipe, tmp_path / "out", progress=False, runner=lambda folder, _status: run_cell(folder))
    with st.Store.open(out) as s:
        cells = {c["pipeline"]: c for c in s.cells()}
        rows = st.by_cell(s.rows())
    assert {p: c["status"] for p, c in cells.items()} == {"baseline": "done", "q4": "done", "q4@llama.cpp": "done"}
    cpp, q4 = rows[cells["q4@llama.cpp"]["cell_id"]], rows[cells["q4"]["cell_id"]]
    for phase, metrics in cpp.items():
        for name, row in metrics.items():
            if not name.endswith(st.RECOVERY):  # recovery rows are the driver's, from the stored values
                assert row["extra"]["runtime"] == "llama.cpp" and row["extra"]["gguf_type"] == "Q4_0", (phase, name)
    assert "runtime" not in q4["size"]["stored_bytes"]["extra"]
    folder = next((out / "cells").glob("tiny-random_q4-llama.cpp_*"))
    gguf = folder / "model.gguf"
    _, tensors = read_layout(gguf)
    assert cpp["size"]["stored_bytes"]["value"] == sum(t.n_bytes for t in tensors)
    assert cpp["size"]["disk_bytes"]["value"] == gguf.stat().st_size
    assert not (folder / "model").exists() and not list(folder.glob("*.tmp*"))
    assert cpp["speed"]["decode_ms_per_token"]["value"] > 0 and cpp["speed"]["prefill_tok_s@16"]["value"] > 0
    assert cpp["text-ppl"]["kld"]["value"] >= 0 and cpp["arc_easy"]["acc"]["n"] == 6
    a, b = cpp["text-ppl"]["perplexity"]["value"], q4["text-ppl"]["perplexity"]["value"]
    assert math.isfinite(a) and abs(math.log(a) - math.log(b)) < 0.05  # the same codes, scored by llama.cpp
    steps = json.loads((folder / "steps.json").read_text())
    assert steps["runtime"] == "llama.cpp" and steps["gguf"]["gguf_type"] == "Q4_0"
    assert len((folder / "items" / "arc_easy.jsonl").read_text().splitlines()) == 6
    cols = {c.header: list(c._cells) for c in summary_table(out).columns}
    assert cols["pipeline"] == ["baseline", "q4", "q4@llama.cpp"] and cols["status"] == ["done"] * 3
