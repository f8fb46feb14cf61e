"""A windowed draft (decode/speculative.Chain `draft_window`, MagicDec's sparse-KV draft): every draft attends to
the first SINKS positions and the last `draft_window` only. Its logits equal transformers' forward of the draft with
that mask written independently here (on the one-call C step, the per-layer path and a prompt's torch path), they
differ from the draft's full attention (the window is real), the exact output stays the verifier's greedy decoding
(Llama and Gemma 3), and bad settings are one-line errors."""

from __future__ import annotations

import pytest
import torch
from test_decode import gemma, greedy_reference, llama, prompt_of
from test_decode_share_kv import noisy_copy

from budgetlm.decode.cached import CachedLM
from budgetlm.decode.generate import Generator, build, check_settings
from budgetlm.decode.lean import HFRuntime, LeanLlama
from budgetlm.decode.speculative import SINKS
from budgetlm.errors import ConfigError
from budgetlm.models.sources import tiny_tokenizer

TOK = tiny_tokenizer()


def sparse_mask(n: int, window: int, sinks: int) -> torch.Tensor:
    """[1, 1, n, n] boolean mask (True: attended): position i sees j <= i with i - j < window, or j < sinks."""
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    seen = (j <= i) & ((i - j < window) | (j < sinks))
    return seen[None, None]


@pytest.mark.parametrize("runtime", ["step", "c-layers", "torch"])
def test_windowed_logits_equal_a_masked_forward(runtime, monkeypatch):
    from budgetlm.decode.lean import CGlue
    from budgetlm.decode.lean_step import LeanStepLlama
    from budgetlm.methods.quant import native

    if runtime != "torch" and native.library() is None:
        pytest.skip("budgetlm's C library is not built here")
    if runtime == "c-layers":
        monkeypatch.setenv("BUDGETLM_LEAN_STEP", "0")
    if runtime == "torch":
        monkeypatch.setenv("BUDGETLM_LEAN_C", "0")
    d = llama(5).float()  # float32: the C glue and the one-call step
    window = 6
    prompt = prompt_of(30, 1)
    lm = CachedLM(d, "d")
    assert isinstance(lm.runtime, LeanStepLlama) == (runtime == "step")
    assert isinstance(lm.runtime, LeanLlama) and isinstance(lm.runtime.glue, CGlue) == (runtime != "torch")
    lm.runtime.sparse = (window, SINKS)
    # a 30-token prompt (the torch path: above 16 rows), then 3 tokens one at a time and 5 at once (the C step)
    rows = [lm.logits(prompt, 0)[-1]]
    seq = list(prompt)
    for t in (11, 12, 13):
        seq.append(t)
        rows.append(lm.logits(seq, len(seq) - 1)[-1])
    seq += [20, 21, 22, 23, 24]
    rows += list(lm.logits(seq, len(seq) - 5))
    got = torch.stack(rows)
    with torch.no_grad():
        full = d(torch.tensor([seq]), attention_mask=sparse_mask(len(seq), window, SINKS)).logits[0]
        plain = d(torch.tensor([seq])).logits[0]
    at = [len(prompt) - 1, len(prompt), len(prompt) + 1, *range(len(prompt) + 2, len(seq))]
    torch.testing.assert_close(got, full[at].float(), rtol=1e-4, atol=1e-4)
    assert (got - plain[at].float()).abs().max() > 1e-3  # not the full attention: the test can fail


@pytest.mark.parametrize("model", ["llama", "gemma"])
def test_exact_output_unchanged_with_a_windowed_draft(model):
    make = llama if model == "llama" else gemma
    v = make(2)
    d = noisy_copy(v, 0.05, 3)
    for seed in range(2):
        prompt = prompt_of(40 + 9 * seed, seed)
        want = greedy_reference(v, prompt, 16)
        out = Generator([("d", d), ("v", v)], TOK, taus=[None], max_draft=4, draft_window=8)(prompt, 16)
        assert out.tokens == want
        full = Generator([("d", d), ("v", v)], TOK, taus=[None], max_draft=4)(prompt, 16)
        assert full.tokens == want
    # a window keeps a draft's view, not its output: the windowed draft's acceptance is its own
    assert out.levels[1]["proposed"] > 0


def test_bad_windows_and_runtimes_are_one_line_errors(monkeypatch):
    with pytest.raises(ConfigError, match="above 4"):
        check_settings(8, "exact", 8, 0.0, 1.0, draft_window=SINKS)
    with pytest.raises(ConfigError, match="above 4"):
        check_settings(8, "exact", 8, 0.0, 1.0, draft_window=-1)
    check_settings(8, "exact", 8, 0.0, 1.0, draft_window=SINKS + 1)

    class Handle:
        source, tokenizer, model = "v", TOK, llama(1)

    with pytest.raises(ConfigError, match="needs --draft"):
        build(Handle(), [], draft_window=64)
    v = llama(1)
    monkeypatch.setenv("BUDGETLM_LEAN", "0")  # transformers' runtime: no window to set
    lm = CachedLM(v, "d")
    assert isinstance(lm.runtime, HFRuntime)
    with pytest.raises(ConfigError, match="transformers' runtime"):
        Generator([("d", v), ("v", v)], TOK, taus=[None], draft_window=64)(prompt_of(10, 0), 4)


def test_generate_and_eval_take_a_draft_window(run_main, tmp_path):
    import json

    args = ("generate", "tiny-random", "The answer is the number of", "--max-new-tokens", "12", "--json")
    plain = json.loads(run_main(*args).stdout)
    windowed = json.loads(run_main(*args, "--draft", "layers:1", "--tau", "inf", "--draft-window", "5").stdout)
    assert windowed["text"] == plain["text"] and windowed["levels"][1]["proposed"] > 0
    common = ("eval", "tiny-random", "--tasks", "arith", "--limit", "2", "--json", "--draft", "layers:1")
    run_main(*common, "--draft-window", "5", "--out", tmp_path / "e")
    doc = json.loads((tmp_path / "e" / "eval.json").read_text())
    assert doc["arith"]["exact_match"]["extra"]["decoding"].endswith("drafts attend to 4 sinks + the last 5 positions")


def test_a_recipe_takes_a_draft_window_and_leaves_other_cell_ids_alone():
    from budgetlm.experiments.plan import plan
    from budgetlm.experiments.recipe import parse_recipe

    base = {"name": "r", "models": ["tiny-random"], "tasks": ["arith"], "limit": 2, "bench": {"enabled": False},
            "pipelines": {"q8": [{"method": "rtn", "bits": 8}]}}  # fmt: skip
    plain = {c.pipeline: c for c in plan(parse_recipe({**base, "decoding": {"drafts": ["layers:1"]}}))}
    windowed = {c.pipeline: c for c in plan(parse_recipe({**base, "decoding": {"drafts": ["layers:1"],
                                                                                "draft_window": 64}}))}  # fmt: skip
    assert "draft_window" not in plain["q8"].config["decoding"]  # absent: the ids of existing studies stay
    assert windowed["q8"].config["decoding"]["draft_window"] == 64 and windowed["q8"].id != plain["q8"].id
    with pytest.raises(ConfigError, match="above 4"):
        plan(parse_recipe({**base, "decoding": {"drafts": ["layers:1"], "draft_window": 3}}))
