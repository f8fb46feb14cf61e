"""A recipe's `runtime: {llama.cpp: [...]}` (experiments/runtime.py) without llama-cpp-python: the `<p>@llama.cpp`
pipelines it generates, the cell ids of every other cell (unchanged), its one-line errors, and the driver skipping
llama.cpp cells where llama-cpp-python is missing (one line, status "skipped", the rest run; a rerun with it runs
them). tests/unit/test_llamacpp_lm.py runs them for real where llama-cpp-python is installed."""

from __future__ import annotations

import json
import textwrap
from importlib import resources

import pytest
import yaml
from typer.testing import CliRunner

from budgetlm.cli import app
from budgetlm.data.tasks.base import Item, Task, TaskData, tasks
from budgetlm.errors import ConfigError, UnknownNameError
from budgetlm.experiments import runtime
from budgetlm.experiments import store as st
from budgetlm.experiments.cell import RESULT
from budgetlm.experiments.plan import plan
from budgetlm.experiments.recipe import dump_recipe, load_recipe, parse_recipe
from budgetlm.experiments.study import run_study, summary_table
from budgetlm.results import Metric

BASE = {"name": "r", "models": ["tiny-random"], "tasks": ["text-ppl"], "limit": 2, "bench": {"enabled": False}}
PIPES = {"q8": [{"method": "rtn", "bits": 8, "group_size": 32}], "q4": [{"method": "rtn", "bits": 4}]}


def rec(**extra):
    return parse_recipe({**BASE, "pipelines": PIPES, **extra})


def test_runtime_makes_a_sibling_pipeline_after_its_torch_one():
    r = rec(runtime={"llama.cpp": ["q8", "baseline"]})
    assert list(r.pipelines) == ["baseline", "baseline@llama.cpp", "q8", "q8@llama.cpp", "q4"]
    assert r.pipelines["q8@llama.cpp"] == r.pipelines["q8"] and r.pipelines["baseline@llama.cpp"] == []
    cells = {c.pipeline: c for c in plan(r)}
    assert cells["q8@llama.cpp"].config["runtime"] == "llama.cpp" and cells["q8@llama.cpp"].runtime == "llama.cpp"
    assert "runtime" not in cells["q8"].config and cells["q8"].runtime == "torch"
    assert not cells["baseline@llama.cpp"].is_baseline  # the torch baseline stays the reference
    assert cells["q8@llama.cpp"].label == "q8@llama.cpp (tiny-random)"
    assert cells["q8@llama.cpp"].folder(runtime.Path("/s")).name.startswith("tiny-random_q8-llama.cpp_")


def test_the_resolved_recipe_parses_to_itself():
    r = rec(runtime={"llama.cpp": ["q8"]})
    again = parse_recipe(yaml.safe_load(dump_recipe(r)))
    assert again == r
    assert [c.id for c in plan(again)] == [c.id for c in plan(r)]


def test_other_cells_keep_their_ids():
    without = {c.pipeline: c.id for c in plan(rec())}
    withrt = {c.pipeline: c.id for c in plan(rec(runtime={"llama.cpp": ["q8", "q4"]}))}
    assert {p: i for p, i in withrt.items() if "@" not in p} == without
    assert len(set(withrt.values())) == 5  # the llama.cpp cells have ids of their own


def test_shipped_recipes_plan_the_same_torch_cells_as_without_the_runtime_key():
    """Every shipped recipe's torch cells keep the ids main planned (main's size_reduction had no `runtime` key: the
    same recipe without it plans them)."""
    folder = resources.files("budgetlm") / "recipes"
    for path in sorted(folder.iterdir()):
        if not path.name.endswith(".yaml"):
            continue
        data = yaml.safe_load(path.read_text())
        had = data.pop("runtime", None)
        ours = {c.pipeline: c.id for c in plan(load_recipe(path.name[:-5]))}
        before = {c.pipeline: c.id for c in plan(parse_recipe(data, path.name))}
        assert {p: i for p, i in ours.items() if not p.endswith("@llama.cpp")} == before, path.name
        if path.name == "size_reduction.yaml":
            assert had == {"llama.cpp": ["gguf-q8_0", "gguf-q4_1", "gguf-q4_0"]}
            assert [p for p in ours if p.endswith("@llama.cpp")] == [f"{p}@llama.cpp" for p in had["llama.cpp"]]


