"""The results store: round trip of rows and cells, one atomic transaction per cell."""

from __future__ import annotations

import math
import sqlite3

import pytest

from budgetlm.errors import BudgetLMError
from budgetlm.experiments import store as st
from budgetlm.results import Metric


def phases(acc: float) -> dict:
    return {
        "t-acc": {"acc": Metric(acc, 0.05, 40, "").to_dict(), "acc_norm": Metric(acc - 0.1, None, 40).to_dict()},
        "size": {"stored_bytes": Metric(1234.0, unit="B", extra={"how": "state dict"}).to_dict()},
        "speed": {"prefill_tok_s@512": Metric(90.0).to_dict(), "prefill_tok_s@128": Metric(100.0).to_dict()},
    }


def test_round_trip(tmp_path):
    with st.Store(tmp_path) as s:
        s.start_cell("c1", "tiny-random", "baseline", {"limit": 3, "steps": []})
        s.finish_cell("c1", phases(0.5), {"python": "3.11"})
        s.set_meta("plan", ["c1"])
    with st.Store.open(tmp_path) as s:
        assert s.done_cells() == {"c1"}
        (cell,) = s.cells()
        assert cell["config"] == {"limit": 3, "steps": []} and cell["env"] == {"python": "3.11"}
        assert cell["status"] == "done" and cell["finished"] >= cell["started"]
        rows = s.rows()
        assert s.get_meta("plan") == ["c1"]
    assert len(rows) == 5
    acc = next(r for r in rows if r["metric"] == "acc")
    assert (acc["model"], acc["pipeline"], acc["task_or_phase"]) == ("tiny-random", "baseline", "t-acc")
    assert (acc["value"], acc["stderr"], acc["n"], acc["source"]) == (0.5, 0.05, 40, "measured")
    assert next(r for r in rows if r["metric"] == "acc_norm")["stderr"] is None
    assert next(r for r in rows if r["metric"] == "stored_bytes")["extra"] == {"how": "state dict"}
    by = st.by_cell(rows)
    assert st.value(by["c1"], "size", "stored_bytes") == 1234.0
    assert st.prefill_metrics(by["c1"]) == ["prefill_tok_s@128", "prefill_tok_s@512"]


def test_nan_values_read_back_as_nan(tmp_path):
    with st.Store(tmp_path) as s:
        s.start_cell("c1", "m", "p", {})
        s.finish_cell("c1", {"t": {"ppl": {"value": float("nan"), "stderr": float("nan")}}})
        (row,) = s.rows()
    assert math.isnan(row["value"]) and row["stderr"] is None and row["unit"] == ""


def test_a_failure_while_writing_a_cell_leaves_nothing_of_it(tmp_path):
    bad = phases(0.5)
    bad["t-acc"]["acc_norm"]["value"] = "not a number"  # fails after 'acc' was inserted
    with st.Store(tmp_path) as s:
        s.start_cell("c1", "m", "baseline", {})
        s.finish_cell("c1", phases(0.7))
        s.start_cell("c2", "m", "q", {})
        with pytest.raises(ValueError):
            s.finish_cell("c2", bad)
        assert s.done_cells() == {"c1"}
        assert {r["cell_id"] for r in s.rows()} == {"c1"}
        assert next(c for c in s.cells() if c["cell_id"] == "c2")["status"] == "running"
        # rewriting a finished cell that fails keeps its previous rows
        with pytest.raises(ValueError):
            s.finish_cell("c1", bad)
        assert {r["value"] for r in s.rows() if r["metric"] == "acc"} == {0.7}
        assert s.done_cells() == {"c1"}
    # and another connection sees the same state (the transaction was rolled back, not left open)
    conn = sqlite3.connect(tmp_path / st.FILENAME)
    assert conn.execute("SELECT COUNT(*) FROM rows WHERE cell_id='c2'").fetchone()[0] == 0
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    conn.close()


def test_finish_requires_a_started_cell_and_rolls_back(tmp_path):
    with st.Store(tmp_path) as s:
        with pytest.raises(BudgetLMError, match="never started"):
            s.finish_cell("nope", phases(0.5))
        assert s.rows() == []


