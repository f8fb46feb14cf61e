"""End-to-end runs of the main commands: a study killed mid-way resumes (tiny model), and the real
bundled model goes through run, report, eval and compare (marked slow)."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

TINY_RECIPE = """
name: tiny
models: [tiny-random]
pipelines:
  baseline: []
  int8: [{method: rtn, bits: 8}]
  int4: [{method: rtn, bits: 4, group_size: 32, symmetric: false}]
tasks: [text-ppl, text-cloze]
limit: 6
bench: {enabled: true, prefill: [16], decode_tokens: 4, repeats: 1, warmup: 0}
"""


def cli(*args, timeout=1800, **kw):
    return subprocess.run(
        [sys.executable, "-m", "budgetlm.cli", *args], capture_output=True, text=True, timeout=timeout, **kw
    )


def cells(study: Path) -> dict:
    con = sqlite3.connect(study / "results.sqlite")
    out = {r[3]: (r[0], r[1], r[2]) for r in con.execute("SELECT pipeline, status, started, cell_id FROM cells")}
    con.close()
    return out


def test_killed_study_resumes_without_redoing_finished_cells(tmp_path):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(TINY_RECIPE)
    study = tmp_path / "study"
    proc = subprocess.Popen(
        [sys.executable, "-m", "budgetlm.cli", "run", str(recipe), "--out", str(study)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 600
    while time.time() < deadline:  # kill the driver as soon as the first cell is in the store
        if (study / "results.sqlite").exists():
            try:
                if any(s == "done" for _, s, _ in cells(study).values()):
                    break
            except sqlite3.OperationalError:
                pass
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    first = {p: started for p, s, started in cells(study).values() if s == "done"}
    assert first, "no cell finished before the kill"
    assert len(first) < 3, "the study finished before it could be interrupted"
    done = cli("run", str(recipe), "--out", str(study))
    assert done.returncode == 0, done.stderr
    after = {p: (s, started) for p, s, started in cells(study).values()}
    assert {p for p, (s, _) in after.items() if s == "done"} == {"baseline", "int8", "int4"}
    for pipeline, started in first.items():
        assert after[pipeline][1] == started, f"{pipeline} was run again"
    con = sqlite3.connect(study / "results.sqlite")
    kld = dict(
        con.execute(
            "SELECT c.pipeline, r.value FROM rows r JOIN cells c USING (cell_id) WHERE r.metric = 'kld'"
        ).fetchall()
    )
    con.close()
    assert kld["baseline"] == pytest.approx(0, abs=1e-6) and kld["int4"] > kld["int8"] > 0


QUICK_RECIPE = """
name: quick
models: [smollm2-135m]
pipelines:
  baseline: []
  rtn-int8: [{method: rtn, bits: 8}]
tasks: [text-ppl, text-cloze, arith, fidelity]
limit: 6
bench: {enabled: true, prefill: [64], decode_tokens: 8, repeats: 1, warmup: 1}
"""


@pytest.mark.slow
def test_bundled_model_study_report_eval_and_compare(tmp_path):
    recipe = tmp_path / "quick.yaml"
    recipe.write_text(QUICK_RECIPE)
    study = tmp_path / "study"
    run = cli("run", str(recipe), "--out", str(study))
    assert run.returncode == 0, run.stderr[-2000:]
    rep = cli("report", str(study))
    assert rep.returncode == 0, rep.stderr
    for name in ("report.md", "results.csv", "pareto.png", "report.html"):
        assert (study / name).stat().st_size > 0
    con = sqlite3.connect(study / "results.sqlite")
    rows = {
        (p, t, m): v
        for p, t, m, v in con.execute(
            "SELECT c.pipeline, r.task_or_phase, r.metric, r.value FROM rows r JOIN cells c USING (cell_id)"
        )
    }
    con.close()
    # int8 weights: stored bytes really smaller, perplexity close to the base, agreement high but not perfect
    assert rows[("rtn-int8", "size", "stored_bytes")] < 0.5 * rows[("baseline", "size", "stored_bytes")]
    assert abs(rows[("rtn-int8", "text-ppl", "perplexity")] / rows[("baseline", "text-ppl", "perplexity")] - 1) < 0.05
    assert rows[("baseline", "text-ppl", "top1_agreement")] == 1.0
    assert 0.9 < rows[("rtn-int8", "text-ppl", "top1_agreement")] <= 1.0
    assert rows[("baseline", "speed", "decode_ms_per_token")] > 0

    a, b = tmp_path / "a", tmp_path / "b"
    ev = cli("eval", "smollm2-135m", "--tasks", "text-cloze", "--limit", "8", "--out", str(a), "--json")
    assert ev.returncode == 0, ev.stderr
    assert set(json.loads(ev.stdout)["text-cloze"]) >= {"acc", "acc_norm"}
    folder = next(p for p in study.rglob("model") if (p / "budgetlm.json").exists())
    ev = cli("eval", str(folder), "--tasks", "text-cloze", "--limit", "8", "--out", str(b))
    assert ev.returncode == 0, ev.stderr
    cmp = cli("compare", str(a), str(b))
    assert cmp.returncode == 0, cmp.stderr
    assert "mcnemar" in cmp.stdout.lower() and "text-cloze" in cmp.stdout
