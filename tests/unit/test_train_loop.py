"""The training loop on the tiny model: it learns (overfits a tiny batch), follows the warm-up + cosine formula,
accumulates gradients as one big batch would, changes only trainable parameters, and a run interrupted (by an
exception, and by SIGKILL in a real subprocess) then resumed ends bit for bit where an uninterrupted run ends."""

from __future__ import annotations

import math
import os
import random
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from budgetlm.errors import ConfigError, DataError
from budgetlm.models.sources import load
from budgetlm.train import TrainConfig, fit
from budgetlm.train.config import lr_factor
from budgetlm.train.data import DataOrder, TrainData, build_data, collate
from budgetlm.train.loop import accumulate_gradients, answer_loss


@pytest.fixture(scope="module")
def arith_data():
    from budgetlm.models.sources import tiny_tokenizer
    from budgetlm.train.config import DataConfig

    return build_data(tiny_tokenizer(), DataConfig(task="arith", limit=16), max_len=96, seed=0)


def with_dropout(handle, p: float = 0.1):
    """Attention dropout on, so training draws from torch's RNG and a resume must restore it."""
    for layer in handle.model.model.layers:
        layer.self_attn.attention_dropout = p
    return handle


def noisy_loss(model, batch):
    """The default loss scaled by draws from python's and numpy's RNGs: a resume must restore them too."""
    scale = 1 + 0.1 * random.random() + 0.1 * float(np.random.rand())
    return answer_loss(model, batch) * scale


def trainable(handle) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in handle.model.named_parameters() if p.requires_grad}


def assert_bitwise_equal(a: dict, b: dict):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


class Interrupt(Exception):
    pass


def stop_after(k: int):
    def hook(info):
        if info.step == k:
            raise Interrupt

    return hook


def test_loss_falls_when_overfitting_a_tiny_batch(arith_data):
    h = load("tiny-random")
    data = TrainData(arith_data.examples[:4], "4 arith examples")
    res = fit(h, {"steps": 20, "lr": 3e-3, "batch_size": 4, "max_grad_norm": None}, data=data)
    assert len(res.losses) == 20 and res.steps == 20
    assert res.losses[-1] < 0.5 * res.losses[0]  # the same 4 examples every step: memorised
    assert res.trainable_params == sum(p.numel() for p in h.model.parameters())  # full fine-tuning (tied once)
    assert not h.model.training  # left in eval mode as loaded
    assert res.peak_rss_bytes > 0 and all(t > 0 for t in res.step_times)


def expected_lr(base: float, s: int, warmup: int, total: int, floor: float) -> float:
    if s < warmup:
        return base * (s + 1) / warmup
    t = (s - warmup) / (total - warmup)
    return base * (floor + (1 - floor) * (math.cos(math.pi * t) + 1) / 2)


def test_lr_schedule_follows_warmup_then_cosine(arith_data):
    cfg = TrainConfig(steps=10, lr=2e-3, warmup_steps=3, min_lr_ratio=0.1, batch_size=2)
    res = fit(load("tiny-random"), cfg, data=arith_data)
    want = [expected_lr(2e-3, s, 3, 10, 0.1) for s in range(10)]
    assert res.lrs == pytest.approx(want, rel=1e-12)
    assert res.lrs[2] == pytest.approx(2e-3) and res.lrs[3] == pytest.approx(2e-3)  # the peak
    for s in (0, 5, 9):
        assert lr_factor(s, cfg) * cfg.lr == pytest.approx(want[s], rel=1e-12)
    no_warmup = TrainConfig(steps=4)
    assert [lr_factor(s, no_warmup) for s in range(4)] == pytest.approx([1.0, 0.853553, 0.5, 0.146447], abs=1e-6)


def test_grad_accumulation_equals_one_big_batch(arith_data):
    h = load("tiny-random")
    h.model.train()  # dropout is 0 in the tiny model: deterministic
    exs = arith_data.examples[:4]
    pad = h.tokenizer.pad_token_id

    def grads(micro):
        h.model.zero_grad(set_to_none=True)
        accumulate_gradients(h.model, micro, None, bf16=False)
        return {n: p.grad.clone() for n, p in h.model.named_parameters()}

    two = grads([collate(exs[:2], pad), collate(exs[2:], pad)])
    one = grads([collate(exs, pad)])
    for n in one:
        torch.testing.assert_close(two[n], one[n], atol=1e-6, rtol=1e-5)
    # the naive mean of the two micro-batch means differs (the answers have different lengths)
    h.model.zero_grad(set_to_none=True)
    for b in (collate(exs[:2], pad), collate(exs[2:], pad)):
        (answer_loss(h.model, b) / 2).backward()
    naive = h.model.model.embed_tokens.weight.grad
    assert not torch.allclose(naive, one["model.embed_tokens.weight"], atol=1e-6)


