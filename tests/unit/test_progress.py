"""Progress off a terminal (pytest captures stderr, so every Progress here writes plain lines): the facility itself
(lines, throttling with a fake clock, relay, the count and the time left), then each long step that uses it: gptq
writes a line per layer, bench a line per phase and run, eval a line per task and for the base-model reference
(relayed from its separate process), training every N steps, a study a line per cell start and finish; results on
stdout stay whole (tables not cut in a pipe, --json parseable)."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from test_study import FakeRunner, registries  # noqa: F401 - the study tests' fake runner, method and tasks

from budgetlm import progress
from budgetlm.progress import Progress, duration, relay, track


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(progress, "_now", c)
    monkeypatch.setattr(progress, "_last_line", float("-inf"))
    monkeypatch.setattr(progress, "_pending", None)
    return c


@pytest.fixture
def scheduled(monkeypatch):
    """No timer thread: record the waits instead (the test calls progress.flush() as the timer would)."""
    waits = []
    monkeypatch.setattr(progress, "_schedule", waits.append)
    return waits


@pytest.fixture
def no_throttle(monkeypatch):
    monkeypatch.setattr(progress, "MIN_INTERVAL", 0.0)


def err_lines(capsys) -> list[str]:
    return capsys.readouterr().err.splitlines()


# ---------------------------------------------------------------------------------------------- the facility


def test_plain_lines_with_count_elapsed_and_time_left(capsys, clock):
    with Progress("work", 4) as p:
        assert p.mode == "lines"
        p.status("unit 1: reading")
        clock.t += 10
        p.advance("unit 1 done")
        clock.t += 20
        p.advance("unit 2 done")
        p.status("quiet on a log", line=False)
        clock.t += 30.5
        p.advance()
        p.advance("unit 4 done")
    assert err_lines(capsys) == [
        "work: unit 1: reading",
        "work: unit 1 done [1/4, 10 s, ~30 s left]",
        "work: unit 2 done [2/4, 30 s, ~30 s left]",
        "work: done [3/4, 1m00s, ~20 s left]",
        "work: unit 4 done [4/4, 1m00s]",
    ]


def test_a_resumed_count_estimates_from_the_units_done_here(capsys, clock):
    with Progress("cells", 10, completed=6) as p:
        clock.t += 40
        p.advance("cell 7")
    assert err_lines(capsys) == ["cells: cell 7 [7/10, 40 s, ~2m00s left]"]


def test_disabled_progress_writes_nothing(capsys, clock):
    with Progress("work", 2, enabled=False) as p:
        p.status("x")
        p.advance("y")
    assert capsys.readouterr().err == ""


def test_throttled_lines_wait_their_turn_and_the_newest_wins(capsys, clock, scheduled):
    with Progress("gptq", 3, throttled=True) as p:
        p.status("layer 1/3: hessians")  # first line: written at once
        clock.t += 0.2
        p.status("layer 1/3: column sweep")  # 0.2 s later: waits
        assert scheduled == [pytest.approx(0.8)]
        clock.t += 0.3
        p.advance("layer 1/3 done")  # replaces the waiting line
        clock.t += 0.5
        progress.flush()  # the timer fires 1 s after the first line
        clock.t += 0.1
        p.advance("layer 2/3 done")  # 0.1 s after the flushed line: waits ...
        p.advance("layer 3/3 done")  # ... and the last unit's line is never held back
        progress.flush()  # nothing left waiting
    assert err_lines(capsys) == [
        "gptq: layer 1/3: hessians",
        "gptq: layer 1/3 done [1/3, 0.5 s, ~1.0 s left]",
        "gptq: layer 3/3 done [3/3, 1.1 s]",
    ]


def test_the_timer_writes_the_waiting_line(capsys, monkeypatch):
    monkeypatch.setattr(progress, "MIN_INTERVAL", 0.5)
    monkeypatch.setattr(progress, "_last_line", float("-inf"))
    with Progress("lobi", 2, throttled=True) as p:
        p.status("layer 1/2: 8 candidate grids")
        p.status("layer 1/2: the long part")  # within 0.5 s of the first: waits for the timer
        progress._timer.join()  # the timer thread writes it (no sleeping, no timing assertion)
        assert err_lines(capsys) == ["lobi: layer 1/2: 8 candidate grids", "lobi: layer 1/2: the long part"]


def test_a_closed_progress_drops_its_waiting_line(capsys, clock, scheduled):
    with Progress("rtn", 5, throttled=True) as p:
        p.advance("a")
        clock.t += 0.1
        p.advance("b")
    progress.flush()
    assert err_lines(capsys) == ["rtn: a [1/5, 0.0 s, ~0.0 s left]"]


def test_every_nth_unit_and_the_last(capsys, clock):
    with Progress("train", 7, every=3) as p:
        for i in range(7):
            p.advance(f"step {i + 1}")
    assert [ln.split(" [")[0] for ln in err_lines(capsys)] == ["train: step 3", "train: step 6", "train: step 7"]


def test_relay_sends_lines_to_the_callback_not_stderr(capsys, clock):
    got = []
    with relay(got.append):
        with Progress("bench", 1) as p:
            assert p.mode == "relay"
            p.status("prefill")
            p.advance("prefill done")
    assert capsys.readouterr().err == ""
    assert got == ["bench: prefill", "bench: prefill done [1/1, 0.0 s]"]


def test_relay_lines_are_prefixed_for_the_parent(capsys, clock):
    with progress.relay_lines(), Progress("eval", 1) as p:
        p.status("text-ppl: scoring 3 items")
    assert capsys.readouterr().out == "progress: eval: text-ppl: scoring 3 items\n"


def test_track_counts_an_item_when_the_next_is_asked_for(capsys, clock, no_throttle):
    for i in track(range(5), "loop", label=lambda i, _: f"item {i}"):
        if i == 2:
            break
    assert [ln for ln in err_lines(capsys) if "done" in ln] == [
        "loop: item 0 done [1/5, 0.0 s, ~0.0 s left]",
        "loop: item 1 done [2/5, 0.0 s, ~0.0 s left]",
    ]


def test_duration():
    assert [duration(s) for s in (0.04, 9.94, 12.4, 59.6, 133, 3599, 3725)] == [
        "0.0 s", "9.9 s", "12 s", "1m00s", "2m13s", "59m59s", "1h02m",
    ]  # fmt: skip


# ---------------------------------------------------------------------------------------------- the long steps


def test_compress_gptq_writes_a_line_per_layer(tmp_path, run_main, no_throttle):
    proc = run_main("compress", "tiny-random", "--method", "gptq", "--set", "group_size=16",
                   "--out", str(tmp_path / "q"))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    assert [ln.split(" [")[0] for ln in lines if " done [" in ln] == ["gptq: layer 1/2 done", "gptq: layer 2/2 done"]
    for layer in (1, 2):
        assert f"gptq: layer {layer}/2: hessians of 7 Linears" in lines
        assert f"gptq: layer {layer}/2: column sweep" in lines
    assert lines[-1].startswith("gptq: layer 2/2 done [2/2, ")
    assert "saved" in proc.stdout and " done [" not in proc.stdout  # stdout: the report, no progress


def test_bench_writes_a_line_per_phase_and_run(monkeypatch, capsys, no_throttle):
    from budgetlm.hardware import bench
    from budgetlm.models.sources import load
    from budgetlm.results import Metric

    monkeypatch.setattr(bench, "memory_bandwidth", lambda: Metric(10.0, unit="GB/s"))
    monkeypatch.setattr(bench, "energy_available", lambda: (False, "no RAPL in this test"))
    out = bench.measure(load("tiny-random"), prefill=(8, 16), decode_tokens=2, repeats=2, warmup=1, progress=True)
    assert set(out) == {"size", "host", "speed"}
    assert [re.sub(r" \[.*", "", ln) for ln in err_lines(capsys)] == [
        "bench: size of the weights",
        "bench: size done",
        "bench: host memory bandwidth",
        "bench: host memory bandwidth done",
        "bench: prefill 8 tokens, warm-up 1/1",
        "bench: prefill 8 tokens, repeat 1/2",
        "bench: prefill 8 tokens, repeat 2/2",
        "bench: prefill 8 tokens done",
        "bench: prefill 16 tokens, warm-up 1/1",
        "bench: prefill 16 tokens, repeat 1/2",
        "bench: prefill 16 tokens, repeat 2/2",
        "bench: prefill 16 tokens done",
        "bench: decode 2 tokens after a 32-token prompt, warm-up 1/1",
        "bench: decode 2 tokens after a 32-token prompt, repeat 1/2",
        "bench: decode 2 tokens after a 32-token prompt, repeat 2/2",
        "bench: decode 2 tokens after a 32-token prompt done",
    ]


def test_eval_reports_the_reference_process_and_each_task(tmp_path, capsys):
    from budgetlm.evaluation.harness import evaluate
    from budgetlm.methods.base import apply_steps
    from budgetlm.models.sources import load

    handle = load("tiny-random")
    apply_steps(handle, [{"method": "rtn", "bits": 8}])  # not the base: its reference comes from another process
    capsys.readouterr()
    res = evaluate(handle, ["text-ppl", "text-cloze"], limit=3, reference_dir=tmp_path / "refs", progress=True)
    assert 0 <= res["text-ppl"]["kld"].value < 0.01
    lines = [re.sub(r" in [0-9.]+ s \[.*", "", ln) for ln in err_lines(capsys)]
    assert lines == [
        "eval: text-ppl: computing the base model's reference with tiny-random (separate process)",
        "eval: text-ppl: base-model reference: loading tiny-random",
        "eval: text-ppl: base-model reference: scoring 3 items with tiny-random",
        "eval: text-ppl: scoring 3 items",
        "eval: text-ppl done",
        "eval: text-cloze: scoring 3 items",
        "eval: text-cloze done",
    ]


def test_eval_json_stays_pure_json_with_progress_on_stderr(tmp_path, monkeypatch, run_main):
    monkeypatch.setenv("BUDGETLM_CACHE", str(tmp_path / "cache"))
    proc = run_main("eval", "tiny-random", "--tasks", "text-ppl", "--limit", "2", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["text-ppl"]["perplexity"] > 1
    lines = [ln for ln in proc.stderr.splitlines() if not ln.startswith("warning: ")]  # tiny-random's perplexity
    assert lines[-1].startswith("eval: text-ppl done in ")
    assert "writing the base model's reference (this model is the base)" in proc.stderr


def test_training_writes_a_line_every_n_steps(monkeypatch, capsys):
    from budgetlm.models.sources import load, tiny_tokenizer
    from budgetlm.train import fit, loop
    from budgetlm.train.config import DataConfig
    from budgetlm.train.data import build_data

    monkeypatch.setattr(loop, "LINES_PER_RUN", 3)  # 6 steps: a line every 2
    monkeypatch.setattr(progress, "MIN_INTERVAL", 0.0)
    data = build_data(tiny_tokenizer(), DataConfig(task="arith", limit=8), max_len=64, seed=0)
    res = fit(load("tiny-random"), {"steps": 6, "batch_size": 2}, data=data, progress=True)
    lines = err_lines(capsys)
    assert [ln.split(":")[1] for ln in lines] == [" step 2", " step 4", " step 6"]
    for ln, step in zip(lines, (2, 4, 6)):
        assert f"loss {res.losses[step - 1]:.4f}" in ln and f"[{step}/6, " in ln


# ---------------------------------------------------------------------------------------------- a study


def test_a_study_writes_a_line_per_cell_start_status_and_finish(tmp_path, capsys):
    from budgetlm.errors import BudgetLMError
    from budgetlm.experiments.study import run_study

    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "name: demo\nmodels: [tiny-random]\npipelines:\n  q4: [{method: fake-quant, bits: 4}]\n"
        "  q2: [{method: fake-quant, bits: 2}]\ntasks: [t-acc, t-ppl]\nlimit: 5\n"
    )
    with pytest.raises(BudgetLMError, match="1 of 3 cells failed"):
        run_study(recipe, tmp_path / "out", progress=True, runner=FakeRunner(fail="q2"))
    log = next((tmp_path / "out" / "cells").glob("*_q2_*")) / "log.txt"
    lines = [re.sub(r" in [0-9.]+ s \[", " [", ln) for ln in err_lines(capsys)]
    assert [re.sub(r", [0-9.]+ s.*\]", "]", ln) for ln in lines] == [
        "run: cell 1/3 baseline (tiny-random): started",
        "run: cell 1/3 baseline (tiny-random): evaluating",
        "run: cell 1/3 baseline (tiny-random): done [1/3]",
        "run: cell 2/3 q4 (tiny-random): started",
        "run: cell 2/3 q4 (tiny-random): evaluating",
        "run: cell 2/3 q4 (tiny-random): done [2/3]",
        "run: cell 3/3 q2 (tiny-random): started",
        "run: cell 3/3 q2 (tiny-random): evaluating",
        f"run: cell 3/3 q2 (tiny-random): failed: boom: out of cheese (log: {log}) [3/3]",
    ]


def test_the_driver_relays_the_cells_progress_lines(tmp_path, monkeypatch):
    from budgetlm.experiments import runners

    printed = "status: loading tiny-random\nprogress: gptq: layer 1/2 done [1/2, 3 s]\nsome warning\nstatus: done\n"
    fake = subprocess.Popen  # a stand-in cell process that prints what a cell prints
    monkeypatch.setattr(runners.subprocess, "Popen", lambda cmd, **kw: fake(["printf", printed], **kw))
    heard = []
    runners.subprocess_runner(tmp_path, heard.append)
    assert heard == ["loading tiny-random", "gptq: layer 1/2 done [1/2, 3 s]", "done"]
    assert (tmp_path / "log.txt").read_text() == printed


def test_a_cell_process_prints_its_progress_for_the_driver(tmp_path, monkeypatch, capsys):
    """cell.main (what `python -m budgetlm.experiments.cell` runs) relays its steps' progress as lines."""
    from budgetlm.experiments import cell
    from budgetlm.experiments.study import run_study
    from budgetlm.results import Metric

    monkeypatch.setattr("budgetlm.hardware.bench.memory_bandwidth", lambda: Metric(10.0, unit="GB/s"))
    monkeypatch.setattr(progress, "MIN_INTERVAL", 0.0)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "name: tiny\nmodels: [tiny-random]\npipelines: {int8: [{method: rtn, bits: 8}]}\ntasks: [text-cloze]\n"
        "limit: 2\nbench: {prefill: [8], decode_tokens: 2, repeats: 1, warmup: 0}\n"
    )
    outputs = []

    def in_process(folder, on_status):
        assert cell.main([str(folder)]) == 0
        outputs.append(capsys.readouterr().out.splitlines())

    run_study(recipe, tmp_path / "out", progress=False, runner=in_process)
    int8 = outputs[1]
    assert "status: applying rtn" in int8
    assert any(ln.startswith("progress: rtn: model.layers.1.mlp.down_proj done [14/14, ") for ln in int8)
    assert any(ln.startswith("progress: eval: text-cloze done in ") for ln in int8)
    assert any(ln.startswith("progress: bench: decode 2 tokens after a 32-token prompt done [4/4, ") for ln in int8)


