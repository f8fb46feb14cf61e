"""The latent-space figure (recipe `latent:`): the prompts are the tasks' own, the stored states are the model's final
hidden states (checked against transformers' own forward and the model's norm), the silhouette against a plain numpy
computation, the points repeat for a seed, and the report draws them from the store alone (no model, no states)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from budgetlm.data.tasks.base import TaskContext, tasks
from budgetlm.errors import BudgetLMError, ConfigError
from budgetlm.evaluation import latent as lt
from budgetlm.evaluation.harness import sample_items
from budgetlm.experiments.latent import ROWS, STATES, run_latent
from budgetlm.experiments.recipe import parse_recipe
from budgetlm.models.lm import HFLM

LATENT = {"tasks": ["text-cloze", "arith"], "items": 12, "perplexity": 5}


def _cfg(**latent) -> dict:
    return {"model": "tiny-random", "seed": 0, "data_dir": None, "latent": {**LATENT, **latent}}


def _independent_states(model, prompts: list[list[int]]) -> np.ndarray:
    """One prompt at a time: the last decoder layer's output (a forward hook), the model's final norm applied by hand,
    the last token; it must also be transformers' last entry of output_hidden_states."""
    layer = model.model.layers[-1]
    seen = []
    hook = layer.register_forward_hook(lambda mod, args, out: seen.append(out[0] if isinstance(out, tuple) else out))
    rows = []
    try:
        with torch.no_grad():
            for ids in prompts:
                seen.clear()
                out = model(input_ids=torch.tensor([ids]), output_hidden_states=True)
                normed = model.model.norm(seen[-1])[0, -1]
                torch.testing.assert_close(out.hidden_states[-1][0, -1], normed)
                rows.append(normed.numpy())
    finally:
        hook.remove()
    return np.stack(rows)


def _independent_silhouette(x: np.ndarray, labels: list[int]) -> float:
    """Rousseeuw's silhouette with cosine distance, written out."""
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    d = 1.0 - unit @ unit.T
    labels = np.asarray(labels)
    scores = []
    for i in range(len(x)):
        own = (labels == labels[i]) & (np.arange(len(x)) != i)
        a = d[i, own].mean()
        b = min(d[i, labels == k].mean() for k in set(labels.tolist()) if k != labels[i])
        scores.append((b - a) / max(a, b))
    return float(np.mean(scores))


def test_prompts_are_the_tasks_own(tiny):
    lm = HFLM(tiny)
    cloze, arith = tasks.get("text-cloze"), tasks.get("arith")
    doc = cloze.load(TaskContext()).items[0].doc
    context = cloze.doc_to_text(doc)
    assert lt.prompt_tokens(lm, cloze, doc) == tiny.tokenizer(context.rstrip(), add_special_tokens=False)["input_ids"]
    doc = arith.load(TaskContext()).items[0].doc
    assert not tiny.is_instruct  # no chat template: the prompt is the task's text
    assert (
        lt.prompt_tokens(lm, arith, doc)
        == tiny.tokenizer(arith.doc_to_text(doc), add_special_tokens=False)["input_ids"]
    )
    with pytest.raises(ConfigError, match="text-ppl.*builds no prompt"):
        lt.prompt_tokens(lm, tasks.get("text-ppl"), {})


def test_stored_states_are_the_final_hidden_states(tiny, tmp_path):
    rows = run_latent(tiny, _cfg(), tmp_path, baseline=True)
    states = np.load(tmp_path / STATES)
    points = rows["tsne_kl"].extra
    assert len(points["ids"]) == len(points["x"]) == states.shape[0] == 24 and points["tasks"] == LATENT["tasks"]

    lm = HFLM(tiny)
    prompts, ids, labels = [], [], []
    for k, name in enumerate(LATENT["tasks"]):
        task = tasks.get(name)
        for item in sample_items(task.load(TaskContext()).items, 12, 0):
            prompts.append(lt.prompt_tokens(lm, task, item.doc))
            ids.append(item.id)
            labels.append(k)
    assert points["ids"] == ids and points["task"] == labels
    expected = _independent_states(tiny.model, prompts)
    np.testing.assert_allclose(states, expected, rtol=1e-4, atol=1e-5)  # batched by length vs one at a time
    assert math.isclose(rows["silhouette_task"].value, _independent_silhouette(expected, labels), abs_tol=1e-4)
    assert -1 <= rows["silhouette_task_2d"].value <= 1 and rows["tsne_kl"].value >= 0
    assert "cosine_to_baseline" not in rows  # outside a study there is no baseline
    assert set(rows) <= set(ROWS)