def test_decoding_and_latent_stay_out_of_llama_cpp_cells():
    latent = {"tasks": ["text-cloze", "arith"], "items": 4, "perplexity": 3}
    r = parse_recipe(
        {
            **BASE,
            "tasks": ["text-cloze", "arith"],
            "pipelines": PIPES,
            "runtime": {"llama.cpp": ["q8"]},
            "decoding": {"drafts": ["layers:1"]},
            "latent": latent,
        }
    )
    cells = {c.pipeline: c for c in plan(r)}
    assert "decoding" in cells["q8"].config and "latent" in cells["q8"].config
    assert "decoding" not in cells["q8@llama.cpp"].config and "latent" not in cells["q8@llama.cpp"].config


@pytest.mark.parametrize(
    ("extra", "pipes", "error", "needle"),
    [
        ({"runtime": {"llamacpp": ["q8"]}}, PIPES, UnknownNameError, "runtime 'llamacpp' (did you mean: llama.cpp?)"),
        ({"runtime": {"torch": ["q8"]}}, PIPES, UnknownNameError, "a recipe can name: llama.cpp"),
        ({"runtime": {"llama.cpp": ["q9"]}}, PIPES, UnknownNameError, "runtime.llama.cpp[0]: no pipeline 'q9'"),
        ({"runtime": {"llama.cpp": ["q8", "q8"]}}, PIPES, ConfigError, "'q8' is listed twice"),
        ({"runtime": {"llama.cpp": []}}, PIPES, ConfigError, "runtime.llama.cpp: an empty list"),
        ({"runtime": {}}, PIPES, ConfigError, "runtime: an empty mapping"),
        ({"runtime": {"llama.cpp": ["q8@llama.cpp"]}}, PIPES, UnknownNameError, "no pipeline 'q8@llama.cpp'"),
        ({}, {**PIPES, "q8@llama.cpp": PIPES["q8"]}, ConfigError, "the suffix @llama.cpp is reserved"),
        ({"runtime": {"llama.cpp": ["q8"]}}, {**PIPES, "q8@llama.cpp": PIPES["q4"]}, ConfigError, "steps differ"),
        (
            {"runtime": {"llama.cpp": ["q8"]}, "decoding": {"drafts": ["layers:1"], "pipelines": ["q8@llama.cpp"]}},
            PIPES,
            ConfigError,
            "speculative decoding runs in torch only",
        ),
    ],
)
def test_one_line_errors(extra, pipes, error, needle):
    with pytest.raises(error) as e:
        parse_recipe({**BASE, "pipelines": pipes, **extra}, "recipe r.yaml")
    msg = str(e.value)
    assert needle in msg and msg.startswith("recipe r.yaml: ") and "\n" not in msg


# ---------------------------------------------------------------------------------------------- the driver


class FakeTask(Task):
    def load(self, ctx):
        return TaskData([Item("only", {})], "fake")


@pytest.fixture
def study_recipe(tmp_path, monkeypatch):
    monkeypatch.setitem(tasks._items, "t-acc", FakeTask())
    path = tmp_path / "r.yaml"
    path.write_text(
        textwrap.dedent(
            """
            name: demo
            models: [tiny-random]
            pipelines: {q8: [{method: rtn, bits: 8, group_size: 32}]}
            runtime: {llama.cpp: [q8]}
            tasks: [t-acc]
            """
        )
    )
    return path


class FakeRunner:
    def __init__(self):
        self.ran: list[str] = []

    def __call__(self, folder, on_status):
        cfg = json.loads((folder / "config.json").read_text())
        self.ran.append(cfg["pipeline"])
        phases = {"t-acc": {"acc": Metric(0.5, 0.1, 1).to_dict()}}
        (folder / RESULT).write_text(json.dumps({"phases": phases, "env": {}}))


