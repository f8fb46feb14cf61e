"""`budgetlm train` from the outside: it trains and saves a loadable adapter beside its checkpoints; a process killed
after its first checkpoint and rerun with --resume ends with bitwise the weights of an uninterrupted run; bad input
is one line on stderr with exit code 2, before any model is loaded."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from test_cli import assert_one_line_error  # the CLI tests' helper (same folder)

from budgetlm.api import train
from budgetlm.cli import split_train_settings
from budgetlm.errors import ConfigError
from budgetlm.models.sources import load

TINY = [
    "--set",
    "train.batch_size=2",
    "--set",
    "train.max_len=32",
    "--set",
    "train.data.task=corpus",
    "--set",
    "train.data.limit=8",
]
TINY_TRAIN = {"batch_size": 2, "max_len": 32, "data": {"task": "corpus", "limit": 8}}


def cli(*args, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "budgetlm.cli", "train", "tiny-random", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


@pytest.fixture
def train_main(run_main):
    """`budgetlm train tiny-random ARGS` in this process (see conftest.train_main)."""
    return lambda *args: run_main("train", "tiny-random", *args)


def test_split_train_settings_nests_dotted_keys():
    method, tr = split_train_settings({"r": 4, "train.steps": 3, "train.data.task": "corpus", "train.data.limit": 2})
    assert method == {"r": 4} and tr == {"steps": 3, "data": {"task": "corpus", "limit": 2}}
    with pytest.raises(ConfigError, match="expected a mapping"):
        split_train_settings({"train": 3})


def test_train_saves_an_adapter_that_reloads_to_the_same_outputs(tmp_path):
    handle, result, _ = train("tiny-random", "lora_xs", tmp_path, {"r": 4}, {**TINY_TRAIN, "steps": 2})
    assert result.steps == 2 and result.trainable_params == 14 * 4 * 4  # r² per module, 7 modules x 2 layers
    again = load(tmp_path)  # written as a plain LoRA (lora_A = R·A): equal to fp32 rounding
    x = torch.randint(0, 200, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(again.model(x).logits, handle.model(x).logits, atol=1e-5, rtol=0)
    assert (tmp_path / "checkpoints" / "step-000002" / "state.json").is_file()
    assert [p["method"] for p in again.provenance][-2:] == ["lora_xs", "train"]


def test_full_fine_tuning_trains_every_parameter(tmp_path):
    base = load("tiny-random")
    handle, result, notes = train("tiny-random", "full", tmp_path, {}, {**TINY_TRAIN, "steps": 1, "lr": 1e-2})
    names = {n for n, _ in handle.model.named_parameters()}
    assert {n for n, p in handle.model.named_parameters() if p.requires_grad} == names
    assert result.trainable_params == sum(p.numel() for p in base.model.parameters())
    before = dict(base.model.named_parameters())
    assert all(not torch.equal(p, before[n]) for n, p in handle.model.named_parameters() if "norm" not in n)


def test_resume_after_kill_is_bitwise_equal(tmp_path, train_main):
    args = ["--method", "lora", "--set", "r=4", *TINY, "--set", "train.steps=50", "--set", "train.save_every=1"]
    killed, full = tmp_path / "killed", tmp_path / "full"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "budgetlm.cli", "train", "tiny-random", *args, "--out", str(killed)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    first = killed / "checkpoints" / "step-000001" / "state.json"
    try:
        deadline = time.time() + 240
        while not first.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.002)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    assert not (killed / "adapter_model.safetensors").exists()  # killed before the end
    done = max(int(p.name.split("-")[1]) for p in (killed / "checkpoints").glob("step-*"))
    assert 1 <= done < 50

    resumed = train_main(*args, "--out", str(killed), "--resume", "--json")  # in this process: start-up is slow
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["train"]["resumed_from_step"] >= 1
    ref = train_main(*args, "--out", str(full), "--json")
    assert ref.returncode == 0, ref.stderr
    a, b = load_file(str(killed / "adapter_model.safetensors")), load_file(str(full / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any("lora_B" in k and a[k].abs().sum() > 0 for k in a)  # it trained


def test_bad_input_is_one_line_with_exit_2(tmp_path, train_main):
    cli = train_main
    out = str(tmp_path / "x")
    assert_one_line_error(cli("--method", "lorra", "--set", "train.steps=1", "--out", out), "lora")
    assert_one_line_error(cli("--method", "rtn", "--set", "train.steps=1", "--out", out), "not an adapter")
    assert_one_line_error(cli("--method", "lora", "--out", out), "--train-config")
    assert_one_line_error(cli("--method", "lora", "--set", "r=65", *TINY, "--set", "train.steps=1", "--out", out),
                          "r=65 exceeds")  # fmt: skip
    assert not (tmp_path / "x" / "checkpoints").exists()


def test_resume_from_another_config_is_refused(tmp_path, train_main):
    cli = train_main
    cfg = tmp_path / "train.yaml"
    cfg.write_text("steps: 2\nbatch_size: 2\nmax_len: 32\ndata: {task: corpus, limit: 4}\n")
    train("tiny-random", "lora", tmp_path / "run", {"r": 4}, {"steps": 2, **TINY_TRAIN, "data": {"task": "corpus",
          "limit": 4}})  # fmt: skip
    ok = cli("--method", "lora", "--set", "r=4", "--train-config", str(cfg), "--out", str(tmp_path / "run"), "--resume")
    assert ok.returncode == 0, ok.stderr  # the same run, already complete: resumes at its last step
    other = cli("--method", "lora", "--set", "r=2", "--train-config", str(cfg), "--set", "train.lr=0.01",
                "--out", str(tmp_path / "run"), "--resume")  # fmt: skip
    assert_one_line_error(other, "another config", "config.r (4 -> 2)", "train.lr (0.0001 -> 0.01)")
    again = cli("--method", "lora", "--set", "r=4", "--train-config", str(cfg), "--out", str(tmp_path / "run"))
    assert_one_line_error(again, "holds a training run; pass --resume to continue it, --force to start afresh")
