"""`budgetlm solve`: the choice against a brute-force reference written here, measured vs projected figures, the
Pareto neighbours, proposals (valid, never in the store), --run on the tiny model, and every bad input."""

from __future__ import annotations

import contextlib
import io
import json
import random

import pytest

from budgetlm import api
from budgetlm.errors import BudgetLMError
from budgetlm.experiments import store as st
from budgetlm.experiments.plan import plan
from budgetlm.experiments.recipe import parse_recipe
from budgetlm.hardware.devices import OVERHEAD_BYTES, load_devices
from budgetlm.methods.base import parse_config
from budgetlm.models.sources import skeleton
from budgetlm.solve.propose import _supported_bits

TASKS = ["text-cloze", "text-ppl"]
PIPELINES = {
    "int8": [{"method": "rtn", "bits": 8}],
    "int4": [{"method": "rtn", "bits": 4, "group_size": 128}],
    "int4.group_size-64": [{"method": "rtn", "bits": 4, "group_size": 64}],
    "int2": [{"method": "rtn", "bits": 2, "group_size": 64}],
    "wanda": [{"method": "wanda", "sparsity": 0.5}],
}
# pipeline: (acc, stored bytes, decode ms/token, peak RSS while benchmarking)
FIGURES = {
    "baseline": (0.80, 2.0e6, 10.0, 300e6),
    "int8": (0.79, 0.6e6, 6.0, 250e6),
    "int4": (0.75, 0.35e6, 5.0, 240e6),
    "int4.group_size-64": (0.76, 0.4e6, 5.2, 241e6),
    "int2": (0.50, 0.2e6, 4.5, 235e6),
    "wanda": (0.70, 1.2e6, 9.0, 290e6),
}
BANDWIDTH = 10.0  # GB/s of this (pretend) host: decode roofline = stored bytes / bandwidth
PARAMS = 5e5
KV_PER_TOKEN = 1024  # tiny-random: 2 layers x (K + V) x 2 KV heads x head dim 32 x 4 bytes
TINY_WINDOW = 1024


def metric(value, stderr=None, n=None, unit="", **extra):
    return {"value": value, "stderr": stderr, "n": n, "unit": unit, "source": "measured", "extra": extra}


def phases(acc, size, decode, rss):
    return {
        "text-cloze": {"acc": metric(acc, 0.02, 100)},
        "text-ppl": {"perplexity": metric(20 / acc, 0.5, 100)},
        "size": {
            "stored_bytes": metric(size, unit="B"),
            "read_bytes_per_token": metric(size, unit="B"),
            "params": metric(PARAMS),
        },
        "speed": {
            "decode_ms_per_token": metric(decode, 0.1, 3, unit="ms/token", dtype="float32"),
            "decode_roofline_ms": metric(size / (BANDWIDTH * 1e9) * 1e3, unit="ms", bandwidth_gb_s=BANDWIDTH),
        },
        "memory": {"peak_rss_benchmark": metric(rss, unit="B")},
    }


def make_study(folder, pipelines=PIPELINES, figures=FIGURES):
    """A study store as `budgetlm run` leaves it (a recipe, its plan, every cell done), with the given figures."""
    rec = parse_recipe({"name": "demo", "models": ["tiny-random"], "tasks": TASKS, "pipelines": pipelines})
    cells = plan(rec)
    with st.Store(folder) as s:
        s.set_meta("plan", [c.id for c in cells])
        s.set_meta("recipe", rec.model_dump(mode="json"))
        for c in cells:
            s.start_cell(c.id, c.model, c.pipeline, c.config)
            s.finish_cell(c.id, phases(*figures[c.pipeline]))
    return folder


@pytest.fixture
def study(tmp_path):
    return make_study(tmp_path / "study")


def snapshot(folder):
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------- the reference


def reference_projection(size, decode, device, context=TINY_WINDOW):
    """decode ms and memory needed on `device`, by the roofline formulas written out again."""
    ratio = decode / (size / (BANDWIDTH * 1e9) * 1e3)
    kv = KV_PER_TOKEN * context
    memory_s = (size + kv) / (device.bandwidth_gb_s.value * 1e9)
    compute_s = 2 * PARAMS / (device.peak_gops["fp32"].value * 1e9)
    return ratio * max(memory_s, compute_s) * 1e3, size + kv + OVERHEAD_BYTES


