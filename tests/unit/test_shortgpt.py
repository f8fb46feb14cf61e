"""ShortGPT: Block Influence equals a direct computation from the model's own hidden states, an identity layer goes
first, removal leaves a model equal to one built from the remaining layers' weights, and the smaller model saves,
loads, generates with a KV cache and exports to GGUF with renumbered blocks (Llama and Gemma 3 local/global)."""

import copy
import json

import gguf
import pytest
import torch
from transformers import DynamicCache, Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM

from budgetlm.api import export, load
from budgetlm.errors import ConfigError
from budgetlm.methods.base import StepContext, apply_steps
from budgetlm.methods.prune.shortgpt import ShortGPT, block_influence, layers_to_remove, remove_layers
from budgetlm.models.handle import ModelHandle
from budgetlm.models.sources import tiny_random, tiny_tokenizer

CTX = dict(n_calibration=3, calibration_len=24)
IDS = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(5))


def llama_config(n_layers: int) -> LlamaConfig:
    """tiny-random's Llama config with `n_layers` decoder layers."""
    base = tiny_random().model.config.to_dict()
    return LlamaConfig.from_dict({**base, "num_hidden_layers": n_layers})


def tiny_llama(n_layers: int = 4, seed: int = 0) -> ModelHandle:
    torch.manual_seed(seed)
    return ModelHandle(LlamaForCausalLM(llama_config(n_layers)).eval(), tiny_tokenizer(), "tiny4", [], "tiny4")


def gemma_config(layer_types: list[str]) -> Gemma3TextConfig:
    tok = tiny_tokenizer()
    return Gemma3TextConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=len(layer_types),
        layer_types=layer_types,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=256,  # transformers' GGUF loader assumes query_pre_attn_scalar = head_dim = 256
        query_pre_attn_scalar=256,
        sliding_window=4,  # shorter than the test sequences: local and global layers really differ
        max_position_embeddings=256,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )


def tiny_gemma3(layer_types: list[str]) -> ModelHandle:
    torch.manual_seed(2)
    model = Gemma3ForCausalLM(gemma_config(layer_types)).eval()
    with torch.no_grad():  # Gemma norms start at 0 (scale 1 + w); make them matter
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(torch.randn_like(p) * 0.3)
    return ModelHandle(model, tiny_tokenizer(), "tiny-gemma3", [], "tiny-gemma3")


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def make_identity(model, i: int) -> None:
    """Layer i adds nothing to the residual stream: its output is its input exactly."""
    with torch.no_grad():
        model.model.layers[i].self_attn.o_proj.weight.zero_()
        model.model.layers[i].mlp.down_proj.weight.zero_()


def rebuilt(handle: ModelHandle, state: dict, keep: list[int], config) -> torch.nn.Module:
    """A model built from `config`, holding `state`'s embeddings/norm/head and layers `keep` (renumbered)."""
    cls = type(handle.model)
    fresh = cls(config).eval()
    sd = {}
    for k, v in state.items():
        if k.startswith("model.layers."):
            old, rest = k[len("model.layers.") :].split(".", 1)
            if int(old) in keep:
                sd[f"model.layers.{keep.index(int(old))}.{rest}"] = v
        else:
            sd[k] = v
    missing, unexpected = fresh.load_state_dict(sd, strict=False)
    assert not unexpected and all(k.endswith("lm_head.weight") for k in missing)
    fresh.tie_weights()
    return fresh


# --- Block Influence ----------------------------------------------------------------------------------------


