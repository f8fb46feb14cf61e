"""Generic checks every registered method must pass (peft's shared-tester idea): it applies to the tiny
model, the model still generates, its config round-trips through YAML, bad configs are rejected in one
line, provenance records it, the saved folder reloads to the same outputs, and size accounting agrees
with the bytes on disk."""

import json
import struct

import pytest
import torch
import yaml

from budgetlm.errors import ConfigError
from budgetlm.hardware.size import model_size
from budgetlm.methods.base import apply_steps, methods, parse_config
from budgetlm.models.lm import HFLM, GenArgs
from budgetlm.models.sources import load

ALL = methods.names()


def safetensors_payload(path):
    with open(path, "rb") as f:
        header_len = struct.unpack("<Q", f.read(8))[0]
    return path.stat().st_size - 8 - header_len


def test_registry_is_not_empty():
    assert "rtn" in ALL


@pytest.mark.parametrize("name", ALL)
def test_config_round_trips_through_yaml(name):
    cls = methods.get(name)
    cfg = cls()
    text = yaml.safe_dump(cfg.model_dump())
    assert cls.model_validate(yaml.safe_load(text)) == cfg
    assert cls.describe(), "every method has a one-line description"


@pytest.mark.parametrize("name", ALL)
def test_unknown_setting_is_rejected_in_one_line(name):
    with pytest.raises(ConfigError) as e:
        parse_config(name, {"no_such_setting": 1})
    assert "no_such_setting" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("name", ALL)
def test_apply_generate_save_reload_and_size(name, tmp_path):
    h = load("tiny-random")
    x = torch.randint(0, 250, (2, 16))
    before = h.model(x).logits
    apply_steps(h, [{"method": name}])
    assert h.provenance[-1]["method"] == name
    after = h.model(x).logits
    assert torch.isfinite(after).all()
    if getattr(methods.get(name), "identity_at_attach", False):  # an adapter attached without a train config
        assert torch.allclose(after, before, atol=1e-4), "a freshly attached adapter changed the outputs"
        assert not h.model.get_input_embeddings().weight.requires_grad, "the adapter left the base trainable"
        assert any(p.requires_grad for p in h.model.parameters()), "the adapter has nothing to train"
    else:
        assert not torch.equal(after, before), "the method changed nothing"
    out = HFLM(h).generate_until([("hello", GenArgs(until=[], max_gen_toks=4))])
    assert isinstance(out[0], str)
    h.save(tmp_path / "m")
    again = load(tmp_path / "m")
    assert torch.equal(again.model(x).logits, after)
    size = model_size(again, tmp_path / "m")
    assert size["stored_bytes"].value == safetensors_payload(tmp_path / "m" / "model.safetensors")
    assert 0 < size["linear_bpw"].value <= 32
    manifest = json.loads((tmp_path / "m" / "budgetlm.json").read_text())
    assert manifest["base"] == "tiny-random"