def test_points_repeat_for_a_seed(tiny, tmp_path):
    a = run_latent(tiny, _cfg(), tmp_path / "a", baseline=True)["tsne_kl"]
    b = run_latent(tiny, _cfg(), tmp_path / "b", baseline=True)["tsne_kl"]
    assert a.extra["x"] == b.extra["x"] and a.extra["y"] == b.extra["y"] and a.value == b.value
    other = run_latent(tiny, {**_cfg(), "seed": 1}, tmp_path / "c", baseline=True)["tsne_kl"]
    assert other.extra["x"] != a.extra["x"]


def test_silhouette_checks_against_numpy():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 1, (10, 6)) + 3, rng.normal(0, 1, (12, 6)) - 3, rng.normal(0, 1, (7, 6))])
    labels = [0] * 10 + [1] * 12 + [2] * 7
    assert math.isclose(lt.silhouette(x, labels), _independent_silhouette(x, labels), abs_tol=1e-9)
    assert lt.silhouette(x, [0] * len(x)) is None


def test_too_few_items_for_the_perplexity(tiny, tmp_path):
    with pytest.raises(BudgetLMError, match="latent.perplexity 30 needs more than 30 items, and the tasks gave 4"):
        run_latent(tiny, _cfg(items=2, perplexity=30), tmp_path, baseline=True)


@pytest.mark.parametrize(
    ("latent", "needle"),
    [
        (
            {"tasks": ["text-cloze", "arithh"]},
            "latent.tasks[1]: 'arithh' is not among the recipe's tasks (did you mean: arith?)",
        ),
        ({"tasks": ["text-cloze", "arith"], "items": 0}, "latent.items: Input should be greater than or equal to 1"),
        ({"tasks": ["text-cloze", "arith"], "items": 4, "perplexity": 8}, "must be below the number of points, 8"),
        ({"tasks": ["text-cloze", "text-ppl"]}, "latent.tasks[1]: task 'text-ppl' (perplexity) builds no prompt"),
        ({"tasks": ["arith"]}, "latent.tasks: List should have at least 2 items"),
        ({"tasks": ["arith", "arith"]}, "'arith' is listed twice"),
        ({"tasks": ["arith", "text-cloze"], "perplexity": 0}, "latent.perplexity: Input should be greater than 0"),
        ({"tasks": ["arith", "text-cloze"], "size": 3}, "latent: unknown key 'size'"),
    ],
)
def test_bad_latent_settings_are_one_line(latent, needle):
    data = {"models": ["tiny-random"], "tasks": ["text-cloze", "arith", "text-ppl"], "latent": latent}
    with pytest.raises(ConfigError) as err:
        parse_recipe(data)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_cells_without_latent_keep_their_ids():
    from budgetlm.experiments.plan import plan

    base = {"models": ["tiny-random"], "tasks": ["text-cloze", "arith"]}
    without = plan(parse_recipe(base))
    assert all("latent" not in c.config for c in without)
    with_latent = plan(parse_recipe({**base, "latent": LATENT}))
    assert with_latent[0].config["latent"] == {**LATENT, "perplexity": 5.0}
    assert with_latent[0].id != without[0].id


@pytest.fixture
def latent_study(tmp_path, tiny_study_data):
    """A baseline and an int4 cell on tiny-random with latent data (cells run in this process)."""
    from budgetlm.experiments.cell import run_cell
    from budgetlm.experiments.study import run_study

    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "name: latent\nmodels: [tiny-random]\npipelines: {int4: [{method: rtn, bits: 4}]}\n"
        f"tasks: [arc_easy, text-cloze]\nlimit: 2\ndata_dir: {tiny_study_data}\nbench: {{enabled: false}}\n"
        "latent: {tasks: [arc_easy, text-cloze], items: 8, perplexity: 4}\n"
    )
    return run_study(recipe, tmp_path / "out", progress=False, runner=lambda folder, on_status: run_cell(folder))


