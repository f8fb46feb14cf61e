"""The `embeddings` option of rtn/gptq/awq/lobi and QuantEmbedding: a gather of packed rows against a reference
written here (dequantise the whole table, then index), every method on tied and untied tiny Llamas, storage shared
when tied, whole-model bits per weight from bytes computed here, save/reload, GGUF export."""

import pytest
import torch
from transformers import LlamaForCausalLM

from budgetlm.errors import ConfigError
from budgetlm.hardware.size import model_size
from budgetlm.methods.base import StepContext, apply_steps, parse_config
from budgetlm.methods.quant.embedding import QuantEmbedding
from budgetlm.methods.quant.layers import QuantLinear
from budgetlm.methods.quant.quantizer import find_grid, quantize
from budgetlm.models.handle import ModelHandle
from budgetlm.models.sources import load, tiny_config, tiny_tokenizer

X = torch.randint(0, 259, (2, 12), generator=torch.Generator().manual_seed(5))
CTX = dict(n_calibration=8, calibration_len=64)


def tiny(tied: bool) -> ModelHandle:
    cfg = tiny_config()
    cfg.tie_word_embeddings = tied
    torch.manual_seed(0)
    return ModelHandle(LlamaForCausalLM(cfg).eval(), tiny_tokenizer(), "tiny-random", [], "tiny-random")


def reference_rows(codes, scales, zeros, bits, group, ids):
    """Dequantise the whole table element by element, then index: w = (code - zero) * scale."""
    vocab, dim = codes.shape
    table = torch.empty(vocab, dim)
    for c in range(dim):
        g = c // group
        zero = zeros[:, g].float() if zeros is not None else torch.full((vocab,), 2.0 ** (bits - 1))
        table[:, c] = (codes[:, c].float() - zero) * scales[:, g].float()
    return table[ids]


@pytest.mark.parametrize(
    "bits,group,sym", [(8, None, True), (8, 32, False), (4, 32, False), (3, 64, True), (2, 16, False)]
)
def test_gather_matches_dequantise_then_index(bits, group, sym):
    w = torch.randn(259, 128, generator=torch.Generator().manual_seed(0))
    grid = find_grid(w, bits, group, sym)
    codes = quantize(w, grid)
    emb = QuantEmbedding.from_codes(codes, grid)
    ids = torch.tensor([[0, 5, 258, 5], [17, 3, 3, 100]])
    scales16 = grid.scales.to(torch.float16)
    ref = reference_rows(codes, scales16, grid.zeros, bits, group or 128, ids.reshape(-1)).reshape(2, 4, 128)
    got = emb(ids)
    assert got.shape == (2, 4, 128)
    assert torch.allclose(got, ref, atol=1e-6, rtol=1e-6)
    # the table is stored exactly as the QuantLinear of the same codes
    ql = QuantLinear.from_codes(codes, grid, None)
    assert emb.storage_bytes() == ql.storage_bytes()
    assert torch.equal(emb.codes(), codes)


def test_forward_never_dequantises_the_whole_table(monkeypatch):
    w = torch.randn(259, 128)
    grid = find_grid(w, 4, 32, False)
    emb = QuantEmbedding.from_codes(quantize(w, grid), grid)
    seen = []
    import budgetlm.methods.quant.layers as mod

    real = mod.unpack
    monkeypatch.setattr(mod, "unpack", lambda p, b, n: seen.append(n) or real(p, b, n))
    emb(torch.tensor([[1, 2, 3]]))
    assert seen == [3 * 128]


def _stored(mod) -> int:
    return sum(t.numel() * t.element_size() for t in mod.state_dict().values())