def missing(monkeypatch):
    real = runtime.importlib.util.find_spec
    monkeypatch.setattr(runtime.importlib.util, "find_spec", lambda n, *a: None if n == "llama_cpp" else real(n))


def test_without_llama_cpp_the_driver_skips_those_cells_in_one_line(tmp_path, study_recipe, monkeypatch, capsys):
    missing(monkeypatch)
    runner = FakeRunner()
    out = run_study(study_recipe, tmp_path / "out", progress=True, runner=runner)  # no error: nothing failed
    assert runner.ran == ["baseline", "q8"]
    err = [line for line in capsys.readouterr().err.splitlines() if "skipped" in line]
    assert err == [
        "skipped 1 cell(s) (q8@llama.cpp): llama-cpp-python is not installed: pip install -e '.[llamacpp]' "
        "(it compiles llama.cpp, 10-40 min on 2 cores; build flags in README, `bench`)"
    ]
    with st.Store.open(out) as s:
        status = {c["pipeline"]: (c["status"], c["error"]) for c in s.cells()}
    assert status["q8@llama.cpp"][0] == "skipped" and "pip install -e '.[llamacpp]'" in status["q8@llama.cpp"][1]
    assert status["q8"][0] == status["baseline"][0] == "done"
    cols = {c.header: list(c._cells) for c in summary_table(out).columns}
    assert cols["pipeline"] == ["baseline", "q8", "q8@llama.cpp"]
    assert cols["status"] == ["done", "done", "skipped"]

    monkeypatch.undo()  # llama-cpp-python "installed" now: the rerun runs only the skipped cell
    monkeypatch.setitem(tasks._items, "t-acc", FakeTask())
    monkeypatch.setattr(runtime, "unavailable", lambda rt: None)
    again = FakeRunner()
    run_study(study_recipe, out, progress=False, runner=again)
    assert again.ran == ["q8@llama.cpp"]


def test_dry_run_lists_the_llama_cpp_cells_and_says_they_would_be_skipped(study_recipe, monkeypatch):
    missing(monkeypatch)
    res = CliRunner().invoke(app, ["run", str(study_recipe), "--dry-run"], terminal_width=300)
    assert res.exit_code == 0, res.output
    assert "q8@llama.cpp" in res.output and "runtime llama.cpp (skipped here: llama-cpp-python is not" in res.output
    assert "note: `run` would skip 1 cell(s) (q8@llama.cpp): llama-cpp-python is not installed: pip install" in (
        res.output.replace("\n", " ")
    )


def test_a_llama_cpp_pipeline_whose_codes_no_block_type_holds_is_refused_before_anything_is_written(tmp_path):
    from budgetlm.experiments.runtime import check_runtimes

    ok = rec(runtime={"llama.cpp": ["q8", "baseline"]})
    check_runtimes(ok)  # q8 g32 symmetric: Q8_0; the baseline: its float type
    pipes = {**PIPES, "g16": [{"method": "rtn", "bits": 4, "group_size": 16}]}
    bad = parse_recipe({**BASE, "pipelines": pipes, "runtime": {"llama.cpp": ["q8", "g16"]}})
    with pytest.raises(ConfigError) as e:
        check_runtimes(bad)
    assert str(e.value).startswith("runtime.llama.cpp: g16 on tiny-random: no GGUF block type holds the codes")
    with pytest.raises(ConfigError):
        run_study(bad, tmp_path / "out", progress=False, runner=FakeRunner())
    assert not (tmp_path / "out").exists()


def test_a_llama_cpp_cell_on_a_machine_without_it_fails_in_one_line_before_any_work(tmp_path, monkeypatch):
    from budgetlm.experiments.cell import run_cell

    missing(monkeypatch)
    cell = next(c for c in plan(rec(runtime={"llama.cpp": ["q8"]})) if c.runtime == "llama.cpp")
    folder = tmp_path / "cell"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(cell.config))
    with pytest.raises(ConfigError) as e:
        run_cell(folder)
    assert str(e.value).startswith("this cell runs in llama.cpp, but llama-cpp-python is not installed here: pip")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json"]