def test_a_study_stores_latent_rows_and_the_report_draws_them_from_the_store(latent_study):
    from budgetlm.report import latent as report_latent
    from budgetlm.report.build import build_report, load_study
    from budgetlm.report.html import draw

    out = latent_study
    _, cells, _, _ = load_study(out)
    base, int4 = cells
    assert base["pipeline"] == "baseline" and int4["pipeline"] == "int4"
    states = {c["pipeline"]: np.load(out / c["folder"] / STATES) for c in cells}
    assert states["baseline"].shape == (16, 128)
    cos = int4["phases"]["latent"]["cosine_to_baseline"]
    expected = lt.cosines(states["int4"], states["baseline"])
    assert math.isclose(cos["value"], float(expected.mean()), rel_tol=1e-9) and cos["n"] == 16
    assert math.isclose(cos["stderr"], float(expected.std(ddof=1) / 4), rel_tol=1e-9)
    assert "cosine_to_baseline" not in base["phases"]["latent"]
    stored = {c["cell_id"]: c["phases"]["latent"]["tsne_kl"]["extra"] for c in cells}

    # the report needs neither the models nor the states nor the references
    import shutil

    for c in cells:
        shutil.rmtree(out / c["folder"] / "model", ignore_errors=True)
        (out / c["folder"] / STATES).unlink()
    shutil.rmtree(out / "references")
    paths = build_report(out)
    _, cells, _, _ = load_study(out)
    fig = report_latent.latent_figure(cells)
    assert [p.cell_id for p in fig.panels] == [c["cell_id"] for c in cells] and fig.tasks == ["arc_easy", "text-cloze"]
    for p in fig.panels:
        assert p.x == stored[p.cell_id]["x"] and p.y == stored[p.cell_id]["y"] and p.ids == stored[p.cell_id]["ids"]
    plot = draw(fig)
    drawn = sum(len(trace.x) for trace in plot.data)
    assert drawn == 32 and {trace.name for trace in plot.data} == {"arc_easy", "text-cloze"}
    page = paths["html"].read_text()
    assert 'id="latent"' in page and report_latent.NONE not in page
    md = paths["markdown"].read_text()
    assert "## Latent space" in md and f"| int4 | `{int4['cell_id']}` | 16 |" in md
    assert f"{cos['value']:.3f} ± " in md


def test_the_report_says_when_no_cell_has_latent_data():
    from budgetlm.report import latent as report_latent

    cells = [{"cell_id": "c1", "label": "baseline", "folder": "cells/x", "phases": {"arith": {}}}]
    fig = report_latent.latent_figure(cells)
    assert fig.note == report_latent.NONE and not fig.panels
    assert report_latent.NONE + "." in report_latent.markdown(cells)


def test_a_variant_without_baseline_states_says_so(tiny, tmp_path):
    from budgetlm.report import latent as report_latent

    rows = run_latent(tiny, {**_cfg(), "study_dir": str(tmp_path)}, tmp_path, baseline=False)
    assert "cosine_to_baseline" not in rows
    note = rows["tsne_kl"].extra["cosine_to_baseline"]
    assert note.startswith("not measured: no baseline states of these items")
    phases = {"latent": {m: {**r.to_dict(), "value": r.value} for m, r in rows.items()}}
    md = "\n".join(report_latent.markdown([{"cell_id": "c", "label": "int4", "folder": "f", "phases": phases}]))
    assert f"No cosine to the baseline: int4: {note}." in md


def test_only_prompts_of_one_length_share_a_forward(tiny, monkeypatch):
    """No padding: a padding mask takes attention off its causal fast path (twice the time on long prompts)."""
    lm = HFLM(tiny)
    calls = []
    real = lm._hidden

    def hidden(seqs):
        calls.append(sorted(len(s) for s in seqs))
        return real(seqs)

    monkeypatch.setattr(lm, "_hidden", hidden)
    prompts = [[5] * 7, [6] * 5, [7] * 7, [8] * 9, [9] * 5, [10] * 7] + [[3] * 4] * 10
    states = lt.final_states(lm, prompts)
    assert calls == [[4] * 8, [4, 4], [5, 5], [7, 7, 7], [9]]
    np.testing.assert_allclose(states, _independent_states(tiny.model, prompts), rtol=1e-4, atol=1e-5)
