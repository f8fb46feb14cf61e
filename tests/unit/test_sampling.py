from collections import Counter

from budgetlm.data.tasks.base import Item
from budgetlm.evaluation.harness import sample_items, sampling


def items(n_per_label):
    out = []
    for label, n in n_per_label.items():
        out += [Item(f"{label}-{i}", {}, label) for i in range(n)]
    return out


def test_limit_is_seeded_stratified_not_first_n():
    data = items({0: 60, 1: 30, 2: 10})
    a = sample_items(data, 20, seed=0)
    assert len(a) == 20 and len({it.id for it in a}) == 20
    assert Counter(it.label for it in a) == {0: 12, 1: 6, 2: 2}
    assert [it.id for it in a] == [it.id for it in sample_items(data, 20, seed=0)]
    assert [it.id for it in a] != [it.id for it in sample_items(data, 20, seed=1)]
    assert [it.id for it in a] != [it.id for it in data[:20]]


def test_rounding_fills_exactly_the_limit():
    data = items({"a": 5, "b": 5, "c": 5})
    got = sample_items(data, 7, seed=3)
    assert len(got) == 7 and max(Counter(it.label for it in got).values()) == 3


def test_no_limit_or_large_limit_keeps_all():
    data = items({0: 3})
    assert len(sample_items(data, None, 0)) == 3 and len(sample_items(data, 10, 0)) == 3


def test_the_result_says_how_items_were_chosen():
    assert sampling(20, 100, seed=3) == "seed 3, stratified by label"
    assert sampling(None, 100, seed=3) == sampling(100, 100, seed=3) == "all"
    assert sampling(5000, 2376, seed=0) == "all 2,376 items (fewer than the limit of 5,000)"
