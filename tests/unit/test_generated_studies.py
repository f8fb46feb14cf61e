"""Generated studies (experiments/generated.py): `study: ablation` / `study: transfer` expand into ordinary cells,
bad declarations are one-line errors; the report's ablation tables and transfer matrix (report/studies.py) hold the
store's values and paired tests that an independent computation (scipy, a plain bootstrap loop) reproduces; the
recipe's `devices` and `decoding.pipelines`; every shipped recipe passes `budgetlm run NAME --dry-run`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy import stats as sps

from budgetlm.errors import ConfigError, UnknownNameError
from budgetlm.experiments import store as st
from budgetlm.experiments.plan import Cell, plan
from budgetlm.experiments.recipe import bundled_recipe, dump_recipe, parse_recipe
from budgetlm.report import studies
from budgetlm.report.build import build_report, load_study

RTN = {"method": "rtn", "bits": 8}
NF4 = {"method": "nf4"}


def lora(task="arith"):
    return {"method": "lora", "r": 2, "train": {"steps": 1, "data": {"task": task}}}


def recipe(**extra):
    return parse_recipe({"models": ["tiny-random"], "tasks": ["arith", "arc_easy"], **extra}, "recipe r.yaml")


# ---------------------------------------------------------------------------------------------- expansion


def test_ablation_names_counts_and_roles():
    rec = recipe(study="ablation", pipelines={"full": [RTN, lora(), NF4]})
    assert list(rec.pipelines) == ["baseline", "full", "full-minus-rtn", "full-minus-lora", "full-minus-nf4"]
    assert [s["method"] for s in rec.pipelines["full-minus-lora"]] == ["rtn", "nf4"]
    assert rec.study.pipeline == "full"
    assert rec.study.roles == {"full": "full", "full-minus-rtn": "step 1 rtn", "full-minus-lora": "step 2 lora",
                               "full-minus-nf4": "step 3 nf4"}  # fmt: skip
    assert len(plan(rec)) == 5
    again = parse_recipe(yaml.safe_load(dump_recipe(rec)))  # the resolved recipe (as stored) parses to itself
    assert again == rec and [c.id for c in plan(again)] == [c.id for c in plan(rec)]


def test_ablation_of_a_method_used_twice_numbers_its_steps():
    rec = recipe(study={"kind": "ablation", "pipeline": "p"}, pipelines={"p": [RTN, RTN], "other": [NF4]})
    assert [p for p in rec.pipelines if "minus" in p] == ["p-minus-1-rtn", "p-minus-2-rtn"]
    assert "other" in rec.pipelines


def test_transfer_names_and_retargeted_training():
    rec = recipe(tasks=["arith", "arc_easy", "boolq:eval-fold", "text-ppl"], study="transfer",
                 pipelines={"hola": [RTN, {**lora(), "train": {"steps": 1, "data": {"task": "arith", "limit": 9}}}]},
                 )  # fmt: skip
    assert list(rec.pipelines) == ["baseline", "hola", "hola@train-arc_easy", "hola@train-boolq"]
    assert rec.study.roles == {"hola": "arith", "hola@train-arc_easy": "arc_easy", "hola@train-boolq": "boolq"}
    data = rec.pipelines["hola@train-boolq"][1]["train"]["data"]
    assert (data["task"], data["split"], data["limit"]) == ("boolq", None, 9)
    assert rec.pipelines["hola@train-boolq"][0] == rec.pipelines["hola"][0]
    folders = [c.folder(Path()).name for c in plan(rec)]
    assert folders[2].startswith("tiny-random_hola-train-arc_easy_")  # '@' is no character of a folder name
    assert parse_recipe(yaml.safe_load(dump_recipe(rec))) == rec


def test_transfer_with_listed_tasks():
    rec = recipe(study={"kind": "transfer", "train_tasks": ["arith", "arc_challenge"]}, pipelines={"a": [lora()]})
    assert list(rec.pipelines) == ["baseline", "a", "a@train-arc_challenge"]


@pytest.mark.parametrize(
    "extra, needle",
    [
        (
            {"study": "ablaton", "pipelines": {"a": [RTN, NF4]}},
            "unknown study kind 'ablaton' (did you mean: ablation?)",
        ),
        ({"study": "ablation", "pipelines": {"a": [RTN]}}, "pipeline 'a' has 1 step(s); give it two or more"),
        ({"study": "ablation", "pipelines": {"a": [RTN, NF4], "b": [NF4]}}, "study.pipeline); pipelines: a, b"),
        ({"study": {"kind": "ablation", "pipeline": "x"}, "pipelines": {"a": [RTN, NF4]}}, "no pipeline 'x'"),
        ({"study": {"kind": "ablation", "train_tasks": ["arith"]}, "pipelines": {"a": [RTN, NF4]}}, "only a transfer"),
        (
            {"study": {"kind": "ablation", "pipeline": "a"}, "pipelines": {"a": [RTN, NF4], "a-minus-rtn": [RTN]}},
            "already defines",
        ),
        ({"study": "transfer", "pipelines": {"a": [RTN, NF4]}}, "has no training step on a task"),
        ({"study": "transfer", "pipelines": {"a": [{"method": "kd"}]}}, "has no training step on a task"),  # corpus
        ({"study": {"kind": "transfer", "train_tasks": ["text-ppl"]}, "pipelines": {"a": [lora()]}}, "text-ppl"),
        ({"study": {"kind": "transfer", "train_tasks": ["arith"]}, "pipelines": {"a": [lora()]}}, "besides 'arith'"),
        ({"study": "transfer", "pipelines": {"a": [lora(), lora("arc_easy")]}}, "trains on several tasks"),
        ({"study": {"kind": "transfer", "bogus": 1}}, "unknown key 'bogus' (allowed: kind, pipeline"),
        ({"devices": ["rpi6"]}, "devices[0]: unknown device 'rpi6' (did you mean: rpi5"),
        ({"devices": []}, "devices: an empty list"),
        ({"decoding": {"drafts": ["layers:1"], "pipelines": ["nope"]}}, "decoding.pipelines[0]: no pipeline 'nope'"),
    ],
)
def test_bad_declarations_are_one_line_errors(extra, needle):
    with pytest.raises((ConfigError, UnknownNameError)) as info:
        recipe(**extra)
    assert needle in str(info.value) and "\n" not in str(info.value)
    assert str(info.value).startswith("recipe r.yaml: ")


def test_transfer_onto_an_evaluated_fold_is_refused():
    with pytest.raises(ConfigError, match="hola@train-boolq"):  # the contamination rule sees generated pipelines too
        recipe(tasks=["arith", "boolq"], study={"kind": "transfer", "train_tasks": ["boolq"]},
               pipelines={"hola": [lora()]})  # fmt: skip


def test_decoding_applies_to_the_pipelines_it_lists():
    rec = recipe(pipelines={"hsd": [], "q": [RTN], "q+hsd": [RTN]},
                 decoding={"drafts": ["layers:1"], "pipelines": ["hsd", "q+hsd"]})  # fmt: skip
    decoded = {c.pipeline for c in plan(rec) if "decoding" in c.config}
    assert decoded == {"hsd", "q+hsd"}
    everywhere = recipe(pipelines={"q": [RTN]}, decoding={"drafts": ["layers:1"]})
    assert all("decoding" in c.config for c in plan(everywhere))
    # a recipe without the new key keeps its cells' ids
    assert "pipelines" not in plan(everywhere)[0].config["decoding"]


def test_recipe_devices_are_kept():
    assert recipe(devices=["rpi5", "h100"]).devices == ["rpi5", "h100"]


# ---------------------------------------------------------------------------------------------- shipped recipes


SHIPPED = sorted(p.stem for p in bundled_recipe().parent.glob("*.yaml"))


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_recipe_passes_dry_run(name, monkeypatch):
    from typer.testing import CliRunner

    from budgetlm.cli import app

    monkeypatch.setenv("COLUMNS", "400")
    out = CliRunner().invoke(app, ["run", name, "--dry-run"])
    assert out.exit_code == 0, out.output
    assert f"{name}:" in out.output and "cells; tasks" in out.output


def test_the_new_recipes_cover_the_issue():
    size = parse_recipe(yaml.safe_load(bundled_recipe("size_reduction").read_text()))
    methods = {s["method"] for steps in size.pipelines.values() for s in steps}
    assert {"qlora", "gptq", "awq", "sparsegpt", "wanda", "shortgpt", "lora", "kd", "hidden_kd", "rtn"} <= methods
    assert {"text-ppl", "fidelity", "arc_easy"} <= set(size.tasks) and size.bench.enabled
    hola = parse_recipe(yaml.safe_load(bundled_recipe("hola").read_text()))
    targets = {
        s["target_bits"] for steps in hola.pipelines.values() for s in steps if s["method"] in ("lobi", "lobi_lora")
    }
    assert targets == {3.0, 4.0}
    assert {"gsm8k", "arc_easy", "arc_challenge"} <= set(hola.tasks) and any("rag" in t for t in hola.tasks)
    decoded = {c.pipeline for c in plan(hola) if "decoding" in c.config}
    assert "hsd" in decoded and "baseline" not in decoded and "lobi-4" not in decoded


# ---------------------------------------------------------------------------------------------- report


ACC = {"of": "acc"}
PPL = {"of": "nll", "per": "tokens", "finish": "exp"}
N_ACC, N_PPL = 60, 30


def _items(seed: int, p_right: float):
    rng = np.random.default_rng(seed)
    acc = [{"id": f"q{i}", "acc": float(rng.random() < p_right)} for i in range(N_ACC)]
    ppl = [{"id": f"d{i}", "nll": float(rng.uniform(20, 40) * (1 + seed / 50)), "tokens": int(rng.integers(10, 20))}
           for i in range(N_PPL)]  # fmt: skip
    return acc, ppl


def _rows(acc, ppl):
    value = sum(r["acc"] for r in acc) / len(acc)
    perplexity = math.exp(sum(r["nll"] for r in ppl) / sum(r["tokens"] for r in ppl))
    m = {"value": value, "stderr": 0.05, "n": len(acc), "unit": "", "source": "measured", "extra": {"aggregate": ACC}}
    p = {
        "value": perplexity,
        "stderr": 0.5,
        "n": len(ppl),
        "unit": "",
        "source": "measured",
        "extra": {"aggregate": PPL},
    }
    return {"t-acc": {"acc": m}, "t-ppl": {"perplexity": p}}


def make_study(path: Path, rec, quality: dict[str, tuple[int, float]], no_items=()):
    """A store of the recipe's cells, each with per-item records drawn from (seed, share right) in its folder."""
    cells = plan(rec)
    with st.Store(path) as s:
        for c in cells:
            seed, p_right = quality[c.pipeline]
            acc, ppl = _items(seed, p_right)
            if c.pipeline not in no_items:
                folder = Cell(c.id, c.model, c.pipeline, c.config).folder(path)
                (folder / "items").mkdir(parents=True)
                for task, recs in (("t-acc", acc), ("t-ppl", ppl)):
                    (folder / "items" / f"{task}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
                rows = _rows(acc, ppl)
                (folder / "eval.json").write_text(json.dumps(rows))
            s.start_cell(c.id, c.model, c.pipeline, {**c.config, "tasks": ["t-acc", "t-ppl"]})
            s.finish_cell(c.id, _rows(acc, ppl), {"cores": 2})
        s.set_meta("plan", [c.id for c in cells])
        s.set_meta("recipe", {**rec.model_dump(mode="json"), "tasks": ["t-acc", "t-ppl"]})
    return path


def _by_pipeline(path):
    _, cells, _, tasks = load_study(path)
    return {c["pipeline"]: c for c in cells}, cells, tasks


def _independent(a: dict, b: dict, task: str, path: Path):
    """B - A and its p-value computed here: scipy's binomial test / chi-square for McNemar, a plain bootstrap loop."""

    def read(c):
        lines = (path / c["folder"] / "items" / f"{task}.jsonl").read_text().splitlines()
        return {r["id"]: r for r in map(json.loads, lines)}

    ra, rb = read(a), read(b)
    ids = [i for i in ra if i in rb]
    if task == "t-acc":
        xa, xb = [ra[i]["acc"] for i in ids], [rb[i]["acc"] for i in ids]
        b01 = sum(1 for x, y in zip(xa, xb) if x == 0 and y == 1)
        b10 = sum(1 for x, y in zip(xa, xb) if x == 1 and y == 0)
        if b01 + b10 == 0:
            p = 1.0
        elif b01 + b10 < 25:
            p = sps.binomtest(min(b01, b10), b01 + b10, 0.5).pvalue
        else:
            p = sps.chi2.sf((abs(b01 - b10) - 1) ** 2 / (b01 + b10), 1)
        return float(np.mean(xb) - np.mean(xa)), p
    A = np.array([[ra[i]["nll"], ra[i]["tokens"]] for i in ids])
    B = np.array([[rb[i]["nll"], rb[i]["tokens"]] for i in ids])
    ppl = lambda m: math.exp(m[:, 0].sum() / m[:, 1].sum())  # noqa: E731
    diff = ppl(B) - ppl(A)
    rng = np.random.default_rng(0)
    boots = []
    for _ in range(studies.N_BOOT):
        idx = rng.integers(0, len(ids), size=len(ids))
        boots.append(ppl(B[idx]) - ppl(A[idx]))
    boots = np.array(boots)
    return diff, (np.sum(np.abs(boots - diff) >= abs(diff)) + 1) / (studies.N_BOOT + 1)


ABLATION = {"baseline": (0, 0.5), "full": (1, 0.7), "full-minus-rtn": (1, 0.7), "full-minus-lora": (3, 0.35),
            "full-minus-nf4": (4, 0.6)}  # fmt: skip


@pytest.fixture
def ablation_study(tmp_path):
    rec = recipe(study="ablation", pipelines={"full": [RTN, lora(), NF4]})
    return make_study(tmp_path, rec, ABLATION)


def test_ablation_tables_hold_the_store_values_and_independent_paired_tests(ablation_study):
    path = ablation_study
    by, cells, tasks = _by_pipeline(path)
    recipe_meta = load_study(path)[0]
    (table,) = studies.study_tables(path, recipe_meta, cells, tasks)
    assert [role for role, _ in table.rows] == ["full", "step 1 rtn", "step 2 lora", "step 3 nf4"]
    assert table.columns == [("t-acc", "acc"), ("t-ppl", "perplexity")]
    for name in ("full-minus-rtn", "full-minus-lora", "full-minus-nf4"):
        for task, metric in table.columns:
            claim = table.claims[(by[name]["cell_id"], task)]
            diff, p = _independent(by["full"], by[name], task, path)
            stored = by[name]["phases"][task][metric]["value"] - by["full"]["phases"][task][metric]["value"]
            assert claim["diff"] == pytest.approx(diff, rel=1e-9, abs=1e-12)
            assert claim["diff"] == pytest.approx(stored, rel=1e-9, abs=1e-12)  # the store's values
            assert claim["p"] == pytest.approx(p, rel=1e-9)
            assert claim["test"] == ("mcnemar" if task == "t-acc" else "bootstrap")
    # minus-rtn has the full pipeline's items: no difference, not significant; minus-lora drops clearly
    assert table.claims[(by["full-minus-rtn"]["cell_id"], "t-acc")]["p"] == 1.0
    assert table.claims[(by["full-minus-lora"]["cell_id"], "t-acc")]["p"] < 0.05
    md = build_report(path)["markdown"].read_text()
    assert "## Ablation of `full` (tiny-random)" in md and "### t-acc: acc ↑" in md
    line = next(ln for ln in md.splitlines() if ln.startswith("| full-minus-rtn | step 1 rtn"))
    assert "+0.000 n.s." in line and "| mcnemar | 1.0000 |" in line
    lora_line = next(ln for ln in md.splitlines() if ln.startswith("| full-minus-lora | step 2 lora"))
    assert "n.s." not in lora_line.split("|")[4]
    assert "McNemar's test" in md and "n.s.: p ≥ 0.05" in md


def test_ablation_heatmap_in_the_html(ablation_study):
    from budgetlm.report.html import draw

    path = ablation_study
    _, cells, tasks = _by_pipeline(path)
    done = [c for c in cells if c["status"] == "done"]
    sections = studies.study_sections(path, load_study(path)[0], done, tasks)
    assert [h for h, _, _ in sections] == ["Ablation (measured, paired tests)"]
    (fig,) = sections[0][1]
    assert fig.rows[0].startswith("full: ") and fig.values[0] == [0.0, 0.0]
    assert all(cid in fig.caption for cid in fig.cell_ids) and "t-acc/acc" in fig.caption
    trace = draw(fig).data[0]
    assert trace.customdata[1][0][1] == fig.folders[1]  # hovering a row shows its cell's folder
    html = build_report(path)["html"].read_text()
    assert 'id="ablation-0"' in html and "Ablation (measured, paired tests)" in html


TRANSFER = {"baseline": (0, 0.5), "a": (1, 0.8), "a@train-arc_easy": (2, 0.5), "a@train-arc_challenge": (5, 0.52)}


def test_transfer_matrix_against_the_untrained_baseline(tmp_path):
    rec = recipe(study={"kind": "transfer", "train_tasks": ["arith", "arc_easy", "arc_challenge"]},
                 pipelines={"a": [lora()]})  # fmt: skip
    path = make_study(tmp_path, rec, TRANSFER, no_items=("a@train-arc_challenge",))
    by, cells, tasks = _by_pipeline(path)
    (table,) = studies.study_tables(path, load_study(path)[0], cells, tasks)
    assert [role for role, _ in table.rows] == ["", "arith", "arc_easy", "arc_challenge"]
    assert table.reference["pipeline"] == "baseline"
    claim = table.claims[(by["a"]["cell_id"], "t-acc")]
    diff, p = _independent(by["baseline"], by["a"], "t-acc", path)
    assert (claim["diff"], claim["p"]) == (pytest.approx(diff), pytest.approx(p))
    missing = table.claims[(by["a@train-arc_challenge"]["cell_id"], "t-acc")]
    assert isinstance(missing, str) and "no per-item records" in missing
    assert studies.diagonal("arc_easy", "arc_easy:eval-fold") and not studies.diagonal("", "arc_easy")
    md = build_report(path)["markdown"].read_text()
    assert "## Transfer of `a` (tiny-random)" in md
    assert "| trained on ↓ / evaluated on → | t-acc (acc) | t-ppl (perplexity) |" in md
    assert any(ln.startswith("| (untrained baseline) |") for ln in md.splitlines())
    row = next(ln for ln in md.splitlines() if ln.startswith("| arith (`a`) |"))
    assert f"p {claim['p']:.4f}" in row or "p <0.0001" in row
    html = build_report(path)["html"].read_text()
    assert 'id="transfer-0"' in html and "untested: no per-item records" in html


def test_transfer_heatmap_marks_the_diagonal(tmp_path):
    rec = parse_recipe({"models": ["tiny-random"], "tasks": ["arith", "arc_easy"], "pipelines": {"a": [lora()]},
                        "study": {"kind": "transfer", "train_tasks": ["arith", "arc_easy"]}})  # fmt: skip
    quality = {"baseline": (0, 0.5), "a": (1, 0.8), "a@train-arc_easy": (2, 0.6)}
    path = make_study(tmp_path, rec, quality)
    _, cells, _ = _by_pipeline(path)
    meta = {**load_study(path)[0]}
    for c in cells:  # evaluated on the recipe's own task names: arith and arc_easy
        c["phases"] = {"arith": c["phases"]["t-acc"], "arc_easy": c["phases"]["t-ppl"]}
    sections = studies.study_sections(path, meta, cells, ["arith", "arc_easy"])
    (fig,) = sections[0][1]
    assert fig.rows == ["untrained baseline", "trained on arith", "trained on arc_easy"]
    assert fig.text[1][0].startswith("◆ ") and not fig.text[1][1].startswith("◆")
    assert fig.text[2][1].startswith("◆ ") and not fig.text[0][0].startswith("◆")


def test_no_study_no_tables(tmp_path):
    rec = recipe(pipelines={"q": [RTN]})
    path = make_study(tmp_path, rec, {"baseline": (0, 0.5), "q": (1, 0.5)})
    md = build_report(path)["markdown"].read_text()
    assert "## Ablation" not in md and "## Transfer" not in md


def test_slope_chart_pairs_carry_their_paired_tests(tmp_path):
    rec = recipe(pipelines={"q": [RTN], "q+nf4": [RTN, NF4], "l": [lora()], "l+nf4": [lora(), NF4]})
    quality = {"baseline": (0, 0.5), "q": (1, 0.7), "q+nf4": (2, 0.6), "l": (3, 0.5), "l+nf4": (3, 0.5)}
    path = make_study(tmp_path, rec, quality)
    by, _, _ = _by_pipeline(path)
    md = build_report(path)["markdown"].read_text()
    assert "## Paired tests of the slope charts' pairs" in md and "### before nf4 vs after nf4" in md
    row = next(ln for ln in md.splitlines() if ln.startswith("| t-acc (acc) | q | q+nf4 |"))
    diff, p = _independent(by["q"], by["q+nf4"], "t-acc", path)
    assert f"{diff:+.3f}" in row and f"| mcnemar | {p:.4f} |" in row
    same = next(ln for ln in md.splitlines() if ln.startswith("| t-acc (acc) | l | l+nf4 |"))
    assert "+0.000 n.s." in same


def test_the_report_finds_a_task_under_its_canonical_name():
    result_name = st.result_name
    assert result_name("sciq-rag:gate=grad") == "sciq-rag:gate=grad:k=3"  # as the harness names its rows
    assert result_name("arc_easy") == "arc_easy" and result_name("t-acc") == "t-acc"
