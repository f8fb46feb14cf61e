"""Paired statistics against independent computations (scipy, hand-written bootstrap loops), and
`compare` on two evaluation folders written here."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as sps

from budgetlm.errors import DataError
from budgetlm.evaluation.compare import compare, format_table
from budgetlm.evaluation.stats import bootstrap_stderr, mcnemar, paired_bootstrap, perplexity


def paired_outcomes(both_right: int, only_a: int, only_b: int, both_wrong: int) -> tuple[list[bool], list[bool]]:
    a = [True] * both_right + [True] * only_a + [False] * only_b + [False] * both_wrong
    b = [True] * both_right + [False] * only_a + [True] * only_b + [False] * both_wrong
    return a, b


# -- McNemar ---------------------------------------------------------------------------------------------------
def test_mcnemar_exact_matches_scipy_binomtest():
    a, b = paired_outcomes(20, 3, 9, 8)  # 12 discordant pairs: exact test
    r = mcnemar(a, b)
    assert (r["b01"], r["b10"], r["method"]) == (9, 3, "exact binomial")
    assert r["p"] == pytest.approx(sps.binomtest(3, 12, 0.5).pvalue, rel=1e-12)


def test_mcnemar_chi_square_matches_scipy():
    a, b = paired_outcomes(50, 10, 30, 10)  # 40 discordant pairs: chi-square, continuity corrected
    r = mcnemar([float(x) for x in a], [float(x) for x in b])
    expected_stat = (abs(30 - 10) - 1) ** 2 / 40
    assert r["statistic"] == pytest.approx(expected_stat)
    assert r["p"] == pytest.approx(sps.chi2.sf(expected_stat, df=1), rel=1e-10)
    assert r["method"].startswith("chi-square")


def test_mcnemar_identical_and_bad_input():
    a, _ = paired_outcomes(5, 2, 0, 3)
    assert mcnemar(a, a)["p"] == 1.0
    a, b = paired_outcomes(0, 1, 1, 0)  # one each way: two-sided exact p is 1 (capped)
    assert mcnemar(a, b)["p"] == 1.0
    with pytest.raises(ValueError, match="0/1"):
        mcnemar([0.5, 1.0], [1.0, 1.0])
    with pytest.raises(ValueError, match="length"):
        mcnemar([1, 0], [1])


# -- paired bootstrap ------------------------------------------------------------------------------------------
def loop_bootstrap(a, b, n_boot, seed, stat=np.mean):
    """Reference: one replicate at a time, rng.integers(0, n, size=n) each."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    rng = np.random.default_rng(seed)
    reps = []
    for _ in range(n_boot):
        idx = rng.integers(0, len(a), size=len(a))
        reps.append(stat(b[idx]) - stat(a[idx]))
    return np.array(reps)


def test_paired_bootstrap_equals_a_plain_loop():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=50), rng.normal(0.2, 1.0, size=50)
    r = paired_bootstrap(list(a), list(b), n_boot=3000, seed=7)
    reps = loop_bootstrap(a, b, 3000, 7)
    diff = float(np.mean(b - a))
    assert r["diff"] == pytest.approx(diff)
    assert (r["a"], r["b"]) == (pytest.approx(a.mean()), pytest.approx(b.mean()))
    assert r["ci_low"] == pytest.approx(np.percentile(reps, 2.5), rel=1e-9)
    assert r["ci_high"] == pytest.approx(np.percentile(reps, 97.5), rel=1e-9)
    assert r["p"] == pytest.approx((np.sum(np.abs(reps - diff) >= abs(diff)) + 1) / 3001)


def test_paired_bootstrap_finds_a_real_shift_and_not_a_null_one():
    rng = np.random.default_rng(3)
    a = rng.normal(size=400)
    shifted = a + 0.3 + rng.normal(0, 0.5, size=400)
    r = paired_bootstrap(a, shifted, n_boot=5000, seed=0)
    assert r["ci_low"] < 0.3 < r["ci_high"]
    assert r["p"] < 0.01
    same = paired_bootstrap(a, a, n_boot=2000, seed=0)
    assert same["diff"] == 0.0 and same["p"] > 0.05 and same["ci_low"] == same["ci_high"] == 0.0
    noise = paired_bootstrap(a, a + rng.normal(0, 0.5, size=400), n_boot=2000, seed=0)
    assert noise["p"] > 0.05 and noise["ci_low"] < 0 < noise["ci_high"]