STEPS = {
    "rtn": {"method": "rtn", "bits": 8},
    "gptq": {"method": "gptq", "bits": 4, "group_size": 32},
    "awq": {"method": "awq", "bits": 4, "group_size": 32, "n_grid": 4, "search_tokens": 64},
    "lobi": {"method": "lobi", "target_bits": 3.5, "candidates": [2, 4], "group_size": 32, "fisher_sequences": 2},
}


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("name", list(STEPS))
def test_methods_quantise_the_embeddings(name, tied, tmp_path):
    h = tiny(tied)
    step = dict(STEPS[name])
    if name != "lobi":
        step["embeddings"] = True  # lobi: on by default
    apply_steps(h, [step], StepContext(**CTX))
    m = h.model
    emb, head = m.get_input_embeddings(), m.get_output_embeddings()
    assert isinstance(emb, QuantEmbedding) and isinstance(head, QuantLinear)
    out = m(X).logits
    assert torch.isfinite(out).all()
    if tied:
        assert emb.tied_to == "lm_head" and emb.store() is head
        assert not list(emb.buffers()) and emb.storage_bytes() == head.storage_bytes()
        assert torch.equal(emb.effective_weight(), head.effective_weight())
    else:
        assert emb.tied_to is None and emb.qweight.data_ptr() != head.qweight.data_ptr()
    # whole-model bits per weight, from the bytes of every tensor (the shared codes once) over the logical weights
    vocab, dim = 259, 128
    linears = [mod for n, mod in m.named_modules() if isinstance(mod, QuantLinear) and mod is not head]
    lin_bytes = sum(_stored(q) for q in linears)
    lin_weights = sum(q.in_features * q.out_features for q in linears)
    norms = sum(p.numel() * 4 for n, p in m.named_parameters() if "norm" in n)
    matrices = _stored(head) + (0 if tied else _stored(emb))
    n_params = (
        lin_weights + vocab * dim * (1 if tied else 2) + sum(p.numel() for n, p in m.named_parameters() if "norm" in n)
    )
    size = model_size(h)
    assert size["stored_bytes"].value == lin_bytes + matrices + norms
    assert size["params"].value == n_params
    assert size["bpw"].value == pytest.approx((lin_bytes + matrices + norms) * 8 / n_params)
    if tied:  # the tied lm_head's bytes are the embedding's, not a Linear's
        assert size["linear_bpw"].value == pytest.approx(lin_bytes * 8 / lin_weights)
    else:
        assert size["linear_bpw"].value == pytest.approx((lin_bytes + _stored(head)) * 8 / (lin_weights + vocab * dim))
    assert size["stored_bytes"].extra["breakdown"]["embedding"] == (_stored(head) if tied else _stored(emb))
    # save -> load: the same logits; a tied table is stored once and shares its lm_head's codes again
    h.save(tmp_path / "m")
    again = load(tmp_path / "m")
    assert torch.equal(again.model(X).logits, out)
    e2 = again.model.get_input_embeddings()
    assert isinstance(e2, QuantEmbedding) and (e2.store() is again.model.lm_head) == tied
    assert model_size(again)["stored_bytes"].value == size["stored_bytes"].value


def test_option_is_off_by_default_except_lobi():
    assert not parse_config("rtn", {}).embeddings
    assert not parse_config("gptq", {}).embeddings
    assert not parse_config("awq", {}).embeddings
    assert parse_config("lobi", {}).embeddings
    assert not parse_config("lobi_lora", {}).embeddings
    h = tiny(True)
    apply_steps(h, [{"method": "rtn"}])
    assert isinstance(h.model.get_input_embeddings(), torch.nn.Embedding)
    assert h.model.lm_head.weight is h.model.get_input_embeddings().weight


def test_bad_values_are_one_line_errors():
    with pytest.raises(ConfigError) as e:
        parse_config("rtn", {"embeddings": "sometimes"})
    assert "embeddings" in str(e.value) and "\n" not in str(e.value)
    h = tiny(True)
    with pytest.raises(ConfigError) as e:  # a group that does not divide the hidden size (128)
        parse_config("rtn", {"embeddings": True, "bits": 4, "group_size": 48}).check(h.model)
    assert "\n" not in str(e.value)


def test_gguf_export_of_quantised_embeddings(tmp_path):
    from transformers import AutoModelForCausalLM, GgufConfig

    from budgetlm.api import export

    for tied in (True, False):
        h = tiny(tied)
        apply_steps(h, [{"method": "rtn", "bits": 8, "embeddings": True}])
        ref = h.model(X).logits
        path = tmp_path / f"{tied}.gguf"
        export(h, path, "Q8_0")  # symmetric 8-bit per channel: the codes themselves
        m = AutoModelForCausalLM.from_pretrained(
            tmp_path, gguf_file=path.name, quantization_config=GgufConfig(dequantize=True)
        ).float()
        with torch.no_grad():
            got = m(X).logits
        assert (got - ref).abs().max() < 1e-3 * ref.abs().max()
