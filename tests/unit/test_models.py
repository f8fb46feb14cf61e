"""Model sources, the handle's save/load round trip and one-line errors for bad input."""

import shutil

import pytest
import torch

from budgetlm.errors import ModelError
from budgetlm.models.sources import load, smollm2_path


def test_tiny_random_is_deterministic_by_seed():
    a, b, c = load("tiny-random"), load("tiny-random"), load("tiny-random", seed=1)
    x = torch.tensor([[5, 6, 7]])
    assert torch.equal(a.model(x).logits, b.model(x).logits)
    assert not torch.equal(a.model(x).logits, c.model(x).logits)
    assert a.tokenizer.decode(a.tokenizer.encode("Grüße, world")) == "Grüße, world"


def test_save_load_round_trip_keeps_provenance_and_ties(tmp_path, tiny):
    tiny.provenance.append({"method": "demo", "config": {}})
    tiny.save(tmp_path / "m")
    back = load(tmp_path / "m")
    x = torch.tensor([[1, 2, 3, 4]])
    assert torch.equal(back.model(x).logits, tiny.model(x).logits)
    assert back.provenance == tiny.provenance
    assert back.base_id == "tiny-random"
    emb = back.model.get_input_embeddings().weight
    assert back.model.get_output_embeddings().weight.data_ptr() == emb.data_ptr()
    assert not list((tmp_path).glob(".m.*")), "no temporary folder is left behind"


def test_saved_folder_never_unpickles(tmp_path, tiny):
    tiny.save(tmp_path / "m")
    names = {p.name for p in (tmp_path / "m").iterdir()}
    assert "model.safetensors" in names and not any(n.endswith((".bin", ".pt", ".pkl")) for n in names)


def test_missing_path_is_one_line_error(tmp_path):
    with pytest.raises(ModelError, match="not found") as e:
        load(tmp_path / "nope")
    assert "\n" not in str(e.value)
    with pytest.raises(ModelError, match="did you mean: smollm2-135m"):
        load("smollm2-13m")


def test_folder_that_is_not_a_model(tmp_path):
    (tmp_path / "readme.txt").write_text("hi")
    with pytest.raises(ModelError, match="no config.json"):
        load(tmp_path)


def test_corrupt_and_truncated_gguf(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(ModelError, match="GGUF"):
        load(bad)
    cut = tmp_path / "cut.gguf"
    with open(smollm2_path(), "rb") as f:
        cut.write_bytes(f.read(2_000_000))
    with pytest.raises(ModelError, match="truncated"):
        load(cut)


def test_non_gguf_file(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    with pytest.raises(ModelError, match="not a .gguf"):
        load(f)


def test_hf_folder_loads(tmp_path, tiny):
    tiny.model.save_pretrained(tmp_path / "hf")
    tiny.tokenizer.save_pretrained(tmp_path / "hf")
    h = load(tmp_path / "hf")
    x = torch.tensor([[3, 4, 5]])
    assert torch.allclose(h.model(x).logits, tiny.model(x).logits)
    shutil.rmtree(tmp_path / "hf")