def reference_bi(model, tokens: torch.Tensor) -> list[float]:
    """BI from one whole-model forward: HF's hidden_states[i] enters layer i; the last entry is after the final
    norm (checked), so the last layer's output is taken from the norm's input instead."""
    seen = {}
    hook = model.model.norm.register_forward_pre_hook(lambda _m, args: seen.__setitem__("pre_norm", args[0]))
    with torch.no_grad():
        hs = model(tokens, output_hidden_states=True, use_cache=False).hidden_states
    hook.remove()
    n = len(model.model.layers)
    assert len(hs) == n + 1
    assert torch.allclose(hs[-1], model.model.norm(seen["pre_norm"]))  # HF's last hidden state is post-norm
    ins = list(hs[:n])
    outs = list(hs[1:n]) + [seen["pre_norm"]]
    bi = []
    for x, y in zip(ins, outs):
        x, y = x.double().reshape(-1, x.shape[-1]), y.double().reshape(-1, y.shape[-1])
        cos = [float(a @ b / (a.norm() * b.norm())) for a, b in zip(x, y)]
        bi.append(1 - sum(cos) / len(cos))
    return bi


def test_block_influence_equals_hidden_state_computation():
    h = tiny_llama(4)
    tokens = StepContext(**CTX).calibration(h.tokenizer)
    before = copy.deepcopy(h.model.state_dict())
    got = block_influence(h.model, tokens, batch_size=2)  # batches of 2 and 1
    want = reference_bi(h.model, tokens)
    assert got.tolist() == pytest.approx(want, abs=1e-6)
    assert all(b > 1e-3 for b in want)
    assert all(torch.equal(v, h.model.state_dict()[k]) for k, v in before.items())  # scoring changes nothing


def test_identity_layer_has_zero_influence_and_goes_first():
    h = tiny_llama(4)
    make_identity(h.model, 2)
    kept_blocks = [h.model.model.layers[i] for i in (0, 1, 3)]
    (report,) = apply_steps(h, [{"method": "shortgpt", "n_layers": 1}], StepContext(**CTX))
    stats = report.stats
    assert stats["model.layers.2"]["block_influence"] == pytest.approx(0, abs=1e-6)
    assert stats["model.layers.2"]["removed"] and stats["model.layers.2"]["rank"] == 0
    assert min(stats[f"model.layers.{i}"]["block_influence"] for i in (0, 1, 3)) > 1e-3
    assert stats["overall"]["removed_layers"] == [2] and stats["overall"]["layers_after"] == 3
    assert list(h.model.model.layers) == kept_blocks  # the very same modules, in order
    assert "removed 1 of 4" in report.notes[0] and "lowest block influence: 2 (BI " in report.notes[0]


def test_targets_and_ignore_choose_the_candidates():
    h = tiny_llama(4)
    make_identity(h.model, 2)
    tokens = StepContext(**CTX).calibration(h.tokenizer)
    bi = reference_bi(h.model, tokens)
    (report,) = apply_steps(
        h, [{"method": "shortgpt", "n_layers": 1, "ignore": ["model.layers.2"]}], StepContext(**CTX)
    )
    lowest_other = min((0, 1, 3), key=lambda i: bi[i])
    assert report.stats["overall"]["removed_layers"] == [lowest_other]
    assert report.stats["model.layers.2"]["rank"] is None


def test_fraction_rounds_half_up_with_at_least_one():
    for fraction, total, n in [(0.25, 30, 8), (0.25, 2, 1), (0.1, 4, 1), (0.5, 18, 9), (0.3, 10, 3), (0.35, 10, 4)]:
        assert layers_to_remove(ShortGPT(fraction=fraction), total) == n
    assert layers_to_remove(ShortGPT(), 12) == 3  # default fraction 0.25
    assert layers_to_remove(ShortGPT(n_layers=5), 12) == 5
    assert ShortGPT().fraction == 0.25 and ShortGPT(n_layers=2).fraction is None


# --- the model after removal ------------------------------------------------------------------------------------


def test_logits_equal_a_model_built_from_the_remaining_layers():
    h = tiny_llama(5)
    state = copy.deepcopy(h.model.state_dict())
    kept = remove_layers(h.model, [3, 1])
    assert kept == [0, 2, 4]
    want = rebuilt(h, state, kept, llama_config(3))
    assert torch.equal(logits(h.model), logits(want))
    assert [b.self_attn.layer_idx for b in h.model.model.layers] == [0, 1, 2]
    assert h.model.config.num_hidden_layers == 3 and h.model.config.budgetlm_removed_layers == [1, 3]