# ---------------------------------------------------------------------------------------------- tables


def test_tables_in_a_pipe_are_printed_whole(tmp_path):
    long = "gptq-4bit-group128-act-order-true-sequential-with-a-long-name"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"name: wide\nmodels: [tiny-random]\npipelines:\n  {long}: [{{method: rtn, bits: 4, group_size: 16}}]\n"
        "tasks: [text-ppl, text-cloze]\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "budgetlm.cli", "run", str(recipe), "--dry-run"], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert long in proc.stdout and "rtn(embeddings=False, bits=4, group_size=16, symmetric=True)" in proc.stdout
    assert "…" not in proc.stdout


def test_the_study_summary_table_is_not_cut_off_a_terminal(tmp_path, monkeypatch, capsys):
    from budgetlm import cli
    from budgetlm.experiments.study import run_study, summary_table

    long = "q4-with-a-pipeline-name-much-longer-than-eighty-columns-allow-in-a-narrow-table"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"name: demo\nmodels: [tiny-random]\npipelines:\n  {long}: [{{method: fake-quant, bits: 4}}]\n"
        "tasks: [t-acc, t-ppl]\nlimit: 5\n"
    )
    out = run_study(recipe, tmp_path / "out", progress=False, runner=FakeRunner())
    capsys.readouterr()
    cli._console().print(summary_table(out))  # stdout is pytest's capture: not a terminal
    text = capsys.readouterr().out
    assert long in text and "0.600 ± 0.050 (75%)" in text and "…" not in text
