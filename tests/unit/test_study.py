"""The study driver with a fake cell runner: cells run once, results stored, recovery % computed, failures
recorded, and a killed study resumes without rerunning finished cells."""

from __future__ import annotations

import json
import textwrap

import pytest

from budgetlm.data.tasks.base import Item, Task, TaskData, tasks
from budgetlm.errors import BudgetLMError, ConfigError
from budgetlm.experiments import store as st
from budgetlm.experiments.cell import RESULT
from budgetlm.experiments.runners import CellFailed, subprocess_runner
from budgetlm.experiments.study import recovery, run_study, study_lock, summary_table
from budgetlm.methods.base import MethodConfig, methods
from budgetlm.results import Metric


class FakeQuant(MethodConfig):
    bits: int = 8


class FakeTask(Task):
    """Loads one item (the driver loads every task once before it writes anything); the fake runner scores it."""

    def load(self, ctx):
        return TaskData([Item("only", {})], "fake")


@pytest.fixture(autouse=True)
def registries(monkeypatch):
    monkeypatch.setitem(methods._items, "fake-quant", FakeQuant)
    monkeypatch.setitem(tasks._items, "t-acc", FakeTask())
    monkeypatch.setitem(tasks._items, "t-ppl", FakeTask())


@pytest.fixture
def recipe(tmp_path):
    path = tmp_path / "study.yaml"
    path.write_text(
        textwrap.dedent(
            """
            name: demo
            models: [tiny-random]
            pipelines:
              q4: [{method: fake-quant, bits: 4}]
              q2: [{method: fake-quant, bits: 2}]
            tasks: [t-acc, t-ppl]
            limit: 5
            """
        )
    )
    return path


ACC = {0: (0.80, 0.04), 4: (0.60, 0.05), 2: (0.25, 0.06)}  # bits (0 = baseline) -> (acc, stderr)


class FakeRunner:
    """Writes a result.json as a cell would, from the cell's config; records what it ran."""

    def __init__(self, fail=None, interrupt=None, finish_then_interrupt=None):
        self.ran: list[str] = []
        self.fail, self.interrupt, self.finish_then_interrupt = fail, interrupt, finish_then_interrupt

    def __call__(self, folder, on_status):
        assert sorted(p.name for p in folder.iterdir()) == ["config.json"]  # a clean folder every time
        cfg = json.loads((folder / "config.json").read_text())
        pipeline = cfg["pipeline"]
        self.ran.append(pipeline)
        on_status("evaluating")
        (folder / "partial.txt").write_text("half-written")
        if pipeline == self.fail:
            raise CellFailed("boom: out of cheese")
        if pipeline == self.interrupt:
            raise KeyboardInterrupt
        bits = cfg["steps"][0]["bits"] if cfg["steps"] else 0
        acc, se = ACC[bits]
        phases = {
            "t-acc": {"acc": Metric(acc, se, 5), "acc_norm": Metric(acc / 2, se, 5)},
            "t-ppl": {"perplexity": Metric(10.0 + 10 * (bits == 2), 0.5, 5)},
            "size": {
                "stored_bytes": Metric(4e6 * (bits or 32) / 32, unit="B"),
                "bpw": Metric((bits or 32) + 1.5),
                "linear_bpw": Metric(bits or 32),
            },
            "speed": {  # q2 is benchmarked on a busy machine: load 5.0 on 2 CPUs
                "decode_ms_per_token": Metric(5.0, extra={"loadavg_before": [0.5], "loadavg_after": [0.7], "cpus": 2}),
                "prefill_tok_s@128": Metric(300.0, extra={"loadavg_before": [5.0 if bits == 2 else 1.9], "cpus": 2}),
            },
        }
        result = {"phases": {p: {k: m.to_dict() for k, m in ms.items()} for p, ms in phases.items()}, "env": {"x": 1}}
        (folder / RESULT).write_text(json.dumps(result))
        if pipeline == self.finish_then_interrupt:
            raise KeyboardInterrupt


def stored(out):
    with st.Store.open(out) as s:
        cells = {c["pipeline"]: c for c in s.cells()}
        rows = st.by_cell(s.rows())
    return cells, {p: rows.get(c["cell_id"], {}) for p, c in cells.items()}