def test_repeated_removal_records_original_indices():
    h = tiny_llama(5)
    remove_layers(h.model, [1])  # original 0, 2, 3, 4 remain
    remove_layers(h.model, [1, 3])  # current 1 and 3 are original 2 and 4
    assert h.model.config.budgetlm_removed_layers == [1, 2, 4]
    assert len(h.model.model.layers) == 2 and h.model.config.num_hidden_layers == 2


def greedy(model, ids, use_cache: bool, n: int = 12):
    with torch.no_grad():
        return model.generate(
            ids, max_new_tokens=n, do_sample=False, use_cache=use_cache, attention_mask=torch.ones_like(ids)
        )


def test_saved_model_loads_generates_with_cache_and_exports(tmp_path):
    h = tiny_llama(4)
    make_identity(h.model, 1)
    apply_steps(h, [{"method": "shortgpt", "n_layers": 2}], StepContext(**CTX))
    assert len(h.model.model.layers) == 2
    after = logits(h.model)

    h.save(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    removed = config["budgetlm_removed_layers"]
    assert config["num_hidden_layers"] == 2 and len(removed) == 2 and 1 in removed
    provenance = json.loads((tmp_path / "m" / "provenance.json").read_text())
    assert provenance[-1]["method"] == "shortgpt" and provenance[-1]["config"]["n_layers"] == 2
    again = load(str(tmp_path / "m"))
    assert len(again.model.model.layers) == 2 and again.model.config.budgetlm_removed_layers == removed
    assert torch.equal(logits(again.model), after)

    prompt = IDS[:1, :6]
    cached = greedy(again.model, prompt, True)
    assert torch.equal(cached, greedy(again.model, prompt, False))
    cache = DynamicCache(config=again.model.config)
    with torch.no_grad():
        again.model(prompt, past_key_values=cache, use_cache=True)
    assert len(cache.layers) == 2 and cache.get_seq_length() == 6

    path = tmp_path / "m.gguf"
    export(again, path, "F32")
    reader = gguf.GGUFReader(str(path))
    assert reader.fields["llama.block_count"].contents() == 2
    blocks = {int(t.name.split(".")[1]) for t in reader.tensors if t.name.startswith("blk.")}
    assert blocks == {0, 1}
    # blk.1 holds the second remaining layer's weights (norms are written as they are)
    norm = next(t for t in reader.tensors if t.name == "blk.1.attn_norm.weight")
    assert torch.equal(torch.from_numpy(norm.data.copy()), again.model.model.layers[1].input_layernorm.weight)
    from transformers import AutoModelForCausalLM, GgufConfig

    reloaded = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, quantization_config=GgufConfig(dequantize=True), dtype=torch.float32
    ).eval()
    assert reloaded.config.num_hidden_layers == 2
    assert (logits(reloaded) - after).abs().max() < 1e-4 * after.abs().max()


# --- Gemma 3: local/global layer types --------------------------------------------------------------------------


def test_gemma3_layer_types_follow_the_removed_layers(tmp_path):
    types = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
    h = tiny_gemma3(types)
    state = copy.deepcopy(h.model.state_dict())
    kept = remove_layers(h.model, [0, 3])
    cfg = h.model.config
    assert cfg.layer_types == ["full_attention", "sliding_attention"] and cfg.num_hidden_layers == 2
    layers = h.model.model.layers
    assert [b.layer_idx for b in layers] == [0, 1] and [b.self_attn.layer_idx for b in layers] == [0, 1]
    assert [b.self_attn.layer_type for b in layers] == cfg.layer_types
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(1))  # longer than the window
    want = rebuilt(h, state, kept, gemma_config(["full_attention", "sliding_attention"]))
    assert torch.equal(logits(h.model, ids), logits(want, ids))
    assert torch.equal(greedy(h.model, ids[:, :6], True), greedy(h.model, ids[:, :6], False))

    h.save(tmp_path / "g")
    again = load(str(tmp_path / "g"))
    assert again.model.config.layer_types == cfg.layer_types
    assert torch.equal(logits(again.model, ids), logits(h.model, ids))
    export(again, tmp_path / "g.gguf", "F32")
    reader = gguf.GGUFReader(str(tmp_path / "g.gguf"))
    assert reader.fields["gemma3.block_count"].contents() == 2
    assert reader.fields["gemma3.attention.sliding_window_pattern"].contents() == [False, True]
    assert {int(t.name.split(".")[1]) for t in reader.tensors if t.name.startswith("blk.")} == {0, 1}


