"""The report reads only the store and writes report.md, results.csv and pareto.png."""

from __future__ import annotations

import csv
import random

import pytest

from budgetlm.errors import BudgetLMError
from budgetlm.experiments import store as st
from budgetlm.experiments.study import recovery
from budgetlm.report.build import CSV_COLUMNS, build_report
from budgetlm.report.plots import pareto_front

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def metric(value, stderr=None, n=None, unit="", **extra):
    return {"value": value, "stderr": stderr, "n": n, "unit": unit, "source": "measured", "extra": extra}


def cell_phases(acc, ppl, size_bytes, energy=True, load=0.5):
    phases = {
        "t-acc": {"acc": metric(acc, 0.05, 40, data="generated demo"), "seconds": metric(3.0, unit="s")},
        "t-ppl": {"perplexity": metric(ppl, 0.4, 40)},
        "size": {"stored_bytes": metric(size_bytes, unit="B"), "bpw": metric(size_bytes / 1.25e8, unit="bits")},
        "speed": {
            "prefill_tok_s@128": metric(700.0, 10.0, 3),
            "decode_ms_per_token": metric(35.0, 1.0, 3, energy="unavailable: no RAPL here"),
            "decode_pct_roofline": metric(60.0, unit="%", loadavg=[load, 0.4, 0.3]),
        },
        "memory": {"peak_rss_load": metric(6e8, unit="B"), "peak_rss_evaluation": metric(7e8, unit="B")},
        "step1-rtn": {"seconds": metric(2.5, unit="s")},
    }
    if energy:
        phases["energy"] = {"decode_j_per_token": metric(0.25, unit="J/token")}
    return phases


@pytest.fixture
def study(tmp_path):
    env = {"python": "3.11.7", "torch": "2.13.0", "cpu": "Test CPU", "threads": 2, "git_commit": "abcdef1234567"}
    env["cores"] = 2
    with st.Store(tmp_path) as s:
        s.start_cell("b0", "smollm2-135m", "baseline", {"tasks": ["t-acc", "t-ppl"], "steps": []})
        s.finish_cell("b0", cell_phases(0.8, 17.7, 5.16e8, energy=False), env)
        s.start_cell("q8", "smollm2-135m", "rtn-int8", {"tasks": ["t-acc", "t-ppl"], "steps": [{"method": "rtn"}]})
        s.finish_cell("q8", cell_phases(0.6, 18.0, 1.6e8, load=3.2), env)  # benchmarked on a busy machine
        s.start_cell("q2", "smollm2-135m", "rtn-int2", {"tasks": ["t-acc", "t-ppl"], "steps": [{"method": "rtn"}]})
        s.set_status("q2", "failed", "boom")
        s.start_cell("old", "smollm2-135m", "stale", {"tasks": ["t-acc"], "steps": []})  # not in the plan
        s.finish_cell("old", cell_phases(0.1, 99.0, 1e6))
        s.set_meta("plan", ["b0", "q8", "q2"])
        s.set_meta("recipe", {"name": "demo", "models": ["smollm2-135m"], "tasks": ["t-acc", "t-ppl"], "limit": 40})
        rows = st.by_cell(s.rows())
        for c in ("b0", "q8"):
            s.put_rows(c, recovery(rows[c], rows["b0"], "b0"))
    return tmp_path


def test_report_files(study):
    paths = build_report(study)
    assert set(paths) == {"markdown", "csv", "pareto", "html"}
    assert paths["pareto"].read_bytes()[:8] == PNG_MAGIC
    with open(paths["csv"], newline="") as f:
        records = list(csv.DictReader(f))
    assert list(records[0]) == CSV_COLUMNS
    # every row of the two finished plan cells, the stale cell left out
    with st.Store.open(study) as s:
        expected = {(r["cell_id"], r["task_or_phase"], r["metric"]) for r in s.rows(["b0", "q8"])}
    assert {(r["cell_id"], r["task_or_phase"], r["metric"]) for r in records} == expected
    assert len(records) == len(expected) == 2 * 13 - 1  # 12 rows + acc_recovery_pct each; baseline: no energy
    rec = next(r for r in records if r["cell_id"] == "q8" and r["metric"] == "acc_recovery_pct")
    assert (rec["model"], rec["pipeline"], rec["task_or_phase"]) == ("smollm2-135m", "rtn-int8", "t-acc")
    assert float(rec["value"]) == pytest.approx(75.0) and float(rec["stderr"]) == pytest.approx(6.25)
    size = next(r for r in records if r["cell_id"] == "b0" and r["metric"] == "stored_bytes")
    assert float(size["value"]) == 5.16e8 and size["stderr"] == "" and size["unit"] == "B"


