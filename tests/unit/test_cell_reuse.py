"""A cell's steps run once per study: a cell interrupted after it saved its compressed model starts from that model
when the study resumes, and a cell whose model, steps and seed another finished cell shares loads that cell's
model (its files hard-linked) instead of compressing again. Real cells on tiny-random, in this process."""

from __future__ import annotations

import json

import pytest

from budgetlm.errors import Interrupted
from budgetlm.experiments import store as st
from budgetlm.experiments.cell import RESULT, compressed_model, run_cell
from budgetlm.experiments.study import run_study


def recipe_file(tmp_path, data, pipelines: str):
    path = tmp_path / "r.yaml"
    path.write_text(
        f"name: reuse\nmodels: [tiny-random]\npipelines: {pipelines}\ntasks: [arc_easy]\nlimit: 6\n"
        f"data_dir: {data}\nbench: {{enabled: false}}\n"
    )
    return path


def cell_folder(out, pipeline):
    return next(p for p in (out / "cells").iterdir() if p.name.startswith(f"tiny-random_{pipeline}_"))


def test_a_second_pipeline_with_the_same_steps_loads_the_first_ones_model(tmp_path, tiny_study_data, monkeypatch):
    import budgetlm.methods.base as base

    calls = []
    real = base.apply_steps

    def counting(handle, steps, ctx):
        calls.append([s["method"] for s in steps])
        return real(handle, steps, ctx)

    monkeypatch.setattr(base, "apply_steps", counting)
    steps = "[{method: rtn, bits: 4, group_size: 16}]"
    recipe = recipe_file(tmp_path, tiny_study_data, f"{{a: {steps}, b: {steps}, c: [{{method: rtn, bits: 8}}]}}")
    out = run_study(recipe, tmp_path / "out", progress=False, runner=lambda folder, _: run_cell(folder))
    assert calls == [["rtn"], ["rtn"]]  # a and c compress; b starts from a's model
    a, b, c = (cell_folder(out, p) for p in "abc")
    rb = json.loads((b / RESULT).read_text())
    assert rb["compressed_in"] == a.name and "compressed_in" not in json.loads((a / RESULT).read_text())
    steps_a, steps_b = (json.loads((f / "steps.json").read_text()) for f in (a, b))
    assert steps_b["reports"] == steps_a["reports"]
    wa, wb = a / "model" / "model.safetensors", b / "model" / "model.safetensors"
    assert wa.stat().st_ino == wb.stat().st_ino  # hard-linked, not copied
    with st.Store.open(out) as s:
        rows = st.by_cell(s.rows())
        ids = {c["pipeline"]: c["cell_id"] for c in s.cells()}
    assert rows[ids["b"]]["arc_easy"]["acc"]["value"] == rows[ids["a"]]["arc_easy"]["acc"]["value"]
    step_a, step_b = rows[ids["a"]]["step1-rtn"], rows[ids["b"]]["step1-rtn"]
    assert {k: v["value"] for k, v in step_b.items()} == {k: v["value"] for k, v in step_a.items()}  # as measured
    items = [json.loads(x) for x in (a / "items" / "arc_easy.jsonl").read_text().splitlines()]
    items_b = [json.loads(x) for x in (b / "items" / "arc_easy.jsonl").read_text().splitlines()]
    assert [i["loglikelihoods"] for i in items] == [i["loglikelihoods"] for i in items_b]  # the same model
    # removing a's folder leaves b's model whole
    import shutil

    shutil.rmtree(a)
    from budgetlm.models.handle import load_folder

    assert load_folder(b / "model").provenance[-1]["method"] == "rtn"


def test_another_seed_or_other_steps_are_not_reused(tmp_path, tiny_study_data):
    recipe = recipe_file(tmp_path, tiny_study_data, "{a: [{method: rtn, bits: 4, group_size: 16}]}")
    out = run_study(recipe, tmp_path / "out", progress=False, runner=lambda folder, _: run_cell(folder))
    a = cell_folder(out, "a")
    cfg = json.loads((a / "config.json").read_text())
    me = tmp_path / "out" / "cells" / "x"
    me.mkdir()
    assert compressed_model(me, cfg)[0] == a
    assert compressed_model(me, cfg | {"seed": 1}) is None
    assert compressed_model(me, cfg | {"model": "smollm2-135m"}) is None
    assert compressed_model(me, cfg | {"steps": [dict(cfg["steps"][0], bits=8)]}) is None
    assert compressed_model(me, cfg | {"steps": []}) is None  # nothing to compress: the model is loaded as given
    (a / "model" / "model.safetensors").unlink()  # an incomplete folder is never used
    assert compressed_model(me, cfg) is None


def test_a_cell_killed_after_saving_its_model_resumes_from_it(tmp_path, tiny_study_data, monkeypatch):
    import budgetlm.evaluation.harness as harness
    import budgetlm.methods.base as base

    recipe = recipe_file(tmp_path, tiny_study_data, "{a: [{method: rtn, bits: 4, group_size: 16}]}")
    real_eval = harness.evaluate

    def killed(handle, *a, **k):
        if handle.provenance:
            raise KeyboardInterrupt  # cell a dies while it evaluates, its model saved
        return real_eval(handle, *a, **k)

    monkeypatch.setattr(harness, "evaluate", killed)
    with pytest.raises((KeyboardInterrupt, Interrupted)):
        run_study(recipe, tmp_path / "out", progress=False, runner=lambda folder, _: run_cell(folder))
    a = cell_folder(tmp_path / "out", "a")
    assert (a / "model" / "model.safetensors").is_file() and not (a / RESULT).exists()
    (a / "items").mkdir(exist_ok=True)
    (a / "items" / "arc_easy.jsonl").write_text("half-written\n")
    inode = (a / "model" / "model.safetensors").stat().st_ino

    def refuse(*a, **k):
        raise AssertionError("the steps ran again")

    monkeypatch.setattr(harness, "evaluate", real_eval)
    monkeypatch.setattr(base, "apply_steps", refuse)
    out = run_study(recipe, tmp_path / "out", progress=False, runner=lambda folder, _: run_cell(folder))
    result = json.loads((a / RESULT).read_text())
    assert result["compressed_in"] == a.name
    assert (a / "model" / "model.safetensors").stat().st_ino == inode  # kept, not re-saved
    assert len((a / "items" / "arc_easy.jsonl").read_text().splitlines()) == 6  # the rest started clean
    with st.Store.open(out) as s:
        assert [c["status"] for c in s.cells()] == ["done", "done"]
