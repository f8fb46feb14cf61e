"""Distillation (kd, hidden_kd): the losses against hand-computed and independently written references, the
top-k cache, layer maps and projections, the tokenizer check, where gradients go, and recovery after pruning."""

import math

import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from budgetlm.data import corpus
from budgetlm.data.tasks.offline import kl_topk, topk_reference
from budgetlm.errors import ConfigError
from budgetlm.methods.base import StepContext, apply_steps, parse_config
from budgetlm.methods.distill import hidden as hid
from budgetlm.methods.distill import kd
from budgetlm.methods.distill import teacher as tmod
from budgetlm.methods.prune.shortgpt import remove_layers
from budgetlm.models.handle import ModelHandle
from budgetlm.models.sources import load, tiny_random, tiny_tokenizer
from budgetlm.train.data import IGNORE, Example, collate
from budgetlm.train.loop import answer_loss

SMALL = {"steps": 2, "batch_size": 2, "max_len": 32, "data": "corpus"}
CTX = StepContext(n_calibration=2, calibration_len=32)


def tiny_llama(n_layers: int = 2, hidden: int = 128, seed: int = 0) -> ModelHandle:
    """tiny-random's tokenizer and config with another depth or width."""
    base = tiny_random().model.config.to_dict()
    cfg = LlamaConfig.from_dict({**base, "num_hidden_layers": n_layers, "hidden_size": hidden})
    torch.manual_seed(seed)
    return ModelHandle(LlamaForCausalLM(cfg).eval(), tiny_tokenizer(), "tiny-x", [], "tiny-x")


def batch(seed: int = 0, prompt: int = 0) -> dict:
    """Two examples of different lengths; the first `prompt` tokens carry no label."""
    g = torch.Generator().manual_seed(seed)
    exs = []
    for n in (12, 9):
        ids = torch.randint(0, 256, (n,), generator=g).tolist()
        exs.append(Example(ids, [IGNORE] * prompt + ids[prompt:]))
    return collate(exs, pad_id=258)


def full_kl(p_logits, q_logits):
    """KL(softmax(p) ‖ softmax(q)) per row, written with F.kl_div (an independent reference)."""
    return F.kl_div(F.log_softmax(q_logits, -1), F.log_softmax(p_logits, -1), log_target=True, reduction="none").sum(-1)


# --- the losses -------------------------------------------------------------------------------------------------
def softmax(xs):
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    return [v / sum(e) for v in e]


@pytest.mark.parametrize("reverse", [False, True])
def test_logit_kd_equals_a_hand_computed_t2_kl(reverse):
    zs, zt, T = [[1.0, 2.0, -0.5, 0.0], [0.3, -1.0, 2.5, 1.0]], [[0.5, 0.0, 1.0, -2.0], [0.0, 0.0, 3.0, 0.5]], 2.0
    expect = 0.0
    for s, t in zip(zs, zt):
        p, q = softmax([x / T for x in t]), softmax([x / T for x in s])
        if reverse:
            p, q = q, p
        expect += sum(a * math.log(a / b) for a, b in zip(p, q))
    expect = T * T * expect / len(zs)
    got = kd.logit_kd(torch.tensor(zs), torch.tensor(zt), T, reverse)
    assert got.item() == pytest.approx(expect, rel=1e-6)
    assert kd.logit_kd(torch.tensor(zs), torch.tensor(zt), T, not reverse).item() != pytest.approx(expect, rel=1e-3)


def test_kd_loss_is_exactly_zero_when_student_equals_teacher():
    student, teacher = load("tiny-random"), load("tiny-random")
    student.model.train()  # as fit runs it
    for reverse in (False, True):
        cfg = kd.KD(w_kd=1.0, temperature=2.0, reverse=reverse)
        loss = kd.DistillLoss(cfg, teacher.model)(student.model, batch())
        assert loss.item() == 0.0
        loss.backward()
        assert all(p.grad is None or not p.grad.any() for p in student.model.parameters())
        student.model.zero_grad()
    # and a whole KD run leaves the student bit for bit where it was
    before = {k: v.clone() for k, v in student.model.state_dict().items()}
    report = kd.distill(student, kd.KD(w_kd=1.0, train=SMALL), CTX, teacher=teacher)
    assert report.stats["train"]["losses"] == [0.0, 0.0]
    assert all(torch.equal(before[k], v) for k, v in student.model.state_dict().items())