def test_study_runs_every_cell_once_and_stores_results(tmp_path, recipe):
    runner = FakeRunner()
    out = run_study(recipe, tmp_path / "out", progress=False, runner=runner)
    assert out == (tmp_path / "out").resolve()
    assert runner.ran == ["baseline", "q4", "q2"]
    cells, rows = stored(out)
    assert {p: c["status"] for p, c in cells.items()} == {"baseline": "done", "q4": "done", "q2": "done"}
    assert cells["q4"]["env"] == {"x": 1} and cells["q4"]["config"]["steps"][0]["bits"] == 4
    assert st.value(rows["q2"], "t-acc", "acc") == 0.25
    assert (out / "recipe.yaml").is_file() and "q4" in (out / "recipe.yaml").read_text()
    # a second run finds everything done and runs nothing
    again = FakeRunner()
    run_study(recipe, out, progress=False, runner=again)
    assert again.ran == []


def test_recovery_pct_rows(tmp_path, recipe):
    out = run_study(recipe, tmp_path / "out", progress=False, runner=FakeRunner())
    _, rows = stored(out)
    for pipeline, bits in [("baseline", 0), ("q4", 4), ("q2", 2)]:
        rec = rows[pipeline]["t-acc"]["acc_recovery_pct"]
        assert rec["value"] == pytest.approx(100 * ACC[bits][0] / ACC[0][0])  # 100, 75, 31.25
        assert rec["stderr"] == pytest.approx(100 * ACC[bits][1] / ACC[0][0])
        assert rec["unit"] == "%" and rec["source"] == "measured"
        assert rows[pipeline]["t-acc"]["acc_norm_recovery_pct"]["value"] == pytest.approx(100 * ACC[bits][0] / 0.8)
        assert "perplexity_recovery_pct" not in rows[pipeline]["t-ppl"]  # not an accuracy
        assert "stored_bytes_recovery_pct" not in rows[pipeline]["size"]


def test_recovery_function_skips_zero_and_missing_baselines():
    row = {"value": 0.5, "stderr": None, "n": 3}
    base = {"t": {"acc": {"value": 0.0}, "exact_match": {"value": 0.25}}}
    out = recovery({"t": {"acc": row, "exact_match": row, "f1": row}}, base, "b")
    assert list(out["t"]) == ["exact_match_recovery_pct"]
    assert out["t"]["exact_match_recovery_pct"]["value"] == 200.0
    assert out["t"]["exact_match_recovery_pct"]["stderr"] is None


def test_a_failed_cell_is_recorded_and_the_study_goes_on(tmp_path, recipe):
    runner = FakeRunner(fail="q4")
    with pytest.raises(BudgetLMError) as e:
        run_study(recipe, tmp_path / "out", progress=False, runner=runner)
    msg = str(e.value)
    assert "\n" not in msg and "1 of 3 cells failed" in msg and "q4 (tiny-random): boom: out of cheese" in msg
    assert runner.ran == ["baseline", "q4", "q2"]
    cells, _ = stored(tmp_path / "out")
    assert cells["q4"]["status"] == "failed" and "out of cheese" in cells["q4"]["error"]
    assert cells["q2"]["status"] == "done"
    # a rerun retries only the failed cell
    retry = FakeRunner()
    run_study(recipe, tmp_path / "out", progress=False, runner=retry)
    assert retry.ran == ["q4"]


def test_a_killed_study_resumes_with_the_unfinished_cells(tmp_path, recipe):
    first = FakeRunner(interrupt="q4")
    with pytest.raises(KeyboardInterrupt):
        run_study(recipe, tmp_path / "out", progress=False, runner=first)
    assert first.ran == ["baseline", "q4"]
    cells, rows = stored(tmp_path / "out")
    assert cells["baseline"]["status"] == "done" and cells["q4"]["status"] == "interrupted"
    assert rows["q4"] == {}
    second = FakeRunner()  # asserts each folder it gets is clean: the half-written q4 folder was removed
    run_study(recipe, tmp_path / "out", progress=False, runner=second)
    assert second.ran == ["q4", "q2"]
    cells, rows = stored(tmp_path / "out")
    assert all(c["status"] == "done" for c in cells.values())
    assert rows["q4"]["t-acc"]["acc_recovery_pct"]["value"] == pytest.approx(75.0)


