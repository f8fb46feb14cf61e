"""Recipe validation: unknown keys and wrong types named in one line, steps resolved against the method
registry, tasks checked against the task registry, and a resolved recipe that round-trips through YAML."""

from __future__ import annotations

import textwrap

import pytest

from budgetlm.data.tasks.base import Task, tasks
from budgetlm.errors import ConfigError, UnknownNameError
from budgetlm.experiments.plan import cell_id, plan
from budgetlm.experiments.recipe import BASELINE, Recipe, dump_recipe, load_recipe, parse_recipe
from budgetlm.methods.base import MethodConfig, methods


class FakeQuant(MethodConfig):
    """A stand-in method config for recipe tests."""

    bits: int = 8
    group_size: int | None = None


@pytest.fixture(autouse=True)
def registries(monkeypatch):
    monkeypatch.setitem(methods._items, "fake-quant", FakeQuant)
    for name in ("t-acc", "t-ppl"):
        monkeypatch.setitem(tasks._items, name, Task())


def write(tmp_path, text: str, name: str = "r.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


GOOD = """
    name: demo
    models: [tiny-random]
    pipelines:
      q4: [{method: fake-quant, bits: 4}]
      q8: [{method: fake-quant}]
    tasks: [t-acc, t-ppl]
    limit: 5
    bench: {prefill: [16], decode_tokens: 4}
"""


def test_good_recipe_resolves_defaults_and_round_trips(tmp_path):
    r = load_recipe(write(tmp_path, GOOD))
    assert list(r.pipelines) == [BASELINE, "q4", "q8"]  # baseline added, first
    assert r.pipelines[BASELINE] == []
    q4 = r.pipelines["q4"][0]
    assert q4["method"] == "fake-quant" and q4["bits"] == 4 and q4["group_size"] is None
    assert r.pipelines["q8"][0]["bits"] == 8  # default filled in by the config class
    assert "targets" in q4  # base-class defaults too
    assert r.bench.prefill == [16] and r.bench.repeats == 3
    again = load_recipe(write(tmp_path, dump_recipe(r), "again.yaml"))
    assert again == r
    assert [c.id for c in plan(again)] == [c.id for c in plan(r)]


def test_recipe_from_python_objects_is_validated_too():
    r = parse_recipe(Recipe(models=["tiny-random"], pipelines={"q": ["fake-quant"]}, tasks=["t-acc"]))
    assert r.pipelines["q"][0]["bits"] == 8
    with pytest.raises(ConfigError, match="bits"):
        parse_recipe(
            {"models": ["tiny-random"], "tasks": ["t-acc"], "pipelines": {"q": [{"method": "fake-quant", "bits": "x"}]}}
        )


def one_line(exc_info) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg
    return msg


def test_unknown_top_level_key_is_named_with_allowed_keys(tmp_path):
    path = write(tmp_path, textwrap.dedent(GOOD) + "bogus_key: 1\n", "bad.yaml")
    with pytest.raises(ConfigError) as e:
        load_recipe(path)
    msg = one_line(e)
    assert msg.startswith(f"recipe {path}: unknown key 'bogus_key'")
    assert "allowed: name, models, pipelines, tasks" in msg


def test_misspelt_key_gets_a_suggestion(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'modles' \(did you mean: models\?\)"):
        load_recipe(write(tmp_path, "modles: [tiny-random]\ntasks: [t-acc]\n"))


def test_unknown_key_inside_bench_lists_bench_keys(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_recipe(write(tmp_path, "models: [tiny-random]\ntasks: [t-acc]\nbench: {repeat: 2}\n"))
    msg = one_line(e)
    assert "bench: unknown key 'repeat' (did you mean: repeats?)" in msg
    assert "allowed: enabled, prefill, decode_tokens, repeats, warmup" in msg


def test_unknown_key_inside_a_step(tmp_path):
    text = "models: [tiny-random]\ntasks: [t-acc]\npipelines:\n  q: [{method: fake-quant, bitz: 4}]\n"
    with pytest.raises(ConfigError) as e:
        load_recipe(write(tmp_path, text))
    msg = one_line(e)
    assert "pipelines.q[0]: unknown key 'bitz' (did you mean: bits?)" in msg
    assert "group_size" in msg and "(method 'fake-quant')" in msg


def test_wrong_type_in_a_step_names_the_key_path(tmp_path):
    text = "models: [tiny-random]\ntasks: [t-acc]\npipelines:\n  int8: [{method: fake-quant, bits: eight}]\n"
    path = write(tmp_path, text, "x.yaml")
    with pytest.raises(ConfigError) as e:
        load_recipe(path)
    assert one_line(e).startswith(f"recipe {path}: pipelines.int8[0].bits: Input should be a valid integer")


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("limit: many", "limit: Input should be a valid integer"),
        ("limit: 0", "limit: Input should be greater than or equal to 1"),
        ("models: tiny-random", "models: Input should be a valid list"),
        ("bench: {decode_tokens: [1]}", "bench.decode_tokens: Input should be a valid integer"),
        ("seed: 1.5", "seed: Input should be a valid integer"),
    ],
)
def test_wrong_types(tmp_path, line, expected):
    text = "models: [tiny-random]\ntasks: [t-acc]\n"
    text = "\n".join(ln for ln in text.splitlines() if not ln.startswith(line.split(":")[0] + ":")) + "\n" + line
    with pytest.raises(ConfigError) as e:
        load_recipe(write(tmp_path, text))
    assert expected in one_line(e)


def test_unknown_method_and_task_suggest_close_names(tmp_path):
    text = "models: [tiny-random]\ntasks: [t-acc]\npipelines:\n  q: [{method: fake-qaunt}]\n"
    with pytest.raises(UnknownNameError) as e:
        load_recipe(write(tmp_path, text))
    assert "pipelines.q[0].method: unknown method 'fake-qaunt' (did you mean: fake-quant" in one_line(e)
    with pytest.raises(UnknownNameError) as e:
        load_recipe(write(tmp_path, "models: [tiny-random]\ntasks: [t-accc]\n"))
    assert "tasks[0]: unknown task 't-accc' (did you mean: t-acc" in one_line(e)


def test_step_without_method_and_non_empty_baseline_are_rejected(tmp_path):
    with pytest.raises(ConfigError, match=r"pipelines.q\[0\]: a step needs a 'method' key"):
        load_recipe(write(tmp_path, "models: [tiny-random]\ntasks: [t-acc]\npipelines: {q: [{bits: 4}]}\n"))
    with pytest.raises(ConfigError, match=r"pipelines.q\[1\]: a step is a mapping like .* or a method name, not 5"):
        load_recipe(write(tmp_path, "models: [tiny-random]\ntasks: [t-acc]\npipelines: {q: [fake-quant, 5]}\n"))
    r = load_recipe(write(tmp_path, "models: [tiny-random]\ntasks: [t-acc]\npipelines:\n  baseline:\n"))
    assert r.pipelines == {"baseline": []}
    with pytest.raises(ConfigError, match="pipelines.baseline must be empty"):
        load_recipe(write(tmp_path, "models: [tiny-random]\ntasks: [t-acc]\npipelines: {baseline: [fake-quant]}\n"))


def test_bad_models_and_duplicates(tmp_path):
    with pytest.raises(ConfigError, match=r"models\[0\]: 'tiny-randm' is neither .*did you mean: tiny-random"):
        load_recipe(write(tmp_path, "models: [tiny-randm]\ntasks: [t-acc]\n"))
    with pytest.raises(ConfigError, match="tasks: 't-acc' is listed twice"):
        load_recipe(write(tmp_path, "models: [tiny-random]\ntasks: [t-acc, t-acc]\n"))
    model_dir = tmp_path / "my model"
    model_dir.mkdir()
    r = load_recipe(write(tmp_path, f"models: ['{model_dir}']\ntasks: [t-acc]\n"))
    assert r.models == [str(model_dir.resolve())]


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_recipe(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="empty"):
        load_recipe(write(tmp_path, ""))
    with pytest.raises(ConfigError) as e:
        load_recipe(write(tmp_path, "models: [tiny-random]\ntasks: [t-acc\nlimit: 3\n"))
    assert "invalid YAML at line 3" in one_line(e)
    with pytest.raises(ConfigError, match="invalid YAML at line 3.*'limit' appears twice"):
        load_recipe(write(tmp_path, "limit: 2\ntasks: [t-acc]\nlimit: 3\n"))
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_recipe(write(tmp_path, "- a\n- b\n"))


def test_bundled_quickstart(monkeypatch):
    for name in ("text-ppl", "text-cloze", "arith", "fidelity"):
        if name not in tasks:
            monkeypatch.setitem(tasks._items, name, Task())
    r = load_recipe(None)
    assert r.name == "quickstart" and r.models == ["smollm2-135m"]
    assert list(r.pipelines) == ["baseline", "rtn-int8"]
    assert r.pipelines["rtn-int8"][0]["method"] == "rtn" and r.pipelines["rtn-int8"][0]["bits"] == 8
    assert r.tasks == ["text-ppl", "text-cloze", "arith", "fidelity", "arc_easy"]
    assert r.limit == {"text-ppl": 40, "text-cloze": 40, "arith": 40, "fidelity": 40, "arc_easy": 200}
    assert r.bench.enabled


def test_limit_per_task(tmp_path):
    from budgetlm.evaluation.harness import task_limit

    r = load_recipe(write(tmp_path, GOOD.replace("limit: 5", "limit: {t-acc: 7, t-ppl: null}")))
    assert r.limit == {"t-acc": 7, "t-ppl": None}
    assert (task_limit(r.limit, "t-acc"), task_limit(r.limit, "t-ppl"), task_limit(5, "t-ppl")) == (7, None, 5)
    ids = {c.id for c in plan(r)}
    assert ids.isdisjoint(
        c.id for c in plan(load_recipe(write(tmp_path, GOOD.replace("limit: 5", "limit: {t-acc: 8}"))))
    )
    for bad, message in [
        ("{t-acc: 0}", "limit: t-acc: Input should be greater than or equal to 1"),
        ("{t-acc: many}", "limit: t-acc: Input should be a valid integer"),
        ("{t-ac: 3}", "limit.t-ac: 't-ac' is not among the recipe's tasks (did you mean: t-acc?)"),
    ]:
        with pytest.raises(ConfigError) as e:
            load_recipe(write(tmp_path, GOOD.replace("limit: 5", f"limit: {bad}")))
        assert message in str(e.value)


def test_cell_ids_are_stable_and_change_with_the_config(tmp_path):
    a = plan(load_recipe(write(tmp_path, GOOD)))
    b = plan(load_recipe(write(tmp_path, GOOD)))
    assert [c.id for c in a] == [c.id for c in b]
    assert len({c.id for c in a}) == 3
    assert [c.pipeline for c in a] == ["baseline", "q4", "q8"]
    # an explicit default is the same config as an omitted one
    explicit = plan(
        load_recipe(write(tmp_path, GOOD.replace("[{method: fake-quant}]", "[{method: fake-quant, bits: 8}]")))
    )
    assert [c.id for c in explicit] == [c.id for c in a]
    # one step value changes that cell only
    changed = plan(load_recipe(write(tmp_path, GOOD.replace("bits: 4", "bits: 3"))))
    assert [c.id == d.id for c, d in zip(a, changed)] == [True, False, True]
    # a study-wide value changes every cell
    for old, new in [("limit: 5", "limit: 6"), ("decode_tokens: 4", "decode_tokens: 5"), ("t-ppl]", "t-ppl, t-acc2]")]:
        if "t-acc2" in new:
            tasks._items["t-acc2"] = Task()
        try:
            other = plan(load_recipe(write(tmp_path, GOOD.replace(old, new))))
        finally:
            tasks._items.pop("t-acc2", None)
        assert all(c.id != d.id for c, d in zip(a, other)), old
    # the id is a hash of the config it carries
    assert all(c.id == cell_id(c.config) for c in a)


def test_baseline_first_for_each_model(tmp_path):
    model_dir = tmp_path / "m2"
    model_dir.mkdir()
    r = load_recipe(write(tmp_path, GOOD.replace("[tiny-random]", f"[tiny-random, '{model_dir}']")))
    order = [(c.model, c.pipeline) for c in plan(r)]
    assert order == [
        ("tiny-random", "baseline"),
        ("tiny-random", "q4"),
        ("tiny-random", "q8"),
        (str(model_dir.resolve()), "baseline"),
        (str(model_dir.resolve()), "q4"),
        (str(model_dir.resolve()), "q8"),
    ]


def test_bundled_recipes_by_name_and_a_missing_name_lists_them(monkeypatch, tmp_path):
    for name in ("text-ppl", "text-cloze"):
        if name not in tasks:
            monkeypatch.setitem(tasks._items, name, Task())
    r = load_recipe("quant_suite")
    assert r.name == "quant_suite" and {"gptq-3", "awq-4", "lobi-3", "nf4"} <= set(r.pipelines)
    assert r.pipelines["gptq-3"][0]["bits"] == 3 and r.pipelines["gptq-3"][0]["group_size"] == 64
    with pytest.raises(ConfigError) as e:
        load_recipe("quant_suit")
    assert "quickstart" in one_line(e) and "quant_suite" in one_line(e)


def test_an_nm_pattern_is_not_read_as_a_base_60_number(tmp_path):
    """PyYAML's YAML 1.1 reads `2:4` as 124; recipes and --set must keep it as the pattern string."""
    import yaml

    from budgetlm.cli import parse_steps
    from budgetlm.utils import yaml_load

    assert yaml.safe_load("2:4") == 124  # the trap
    r = load_recipe(
        write(tmp_path, "models: [tiny-random]\npipelines:\n  w: [{method: wanda, pattern: 2:4}]\ntasks: [t-acc]\n")
    )
    assert r.pipelines["w"][0]["pattern"] == "2:4"
    assert parse_steps(["--method", "wanda", "--set", "pattern=2:4"])[0]["pattern"] == "2:4"
    assert yaml_load("4") == 4 and yaml_load("0.5") == 0.5 and yaml_load("null") is None


def test_lists_of_settings_expand_as_a_product_in_order(tmp_path):
    r = load_recipe(
        write(
            tmp_path,
            """
            models: [tiny-random]
            pipelines:
              q: [{method: fake-quant, bits: [2, 4, 8], group_size: [32, 64], targets: [q_proj, v_proj]}]
              plain: [{method: fake-quant}]
            tasks: [t-acc]
            """,
        )
    )
    expected = [f"q.bits-{b}.group_size-{g}" for b in (2, 4, 8) for g in (32, 64)]
    assert list(r.pipelines) == [BASELINE, *expected, "plain"]
    for name in expected:
        step = r.pipelines[name][0]
        b, g = name.split(".")[1:]
        assert (step["bits"], step["group_size"]) == (int(b[5:]), int(g[11:]))
        assert step["targets"] == ["q_proj", "v_proj"]  # a list-valued setting is a value, not a product
    assert len(plan(r)) == 8 and len({c.id for c in plan(r)}) == 8
    assert load_recipe(write(tmp_path, dump_recipe(r), "again.yaml")) == r  # the expanded recipe round-trips


@pytest.mark.parametrize(
    "pipelines, message",
    [
        ("q: [{method: fake-quant, bits: []}]", "pipelines.q[0].bits: an empty list"),
        ("q: [{method: fake-quant, bits: [4, 8]}]\n  q.bits-4: [{method: fake-quant}]", "names 'q.bits-4' twice"),
        ("q: [{method: fake-quant, bits: [4, x]}]", "bits"),
    ],
)
def test_bad_lists_of_settings_are_one_line(tmp_path, pipelines, message):
    text = f"models: [tiny-random]\npipelines:\n  {pipelines}\ntasks: [t-acc]\n"
    with pytest.raises(ConfigError) as err:
        load_recipe(write(tmp_path, text))
    assert message in str(err.value) and "\n" not in str(err.value)