def test_kd_loss_uses_the_labelled_positions_and_mixes_the_task_loss():
    student, teacher = load("tiny-random", seed=1), load("tiny-random")
    b = batch(prompt=5)
    with torch.no_grad():
        zs = student.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        zt = teacher.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        rows = [(r, t) for r in range(2) for t in range(b["input_ids"].shape[1] - 1) if b["labels"][r, t + 1] != IGNORE]
        assert len(rows) == (12 - 5) + (9 - 5)
        s = torch.stack([zs[r, t] for r, t in rows])
        t_ = torch.stack([zt[r, t] for r, t in rows])
        T = 1.5
        ref_kd = T * T * full_kl(t_ / T, s / T).mean()
        ref_ce = answer_loss(student.model, b)  # train.loop's task loss
        for w in (1.0, 0.0, 0.3):
            got = kd.DistillLoss(kd.KD(w_kd=w, temperature=T), teacher.model)(student.model, b)
            assert got.item() == pytest.approx((w * ref_kd + (1 - w) * ref_ce).item(), rel=1e-5)


# --- the top-k cache --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("reverse", [False, True])
def test_coarse_kl_equals_an_explicit_k_plus_one_bucket_kl(reverse):
    g = torch.Generator().manual_seed(0)
    zt, zs = torch.randn(5, 11, generator=g) * 2, torch.randn(5, 11, generator=g) * 2
    ids, lp, tail = topk_reference(F.log_softmax(zt, -1), 4)
    got = kd.coarse_kl(ids.long(), lp, tail, F.log_softmax(zs, -1), reverse)
    p, q = zt.softmax(-1), zs.softmax(-1)
    for r in range(5):
        top = set(ids[r].tolist())
        pb = [p[r, i].item() for i in ids[r].tolist()] + [sum(p[r, i].item() for i in range(11) if i not in top)]
        qb = [q[r, i].item() for i in ids[r].tolist()] + [sum(q[r, i].item() for i in range(11) if i not in top)]
        a, b_ = (qb, pb) if reverse else (pb, qb)
        assert got[r].item() == pytest.approx(sum(x * math.log(x / y) for x, y in zip(a, b_)), rel=1e-4)
        full = full_kl(zs[r], zt[r]) if reverse else full_kl(zt[r], zs[r])
        assert got[r].item() <= full.item() + 1e-6  # a lower bound of the full KL
    if not reverse:
        assert torch.allclose(got, kl_topk(ids, lp, tail, F.log_softmax(zs, -1)), atol=1e-6)


@pytest.mark.parametrize("reverse", [False, True])
def test_coarse_kl_with_k_equal_to_the_vocabulary_is_the_full_kl_and_differentiable(reverse):
    g = torch.Generator().manual_seed(1)
    zt, zs = torch.randn(6, 9, generator=g), torch.randn(6, 9, generator=g).requires_grad_()
    cached = topk_reference(F.log_softmax(zt, -1), 9)
    assert torch.isinf(cached[2]).all()
    got = kd.cached_kd(zs, (cached[0].long(), cached[1], cached[2]), 1.0, reverse)
    ref = kd.logit_kd(zs, zt, 1.0, reverse)
    assert got.item() == pytest.approx(ref.item(), rel=1e-5)
    (gg,) = torch.autograd.grad(got, zs)
    (gr,) = torch.autograd.grad(ref, zs)
    assert torch.isfinite(gg).all() and torch.allclose(gg, gr, atol=1e-6)


