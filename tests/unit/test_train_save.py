"""What `budgetlm train` saves: by default the trained adapter in peft's format (peft and budgetlm both load it back to
the trained model's logits), with --merge the merged model (the unmerged model's logits to fp32 rounding); bad
--merge / --out / base cases are one-line errors that leave nothing behind."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from test_cli import assert_one_line_error  # the CLI tests' helper (same folder)

from budgetlm.api import apply, train
from budgetlm.errors import ConfigError, ModelError
from budgetlm.methods.adapt.base import AdaptedLinear
from budgetlm.models.sources import load

X = torch.randint(0, 250, (2, 12), generator=torch.Generator().manual_seed(3))
TRAIN = {"steps": 2, "lr": 1e-2, "batch_size": 2, "max_len": 32, "data": {"task": "corpus", "limit": 8}}
ADAPTER = {"adapter_config.json", "adapter_model.safetensors", "budgetlm_adapter.json"}
CLI_TRAIN = ["--set", "train.steps=2", "--set", "train.batch_size=2", "--set", "train.max_len=32"]
CLI_TRAIN += ["--set", "train.data.task=corpus", "--set", "train.data.limit=8"]


def logits(model):
    with torch.no_grad():
        return model(X).logits


def peft_load(folder, seed=0):
    from peft import PeftModel

    return PeftModel.from_pretrained(load("tiny-random", seed=seed).model, str(folder))


# --- the default: an adapter folder in peft's format ---------------------------------------------------------------


def test_lora_is_saved_as_peft_writes_it_and_loads_back_bitwise(tmp_path):
    handle, _, _ = train("tiny-random", "lora", tmp_path, {"r": 4}, TRAIN, seed=2)
    expected = logits(handle.model)
    assert {p.name for p in tmp_path.iterdir()} == ADAPTER | {"train.json", "checkpoints"}
    keys = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert len(keys) == 2 * 14 and all(k.startswith("base_model.model.model.layers.") for k in keys)
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in keys.items())  # it trained
    assert torch.equal(logits(peft_load(tmp_path, seed=2)), expected)  # tiny-random is built from the seed
    again = load(tmp_path)
    assert torch.equal(logits(again.model), expected)
    assert again.base == "tiny-random (seed 2)" and [p["method"] for p in again.provenance] == ["lora", "train"]
    record = json.loads((tmp_path / "budgetlm_adapter.json").read_text())
    assert record["base"] == {"model": "tiny-random", "seed": 2} and record["peft_loadable"]
    config = json.loads((tmp_path / "adapter_config.json").read_text())  # peft shortens 20+ names to suffixes
    config["target_modules"] = sorted({n.rpartition(".")[2] for n in config["target_modules"]})
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    assert torch.equal(logits(load(tmp_path).model), expected)


@pytest.mark.parametrize(("method", "settings"), [("lora_xs", {"r": 4}), ("mars", {"r": 4}), ("mars", {"opt": 1})])
def test_budgetlm_adapters_are_written_as_the_same_update_in_a_peft_lora(tmp_path, method, settings):
    handle, _, _ = train("tiny-random", method, tmp_path / "run", settings, TRAIN)
    config = json.loads((tmp_path / "run" / "adapter_config.json").read_text())
    tensors = load_file(str(tmp_path / "run" / "adapter_model.safetensors"))
    for name, mod in handle.model.named_modules():
        if isinstance(mod, AdaptedLinear):  # ΔW from the file, as peft computes it, against the method's own ΔW
            a, b = tensors[f"base_model.model.{name}.lora_A.weight"], tensors[f"base_model.model.{name}.lora_B.weight"]
            scaling = config["alpha_pattern"].get(name, config["lora_alpha"]) / a.shape[0]
            torch.testing.assert_close(b @ a * scaling, mod.delta.delta_weight(), atol=1e-6, rtol=1e-5)
    peft_native = tmp_path / "peft"  # what peft itself writes for a LoRA: the same config keys
    train("tiny-random", "lora", peft_native, {"r": 4}, {**TRAIN, "steps": 1})
    assert config.keys() == json.loads((peft_native / "adapter_config.json").read_text()).keys()
    assert config["peft_type"] == "LORA" and config["target_modules"]
    expected = logits(handle.model)
    torch.testing.assert_close(logits(peft_load(tmp_path / "run")), expected, atol=2e-5, rtol=0)
    torch.testing.assert_close(logits(load(tmp_path / "run").model), expected, atol=2e-5, rtol=0)


@pytest.mark.parametrize(("method", "settings"), [("qlora", {"r": 4}), ("lobi_lora", {"r": 4, "target_bits": 3})])
def test_an_adapter_on_a_base_it_quantised_keeps_that_base_and_loads_bitwise(tmp_path, method, settings):
    handle, _, notes = train("tiny-random", method, tmp_path, settings, TRAIN)
    record = json.loads((tmp_path / "budgetlm_adapter.json").read_text())
    assert record["base"]["folder"] == "base" and not record["peft_loadable"]
    assert (tmp_path / "base" / "budgetlm.json").is_file()
    base = load(tmp_path / "base")  # the quantised base alone, as it was under the adapter
    assert not any(isinstance(m, AdaptedLinear) for m in base.model.modules())
    assert base.provenance[-1]["method"] == method and base.provenance[-1]["base_only"]
    again = load(tmp_path)
    assert torch.equal(logits(again.model), logits(handle.model))
    assert any("load it with budgetlm" in n for n in notes)
    shutil.rmtree(tmp_path / "base")
    with pytest.raises(ModelError, match="base model folder .*base is missing"):
        load(tmp_path)


def test_an_adapter_whose_base_is_gone_is_one_line_naming_it(tmp_path, run_main):
    base = tmp_path / "base-model"
    load("tiny-random").save(base)
    handle, _, _ = train(str(base), "lora", tmp_path / "run", {"r": 4}, TRAIN)
    assert torch.equal(logits(load(tmp_path / "run").model), logits(handle.model))
    base.rename(tmp_path / "moved")
    assert_one_line_error(run_main("eval", str(tmp_path / "run")), f"its base model '{base}' cannot be found")


def test_a_peft_folder_without_budgetlm_record_is_one_line(tmp_path):
    train("tiny-random", "lora", tmp_path, {"r": 4}, TRAIN)
    (tmp_path / "budgetlm_adapter.json").unlink()
    with pytest.raises(ModelError, match="peft adapter without budgetlm's record"):
        load(tmp_path)


# --- --merge ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["lora", "dora", "lora_xs", "mars"])
def test_merge_saves_a_model_folder_with_the_unmerged_logits(tmp_path, method):
    unmerged, _, _ = train("tiny-random", method, tmp_path / "a", {"r": 4}, TRAIN)
    _, _, notes = train("tiny-random", method, tmp_path / "b", {"r": 4}, TRAIN, merge=True)
    assert not ADAPTER & {p.name for p in (tmp_path / "b").iterdir()}
    merged = load(tmp_path / "b")
    assert not getattr(merged.model, "budgetlm_parts", None)
    assert not any(isinstance(m, AdaptedLinear) or "lora" in n for n, m in merged.model.named_modules())
    torch.testing.assert_close(logits(merged.model), logits(unmerged.model), atol=5e-5, rtol=1e-5)
    assert any("merged model" in n and "MB" in n and f"budgetlm eval {tmp_path / 'b'}" in n for n in notes)


def test_saving_again_replaces_the_other_kind_and_keeps_other_files(tmp_path):
    train("tiny-random", "lora", tmp_path, {"r": 4}, TRAIN)
    (tmp_path / "my-notes.txt").write_text("mine")
    train("tiny-random", "lora", tmp_path, {"r": 4}, TRAIN, resume=True, merge=True)
    names = {p.name for p in tmp_path.iterdir()}
    assert "model.safetensors" in names and not ADAPTER & names
    manifest = json.loads((tmp_path / "budgetlm.json").read_text())
    train("tiny-random", "lora", tmp_path, {"r": 4}, TRAIN, resume=True)
    names = {p.name for p in tmp_path.iterdir()}
    assert ADAPTER <= names and not set(manifest["files"]) & names
    assert (tmp_path / "my-notes.txt").read_text() == "mine" and (tmp_path / "train.json").is_file()


def test_merge_that_would_not_give_the_trained_model_is_refused_before_anything_is_written(tmp_path, run_main):
    out = tmp_path / "out"
    for method, needle in [("qlora", "cannot be merged exactly (merging re-rounds"), ("full", "no adapter to merge")]:
        r = run_main("train", "tiny-random", "--method", method, *CLI_TRAIN, "--merge", "--out", str(out))
        assert_one_line_error(r, needle, "drop --merge")
        assert not out.exists()
    compressed = tmp_path / "rtn"
    handle = load("tiny-random")
    apply(handle, [{"method": "rtn", "bits": 4, "group_size": 32}])
    handle.save(compressed)
    r = run_main("train", str(compressed), "--method", "lora_xs", *CLI_TRAIN, "--merge", "--out", str(out))
    assert_one_line_error(r, "has compressed layers (quant_linear x 14)")
    assert not out.exists()


# --- the run folder --------------------------------------------------------------------------------------------------


def test_bad_out_and_data_leave_nothing_behind(tmp_path):
    user = tmp_path / "user"
    user.mkdir()
    (user / "thesis.tex").write_text("x")
    with pytest.raises(ConfigError, match="did not write"):
        train("tiny-random", "lora", user, {"r": 4}, TRAIN)
    assert [p.name for p in user.iterdir()] == ["thesis.tex"]
    with pytest.raises(ConfigError, match="is an existing file; give a folder"):
        train("tiny-random", "lora", user / "thesis.tex", {"r": 4}, TRAIN)
    with pytest.raises(Exception, match="unknown task 'arith2'"):
        train("tiny-random", "lora", tmp_path / "new", {"r": 4}, {**TRAIN, "data": {"task": "arith2"}})
    assert not (tmp_path / "new").exists()
    tiny_dir = tmp_path / "late"  # a failure after train.json was written (here: max_len longer than the text)
    with pytest.raises(Exception, match="max_len"):
        train("tiny-random", "lora", tiny_dir, {"r": 4}, {**TRAIN, "max_len": 10**7})
    assert not tiny_dir.exists()


def test_train_notes_say_what_ran_what_was_saved_and_how_to_load_it(tmp_path, run_main):
    out = tmp_path / "run"
    r = run_main("train", "tiny-random", "--method", "lora", "--set", "r=4", *CLI_TRAIN, "--out", str(out))
    assert r.returncode == 0, r.stderr
    notes = [ln for ln in r.stdout.splitlines() if ln.startswith("note: ")]
    text = "\n".join(notes)
    assert "lora: 16,384 trainable parameters" in text
    assert "trained 2 steps on 8 examples" in text and f"checkpoints in {out / 'checkpoints'}" in text
    size = (out / "adapter_model.safetensors").stat().st_size + (out / "adapter_config.json").stat().st_size
    assert f"saved the lora adapter in peft's format in {out}" in text and f"({size / 1e6:,.2f} MB)" in text
    assert f"budgetlm eval {out}" in text and "PeftModel.from_pretrained(budgetlm.api.load('tiny-random').model" in text
    assert "attached only" not in text
    again = run_main("train", "tiny-random", "--method", "lora", "--set", "r=4", *CLI_TRAIN, "--out", str(out),
                     "--resume")  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert "resumed a finished run (checkpoint at step 2 of 2): no step ran" in again.stdout


def test_train_help_shows_boolean_flags_without_a_value(run_main):
    r = run_main("train", "--help")
    assert r.returncode == 0
    for flag in ("--merge", "--resume", "--json"):
        [line] = [ln for ln in r.stdout.splitlines() if f"{flag} " in ln]
        assert "<bool>" not in line and f"--no-{flag[2:]}" not in r.stdout, line
    assert "--seed" in r.stdout and "<int>" in r.stdout  # the valued options keep their type