def test_report_markdown_tables(study):
    text = build_report(study)["markdown"].read_text()
    lines = text.splitlines()
    assert lines[0] == "# Study demo"
    assert "- **rtn-int2**: failed — boom" in lines
    assert "| pipeline | n | acc ↑ | acc recovery % |" in lines
    assert "| rtn-int8 | 40 | 0.600 ± 0.050 | 75.0 ± 6.2 |" in lines
    assert "| baseline | 40 | 0.800 ± 0.050 | 100.0 ± 6.2 |" in lines
    assert "| pipeline | n | perplexity ↓ |" in lines
    assert "| rtn-int8 | 40 | 18.0 ± 0.4 |" in lines
    assert "Data: generated demo." in lines
    cost = next(ln for ln in lines if ln.startswith("| rtn-int8 | 160.0 |"))
    cells = [c.strip() for c in cost.strip("|").split("|")]
    assert cells[:8] == ["rtn-int8", "160.0", "-", "1.28", "-", "600", "700", "-"]
    assert cells[8:13] == ["700 ± 10", "35.0 ± 1.0", "60", "0.250", "3.20 (contended)"]  # load 3.2 on 2 CPUs
    assert cells[13:] == ["-", "-", "-"]  # the device columns: no bytes read per token nor params stored
    base_cost = next(ln for ln in lines if ln.startswith("| baseline | 516.0 |"))
    assert base_cost.rstrip(" |").endswith("unavailable | 0.50 | - | - | -")
    assert lines[lines.index("## Cost") + 2].endswith(
        "| rpi5 decode s/tok (projected) | jetson-nano decode s/tok (projected) | apple-m2 decode s/tok (projected) |"
    )
    note = next(ln for ln in lines if ln.startswith("Device columns are projected, not measured"))
    assert "Not projected ('-'): baseline: cells/smollm2-135m_baseline_b0: the cell was not benchmarked" in note
    assert "Energy unavailable: no RAPL here." in lines
    assert "| rtn-int8 | step1-rtn | 2.5 | - |" in lines
    assert any(ln.startswith("| baseline | 3.11.7 | 2.13.0 | - | - | Test CPU | 2 | 2 | abcdef1234 |") for ln in lines)
    assert "stale" not in text


def test_report_without_store_is_one_line_error(tmp_path):
    with pytest.raises(BudgetLMError) as e:
        build_report(tmp_path)
    assert "no results.sqlite" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "report.md").exists()


def test_report_of_a_study_without_size_still_writes_a_png(tmp_path):
    with st.Store(tmp_path) as s:
        s.start_cell("b0", "m", "baseline", {"tasks": ["t-acc"]})
        s.finish_cell("b0", {"t-acc": {"acc": metric(0.5, 0.1, 10)}})
    paths = build_report(tmp_path)
    assert paths["pareto"].read_bytes()[:8] == PNG_MAGIC
    assert "| baseline | 10 | 0.500 ± 0.100 | - |" in paths["markdown"].read_text()


def sweep_front(xs, ys, higher):
    """Reference: sort by size (best value first on ties), keep points strictly better than all smaller."""
    sign = 1 if higher else -1
    order = sorted(range(len(xs)), key=lambda i: (xs[i], -sign * ys[i]))
    front, best = [], None
    for i in order:
        if best is None or sign * ys[i] > best:
            if front and xs[front[-1]] == xs[i]:
                continue
            front.append(i)
            best = sign * ys[i]
    return front


@pytest.mark.parametrize("higher", [True, False])
def test_pareto_front_matches_a_sweep(higher):
    rng = random.Random(1)
    for _ in range(200):
        n = rng.randint(1, 9)
        xs = [float(rng.randint(1, 6)) for _ in range(n)]
        ys = [float(rng.randint(0, 6)) for _ in range(n)]
        got = pareto_front(xs, ys, higher)
        want = sweep_front(xs, ys, higher)
        # duplicates of a front point are equally non-dominated: compare the coordinates
        assert sorted({(xs[i], ys[i]) for i in got}) == sorted({(xs[i], ys[i]) for i in want})


def test_pareto_front_examples():
    # sizes 500, 160, 100, 160 MB; accuracies .80, .78, .40, .70: the 160 MB .70 point is dominated
    assert pareto_front([500, 160, 100, 160], [0.8, 0.78, 0.4, 0.7]) == [2, 1, 0]
    assert pareto_front([500, 160], [17.7, 18.0], higher_is_better=False) == [1, 0]
    assert pareto_front([500, 160], [17.7, 17.0], higher_is_better=False) == [1]
    assert pareto_front([1.0, float("nan")], [0.5, 0.9]) == [0]
