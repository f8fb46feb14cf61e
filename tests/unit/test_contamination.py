"""The one contamination rule (data/tasks/contamination.py: gsm_symbolic's templates are GSM8K's test questions) at its
three places: a training run's own eval_tasks, a recipe's pipelines against the study's tasks, and an evaluation
of a model whose provenance records training on gsm_symbolic (refused unless allow_contamination, which marks the
score). Each refusal is one ConfigError line, raised before any data is read or anything is written."""

from __future__ import annotations

import json

import pytest

from budgetlm.data.tasks import contamination
from budgetlm.errors import ConfigError

REASON = "gsm_symbolic's templates are GSM8K's test questions, so the score would be contaminated"
SYM, ARITH, GSM8K = ("gsm_symbolic", None), ("arith", None), ("gsm8k", None)


def test_rule_and_message():
    why = f"evaluating gsm8k after training on gsm_symbolic, but {REASON}"
    assert contamination.first([ARITH, SYM], ["text-ppl", "gsm8k"]) == (SYM, "gsm8k", why, False)
    assert contamination.reason(SYM, "gsm8k:eval-fold")[0].endswith(REASON)
    assert contamination.reason(SYM, "gsm8k_cot") is None
    assert contamination.first([SYM], ["gsm_symbolic", "arith"]) is None
    assert contamination.first([GSM8K], ["gsm_symbolic"]) is None  # GSM8K's train split is not the templates' source
    with pytest.raises(ConfigError) as e:
        contamination.check([SYM], ["gsm8k"], "here", "drop {eval} or stop training on {train}")
    assert str(e.value) == f"here: {why}; drop gsm8k or stop training on gsm_symbolic"


def test_trained_tasks_reads_every_recorded_training():
    provenance = [
        {"method": "rtn", "config": {"bits": 8}},
        {"method": "lora", "config": {"r": 8, "train": {"steps": 2, "data": {"task": "arith", "split": "train"}}}},
        {"method": "train", "config": {"steps": 2, "data": {"task": "gsm_symbolic", "split": "train"}}, "steps": 2},
        {"method": "kd", "config": {"train": {"data": {"task": "gsm_symbolic", "split": "train"}}}},
        {"method": "other", "config": {"data": "gsm8k"}},  # not a data config (a mapping with a task)
        {"method": "train", "config": {"data": {"task": "boolq", "split": None}}},
    ]
    assert contamination.trained_on(provenance) == [("arith", "train"), ("gsm_symbolic", "train"), ("boolq", None)]


def test_train_config_refuses_gsm8k_after_gsm_symbolic():
    from budgetlm.methods.base import parse_config
    from budgetlm.train.config import TrainConfig

    message = (
        f"train: evaluating gsm8k after training on gsm_symbolic, but {REASON}; drop gsm8k from eval_tasks or train "
        "on other data"
    )
    with pytest.raises(ConfigError) as e:
        TrainConfig.parse({"data": "gsm_symbolic", "eval_tasks": ["arith", "gsm8k"]})
    assert str(e.value) == message
    with pytest.raises(ConfigError) as e:  # the same config inside an adapter step
        parse_config("lora", {"train": {"data": "gsm_symbolic", "eval_tasks": ["gsm8k"]}})
    assert str(e.value) == message
    assert TrainConfig.parse({"data": "gsm_symbolic", "eval_tasks": ["gsm_symbolic"]}).data.task == "gsm_symbolic"
    assert TrainConfig.parse({"data": "arith", "eval_tasks": ["gsm8k"]}).eval_tasks == ["gsm8k"]


def test_recipe_refuses_a_pipeline_training_on_gsm_symbolic_with_gsm8k_among_tasks():
    from budgetlm.experiments.recipe import parse_recipe

    recipe = {
        "models": ["tiny-random"],
        "pipelines": {
            "q8": [{"method": "rtn", "bits": 8}],
            "ft": [{"method": "lora", "train": {"data": "gsm_symbolic"}}],
        },
        "tasks": ["gsm_symbolic", "gsm8k"],
    }
    with pytest.raises(ConfigError) as e:
        parse_recipe(recipe, "recipe r.yaml")
    assert str(e.value) == (
        f"recipe r.yaml: pipelines.ft: evaluating gsm8k after training on gsm_symbolic, but {REASON}; remove gsm8k "
        "from tasks or train this pipeline on other data"
    )
    assert parse_recipe({**recipe, "tasks": ["gsm_symbolic"]}).pipelines["ft"][0]["train"]["data"]["task"] == (
        "gsm_symbolic"
    )


GSM_ROW = {"question": "Tom has 1 marble and buys 2 more. How many now?", "answer": "1+2=3\n#### 3"}


