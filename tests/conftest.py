import json
import os
import subprocess

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _float32_calibration_by_default(monkeypatch):
    """GPTQ's calibration_dtype 'auto' means bfloat16 on CPUs where a bf16 matmul measures fast: pin the measured
    speed-up to 1 (float32) so that the numerics the tests check do not depend on the machine (test_gptq tests the
    rule itself and bfloat16)."""
    from budgetlm.methods.quant import gptq

    monkeypatch.setattr(gptq, "bf16_matmul_speedup", lambda: 1.0)


@pytest.fixture(autouse=True)
def _exact_quantised_layers(monkeypatch):
    """Quantised layers compute by exact dequantisation in the tests' own process, so the numerics they check do not
    depend on which path the host's probe picks (tests/unit/test_quant_kernels.py tests the kernels, the probe and
    the path choice; processes the tests start use the kernels)."""
    from budgetlm.methods.quant import kernels

    monkeypatch.setattr(kernels, "_enabled", False)
    monkeypatch.setattr(kernels, "_own_preferred", False)  # a runtime's whole-step timing may set it (lean_step.py)


@pytest.fixture
def offline_datasets(tmp_path, monkeypatch):
    """No hub and an empty `datasets` cache: tasks read only --data-dir files and the bundled data. datasets and
    huggingface_hub read these settings at import time, so the live values are patched (and the environment, for
    anything imported later)."""
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf" / "datasets"))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf" / "datasets")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture
def tiny_study_data(tmp_path, monkeypatch):
    """What a study of real cells on tiny-random needs, offline: arc_easy read from a local file of ten ARC-style
    items (the folder returned, a recipe's data_dir) and the host's memory bandwidth stubbed (it takes seconds to
    measure and is not what such tests are about)."""
    from budgetlm.data.tasks.base import tasks
    from budgetlm.data.tasks.hub import HUB_TASKS
    from budgetlm.results import Metric

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setitem(tasks._items, "arc_easy", HUB_TASKS["arc_easy"])
    monkeypatch.setattr("budgetlm.hardware.bench.memory_bandwidth", lambda: Metric(10.0, unit="GB/s"))
    data = tmp_path / "data"
    (data / "arc_easy").mkdir(parents=True)
    with open(data / "arc_easy" / "test.jsonl", "w") as f:
        for i in range(10):
            choices = {"text": [str(i + 1), str(i + 2), "blue", "seven"], "label": ["A", "B", "C", "D"]}
            f.write(json.dumps({"id": f"q{i}", "question": f"{i} plus one?", "choices": choices, "answerKey": "A"}))
            f.write("\n")
    return data


@pytest.fixture
def tiny():
    from budgetlm.models.sources import load

    return load("tiny-random")


@pytest.fixture
def input_hessian():
    """A reference for the Hessian-based methods: hessian(model, module, tokens) = (2/n) XᵀX in float64, X the
    n inputs (tokens) `module` receives when `model` runs on `tokens`."""
    import torch

    def hessian(model, module, tokens):
        xs = []
        h = module.register_forward_pre_hook(lambda _m, args: xs.append(args[0].reshape(-1, args[0].shape[-1])))
        with torch.no_grad():
            model(input_ids=tokens, use_cache=False)
        h.remove()
        X = torch.cat(xs).double()
        return 2 / X.shape[0] * X.T @ X

    return hessian


@pytest.fixture
def run_main(capsys):
    """`budgetlm ARGS` through cli.main in this process (no interpreter start-up): the command's own parsing, exit
    code, stdout and stderr, as subprocess.CompletedProcess(args, returncode, stdout, stderr)."""
    from budgetlm import cli

    def run(*args):
        code = 0
        try:
            cli.main([str(a) for a in args])
        except SystemExit as exc:
            code = exc.code or 0
        out = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out.out, out.err)

    return run