def test_paired_bootstrap_of_perplexity_rows():
    rng = np.random.default_rng(5)
    tokens = rng.integers(20, 60, size=30).astype(float)
    rows_a = np.stack([tokens * rng.uniform(2.5, 3.0, size=30), tokens], axis=1)
    rows_b = np.stack([tokens * rng.uniform(2.8, 3.3, size=30), tokens], axis=1)
    r = paired_bootstrap(rows_a.tolist(), rows_b.tolist(), n_boot=500, seed=2, stat_fn=perplexity)
    ppl_a = math.exp(rows_a[:, 0].sum() / rows_a[:, 1].sum())
    ppl_b = math.exp(rows_b[:, 0].sum() / rows_b[:, 1].sum())
    assert (r["a"], r["b"], r["diff"]) == (pytest.approx(ppl_a), pytest.approx(ppl_b), pytest.approx(ppl_b - ppl_a))
    reps = loop_bootstrap(rows_a, rows_b, 500, 2, stat=perplexity)
    assert r["ci_low"] == pytest.approx(np.percentile(reps, 2.5))
    assert r["ci_low"] > 0 and r["p"] < 0.01


def test_bootstrap_stderr():
    rng = np.random.default_rng(11)
    x = rng.exponential(size=600)
    se = bootstrap_stderr(x, np.mean, n_boot=2000, seed=4)
    assert se == pytest.approx(x.std(ddof=1) / math.sqrt(len(x)), rel=0.1)
    rows = np.stack([x * 10, np.full(600, 8.0)], axis=1)
    se_ppl = bootstrap_stderr(rows, perplexity, n_boot=300, seed=9)
    reference = np.random.default_rng(9)
    reps = [perplexity(rows[reference.integers(0, 600, size=600)]) for _ in range(300)]
    assert se_ppl == pytest.approx(np.std(reps, ddof=1), rel=1e-12)
    assert math.isnan(bootstrap_stderr([1.0], np.mean))