def test_shortgpt_on_gemma3():
    h = tiny_gemma3(["sliding_attention", "sliding_attention", "full_attention"])
    (report,) = apply_steps(h, [{"method": "shortgpt", "n_layers": 1}], StepContext(**CTX))
    removed = report.stats["overall"]["removed_layers"]
    bi = [report.stats[f"model.layers.{i}"]["block_influence"] for i in range(3)]
    assert removed == [min(range(3), key=lambda i: bi[i])]
    assert len(h.model.config.layer_types) == 2 and torch.isfinite(logits(h.model)).all()


# --- bad input ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "step,ctx,words",
    [
        ({"n_layers": 4}, CTX, ["remove all 4", "at most 3"]),
        ({"fraction": 0.9}, CTX, ["fraction=0.9", "remove all 4"]),
        ({"n_layers": 0}, CTX, ["n_layers", "at least 1"]),
        ({"fraction": 1.0}, CTX, ["fraction", "between 0 and 1"]),
        ({"fraction": 0.0}, CTX, ["fraction", "between 0 and 1"]),
        ({"n_layers": 1, "fraction": 0.5}, CTX, ["either n_layers or fraction"]),
        ({"metric": "angular"}, CTX, ["metric"]),
        ({}, dict(n_calibration=0), ["calibration", "n_calibration"]),
        ({"n_layers": 2, "ignore": ["model.layers.[0-2]"]}, CTX, ["1 removable", "2 are to be removed"]),
    ],
)
def test_bad_input_is_one_line_and_changes_nothing(step, ctx, words):
    h = tiny_llama(4)
    before = copy.deepcopy(h.model.state_dict())
    with pytest.raises(ConfigError) as e:
        apply_steps(h, [{"method": "shortgpt", **step}], StepContext(**ctx))
    msg = str(e.value)
    assert "\n" not in msg and all(w in msg for w in words), msg
    assert len(h.model.model.layers) == 4 and h.model.config.num_hidden_layers == 4
    assert not hasattr(h.model.config, "budgetlm_removed_layers")
    assert h.model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in h.model.state_dict().items())


@pytest.mark.parametrize("indices,words", [([4], "out of range"), ([0, 1, 2, 3], "cannot remove all 4")])
def test_remove_layers_rejects_bad_indices(indices, words):
    h = tiny_llama(4)
    with pytest.raises(ConfigError, match=words):
        remove_layers(h.model, indices)
    assert len(h.model.model.layers) == 4 and h.model.config.num_hidden_layers == 4


def test_quantised_then_pruned_model_reloads(tmp_path):
    """Replaced modules (QuantLinear) of the remaining layers are listed under their new names and rebuilt."""
    h = tiny_llama(3)
    make_identity(h.model, 0)
    apply_steps(h, [{"method": "rtn", "bits": 4, "group_size": 32}], StepContext(**CTX))
    apply_steps(h, [{"method": "shortgpt", "n_layers": 1}], StepContext(**CTX))
    assert h.model.config.budgetlm_removed_layers == [0]
    h.save(tmp_path / "q")
    manifest = json.loads((tmp_path / "q" / "budgetlm.json").read_text())
    assert {n.split(".")[2] for n in manifest["modules"]} == {"0", "1"}
    again = load(str(tmp_path / "q"))
    assert torch.equal(logits(again.model), logits(h.model))