def test_failed_status_and_selection_order(tmp_path):
    with st.Store(tmp_path) as s:
        for c in ("a", "b", "c"):
            s.start_cell(c, "m", c, {})
            s.finish_cell(c, phases(0.5))
        s.set_status("b", "failed", "boom")
        assert s.done_cells() == {"a", "c"}
        assert [c["cell_id"] for c in s.cells(["c", "a"])] == ["c", "a"]
        assert [c["error"] for c in s.cells(["b"])] == ["boom"]
        assert [r["cell_id"] for r in s.rows(["c", "a"])][:1] == ["c"]
        s.put_rows("a", {"t-acc": {"acc_recovery_pct": {"value": 99.0, "unit": "%"}}})
        assert st.value(st.by_cell(s.rows(["a"]))["a"], "t-acc", "acc_recovery_pct") == 99.0


def test_open_requires_an_existing_store(tmp_path):
    with pytest.raises(BudgetLMError, match="no results.sqlite") as e:
        st.Store.open(tmp_path / "nothing")
    assert "\n" not in str(e.value)


def test_metric_classification():
    assert st.is_accuracy("acc") and st.is_accuracy("exact_match_flexible") and st.is_accuracy("rougeL")
    assert not st.is_accuracy("acc_recovery_pct") and not st.is_accuracy("perplexity")
    assert st.lower_is_better("perplexity") and st.lower_is_better("kld") and not st.lower_is_better("acc")
    assert st.main_metric(["acc_norm", "acc", "acc_recovery_pct"]) == "acc"
    assert st.main_metric(["kld", "perplexity", "top1_agreement"]) == "perplexity"
    assert st.main_metric(["custom_score"]) == "custom_score"
    assert st.main_metric([]) is None


def test_a_store_records_its_layout_and_refuses_another(tmp_path):
    from budgetlm import __version__

    with st.Store(tmp_path / "new") as s:
        assert s.get_meta("schema") == st.SCHEMA_VERSION and s.get_meta("budgetlm") == __version__
    # a store from before the layout was recorded reads as layout 1
    old = tmp_path / "old"
    old.mkdir()
    conn = sqlite3.connect(old / st.FILENAME)
    conn.executescript(st._SCHEMA)
    conn.close()
    with st.Store.open(old) as s:
        assert s.get_meta("schema") is None and s.cells() == []
    with st.Store(tmp_path / "new") as s:
        s.set_meta("schema", st.SCHEMA_VERSION + 1)
    with pytest.raises(BudgetLMError, match=rf"incompatible budgetlm \({__version__}: store layout 2;") as e:
        st.Store.open(tmp_path / "new")
    assert "\n" not in str(e.value)
    # a column this code reads is missing: the same refusal, naming it
    odd = tmp_path / "odd"
    odd.mkdir()
    conn = sqlite3.connect(odd / st.FILENAME)
    conn.executescript(st._SCHEMA.replace("unit TEXT, source TEXT,", "unit TEXT,"))
    conn.close()
    with pytest.raises(BudgetLMError, match=r"\(an earlier budgetlm: missing rows.source;"):
        st.Store(odd)


def test_a_store_killed_inside_a_transaction_opens_and_rolls_back(tmp_path):
    """A driver SIGKILLed while it writes a cell leaves a hot journal, which a read-only connection cannot roll back:
    the study is still recognised (and resumed), and opening it for writing rolls the half-written cell back."""
    import subprocess
    import sys
    import textwrap

    with st.Store(tmp_path) as s:
        s.start_cell("c1", "tiny-random", "baseline", {})
        s.finish_cell("c1", phases(0.5))
    code = textwrap.dedent(
        f"""
        import os, signal, sqlite3
        conn = sqlite3.connect({str(tmp_path / st.FILENAME)!r}, isolation_level=None)
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("DELETE FROM rows WHERE cell_id = 'c1'")
        conn.execute("UPDATE cells SET status = 'running'")
        conn.execute("PRAGMA cache_spill = 1")  # pages go to the file (the journal holds the old ones)
        conn.executemany("INSERT INTO meta VALUES (?, ?)", [(f"k{{i}}", "x" * 4000) for i in range(500)])
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    subprocess.run([sys.executable, "-c", code])
    assert (tmp_path / (st.FILENAME + "-journal")).stat().st_size > 0
    with pytest.raises(sqlite3.OperationalError, match="readonly"):  # what the read-only check meets
        sqlite3.connect(f"file:{tmp_path / st.FILENAME}?mode=ro", uri=True).execute("SELECT * FROM cells").fetchall()
    assert st.is_study(tmp_path)
    with st.Store.open(tmp_path) as s:
        assert s.done_cells() == {"c1"} and st.value(st.by_cell(s.rows())["c1"], "t-acc", "acc") == 0.5
    assert not (tmp_path / (st.FILENAME + "-journal")).exists()