def test_recovery_rows_a_killed_driver_did_not_write_are_written_on_resume(tmp_path, recipe):
    """A cell's rows and 'done' are one transaction, its recovery % a second one: a driver killed between the two
    left the last cell without them, and nothing later would have written them."""
    out = run_study(recipe, tmp_path / "out", progress=False, runner=FakeRunner())
    with st.Store.open(out) as s:
        s.conn.execute("DELETE FROM rows WHERE metric LIKE '%_recovery_pct'")
    again = FakeRunner()
    run_study(recipe, out, progress=False, runner=again)
    assert again.ran == []
    _, rows = stored(out)
    assert rows["q2"]["t-acc"]["acc_recovery_pct"]["value"] == pytest.approx(31.25)
    assert rows["baseline"]["t-acc"]["acc_recovery_pct"]["value"] == pytest.approx(100.0)


def test_a_cell_that_finished_while_the_driver_died_is_ingested_not_rerun(tmp_path, recipe):
    first = FakeRunner(finish_then_interrupt="q4")
    with pytest.raises(KeyboardInterrupt):
        run_study(recipe, tmp_path / "out", progress=False, runner=first)
    second = FakeRunner()
    run_study(recipe, tmp_path / "out", progress=False, runner=second)
    assert second.ran == ["q2"]
    cells, rows = stored(tmp_path / "out")
    assert cells["q4"]["status"] == "done" and st.value(rows["q4"], "t-acc", "acc") == 0.6


def test_changing_the_recipe_reruns_only_changed_cells(tmp_path, recipe):
    run_study(recipe, tmp_path / "out", progress=False, runner=FakeRunner())
    recipe.write_text(recipe.read_text().replace("bits: 2", "bits: 4").replace("q2:", "q4b:"))
    runner = FakeRunner()
    run_study(recipe, tmp_path / "out", progress=False, runner=runner)
    assert runner.ran == ["q4b"]
    table = summary_table(tmp_path / "out")  # only the cells of the current plan
    assert table.row_count == 3


def test_a_second_driver_on_the_same_folder_is_refused(tmp_path, recipe):
    out = tmp_path / "out"
    out.mkdir()
    runner = FakeRunner()
    with study_lock(out):
        with pytest.raises(BudgetLMError, match="another study driver is running in"):
            run_study(recipe, out, progress=False, runner=runner)
    assert runner.ran == [] and not (out / "recipe.yaml").exists()
    run_study(recipe, out, progress=False, runner=runner)  # the lock is released with its holder
    assert runner.ran == ["baseline", "q4", "q2"]


def test_summary_table(tmp_path, recipe):
    out = run_study(recipe, tmp_path / "out", progress=False, runner=FakeRunner())
    table = summary_table(out)
    headers = [c.header for c in table.columns]
    assert headers == ["pipeline", "status", "stored MB", "bpw Linears", "bpw model", "t-acc acc",
                       "t-ppl perplexity", "decode ms/tok", "prefill tok/s"]  # fmt: skip
    cols = {c.header: list(c._cells) for c in table.columns}
    assert cols["pipeline"] == ["baseline", "q4", "q2"]
    assert cols["stored MB"] == ["4.0", "0.5", "0.2"]
    assert cols["bpw Linears"] == ["32.00", "4.00", "2.00"] and cols["bpw model"] == ["33.50", "5.50", "3.50"]
    assert cols["t-acc acc"] == ["0.800 ± 0.040 (100%)", "0.600 ± 0.050 (75%)", "0.250 ± 0.060 (31%)"]
    assert cols["prefill tok/s"] == ["300", "300", "300 *"]  # load 1.9 on 2 CPUs passes, 5.0 does not
    assert cols["decode ms/tok"] == ["5.0", "5.0", "5.0 *"]
    assert "* measured while the load average exceeded the CPU count" in table.caption


def test_subprocess_runner_reports_the_cell_error_in_one_line(tmp_path):
    folder = tmp_path / "cell"
    folder.mkdir()
    (folder / "config.json").write_text('{"model": "tiny-random"}')
    with pytest.raises(CellFailed) as e:
        subprocess_runner(folder, lambda s: None)
    msg = str(e.value)
    assert msg.startswith("the cell config") and msg.endswith(
        "lacks pipeline, steps, tasks, limit, seed, data_dir, eval_batch_size, bench; the study driver writes it"
    )
    assert (folder / "log.txt").read_text().strip() == f"error: {msg}"


