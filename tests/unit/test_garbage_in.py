"""Garbage is refused or flagged, never scored silently: non-finite tensors stop a load with one line naming the
tensor and the file (saved folders, packed quantised scales, adapters, Hugging Face folders, GGUF files), and a
perplexity worse than a uniform guess over the vocabulary carries a warning."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from budgetlm.api import apply, export
from budgetlm.data.tasks.offline import implausible_perplexity
from budgetlm.errors import ModelError
from budgetlm.models.handle import check_finite
from budgetlm.models.sources import load

FIX = "the file is corrupt or a method wrote broken weights: re-create it from the original model"


def poison(file, key: str, value: float, index: int = 7) -> int:
    """Write `value` into one element of tensor `key` of a safetensors file; returns the tensor's size."""
    tensors = load_file(file)
    tensors[key].view(-1)[index] = value
    save_file(tensors, file, metadata={"format": "pt"})
    return tensors[key].numel()


def test_nan_weight_in_a_saved_folder(tmp_path, tiny):
    folder = tiny.save(tmp_path / "m")
    key = "model.layers.1.mlp.up_proj.weight"
    numel = poison(folder / "model.safetensors", key, float("nan"))
    with pytest.raises(ModelError) as e:
        load(folder)
    where = f"model folder {folder} (model.safetensors)"
    assert str(e.value) == f"{where}: tensor '{key}' holds 1 NaN and 0 infinite values (of {numel:,}); {FIX}"


def test_infinite_scale_of_a_packed_quantised_layer(tmp_path, tiny):
    apply(tiny, [{"method": "rtn", "bits": 4}])
    folder = tiny.save(tmp_path / "q")
    poison(folder / "model.safetensors", "model.layers.0.mlp.down_proj.scales", -float("inf"), index=0)
    with pytest.raises(ModelError, match=r"'model\.layers\.0\.mlp\.down_proj\.scales' holds 0 NaN and 1 infinite"):
        load(folder)


def test_nan_in_an_adapter_matrix(tmp_path, tiny):
    apply(tiny, [{"method": "lora"}])
    folder = tiny.save(tmp_path / "a")
    key = "model.layers.0.self_attn.q_proj.lora_B.default.weight"
    poison(folder / "model.safetensors", key, float("nan"), index=0)
    with pytest.raises(ModelError, match=rf"tensor '{key}' holds 1 NaN"):
        load(folder)


def test_hugging_face_folder(tmp_path, tiny):
    with torch.no_grad():
        tiny.model.model.norm.weight[3] = float("inf")
    tiny.model.save_pretrained(tmp_path / "hf")
    tiny.tokenizer.save_pretrained(tmp_path / "hf")
    with pytest.raises(ModelError, match=rf"^model folder {tmp_path / 'hf'}: tensor 'model.norm.weight' holds 0 NaN"):
        load(tmp_path / "hf")


def test_gguf_file_is_refused_before_it_is_cached(tmp_path, tiny, monkeypatch):
    monkeypatch.setenv("BUDGETLM_CACHE", str(tmp_path / "cache"))
    with torch.no_grad():
        tiny.model.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
    export(tiny, tmp_path / "m.gguf", "F32")
    with pytest.raises(ModelError, match=rf"^GGUF file {tmp_path / 'm.gguf'} .*'model.layers.1.mlp.up_proj.weight'"):
        load(tmp_path / "m.gguf")
    assert not (tmp_path / "cache" / "models").exists() or not any((tmp_path / "cache" / "models").iterdir())


def test_large_finite_values_whose_sum_overflows_pass(tiny):
    with torch.no_grad():
        tiny.model.model.layers[0].mlp.up_proj.weight[0, :4] = 3e38  # the sum is inf, every value finite
    check_finite(tiny.model, "x")
    with torch.no_grad():
        tiny.model.model.layers[0].mlp.up_proj.weight[0, 4] = -math.inf
    with pytest.raises(ModelError, match="holds 0 NaN and 1 infinite values"):
        check_finite(tiny.model, "x")


def test_cli_eval_of_a_corrupt_folder_is_one_line(tmp_path, tiny):
    folder = tiny.save(tmp_path / "m")
    poison(folder / "model.safetensors", "model.layers.0.self_attn.k_proj.weight", float("nan"))
    proc = subprocess.run(
        [sys.executable, "-m", "budgetlm.cli", "eval", str(folder), "--tasks", "text-ppl", "--limit", "1"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert (
        len(lines) == 1
        and lines[0].startswith("error: model folder")
        and "model.layers.0.self_attn.k_proj.weight" in lines[0]
    )


def test_implausible_perplexity():
    assert implausible_perplexity(258.9, 259) is None
    assert implausible_perplexity(259.5, 259) == (
        "perplexity 259.5 is above the vocabulary size (259), worse than a uniform guess: "
        "the model's weights are likely corrupt or broken by compression"
    )
    assert implausible_perplexity(math.inf, 259).startswith("perplexity inf is above")
    assert "not a number" in implausible_perplexity(math.nan, 259)


def test_eval_warns_once_on_a_perplexity_worse_than_uniform(tmp_path, tiny):
    with torch.no_grad():
        tiny.model.model.embed_tokens.weight.mul_(30)  # tied: confident, wrong logits
    folder = tiny.save(tmp_path / "m")
    cmd = [sys.executable, "-m", "budgetlm.cli", "eval", str(folder), "--tasks", "text-ppl", "--limit", "2"]
    proc = subprocess.run([*cmd, "--json", "--out", str(tmp_path / "ev")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    ppl = json.loads(proc.stdout)["text-ppl"]["perplexity"]  # stdout stays pure JSON
    assert ppl > 259
    warnings = [ln for ln in proc.stderr.splitlines() if ln.startswith("warning:")]
    assert warnings == [f"warning: text-ppl perplexity: {implausible_perplexity(ppl, 259)}"]
    saved = json.loads((tmp_path / "ev" / "eval.json").read_text())["text-ppl"]["perplexity"]
    assert saved["extra"]["warning"] == implausible_perplexity(ppl, 259)