def test_cached_loss_equals_the_on_the_fly_loss_at_k_equal_to_vocab(tmp_path, monkeypatch):
    student, teacher = load("tiny-random", seed=1), load("tiny-random")
    monkeypatch.setattr(tmod, "load_teacher", lambda spec: teacher)
    b = batch(prompt=3)
    exs = [Example(b["input_ids"][r, :n].tolist(), b["labels"][r, :n].tolist()) for r, n in enumerate((12, 9))]
    cache = tmod.teacher_cache(student, "tiny-random", exs, 259, 2.0, 2, tmp_path, "kd")
    assert not cache.hit and cache.path.is_file() and cache.logp.dtype == torch.float16
    for reverse in (False, True):
        cfg = kd.KD(w_kd=1.0, temperature=2.0, reverse=reverse)
        cached = kd.DistillLoss(cfg, cache=cache)(student.model, b)
        fly = kd.DistillLoss(cfg, teacher.model)(student.model, b)
        assert cached.item() == pytest.approx(fly.item(), rel=1e-2)  # within the fp16 rounding of the cache
        # and exactly the on-the-fly loss of the teacher's log-probs as the cache stores them (rounded to fp16)
        with torch.no_grad():
            mask = b["labels"][:, 1:] != IGNORE
            zs = student.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1][mask]
            zt = teacher.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1][mask]
            lt = F.log_softmax(zt / 2.0, -1).half().float()
            ls = F.log_softmax(zs / 2.0, -1)
            a, b_ = (ls, lt) if reverse else (lt, ls)
            ref = 4.0 * (a.exp() * (a - b_)).sum(-1).mean()
        assert cached.item() == pytest.approx(ref.item(), rel=1e-5)
    # a second run reads the file and never loads the teacher; another temperature is another file
    monkeypatch.setattr(tmod, "load_teacher", lambda spec: pytest.fail("the teacher was loaded on a cache hit"))
    again = tmod.teacher_cache(student, "tiny-random", exs, 259, 2.0, 2, tmp_path, "kd")
    assert again.hit and again.path == cache.path and torch.equal(again.ids, cache.ids)
    assert tmod.cache_key("tiny-random", 259, 1.0, exs) != cache.path.stem


def test_kd_step_trains_from_a_topk_cache(tiny, tmp_path):
    steps = [{"method": "shortgpt", "n_layers": 1}]
    steps.append({"method": "kd", "w_kd": 1.0, "cache_topk": 8, "cache_dir": str(tmp_path), "train": SMALL})
    reports = apply_steps(tiny, steps, CTX)
    files = list(tmp_path.glob("*.safetensors"))
    assert len(files) == 1 and reports[1].stats["cache"]["hit"] is False
    assert reports[1].stats["cache"]["positions"] == 4 * 31  # 2 steps x 2 corpus windows x 31 positions
    assert all(math.isfinite(x) and x > 0 for x in reports[1].stats["train"]["losses"])