def reference_choice(figures, max_size=None, max_ms=None, max_rss=None, device=None):
    """The brute force: every cell's figures against every limit, the best accuracy, ties to the smaller size."""
    ok = []
    for name, (acc, size, decode, rss) in figures.items():
        if device is not None:
            decode, rss = reference_projection(size, decode, device)
            if rss > device.memory_gib.value * 2**30:
                continue
        if max_size is not None and size > max_size:
            continue
        if max_ms is not None and decode > max_ms:
            continue
        if max_rss is not None and rss > max_rss:
            continue
        ok.append((-acc, size, name))
    return min(ok)[2] if ok else None


def random_figures(rng, n=10):
    names = ["baseline"] + [f"p{i}" for i in range(n - 1)]
    return {name: (round(rng.uniform(0.3, 0.9), 2), rng.uniform(1e5, 3e6), rng.uniform(1, 20), rng.uniform(1e8, 4e8))
            for name in names}  # fmt: skip


def test_choice_matches_a_brute_force_reference(tmp_path):
    rng = random.Random(7)
    figures = random_figures(rng)
    pipes = {name: [{"method": "rtn", "bits": 8, "group_size": 2 ** (i + 1)}] for i, name in enumerate(figures)}
    pipes.pop("baseline")
    folder = make_study(tmp_path / "s", pipes, figures)
    ids = {
        c.pipeline: c.id for c in plan(parse_recipe({"models": ["tiny-random"], "tasks": TASKS, "pipelines": pipes}))
    }
    checked = none = 0
    for _ in range(100):
        limits = {
            "max_size": rng.choice([None, rng.uniform(1e5, 3e6)]),
            "max_ms": rng.choice([None, rng.uniform(1, 20)]),
            "max_rss": rng.choice([None, rng.uniform(1e8, 4e8)]),
        }
        if not any(v is not None for v in limits.values()):
            continue
        want = reference_choice(figures, **limits)
        try:
            got = api.solve(folder, limits["max_size"], limits["max_ms"], limits["max_rss"])
        except BudgetLMError as exc:
            assert want is None, f"{limits}: {exc}"
            assert "closest" in str(exc)
            none += 1
            continue
        assert got.chosen.cell["pipeline"] == want, limits
        assert got.chosen.cell_id == ids[want] and got.chosen.score == figures[want][0]
        checked += 1
    assert checked > 40 and none > 5  # both outcomes were exercised


def test_projected_choice_matches_the_reference(tmp_path):
    """With --device the decode and memory figures are the roofline projection (written out again here), and a
    cell that does not fit the device's memory fails even when it is the most accurate."""
    rng = random.Random(3)
    figures = random_figures(rng, 6)
    figures["p0"] = (0.99, 9e9, 5.0, 1e8)  # the best score, but 9 GB does not fit an 8 GiB Raspberry Pi
    pipes = {name: [{"method": "rtn", "bits": 8, "group_size": 2 ** (i + 1)}] for i, name in enumerate(figures)}
    pipes.pop("baseline")
    folder = make_study(tmp_path / "s", pipes, figures)
    rpi5 = load_devices()["rpi5"]
    for _ in range(25):
        max_ms = rng.uniform(0.5, 40)
        want = reference_choice(figures, max_ms=max_ms, device=rpi5)
        try:
            got = api.solve(folder, max_ms_per_token=max_ms, device="rpi5")
        except BudgetLMError:
            assert want is None
            continue
        assert got.chosen.cell["pipeline"] == want != "p0"
        dec, needed = reference_projection(*figures[want][1:3], rpi5)
        assert got.chosen.figures["decode_ms_per_token"].value == pytest.approx(dec)
        assert got.chosen.figures["fits"].value == pytest.approx(needed)


