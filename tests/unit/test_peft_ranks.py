"""The peft_ranks recipes (the MARS table's shape) load and plan every adapter at the intended ranks, and a study
of adapter steps reports trainable parameters, train time, peak memory and accuracy per pipeline."""

import re

import pytest

from budgetlm.experiments.cell import run_cell
from budgetlm.experiments.plan import plan
from budgetlm.experiments.recipe import load_recipe, parse_recipe
from budgetlm.experiments.study import run_study
from budgetlm.report.build import build_report

ADAPTERS = {"lora", "dora", "loha", "vblora", "lora_xs", "mars", "qlora", "qmars", "lobi_lora"}


@pytest.mark.parametrize(
    "name,task,evaluated,updates",
    [("peft_ranks", "arith", "arith", 100), ("peft_ranks_arc_easy", "arc_easy", "arc_easy", 100),
     ("peft_ranks_boolq", "boolq", "boolq:eval-fold", 100), ("peft_ranks_short", "arith", "arith", 12),
     ("peft_ranks_arc_challenge", "arc_challenge", "arc_challenge", 100),
     ("peft_ranks_winogrande", "winogrande", "winogrande:eval-fold", 100),
     ("peft_ranks_hellaswag", "hellaswag", "hellaswag:eval-fold", 100)],
)  # fmt: skip
def test_recipes_plan_every_adapter_at_the_mars_ranks(name, task, evaluated, updates):
    recipe = load_recipe(name)
    assert recipe.tasks == [evaluated]
    ranks: dict[str, set] = {}
    for pipeline, steps in recipe.pipelines.items():
        if pipeline == "baseline":
            continue
        (step,) = steps
        assert step["train"]["data"]["task"] == task and step["train"]["steps"] == updates
        assert step["train"]["data"]["split"] is None  # the task's train source: never what is evaluated
        key = step["method"] + (f"-opt{step['opt']}" if step["method"] == "mars" else "")
        ranks.setdefault(key, set()).add(step["r"])
    assert {k.split("-")[0] for k in ranks} == ADAPTERS
    for key, rs in ranks.items():
        assert rs == ({16, 64, 256} if key == "lora_xs" else {2, 8, 32}), key
    assert {"mars-opt0", "mars-opt1"} <= ranks.keys()
    assert len(plan(recipe)) == 1 + 10 * 3


def test_study_report_shows_trainable_parameters_train_time_and_memory(tmp_path):
    train = {"steps": 1, "batch_size": 2, "max_len": 32, "data": {"task": "arith", "limit": 4}}
    recipe = parse_recipe(
        {
            "name": "peft-mini",
            "models": ["tiny-random"],
            "pipelines": {
                "lora-r2": [{"method": "lora", "r": 2, "train": train}],
                "lora_xs-r16": [{"method": "lora_xs", "r": 16, "train": train}],
            },
            "tasks": ["arith"],
            "limit": 2,
            "bench": {"enabled": False},
        }
    )
    folder = run_study(recipe, tmp_path / "study", progress=False, runner=lambda cell, _status: run_cell(cell))
    text = build_report(folder)["markdown"].read_text()
    assert (
        "| pipeline | step | seconds | peak RSS MB | trainable params | train s | train peak RSS MB | last loss |"
        in text
    )
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| (lora\S*) \| step1-\S+ \| [^|]+ \| [^|]+ \| ([\d,]+) \|",
                                                        text, re.M)}  # fmt: skip
    # tiny-random: 2 layers; LoRA r per module is r * (in + out); LoRA-XS r² per module
    d, i, kv = 128, 256, 64
    shapes = [(d, d), (d, kv), (d, kv), (d, d), (d, i), (d, i), (i, d)]
    assert rows["lora-r2"] == f"{2 * 2 * sum(a + b for a, b in shapes):,}"
    assert rows["lora_xs-r16"] == f"{2 * 7 * 16 * 16:,}"
    assert "### arith" in text
