"""What budgetlm may do to an output path: never delete or overwrite what it did not write; replace its own output
of the same kind only when asked (--force); move anything else aside, whole; and leave nothing behind when a command
fails. The refusals themselves are cases of the bad-input corpus (test_bad_inputs.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from budgetlm.errors import ConfigError
from budgetlm.utils import atomic_dir, atomic_file, check_output, move_aside


@pytest.fixture
def run(run_main):
    """(exit code, stdout, stderr) of `budgetlm ARGS` in this process."""

    def call(*args: str) -> tuple[int, str, str]:
        proc = run_main(*args)
        return proc.returncode, proc.stdout, proc.stderr

    return call


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def here(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BUDGETLM_CACHE", str(tmp_path / ".cache"))
    return tmp_path


# ------------------------------------------------------------------------------------------- the rules


def test_check_output_decides_before_any_work(here):
    (here / "empty").mkdir()
    (here / "mine").mkdir()
    (here / "mine" / "a.txt").write_text("x")
    (here / "ours").mkdir()
    (here / "ours" / "eval.json").write_text("{}")
    assert check_output(here / "new" / "deeper", "x", marker="eval.json") is False
    assert not (here / "new").exists()  # checking creates nothing
    assert check_output(here / "empty", "x", marker="eval.json") is False
    assert check_output(here / "ours", "x", marker="eval.json", force=True) is True
    assert check_output(here / "ours", "x", marker="eval.json", resume=True) is True
    with pytest.raises(ConfigError, match="already holds x from an earlier run; pass --force"):
        check_output(here / "ours", "x", marker="eval.json")
    with pytest.raises(ConfigError, match="holds files budgetlm did not write"):
        check_output(here / "mine", "x", marker="eval.json")
    assert check_output(here / "mine", "x", marker="eval.json", force=True) is False  # to be moved aside
    assert check_output(here / "mine" / "a.txt", "x", marker=lambda p: False, folder=False, force=True) is False
    with pytest.raises(ConfigError, match="is a folder"):
        check_output(here / "mine", "x", marker=lambda p: False, folder=False)
    for bad in (here, here.parent, Path("."), Path.home()):
        with pytest.raises(ConfigError, match="is the current folder or holds it"):
            check_output(bad, "x", marker="eval.json", force=True)
    assert sorted(p.name for p in here.iterdir()) == ["empty", "mine", "ours"]


def test_atomic_dir_replaces_only_its_own_kind(here):
    ours = here / "ours"
    ours.mkdir()
    (ours / "eval.json").write_text("old")
    (ours / "stale.txt").write_text("old")
    with atomic_dir(ours, marker="eval.json") as tmp:
        (tmp / "eval.json").write_text("new")
    assert tree(ours) == {"eval.json": b"new"}  # swapped whole: nothing of the old output left
    mine = here / "mine"
    mine.mkdir()
    (mine / "a.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="budgetlm did not write it; not replaced"):
        with atomic_dir(mine, marker="eval.json") as tmp:
            (tmp / "eval.json").write_text("new")
    assert tree(mine) == {"a.txt": b"keep me"}
    with atomic_dir(mine, marker="eval.json", aside=True) as tmp:
        (tmp / "eval.json").write_text("new")
    assert tree(mine) == {"eval.json": b"new"}
    (aside,) = here.glob("mine.old-*")
    assert tree(aside) == {"a.txt": b"keep me"}
    assert not list(here.glob(".*"))  # no temporary folder left


def test_a_failed_write_leaves_the_old_output_and_no_temporary(here):
    ours = here / "ours"
    ours.mkdir()
    (ours / "eval.json").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(ours, marker="eval.json") as tmp:
            (tmp / "eval.json").write_text("half")
            raise RuntimeError("killed")
    with pytest.raises(RuntimeError):
        with atomic_file(here / "f.gguf") as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert tree(here) == {"ours/eval.json": b"old"}


def test_move_aside_never_overwrites_an_earlier_aside(here):
    for text in ("one", "two", "three"):
        (here / "f").write_text(text)
        move_aside(here / "f")
    kept = sorted(p.read_text() for p in here.glob("f.old-*"))
    assert kept == ["one", "three", "two"]


# ------------------------------------------------------------------------------------------- through the CLI


def test_compress_force_replaces_its_model_and_moves_user_files_aside(here, run):
    code, _, err = run("compress", "tiny-random", "--method", "rtn", "--out", "q")
    assert code == 0, err
    first = tree(here / "q")
    code, _, err = run("compress", "tiny-random", "--method", "rtn", "--set", "bits=4", "--out", "q", "--force")
    assert code == 0, err
    manifest = json.loads((here / "q" / "budgetlm.json").read_text())
    assert {m["bits"] for m in manifest["modules"].values()} == {4}
    assert tree(here / "q") != first and not list(here.glob("q.old-*"))  # its own output: replaced, not kept
    (here / "mine").mkdir()
    (here / "mine" / "notes.txt").write_text("a user's notes")
    code, _, err = run("compress", "tiny-random", "--method", "rtn", "--out", "mine", "--force")
    assert code == 0, err
    (aside,) = here.glob("mine.old-*")
    assert tree(aside) == {"notes.txt": b"a user's notes"}
    assert "moved the existing mine aside to" in err
    assert (here / "mine" / "budgetlm.json").is_file()


def test_compress_with_an_impossible_gguf_writes_nothing(here, run):
    code, _, err = run("compress", "tiny-random", "--method", "rtn", "--out", "q", "--gguf", "Q4_0")
    assert code == 2 and "Q4_0" in err and len(err.strip().splitlines()) == 1
    assert tree(here) == {}
    code, _, err = run("compress", "tiny-random", "--method", "rtn", "--out", "q", "--gguf", "Q8_0")
    assert code == 0, err
    assert sorted(tree(here)) == sorted([*(f"q/{f}" for f in tree(here / "q")), "q.Q8_0.gguf"])


def test_export_knows_its_own_files(here, run):
    from budgetlm.export.gguf import is_budgetlm_gguf

    code, _, err = run("export", "tiny-random", "--gguf", "F16", "--out", "m.gguf")
    assert code == 0, err
    assert is_budgetlm_gguf(here / "m.gguf")
    code, _, err = run("export", "tiny-random", "--gguf", "Q8_0", "--out", "m.gguf", "--force")
    assert code == 0, err
    assert not list(here.glob("m.gguf.old-*"))  # an earlier export is replaced
    (here / "user.gguf").write_bytes(b"GGUF but not budgetlm's")
    assert not is_budgetlm_gguf(here / "user.gguf")
    code, _, err = run("export", "tiny-random", "--gguf", "Q8_0", "--out", "user.gguf", "--force")
    assert code == 0, err
    (aside,) = here.glob("user.gguf.old-*")
    assert aside.read_bytes() == b"GGUF but not budgetlm's"


def test_eval_out_is_written_whole_and_replaced_only_with_force(here, run):
    args = ("eval", "tiny-random", "--tasks", "text-cloze", "--limit", "4", "--out", "ev", "--json")
    code, out, err = run(*args)
    assert code == 0, err
    assert sorted(tree(here / "ev")) == ["eval.json", "items/text-cloze.jsonl"]
    assert (
        json.loads(out)["text-cloze"]["acc"]
        == json.loads((here / "ev" / "eval.json").read_text())["text-cloze"]["acc"]["value"]
    )
    code, _, err = run(*args)
    assert code == 2 and "--force" in err
    code, _, err = run(*args, "--force")
    assert code == 0, err
    assert sorted(p.name for p in here.iterdir() if p.name != ".cache") == ["ev"]


def test_run_force_starts_afresh_and_keeps_the_old_study(here, run):
    (here / "r.yaml").write_text("models: [tiny-random]\ntasks: [text-cloze]\nlimit: 2\nbench: {enabled: false}\n")
    code, _, err = run("run", "r.yaml", "--out", "s")
    assert code == 0, err
    code, _, err = run("run", "r.yaml", "--out", "s")  # an existing study is resumed: nothing to do
    assert code == 0, err
    assert not list(here.glob("s.old-*"))
    code, _, err = run("run", "r.yaml", "--out", "s", "--force")
    assert code == 0, err
    (old,) = here.glob("s.old-*")
    assert (old / "results.sqlite").is_file() and (here / "s" / "results.sqlite").is_file()


def test_version_and_help(run):
    from importlib.metadata import version

    code, out, _ = run("--version")
    assert code == 0 and out.strip() == f"budgetlm {version('budgetlm')}"
    code, out, _ = run("compress", "--help")
    assert code == 0
    assert "--method NAME" in out and "--set key=value" in out
    assert "--force " in out and "<bool>" not in out  # flags are shown without a value
    code, out, _ = run("train", "--help")
    assert "--method NAME" in out and "--set key=value" in out and "--resume " in out and "<bool>" not in out


def test_skeleton_has_the_models_modules_without_weights():
    from budgetlm.models.sources import load, skeleton

    real = {n: tuple(p.shape) for n, p in load("tiny-random").model.named_parameters()}
    meta = skeleton("tiny-random")
    assert {n: tuple(p.shape) for n, p in meta.named_parameters()} == real
    assert all(p.device.type == "meta" for p in meta.parameters())
    assert skeleton(os.devnull) is None