def test_measured_and_projected_labels(study, run_main):
    proc = run_main("solve", str(study), "--max-size", "500KB", "--max-ms-per-token", "5.5", "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    chosen = doc["chosen"]
    assert chosen["pipeline"] == "int4.group_size-64" and doc["task_from"] == "the study's first task"
    assert (doc["task"], doc["metric"], doc["higher_is_better"]) == ("text-cloze", "acc", True)
    assert chosen["metric"] == {"name": "acc", "value": 0.76, "stderr": 0.02, "n": 100}
    figs = chosen["figures"]
    assert {k: f["source"] for k, f in figs.items()} == {
        "stored_bytes": "measured",
        "decode_ms_per_token": "measured",
        "peak_rss": "measured",
    }
    assert figs["stored_bytes"]["value"] == 0.4e6 and figs["stored_bytes"]["limit"] == 500e3
    assert figs["peak_rss"]["limit"] is None and figs["peak_rss"]["ok"]
    assert [c["flag"] for c in doc["constraints"]] == ["--max-size", "--max-ms-per-token"]
    assert doc["evaluated"] == 6 and doc["meeting"] == 3

    proc = run_main("solve", str(study), "--max-ms-per-token", "20", "--device", "rpi4", "--max-rss", "2GB", "--json")
    doc = json.loads(proc.stdout)
    figs = doc["chosen"]["figures"]
    assert {k: f["source"] for k, f in figs.items()} == {
        "stored_bytes": "measured",  # the same bytes on any device
        "decode_ms_per_token": "projected",
        "fits": "projected",
        "peak_rss": "projected",
    }
    assert figs["decode_ms_per_token"]["projection"]["device"] == "rpi4"
    assert figs["fits"]["projection"]["context"] == TINY_WINDOW
    assert figs["fits"]["limit"] == 8 * 2**30 and figs["peak_rss"]["limit"] == 2e9

    text = run_main("solve", str(study), "--max-ms-per-token", "20", "--device", "rpi4").stdout
    assert "decode on rpi4" in text and "(projected)" in text and "projected for rpi4 at 1,024 tokens" in text
    assert "(measured)" in text  # the stored size
    measured = run_main("solve", str(study), "--max-size", "1MB").stdout
    assert "decode 6 ms/token (measured)" in measured and "(projected)" not in measured


def test_the_task_and_its_direction(study):
    # perplexity: lower is better; int8 has the lowest perplexity (20 / 0.79) within 1 MB
    got = api.solve(study, max_size="1MB", task="text-ppl")
    assert (got.metric, got.higher, got.task_from) == ("perplexity", False, "--task")
    assert got.chosen.cell["pipeline"] == "int8"


def brute_front(points):
    """Names on the front of (cost, score) points, higher score better, by increasing cost."""
    front = [
        a for a, (x, y) in points.items()
        if not any((x2 <= x and y2 >= y) and (x2 < x or y2 > y) for b, (x2, y2) in points.items() if b != a)
    ]  # fmt: skip
    return sorted(front, key=lambda n: points[n][0])


def test_pareto_neighbours(study):
    got = api.solve(study, max_size="500KB", max_ms_per_token=5.5)
    assert got.chosen.cell["pipeline"] == "int4.group_size-64"
    found = {(front, side): c.cell["pipeline"] for front, side, c in got.neighbours}
    for front, axis in (("size", 1), ("speed", 2)):
        line = brute_front({n: (f[axis], f[0]) for n, f in FIGURES.items()})
        k = line.index("int4.group_size-64")
        assert found[(front, "cheaper")] == line[k - 1] and found[(front, "costlier")] == line[k + 1]
    assert found == {("size", "cheaper"): "int4", ("size", "costlier"): "int8",
                     ("speed", "cheaper"): "int4", ("speed", "costlier"): "int8"}  # fmt: skip
    # the most accurate cell is at the top of both fronts: only cheaper neighbours
    top = api.solve(study, max_size="10MB")
    assert top.chosen.cell["pipeline"] == "baseline"
    assert {(f, s) for f, s, _ in top.neighbours} == {("size", "cheaper"), ("speed", "cheaper")}


def test_proposals_are_new_valid_and_distinct(study):
    got = api.solve(study, max_size="500KB", max_ms_per_token=5.5)
    names = [p.name for p in got.proposals]
    assert names == [
        "int4.group_size-64.bits-3",
        "int4.group_size-64.bits-8",
        "int4.group_size-32",  # its own group_size-64 label replaced
        "int4.bits-3",
        "int4.bits-8",  # int4's group size 64 is in the store, 256 does not divide tiny-random's 128-wide inputs
        "int8.bits-4",
    ]
    with st.Store.open(study) as s:
        stored = [c["config"]["steps"] for c in s.cells()]
        pipelines = {c["pipeline"] for c in s.cells()}
    model = skeleton("tiny-random")
    seen = set()
    for p in got.proposals:
        assert p.steps not in stored and p.name not in pipelines
        key = json.dumps(p.steps, sort_keys=True)
        assert key not in seen
        seen.add(key)
        for step in p.steps:
            parse_config(step["method"], {k: v for k, v in step.items() if k != "method"}).check(model)
    assert got.proposals[0].change() == "step 1 rtn: bits 4 -> 3"


def test_proposal_rules():
    assert _supported_bits(4) == [3, 8] and _supported_bits(2) == [3] and _supported_bits(8) == [4]
    assert _supported_bits(5) == [] and _supported_bits(None) == []


def test_proposals_for_pruning_and_adapters(tmp_path):
    pipes = {"wanda": [{"method": "wanda", "sparsity": 0.5}], "lora": [{"method": "lora", "r": 8}]}
    figures = {"baseline": (0.6, 2e6, 10, 3e8), "wanda": (0.7, 1e6, 9, 2.9e8), "lora": (0.85, 2.1e6, 11, 3.1e8)}
    folder = make_study(tmp_path / "s", pipes, figures)
    got = api.solve(folder, max_size="1.5MB")
    assert got.chosen.cell["pipeline"] == "wanda"
    changes = {(p.name, p.setting, p.after) for p in got.proposals}
    assert ("wanda.sparsity-0.4", "sparsity", 0.4) in changes and ("wanda.sparsity-0.6", "sparsity", 0.6) in changes
    assert ("lora.r-4", "r", 4) in changes and ("lora.r-16", "r", 16) in changes  # lora: the costlier neighbour


# ---------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "args, needle",
    [
        (["{nostudy}", "--max-size", "1MB"], "no results.sqlite"),
        (["{study}", "--max-size", "1MB", "--task", "text-clozz"], "did you mean: text-cloze"),
        (["{study}", "--max-size", "1MB", "--device", "rpi6"], "unknown device 'rpi6' (did you mean: rpi5"),
        (["{study}", "--max-size", "1MB", "--device", "rpi4,rpi5"], "give one device"),
        (["{study}", "--max-size", "100"], "--max-size '100' has no unit"),
        (["{study}", "--max-size", "1XB"], "unknown unit 'XB'"),
        (["{study}", "--max-size", "lots"], "--max-size 'lots' is not a size"),
        (["{study}", "--max-size", "0MB"], "must be a positive size"),
        (["{study}", "--max-rss", "-1GB"], "--max-rss '-1GB' is not a size"),
        (["{study}", "--max-ms-per-token", "fast"], "--max-ms-per-token 'fast' is not a time"),
        (["{study}", "--max-ms-per-token", "0"], "must be a positive time"),
        (["{study}"], "give a budget"),
        (["{study}", "--max-size", "1MB", "--context", "64"], "--context applies to a projection"),
        (["{study}", "--device", "rpi5", "--context", "0"], "--context must be a positive"),
        (["{study}", "--max-size", "100KB"], "closest: int2 (tiny-random)"),
        (
            ["{study}", "--max-size", "100KB", "--max-rss", "200MB"],
            "235.0 MB (measured) is 35.0 MB (18%) over --max-rss",
        ),
        (["{study}", "--max-ms-per-token", "1", "--device", "rpi5"], "(projected) is"),
        (["{study}", "--max-size", "1MB", "--task", "nope"], "its tasks: text-cloze, text-ppl"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(study, tmp_path, run_main, args, needle):
    (tmp_path / "empty").mkdir()
    before = snapshot(tmp_path)
    proc = run_main("solve", *(a.format(study=study, nostudy=tmp_path / "empty") for a in args))
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and needle in lines[0], proc.stderr
    assert proc.stdout == "" and snapshot(tmp_path) == before


def test_no_cell_meets_names_the_closest_and_by_how_much(study):
    with pytest.raises(BudgetLMError) as e:
        api.solve(study, max_size="300KB", max_ms_per_token=4.4)
    # int2 (200 KB, 4.5 ms) is 2% over one limit; int4 (350 KB, 5.0 ms) 17% and 14% over both
    assert str(e.value) == (
        f"no evaluated cell of {study} meets --max-size 300.0 KB, --max-ms-per-token 4.4 ms/token (6 evaluated); "
        "closest: int2 (tiny-random), cell " + _id(study, "int2") + ": decode 4.5 ms/token (measured) is 0.1 ms/token "
        "(2%) over --max-ms-per-token 4.4 ms/token; relax the limits or run smaller or faster pipelines"
    )
    with pytest.raises(BudgetLMError, match=r"over the memory of rpi4 \(8.6 GB\)"):
        api.solve(make_study(study.parent / "big", figures={**FIGURES, **{p: (0.5, 9e9, 1, 1) for p in FIGURES}}),
                  device="rpi4")  # fmt: skip


def _id(folder, pipeline):
    with st.Store.open(folder) as s:
        return next(c["cell_id"] for c in s.cells() if c["pipeline"] == pipeline)


def test_a_store_of_another_budgetlm_is_refused(study, tmp_path, run_main):
    with st.Store(study) as s:
        s.set_meta("schema", st.SCHEMA_VERSION + 1)
        s.set_meta("budgetlm", "9.0.0")
    before = snapshot(study)
    proc = run_main("solve", str(study), "--max-size", "1MB")
    assert proc.returncode == 2 and proc.stdout == "" and snapshot(study) == before
    assert proc.stderr.strip().endswith(
        f"was written by an incompatible budgetlm (9.0.0: store layout {st.SCHEMA_VERSION + 1}; budgetlm 0.1.0 reads "
        f"store layout {st.SCHEMA_VERSION}); read it with the budgetlm that wrote it, or rerun the study into a new "
        "folder"
    )


def test_run_refuses_a_study_planned_by_another_budgetlm(study, run_main, monkeypatch):
    """Cell ids hash the budgetlm version: a study planned by another one would be run again whole."""
    with st.Store(study) as s:
        s.set_meta("plan", ["0123456789ab"] * len(s.get_meta("plan")))
    before = snapshot(study)
    proc = run_main("solve", str(study), "--max-size", "1MB", "--run")
    assert proc.returncode == 2 and proc.stdout == "" and snapshot(study) == before
    assert "were planned by another budgetlm" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------------------- --run


def test_run_evaluates_the_proposals_as_new_cells_of_the_study(tmp_path, monkeypatch, run_main):
    """A real study on tiny-random (cells in this process), then `solve --run`: the proposals become cells of the
    same store, the finished cells are not run again, and the next solve proposes none of them again."""
    from budgetlm.experiments import runners
    from budgetlm.experiments.cell import run_cell
    from budgetlm.results import Metric

    monkeypatch.setattr("budgetlm.hardware.bench.memory_bandwidth", lambda: Metric(10.0, unit="GB/s"))
    ran = []

    def in_process(folder, on_status):
        ran.append(json.loads((folder / "config.json").read_text())["pipeline"])
        with contextlib.redirect_stdout(io.StringIO()):  # its status lines, which a cell process writes to its log
            run_cell(folder)

    monkeypatch.setattr(runners, "subprocess_runner", in_process)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "name: tiny\nmodels: [tiny-random]\npipelines: {int4: [{method: rtn, bits: 4, group_size: 64}]}\n"
        "tasks: [text-cloze]\nlimit: 4\nbench: {prefill: [16], decode_tokens: 4, repeats: 1, warmup: 0}\n"
    )
    out = api.run(recipe, tmp_path / "s")
    assert ran == ["baseline", "int4"]
    with st.Store.open(out) as s:
        sizes = {c["pipeline"]: st.value(st.by_cell(s.rows()).get(c["cell_id"], {}), "size", "stored_bytes")
                 for c in s.cells()}  # fmt: skip
    limit = f"{(sizes['int4'] + sizes['baseline']) / 2:.0f}B"  # only int4 fits
    first = api.solve(out, max_size=limit)
    assert first.chosen.cell["pipeline"] == "int4"
    names = [p.name for p in first.proposals]
    assert names == ["int4.bits-3", "int4.bits-8", "int4.group_size-32", "int4.group_size-128"]

    proc = run_main("solve", str(out), "--max-size", limit, "--run", "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["ran"] == names and ran == ["baseline", "int4", *names]  # the finished cells did not run again
    derived = (out / "recipe.solve.yaml").read_text()
    assert all(n in derived for n in names)
    with st.Store.open(out) as s:
        done = {c["pipeline"] for c in s.cells() if c["status"] == "done"}
        assert set(s.get_meta("plan")) == {c.id for c in plan(parse_recipe(s.get_meta("recipe")))}
    assert done == {"baseline", "int4", *names}
    assert not {p["name"] for p in doc["proposals"]} & done
    assert doc["chosen"]["figures"]["stored_bytes"]["value"] <= float(limit[:-1])
    again = api.solve(out, max_size=limit)
    assert not {p.name for p in again.proposals} & set(names)