# -- compare ---------------------------------------------------------------------------------------------------
def write_eval(folder: Path, items: dict[str, list[dict]], summary: dict) -> Path:
    (folder / "items").mkdir(parents=True)
    for task, records in items.items():
        (folder / "items" / f"{task}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (folder / "eval.json").write_text(json.dumps(summary))
    return folder


MEAN = {"extra": {"aggregate": {"of": "acc"}}}
PPL = {"extra": {"aggregate": {"of": "nll", "per": "tokens", "finish": "exp"}}}
KLD = {"extra": {"aggregate": {"of": "kld_sum", "per": "tokens"}}}


@pytest.fixture()
def two_runs(tmp_path):
    rng = np.random.default_rng(0)
    acc_a = [bool(v) for v in rng.random(45) < 0.6]
    acc_b = list(acc_a)
    for i in (1, 4, 7):  # B loses three items A got right
        acc_a[i], acc_b[i] = True, False
    for i in range(10, 26):  # and gains a run of items A got wrong
        acc_a[i], acc_b[i] = False, True
    arc_a = [{"id": f"q{i}", "acc": float(acc_a[i]), "acc_norm": 1.0, "pred": 2, "target": 1} for i in range(40)]
    arc_b = [{"id": f"q{i}", "acc": float(acc_b[i]), "acc_norm": 1.0, "pred": 0, "target": 1} for i in range(2, 45)]
    tok = rng.integers(10, 90, size=20)  # unequal lengths: token-weighted and item-weighted means differ
    nll = tok * rng.uniform(2.5, 3.5, size=20)
    kl = [0.001 * float(t) for t in tok]  # B's per-token KL in item i, higher in longer items

    def ppl_item(i, scale, kld):
        n = int(tok[i])
        return {"id": i, "nll": float(nll[i] * scale), "tokens": n, "bytes": 4 * n, "kld_sum": kld * n, "kld": kld}

    ppl_a = [ppl_item(i, 1.0, 0.0) for i in range(20)]
    ppl_b = [ppl_item(i, 1.1, kl[i]) for i in range(20)]
    summary = {
        "arc_easy": {"acc": MEAN, "acc_norm": {"extra": {"aggregate": {"of": "acc_norm"}}}},
        "text-ppl": {"ppl": PPL, "kld": KLD, "seconds": {"value": 3.0}},
    }
    a = write_eval(tmp_path / "a", {"arc_easy": arc_a, "text-ppl": ppl_a}, summary)
    b = write_eval(tmp_path / "b", {"arc_easy": arc_b, "text-ppl": ppl_b}, summary)
    return a, b, acc_a, acc_b, nll, tok, kl


def test_compare_two_folders(two_runs):
    a, b, acc_a, acc_b, nll, tok, kl = two_runs
    rows = compare(a, b, n_boot=2000)
    by = {(r["task"], r["metric"]): r for r in rows}
    # only the metrics eval.json declares: no row for kld_sum, bytes, tokens or seconds
    assert list(by) == [("arc_easy", "acc"), ("arc_easy", "acc_norm"), ("text-ppl", "ppl"), ("text-ppl", "kld")]
    acc = by[("arc_easy", "acc")]
    matched = range(2, 40)  # A has q0..q39, B has q2..q44
    assert (acc["n"], acc["matched"], acc["n_a"], acc["n_b"]) == (38, 38, 40, 43)
    b01 = sum(1 for i in matched if not acc_a[i] and acc_b[i])
    b10 = sum(1 for i in matched if acc_a[i] and not acc_b[i])
    assert (acc["test"], acc["b01"], acc["b10"]) == ("mcnemar", b01, b10)
    assert acc["p"] == pytest.approx(sps.binomtest(min(b01, b10), b01 + b10, 0.5).pvalue)
    assert acc["a"] == pytest.approx(np.mean([acc_a[i] for i in matched]))
    assert acc["diff"] == pytest.approx(np.mean([acc_b[i] for i in matched]) - acc["a"])
    assert acc["ci_low"] < acc["diff"] < acc["ci_high"]
    assert by[("arc_easy", "acc_norm")]["p"] == 1.0
    kld = by[("text-ppl", "kld")]  # token-weighted as eval computes it, not the mean of the items' kld
    token_weighted = sum(k * t for k, t in zip(kl, tok)) / tok.sum()
    assert kld["test"] == "bootstrap" and kld["a"] == 0.0 and kld["b"] == pytest.approx(token_weighted)
    assert abs(token_weighted - np.mean(kl)) > 1e-4
    ppl = by[("text-ppl", "ppl")]  # named as eval.json names it; from per-item nll and tokens
    assert ppl["a"] == pytest.approx(math.exp(nll.sum() / tok.sum()))
    assert ppl["b"] == pytest.approx(math.exp(1.1 * nll.sum() / tok.sum()))
    assert ppl["p"] < 0.01
    table = format_table(rows)
    assert table.splitlines()[0].split() == ["task", "metric", "n", "A", "B", "B-A", "95%", "CI", "test", "p"]
    assert "arc_easy: 38 items matched by id (A has 40, B has 43)" in table
    assert any(line.startswith("text-ppl") and " ppl " in line and "bootstrap" in line for line in table.splitlines())


def test_compare_an_eval_json_without_declarations_uses_the_registered_task(two_runs):
    """eval.json written before metrics declared their aggregation: text-ppl's own declaration applies (kld
    token-weighted; bits_per_byte from nll and bytes), for the metrics that eval.json lists."""
    a, b, _, _, nll, tok, kl = two_runs
    old = {"text-ppl": {"kld": {"value": 0.0}, "bits_per_byte": {"value": 1.0}}, "arc_easy": {"acc": {"value": 0.5}}}
    for folder in (a, b):
        (folder / "eval.json").write_text(json.dumps(old))
    by = {(r["task"], r["metric"]): r for r in compare(a, b, n_boot=200)}
    assert set(by) == {("text-ppl", "kld"), ("text-ppl", "bits_per_byte"), ("arc_easy", "acc")}
    assert by[("text-ppl", "kld")]["b"] == pytest.approx(sum(k * t for k, t in zip(kl, tok)) / tok.sum())
    assert by[("text-ppl", "bits_per_byte")]["a"] == pytest.approx(nll.sum() / (4 * tok.sum()) / math.log(2))


def test_compare_errors(tmp_path, two_runs):
    a, b, *_ = two_runs
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"no per-item logs \(items/<task>.jsonl\)"):
        compare(a, tmp_path / "empty")
    other = write_eval(tmp_path / "other", {"arc_easy": [{"id": "zz", "acc": 1.0}]}, {})
    with pytest.raises(DataError, match="no item ids match"):
        compare(a, other)
    elsewhere = write_eval(tmp_path / "elsewhere", {"piqa": [{"id": "q2", "acc": 1.0}]}, {})
    with pytest.raises(DataError, match="share no task"):
        compare(a, elsewhere)
    (b / "items" / "arc_easy.jsonl").write_text('{"id": "q2", "acc": 1}\nnot json\n')
    with pytest.raises(DataError, match="arc_easy.jsonl line 2"):
        compare(a, b)