def test_only_trainable_parameters_change(arith_data):
    h = load("tiny-random")
    before = {n: p.detach().clone() for n, p in h.model.named_parameters()}
    for n, p in h.model.named_parameters():
        p.requires_grad_(n.startswith("model.layers.1.mlp.") or n == "model.norm.weight")
    res = fit(h, {"steps": 3, "lr": 1e-2, "weight_decay": 0.1, "batch_size": 2}, data=arith_data)
    changed = {n for n, p in h.model.named_parameters() if not torch.equal(p, before[n])}
    want = {"model.layers.1.mlp.gate_proj.weight", "model.layers.1.mlp.up_proj.weight"}
    want |= {"model.layers.1.mlp.down_proj.weight", "model.norm.weight"}
    assert changed == want
    assert res.trainable_params == 3 * 128 * 256 + 128


RESUME_CFG = dict(steps=6, lr=5e-3, warmup_steps=2, weight_decay=0.05, batch_size=2, grad_accum=2, save_every=2, seed=7)


def test_resume_after_interruption_is_bitwise_equal(tmp_path, arith_data):
    cfg = {**RESUME_CFG, "eval_tasks": ["text-cloze"], "eval_every": 3, "eval_limit": 2}
    ref = with_dropout(load("tiny-random"))
    full = fit(ref, cfg, tmp_path / "full", loss_fn=noisy_loss, data=arith_data)

    run = with_dropout(load("tiny-random"))
    with pytest.raises(Interrupt):  # dies during step 5, after the checkpoint of step 4
        fit(run, cfg, tmp_path / "cut", loss_fn=noisy_loss, data=arith_data, on_step=stop_after(5))
    again = with_dropout(load("tiny-random", seed=1))  # other initial weights: all come from the checkpoint
    res = fit(again, cfg, tmp_path / "cut", resume=True, loss_fn=noisy_loss, data=arith_data)
    assert res.resumed_from == 4 and res.steps == 6
    assert_bitwise_equal(trainable(again), trainable(ref))
    assert res.losses == full.losses and res.lrs == full.lrs
    assert sorted(res.evals) == sorted(full.evals) == [3, 6]
    assert res.evals[6]["text-cloze"]["acc"] == full.evals[6]["text-cloze"]["acc"]

    done = fit(again, cfg, tmp_path / "cut", resume=True, loss_fn=noisy_loss, data=arith_data)
    assert done.steps == 6 and done.losses == full.losses  # a finished run resumes to nothing
    assert_bitwise_equal(trainable(again), trainable(ref))


def test_resume_without_restoring_rng_would_differ(tmp_path, arith_data):
    """The check above can fail: a run whose dropout draws differ ends elsewhere."""
    cfg = {**RESUME_CFG, "save_every": 0}
    a, b = with_dropout(load("tiny-random")), with_dropout(load("tiny-random"))
    fit(a, cfg, loss_fn=noisy_loss, data=arith_data)
    fit(b, {**cfg, "seed": 8}, loss_fn=noisy_loss, data=arith_data)
    assert not all(torch.equal(x, y) for x, y in zip(trainable(a).values(), trainable(b).values()))


CHILD = """
import sys, time
from budgetlm.models.sources import load
from budgetlm.train import fit
sys.path.insert(0, {here!r})
from test_train_loop import CORPUS_CFG, noisy_loss, with_dropout

def hook(info):
    if info.checkpoint is not None and info.step == 4:
        print("CHECKPOINT", flush=True)
        time.sleep(120)  # killed here, in the middle of the run

fit(with_dropout(load("tiny-random")), CORPUS_CFG, {out!r}, loss_fn=noisy_loss, on_step=hook, progress=False)
"""
CORPUS_CFG = {**RESUME_CFG, "max_len": 32, "data": {"task": "corpus", "limit": 12}}


def test_resume_after_sigkill_is_bitwise_equal(tmp_path):
    out = tmp_path / "killed"
    code = textwrap.dedent(CHILD).format(here=os.path.dirname(__file__), out=str(out))
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        line = proc.stdout.readline().decode()
        assert line.strip() == "CHECKPOINT", proc.stderr.read().decode()[-2000:]
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    leftover = out / "checkpoints" / ".step-000006.partial"  # what a kill during a write leaves
    leftover.mkdir()
    (leftover / "trainable.safetensors").write_bytes(b"torn")

    resumed = with_dropout(load("tiny-random"))
    res = fit(resumed, CORPUS_CFG, out, resume=True, loss_fn=noisy_loss, progress=False)
    assert res.resumed_from == 4
    ref = with_dropout(load("tiny-random"))
    full = fit(ref, CORPUS_CFG, tmp_path / "full", loss_fn=noisy_loss, progress=False)
    assert_bitwise_equal(trainable(resumed), trainable(ref))
    assert res.losses == full.losses
    assert not leftover.exists()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000004", "step-000006"]  # keep 2