# --- teacher checks -----------------------------------------------------------------------------------------------
def reversed_tokenizer(extra: bool = False):
    """tiny-random's byte tokenizer with the byte ids reversed (and optionally one more special token)."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet(), reverse=True)
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    for special in ("<s>", "</s>", "<pad>") + (("<extra>",) if extra else ()):
        vocab[special] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


@pytest.mark.parametrize("extra, why", [(False, "other ids"), (True, "vocabulary of 260")])
@pytest.mark.parametrize("cache", [False, True])
def test_teacher_with_another_tokenizer_is_a_one_line_error(tiny, tmp_path, extra, why, cache):
    other = tiny_random()
    other.tokenizer = reversed_tokenizer(extra)
    other.save(tmp_path / "teacher")
    before = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    step = {"method": "kd", "teacher": str(tmp_path / "teacher"), "train": SMALL}
    if cache:
        step |= {"cache_topk": 4, "cache_dir": str(tmp_path / "cache")}
    with pytest.raises(ConfigError) as e:
        apply_steps(tiny, [step], CTX)
    msg = str(e.value)
    assert "\n" not in msg and "different tokenizer" in msg and why in msg
    assert all(torch.equal(before[k], v) for k, v in tiny.model.state_dict().items())


def test_tokenizer_difference_sees_the_probe_text():
    a, b = tiny_tokenizer(), tiny_tokenizer()
    assert tmod.tokenizer_difference(a, b) is None
    b.backend_tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True, use_regex=False)
    assert "probe text" in tmod.tokenizer_difference(a, b)


def test_bad_configs_are_one_line_errors(tiny):
    cases = [
        ("hidden_kd", {"cache_topk": 4}, "on the fly"),
        ("kd", {"train": {"save_every": 1}}, "save_every"),
        ("kd", {"w_kd": 1.5}, "w_kd"),
        ("kd", {"temperature": 0}, "temperature"),
    ]
    for name, values, words in cases:
        with pytest.raises(ConfigError) as e:
            parse_config(name, values)
        assert words in str(e.value) and "\n" not in str(e.value)
    for step, words in [
        ({"method": "hidden_kd", "layers": [5], "train": SMALL}, r"layers \[5\]"),
        ({"method": "hidden_kd", "layer_map": {0: 7}, "train": SMALL}, "out of range"),
    ]:
        with pytest.raises(ConfigError, match=words):
            apply_steps(tiny, [step], CTX)
    tiny.model.requires_grad_(False)
    with pytest.raises(ConfigError, match="requires grad"):
        apply_steps(tiny, [{"method": "kd", "train": SMALL}], CTX)


# --- hidden states ------------------------------------------------------------------------------------------------
def test_layer_maps_and_projection_shapes():
    teacher = tiny_llama(4)
    same = tiny_llama(4, seed=1)
    assert hid.layer_map(same.model, teacher.model, None, None, "m")[0] == {0: 0, 1: 1, 2: 2, 3: 3}
    pruned = tiny_llama(4, seed=1)
    remove_layers(pruned.model, [1])
    remove_layers(pruned.model, [2])  # original layer 3: layers 0 and 2 remain
    mapping, how = hid.layer_map(pruned.model, teacher.model, None, None, "m")
    assert mapping == {0: 0, 1: 2} and "removed" in how
    assert hid.layer_map(pruned.model, teacher.model, [1], None, "m")[0] == {1: 2}
    narrow = tiny_llama(2, hidden=64)  # no removal record, other depth: proportional, end-aligned
    mapping, how = hid.layer_map(narrow.model, teacher.model, None, None, "m")
    assert mapping == {0: 1, 1: 3} and "proportional" in how
    assert hid.layer_map(narrow.model, teacher.model, None, {0: 2, 1: 0}, "m")[0] == {0: 2, 1: 0}
    proj = hid.projections(narrow.model, teacher.model, mapping, seed=0)
    assert sorted(proj) == ["0", "1"] and all(p.weight.shape == (128, 64) and p.bias is None for p in proj.values())
    assert hid.projections(pruned.model, teacher.model, {0: 0}, 0) is None
    # the captured hidden states are the decoder blocks' outputs (checked against output_hidden_states)
    ids = torch.randint(0, 256, (2, 7))
    with torch.no_grad(), hid.capture(teacher.model, [0, 2]) as hs:
        out = teacher.model(input_ids=ids, output_hidden_states=True)
    assert torch.equal(hs[0], out.hidden_states[1]) and torch.equal(hs[2], out.hidden_states[3])


def test_hidden_loss_against_direct_formulas():
    g = torch.Generator().manual_seed(0)
    hs = {0: torch.randn(2, 5, 4, generator=g)}
    ht = {1: torch.randn(2, 5, 6, generator=g)}
    proj = torch.nn.ModuleDict({"0": torch.nn.Linear(4, 6, bias=False)})
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]).bool()
    with torch.no_grad():
        xs = [proj["0"].weight @ hs[0][r, t] for r in range(2) for t in range(5) if mask[r, t]]
        ys = [ht[1][r, t] for r in range(2) for t in range(5) if mask[r, t]]
        mse = sum(((x - y) ** 2).sum() for x, y in zip(xs, ys)) / (len(xs) * 6)
        cos = sum(1 - (x @ y) / (x.norm() * y.norm()) for x, y in zip(xs, ys)) / len(xs)
        assert hid.hidden_loss(hs, ht, {0: 1}, proj, mask, "mse").item() == pytest.approx(mse.item(), rel=1e-5)
        assert hid.hidden_loss(hs, ht, {0: 1}, proj, mask, "cosine").item() == pytest.approx(cos.item(), rel=1e-5)


def test_gradients_reach_only_the_students_trainable_parameters_and_the_projection():
    teacher = load("tiny-random")
    student = tiny_llama(1, hidden=64, seed=3)
    apply_steps(student, [{"method": "lora", "r": 2}], CTX)  # attach only: the adapter is what trains
    cfg = kd.HiddenKD(w_kd=0.5, loss="mse", train=SMALL)
    mapping = hid.layer_map(student.model, teacher.model, None, None, "hidden_kd")[0]
    assert mapping == {0: 1}
    proj = hid.projections(student.model, teacher.model, mapping, 0)
    loss = kd.DistillLoss(cfg, teacher.model, mapping=mapping, proj=proj)(student.model, batch(prompt=2))
    loss.backward()
    for name, p in student.model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, name
        if "lora_B" in name:  # lora_A's gradient is zero while B is (B = 0 at attach)
            assert p.grad.abs().sum() > 0, name
    assert any(p.requires_grad for p in student.model.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in proj.parameters())
    assert all(p.grad is None for p in teacher.model.parameters())
    student.model.zero_grad(set_to_none=True)

    # a whole run: the adapter changes, the frozen base and the teacher do not, the projection is gone after
    t_before = {k: v.clone() for k, v in teacher.model.state_dict().items()}
    s_before = {k: v.clone() for k, v in student.model.state_dict().items()}
    report = kd.distill(student, cfg, CTX, teacher=teacher)
    assert report.stats["hidden"]["projection_params"] == 64 * 128
    assert not hasattr(student.model, kd.PROJECTION)
    assert all(torch.equal(t_before[k], v) for k, v in teacher.model.state_dict().items())
    assert all(p.grad is None and not p.requires_grad for p in teacher.model.parameters())
    trainable = {n for n, p in student.model.named_parameters() if p.requires_grad}
    for k, v in student.model.state_dict().items():
        assert torch.equal(s_before[k], v) != (k in trainable), k  # lora_A moves from step 2 on


def test_hidden_kd_step_on_a_pruned_student(tiny):
    reports = apply_steps(tiny, [{"method": "shortgpt", "n_layers": 1}, {"method": "hidden_kd", "train": SMALL}], CTX)
    removed = reports[0].stats["overall"]["removed_original_layers"]
    kept = [i for i in range(2) if i not in removed]
    assert reports[1].stats["hidden"]["layer_map"] == {0: kept[0]}
    assert reports[1].stats["hidden"]["projection_params"] == 0


# --- recovery after pruning ----------------------------------------------------------------------------------------
def heldout_kl(student: ModelHandle, teacher: ModelHandle) -> float:
    ids = torch.tensor(student.tokenizer(corpus.heldout_text()[:2000])["input_ids"][:384]).reshape(6, 64)
    with torch.no_grad():
        zs, zt = student.model(input_ids=ids).logits, teacher.model(input_ids=ids).logits
    return full_kl(zt.reshape(-1, zt.shape[-1]), zs.reshape(-1, zs.shape[-1])).mean().item()


def test_lora_recovery_after_shortgpt(tiny):
    train = {"steps": 3, "batch_size": 2, "max_len": 32, "data": "corpus", "lr": 1e-2}
    reports = apply_steps(
        tiny, [{"method": "shortgpt", "n_layers": 1}, {"method": "lora", "r": 4, "train": train}], CTX
    )
    assert len(tiny.model.model.layers) == 1
    losses = reports[1].stats["train"]["losses"]
    assert len(losses) == 3 and losses[-1] < losses[0]


def test_kd_recovery_lowers_the_heldout_kl_to_the_unpruned_teacher(tiny):
    teacher = load("tiny-random")
    apply_steps(tiny, [{"method": "shortgpt", "n_layers": 1}], CTX)
    before = heldout_kl(tiny, teacher)
    train = {"steps": 6, "batch_size": 4, "max_len": 64, "data": "corpus", "lr": 3e-3}
    report = apply_steps(tiny, [{"method": "kd", "w_kd": 1.0, "train": train}], CTX)[0]
    assert report.stats["teacher"] == "tiny-random"  # the default teacher: the unpruned base
    after = heldout_kl(tiny, teacher)
    assert after < 0.8 * before, (before, after)


def test_task_specific_kd_on_arith(tiny):
    train = {"steps": 2, "batch_size": 2, "max_len": 96, "data": {"task": "arith", "limit": 8}}
    report = apply_steps(tiny, [{"method": "kd", "teacher": "tiny-random (seed 1)", "train": train}], CTX)[0]
    assert "reasoning_gym" in report.stats["train"]["data_source"]
    assert all(math.isfinite(x) for x in report.stats["train"]["losses"])


@pytest.mark.parametrize("reverse", [False, True])
def test_logit_kd_gradient_equals_autograd_of_the_plain_formula(reverse):
    g = torch.Generator().manual_seed(2)
    zs = torch.randn(4, 7, generator=g, dtype=torch.float64, requires_grad=True)
    zt = torch.randn(4, 7, generator=g, dtype=torch.float64)
    T = 1.7

    def plain(z):
        ls, lt = F.log_softmax(z / T, -1), F.log_softmax(zt / T, -1)
        a, b = (ls, lt) if reverse else (lt, ls)
        return (a.exp() * (a - b)).sum(-1).mean() * T * T

    (ours,) = torch.autograd.grad(kd.logit_kd(zs, zt, T, reverse), zs)
    (ref,) = torch.autograd.grad(plain(zs), zs)
    assert torch.allclose(ours.double(), ref, atol=1e-6)