def test_eval_refuses_a_model_trained_on_gsm_symbolic_unless_allowed(tmp_path, tiny):
    from budgetlm.evaluation.harness import evaluate

    tiny.provenance = [{"method": "train", "config": {"data": {"task": "gsm_symbolic", "split": "train"}}}]
    with pytest.raises(ConfigError) as e:  # before any data: there is no gsm8k file anywhere yet
        evaluate(tiny, ["text-ppl", "gsm8k"], out_dir=tmp_path / "ev")
    assert str(e.value) == (
        f"eval (from the model's provenance): evaluating gsm8k after training on gsm_symbolic, but {REASON}; "
        "leave gsm8k out, or pass --allow-contamination to score it marked as contaminated"
    )
    assert not (tmp_path / "ev").exists()
    data = tmp_path / "data" / "gsm8k"
    data.mkdir(parents=True)
    (data / "test.jsonl").write_text(json.dumps(GSM_ROW) + "\n")
    res = evaluate(tiny, ["gsm8k"], data_dir=tmp_path / "data", allow_contamination=True)
    assert res["gsm8k"]["exact_match_strict"].extra["contamination"] == (
        f"evaluating gsm8k after training on gsm_symbolic, but {REASON}; allowed by --allow-contamination"
    )


def test_cli_eval_of_a_trained_adapter(tmp_path, run_main, monkeypatch):
    """End to end: `budgetlm train` on gsm_symbolic records it; `budgetlm eval --tasks gsm8k` of the result refuses
    with one line and exit 2 and writes nothing."""
    monkeypatch.chdir(tmp_path)
    train = ["--set", "train.steps=1", "--set", "train.batch_size=1", "--set", "train.max_len=64"]
    data = ["--set", "train.data.task=gsm_symbolic", "--set", "train.data.limit=2"]
    done = run_main("train", "tiny-random", "--method", "lora", "--out", "run", *train, *data)
    assert done.returncode == 0, done.stderr
    refused = run_main("eval", "run", "--tasks", "gsm8k", "--out", "ev")
    assert refused.returncode == 2
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: eval (from the model's provenance): evaluating gsm8k ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_recipe_refuses_a_model_folder_trained_on_gsm_symbolic(tmp_path, tiny):
    from budgetlm.experiments.recipe import parse_recipe

    tiny.provenance = [{"method": "train", "config": {"data": {"task": "gsm_symbolic", "split": "train"}}}]
    tiny.save(tmp_path / "m")
    with pytest.raises(ConfigError) as e:
        parse_recipe({"models": [str(tmp_path / "m")], "tasks": ["gsm8k"]}, "recipe r.yaml")
    assert str(e.value).startswith("recipe r.yaml: models[0] (its provenance): evaluating gsm8k after training on ")
    assert str(e.value).endswith("; remove gsm8k from tasks or use a model not trained on gsm_symbolic")
    assert parse_recipe({"models": [str(tmp_path / "m")], "tasks": ["gsm_symbolic"]}).tasks == ["gsm_symbolic"]


def test_recipe_refuses_a_model_folder_fine_tuned_on_the_items_it_would_score(tmp_path, tiny):
    """The same rule covers the items themselves: a folder fine-tuned on boolq's train fold, in a study of boolq."""
    from budgetlm.experiments.recipe import parse_recipe

    tiny.provenance = [{"method": "lora", "config": {"r": 2, "train": {"data": {"task": "boolq", "split": None}}}}]
    tiny.save(tmp_path / "m")
    with pytest.raises(ConfigError) as e:
        parse_recipe({"models": [str(tmp_path / "m")], "tasks": ["boolq"]}, "recipe r.yaml")
    assert str(e.value).startswith("recipe r.yaml: models[0] (its provenance): training on boolq reads its train-fold")
    assert str(e.value).endswith("evaluate 'boolq:eval-fold' instead")
    assert parse_recipe({"models": [str(tmp_path / "m")], "tasks": ["boolq:eval-fold"]}).tasks == ["boolq:eval-fold"]


def test_training_a_model_trained_on_gsm_symbolic_with_gsm8k_evals_is_refused_before_it_starts(tiny):
    from budgetlm.train.loop import fit

    tiny.provenance = [{"method": "train", "config": {"data": {"task": "gsm_symbolic", "split": "train"}}}]
    for p in tiny.model.parameters():
        p.requires_grad_(True)
    before = [p.detach().clone() for p in tiny.model.parameters()]
    with pytest.raises(ConfigError, match=r"^train \(the model's provenance\): evaluating gsm8k after training on "):
        fit(tiny, {"steps": 1, "data": "arith", "eval_tasks": ["gsm8k"]}, progress=False)
    assert all(bool((p == b).all()) for p, b in zip(tiny.model.parameters(), before))