def test_resume_with_another_config_names_the_keys(tmp_path, arith_data):
    h = load("tiny-random")
    fit(h, {**RESUME_CFG, "steps": 2}, tmp_path, data=arith_data)
    with pytest.raises(ConfigError, match=r"another config: lr \(0.005 -> 0.001\); steps \(2 -> 3\)") as e:
        fit(h, {**RESUME_CFG, "steps": 3, "lr": 1e-3}, tmp_path, resume=True, data=arith_data)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=r"data.limit \(None -> 5\)"):
        fit(h, {**RESUME_CFG, "steps": 2, "data": {"limit": 5}}, tmp_path, resume=True, data=arith_data)
    h.model.model.layers[0].mlp.up_proj.weight.requires_grad_(False)
    with pytest.raises(ConfigError, match="other parameters.*up_proj"):
        fit(h, {**RESUME_CFG, "steps": 2}, tmp_path, resume=True, data=arith_data)
    h.model.model.layers[0].mlp.up_proj.weight.requires_grad_(True)
    with pytest.raises(DataError, match="training examples differ"):
        other = TrainData(arith_data.examples[1:], "other")
        fit(h, {**RESUME_CFG, "steps": 2}, tmp_path, resume=True, data=other)
    with pytest.raises(ConfigError, match="already holds checkpoints; pass resume=True"):
        fit(h, {**RESUME_CFG, "steps": 2}, tmp_path, data=arith_data)


def test_bad_input_fails_before_training(arith_data):
    h = load("tiny-random")
    before = {n: p.detach().clone() for n, p in h.model.named_parameters()}
    bad = [
        ({"steps": 0}, "train: steps: Input should be greater than or equal to 1"),
        ({"stesp": 3}, "train: unknown setting 'stesp' (allowed: steps, lr,"),
        ({"data": {"tsk": "arith"}}, "train: unknown setting 'data.tsk' (allowed: task, split,"),
        ({"steps": 3, "warmup_steps": 5}, "train: warmup_steps=5 exceeds steps=3"),
        ({"eval_every": 2}, "train: eval_every=2 but no eval_tasks"),
        ({"save_every": 2}, "train: resume and save_every need out_dir"),
    ]
    for cfg, msg in bad:
        with pytest.raises(ConfigError) as e:
            fit(h, cfg, data=arith_data)
        assert str(e.value).startswith(msg), str(e.value)
    with pytest.raises(ConfigError, match=r"train: eval_tasks: unknown task 'arith2' \(did you mean: arith"):
        fit(h, {"steps": 1, "eval_tasks": ["arith2"]}, data=arith_data)
    with pytest.raises(ConfigError, match=r"train: data.task: unknown task 'arth' \(did you mean: arith"):
        fit(h, {"steps": 1, "data": "arth"}, data=arith_data)
    for p in h.model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ConfigError, match="no parameter of the model requires grad"):
        fit(h, {"steps": 1}, data=arith_data)
    assert_bitwise_equal({n: p.detach() for n, p in h.model.named_parameters()}, before)
    assert TrainConfig.parse({"data": "corpus"}).data.task == "corpus"


def test_gradient_checkpointing_gives_the_same_training(arith_data):
    cfg = {"steps": 2, "lr": 1e-3, "batch_size": 2}
    a, b = load("tiny-random"), load("tiny-random")
    ra = fit(a, cfg, data=arith_data)
    rb = fit(b, {**cfg, "grad_checkpointing": True}, data=arith_data)
    assert rb.losses == pytest.approx(ra.losses, rel=1e-5)
    for x, y in zip(trainable(a).values(), trainable(b).values()):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-5)
    assert not b.model.is_gradient_checkpointing  # switched off again


def test_bf16_autocast_option(arith_data):
    cfg = {"steps": 1, "lr": 1e-3, "batch_size": 2}
    fp32 = fit(load("tiny-random"), cfg, data=arith_data)
    bf16 = fit(load("tiny-random"), {**cfg, "bf16": True}, data=arith_data)
    assert bf16.losses[0] != fp32.losses[0]  # autocast did run in bf16
    assert bf16.losses[0] == pytest.approx(fp32.losses[0], rel=2e-2)


def test_data_order_consumes_each_example_once_per_epoch(arith_data):
    seen = []

    def spy(model, batch):
        seen.extend(map(tuple, batch["input_ids"].tolist()))
        return answer_loss(model, batch)

    data = TrainData(arith_data.examples[:6], "6")
    fit(load("tiny-random"), {"steps": 3, "batch_size": 2, "grad_accum": 2}, loss_fn=spy, data=data)
    pad = load("tiny-random").tokenizer.pad_token_id
    ids = [tuple(x for x in row if x != pad) for row in seen]
    want = [tuple(data.examples[i].input_ids) for i in DataOrder(6, 0).take(0, 12)]
    assert ids == want and sorted(ids[:6]) == sorted(tuple(e.input_ids) for e in data.examples)
