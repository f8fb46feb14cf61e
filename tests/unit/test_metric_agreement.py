"""`budgetlm compare` recomputes every metric exactly as `budgetlm eval` computed it: A's value equals eval.json's
for each metric of text-ppl (token- and byte-weighted ratios), text-cloze (means of 0/1) and arith (generation),
and the per-item fields that are no metric (kld_sum, agree_count, bytes, ...) never become rows."""

from __future__ import annotations

import json

import pytest

from budgetlm.api import apply, evaluate
from budgetlm.evaluation.compare import compare
from budgetlm.evaluation.harness import RUN_METRICS
from budgetlm.models.sources import load
from budgetlm.results import Aggregate


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("agree")
    h = load("tiny-random")
    apply(h, [{"method": "rtn", "bits": 3}])  # not the base: kld and top-1 agreement against a real reference
    tasks = ["text-ppl", "text-cloze", "arith"]
    evaluate(h, tasks, limit=4, out_dir=tmp / "ev", reference_dir=tmp / "refs")
    return tmp / "ev"


def test_compare_equals_eval_json_for_every_metric(evaluated):
    summary = json.loads((evaluated / "eval.json").read_text())
    want = {(t, m): row["value"] for t, ms in summary.items() for m, row in ms.items() if m not in RUN_METRICS}
    assert "gen_tok_s" in summary["arith"]  # a generation task reports its speed, which compare leaves out
    assert set(summary["text-ppl"]) == {"perplexity", "bits_per_byte", "kld", "top1_agreement", "seconds"}
    rows = compare(evaluated, evaluated, n_boot=100)
    got = {(r["task"], r["metric"]): r["a"] for r in rows}
    assert got.keys() == want.keys()  # the metrics eval.json reports, nothing else
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-12, abs=1e-15), key
    assert 0 < want[("text-ppl", "kld")] and want[("text-ppl", "top1_agreement")] < 1


def test_text_ppl_ratios_are_token_weighted_not_item_means(evaluated):
    items = [json.loads(line) for line in (evaluated / "items" / "text-ppl.jsonl").read_text().splitlines()]
    summary = json.loads((evaluated / "eval.json").read_text())["text-ppl"]
    tokens = sum(r["tokens"] for r in items)
    assert summary["kld"]["value"] == pytest.approx(sum(r["kld_sum"] for r in items) / tokens, rel=1e-12)
    assert summary["top1_agreement"]["value"] == pytest.approx(sum(r["agree_count"] for r in items) / tokens)
    item_mean = sum(r["kld"] for r in items) / len(items)  # what compare used to report
    assert abs(item_mean - summary["kld"]["value"]) > 1e-9
    assert Aggregate.from_dict(summary["kld"]["extra"]["aggregate"]) == Aggregate("kld_sum", "tokens")


def test_aggregate_mean_and_ratio_by_hand():
    records = [{"x": 1.0, "n": 1}, {"x": 5.0, "n": 3}, {"x": 0.0, "n": 4}, {"id": "no x"}]
    mean = Aggregate("x").metric(records)
    assert (mean.value, mean.n) == (2.0, 3)
    assert mean.stderr == pytest.approx((((1 - 2) ** 2 + 3**2 + 2**2) / 2 / 3) ** 0.5)
    ratio = Aggregate("x", "n").metric(records)
    assert ratio.value == 6 / 8 and ratio.extra["aggregate"] == {"of": "x", "per": "n"}
    assert Aggregate("x", "n", "exp").metric(records).value == pytest.approx(2.117000016612675)  # e^0.75
    nan = Aggregate("x").metric([{"x": 1.0}, {"x": float("nan")}])
    assert nan.value != nan.value and nan.n == 2  # a NaN item shows in the aggregate, it does not drop out
    with pytest.raises(ValueError, match="finish"):
        Aggregate("x", "n", "log")
