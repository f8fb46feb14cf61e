"""benchmarks/rag_frontier.py's arithmetic: every threshold's gated accuracy, retrieval rate, paired tests and modelled
latency, against a reference written here, and the target test."""

import importlib.util
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def frontier_mod():
    spec = importlib.util.spec_from_file_location("rag_frontier", ROOT / "benchmarks" / "rag_frontier.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def exact_mcnemar_p(a, b):
    """Two-sided exact binomial McNemar (few discordant pairs), written from the definition."""
    b01 = sum(1 for x, y in zip(a, b) if not x and y)
    b10 = sum(1 for x, y in zip(a, b) if x and not y)
    n = b01 + b10
    if n == 0:
        return 1.0
    k = min(b01, b10)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n)


def test_every_threshold_is_scored_like_the_reference(frontier_mod):
    scores = [0.1, 0.9, 0.5, 0.5, 2.0, 1.5]
    without = [1, 0, 0, 1, 0, 1]
    with_ = [1, 1, 1, 0, 1, 1]
    best = [1, 1, 1, 0, 0, 1]
    cost = frontier_mod.cost_model("margin", 10.0, 100.0, 40.0, None)
    points = frontier_mod.frontier(scores, without, with_, best, cost)
    # thresholds: +inf, the midpoints of the distinct scores from the top, -inf
    distinct = sorted(set(scores))
    mids = [(lo + hi) / 2 for lo, hi in zip(distinct, distinct[1:])][::-1]
    assert [p["threshold"] for p in points] == [math.inf, *mids, -math.inf]
    for p in points:
        on = [s >= p["threshold"] for s in scores]
        gated = [w if o else n for o, n, w in zip(on, without, with_)]
        f = sum(on) / len(on)
        assert p["retrieval_rate"] == pytest.approx(f)
        assert p["acc"] == pytest.approx(sum(gated) / len(gated))
        assert p["p_vs_best"] == pytest.approx(exact_mcnemar_p(gated, best))
        assert p["p_vs_none"] == pytest.approx(exact_mcnemar_p(gated, without))
        assert p["latency_ms"] == pytest.approx(10.0 + f * 100.0 + (1 - f) * 40.0)
    assert points[0]["retrieval_rate"] == 0 and points[-1]["retrieval_rate"] == 1


def test_cost_models(frontier_mod):
    # entropy: the gate's forward is the no-RAG context's, reused when it skips
    entropy = frontier_mod.cost_model("entropy", 10.0, 150.0, 40.0, 35.0)
    assert entropy(0.0) == pytest.approx(35.0 + 5.0)
    assert entropy(1.0) == pytest.approx(35.0 + 160.0)
    assert entropy(0.5) == pytest.approx(35.0 + 80.0 + 2.5)
    grad = frontier_mod.cost_model("grad", 10.0, 150.0, 40.0, 200.0)
    assert grad(0.25) == pytest.approx(200.0 + 0.25 * 160.0 + 0.75 * 40.0)
    assert frontier_mod.cost_model("grad", 10.0, 150.0, 40.0, None) is None


def test_target_needs_all_three_conditions(frontier_mod):
    ok = {"acc": 0.39, "acc_none": 0.37, "p_vs_best": 0.2, "p_vs_none": 0.01, "latency_ms": 70.0}
    assert frontier_mod.meets(ok, 0.40, 100.0)
    assert not frontier_mod.meets({**ok, "latency_ms": 70.01}, 0.40, 100.0)  # less than 30% faster
    assert not frontier_mod.meets({**ok, "p_vs_best": 0.049}, 0.40, 100.0)  # significantly worse than the base
    assert frontier_mod.meets({**ok, "acc": 0.45, "p_vs_best": 0.001}, 0.40, 100.0)  # significantly better: passes
    assert not frontier_mod.meets({**ok, "p_vs_none": 0.05}, 0.40, 100.0)  # not significantly above no-RAG
    assert not frontier_mod.meets({**ok, "acc": 0.30}, 0.40, 100.0)  # significantly *below* no-RAG


def test_settings_parse(frontier_mod):
    assert frontier_mod.parse_settings("k=1,k=3:budget=128") == [(1, None), (3, 128)]
    with pytest.raises(KeyError):
        frontier_mod.parse_settings("budget=3")


def test_calibration_rules(frontier_mod):
    """Scores 0..9 (retrieve where score >= t); retrieval helps items 7, 8, 9 only, and hurts item 2."""
    scores = list(range(10))
    a0 = [1, 0, 1, 0, 0, 0, 0, 0, 0, 0]
    a1 = [1, 0, 0, 0, 0, 0, 0, 1, 1, 1]
    # accuracy: highest gated accuracy (retrieve for 7..9: 0.5), the fewest retrievals among ties
    assert frontier_mod.choose("accuracy", scores, a0, a1) == 6.5
    # gain: 0.5 - (0.2 + 0.3 * (0.4 - 0.2)) = 0.24 at t = 6.5, the largest margin over random gating
    assert frontier_mod.choose("gain", scores, a0, a1) == 6.5
    # fewest within noise: 3 discordant pairs can never be significant against never (p = 0.25): the accuracy rule's
    assert frontier_mod.choose("fewest within noise", scores, a0, a1) == 6.5
    many0, many1 = a0 * 20, a1 * 20
    # x20: retrieving for 8, 9 only is as accurate as always (0.4: it keeps item 2, loses item 7) and 40 - 0 above
    # never; for 9 only: 20 - 40 against always, significantly below (chi-square p = 0.014)
    assert frontier_mod.choose("fewest within noise", scores * 20, many0, many1) == 7.5
    assert frontier_mod.choose("accuracy", scores * 20, many0, many1) == 6.5