def test_real_cells_in_process_tiny_model(tmp_path, tiny_study_data):
    """The whole flow on tiny-random with a real method, a real task from a local file and a tiny benchmark;
    the cells run in this process (the subprocess path is covered above), then the report is built."""
    from budgetlm.experiments.cell import run_cell
    from budgetlm.report.build import build_report

    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"name: tiny\nmodels: [tiny-random]\npipelines: {{int8: [{{method: rtn, bits: 8}}]}}\ntasks: [arc_easy]\n"
        f"limit: 6\ndata_dir: {tiny_study_data}\n"
        "bench: {prefill: [16], decode_tokens: 4, repeats: 1, warmup: 0}\n"
    )
    statuses = []

    def in_process(folder, on_status):
        statuses.append(folder.name)
        run_cell(folder)

    out = run_study(recipe, tmp_path / "out", progress=False, runner=in_process)
    cells, rows = stored(out)
    assert set(cells) == {"baseline", "int8"} and len(statuses) == 2
    base, q = rows["baseline"], rows["int8"]
    assert base["arc_easy"]["acc"]["n"] == 6 and "local" in base["arc_easy"]["acc"]["extra"]["data"]
    assert q["arc_easy"]["acc_recovery_pct"]["value"] == pytest.approx(
        100 * q["arc_easy"]["acc"]["value"] / base["arc_easy"]["acc"]["value"]
    )
    assert st.value(q, "size", "stored_bytes") < 0.5 * st.value(base, "size", "stored_bytes")
    assert st.value(q, "step1-rtn", "seconds") > 0
    for p in ("load", "evaluation", "benchmark"):
        assert st.value(q, "memory", f"peak_rss_{p}") > 10e6
    assert st.value(q, "speed", "decode_ms_per_token") > 0 and st.value(q, "speed", "prefill_tok_s@16") > 0
    folder = next((out / "cells").glob("tiny-random_int8_*"))
    assert (folder / "model" / "model.safetensors").is_file()  # a step changed the model: it is saved
    assert not any((out / "cells").glob("tiny-random_baseline_*/model"))  # the baseline is not copied
    assert len((folder / "items" / "arc_easy.jsonl").read_text().splitlines()) == 6
    env = json.loads((folder / "env.json").read_text())
    assert env["threads"] >= 1 and env["torch"] and env["python"]
    steps = json.loads((folder / "steps.json").read_text())
    assert steps["reports"][0]["method"] == "rtn" and steps["model_folder"].endswith("model")
    report = build_report(out)["markdown"].read_text()
    assert "| int8 | 6 |" in report


def test_max_cells_refuses_a_larger_plan_before_anything_is_written(tmp_path, recipe):
    out = tmp_path / "out"
    with pytest.raises(ConfigError) as err:
        run_study(recipe, out, progress=False, runner=FakeRunner(), max_cells=2)
    assert "expands to 3 cells" in str(err.value) and "--max-cells 2" in str(err.value)
    assert not out.exists()
    runner = FakeRunner()
    run_study(recipe, out, progress=False, runner=runner, max_cells=3)  # exactly the plan's size runs
    assert runner.ran == ["baseline", "q4", "q2"]


class OptionTask(FakeTask):
    """A task whose settings are part of its name, like sciq-rag: `t-opt:gate=x` stores rows as `t-opt:gate=x:k=3`."""

    name = "t-opt"

    def with_options(self, option):
        task = OptionTask()
        task.name = f"t-opt:{option}:k=3"
        return task


def test_summary_table_finds_a_task_written_with_options_under_its_canonical_name(tmp_path, monkeypatch):
    monkeypatch.setitem(tasks._items, "t-opt", OptionTask())
    path = tmp_path / "study.yaml"
    path.write_text("name: opt\nmodels: [tiny-random]\npipelines: {q4: [{method: fake-quant, bits: 4}]}\n"
                    "tasks: ['t-opt:gate=x']\nlimit: 5\n")  # fmt: skip

    class Runner(FakeRunner):
        def __call__(self, folder, on_status):
            super().__call__(folder, on_status)
            result = json.loads((folder / RESULT).read_text())
            result["phases"]["t-opt:gate=x:k=3"] = result["phases"].pop("t-acc")  # as the harness names its rows
            (folder / RESULT).write_text(json.dumps(result))

    out = run_study(path, tmp_path / "out", progress=False, runner=Runner())
    cols = {c.header: list(c._cells) for c in summary_table(out).columns}
    assert cols["t-opt:gate=x acc"] == ["0.800 ± 0.040 (100%)", "0.600 ± 0.050 (75%)"]
