"""sciq-rag and boolq-rag (rag/tasks.py): the prompts are sciq's and boolq's with the passage replaced (the oracle
passage gives exactly sciq's / boolq's requests), settings in the task name, disjoint calibration and evaluation
folds, gates deterministic and applied as calibrated; and `budgetlm rag index` / `rag ask` end to end."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from budgetlm.data.tasks import tasks
from budgetlm.data.tasks.base import TaskContext
from budgetlm.errors import ConfigError, UnknownNameError
from budgetlm.rag.tasks import in_calibration

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SUPPORT = [
    "Darwin proposed the theory of evolution by natural selection.",
    "Water boils at 100 degrees Celsius at sea level.",
    "",
    "Mitochondria make most of the cell's ATP. They are the powerhouse of the cell.",
    "Plants make sugar from light, water and carbon dioxide.",
    "The sun is a star.",
    "Sound travels faster in water than in air.",
    "Magnets attract iron.",
]
QUESTIONS = [
    ("Who proposed natural selection?", "darwin"),
    ("At what temperature does water boil?", "100 degrees"),
    ("What is the chemical symbol of gold?", "Au"),
    ("What makes ATP?", "mitochondria"),
    ("What do plants make from light?", "sugar"),
    ("What is the sun?", "a star"),
    ("Where does sound travel faster?", "water"),
    ("What do magnets attract?", "iron"),
]


@pytest.fixture()
def data(tmp_path, monkeypatch):
    monkeypatch.setenv("BUDGETLM_CACHE", str(tmp_path / "cache"))
    (tmp_path / "data" / "sciq").mkdir(parents=True)
    (tmp_path / "data" / "boolq").mkdir(parents=True)
    rows = [
        {"question": q, "distractor1": "x", "distractor2": "y", "distractor3": "z", "correct_answer": a, "support": s}
        for (q, a), s in zip(QUESTIONS, SUPPORT)
    ]
    (tmp_path / "data" / "sciq" / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    brows = [
        {"question": q.lower().rstrip("?"), "passage": s or "Gold is Au.", "label": i % 2, "idx": i}
        for i, ((q, _), s) in enumerate(zip(QUESTIONS, SUPPORT))
    ]
    (tmp_path / "data" / "boolq" / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in brows))
    return tmp_path / "data"


class Recorder:
    """An LM that records the loglikelihood requests it gets (and scores the shorter continuation higher)."""

    max_length = 2048

    def __init__(self):
        self.requests = []

    def loglikelihood(self, reqs):
        self.requests.extend(r for r in reqs if "warm-up" not in r[0])
        return [(-float(len(c)), False) for _, c in reqs]

    query_loglikelihood = loglikelihood  # the RAG tasks score one query at a time

    def query_reset(self):
        pass

    def encode(self, text):
        return list(text.encode())


@pytest.mark.parametrize("base", ["sciq", "boolq"])
def test_oracle_asks_what_the_original_task_asks(base, data):
    ctx = TaskContext(data_dir=data)
    rag = tasks.get(f"{base}-rag:gate=oracle")
    items = rag.load(ctx).items
    original, with_oracle = Recorder(), Recorder()
    want = tasks.get(base).run(original, items, ctx)
    got = rag.run(with_oracle, items, ctx)
    assert with_oracle.requests == original.requests and original.requests
    assert [r["acc"] for r in got.records] == [r["acc"] for r in want.records]
    assert got.metrics["acc"].extra["rag"] == "gate=oracle" and got.metrics["acc"].extra["index"] == "none"
    never, none = tasks.get(f"{base}-rag:gate=never"), Recorder()
    never.run(none, items, ctx)
    key = "support" if base == "sciq" else "passage"
    assert none.requests == [r for it in items for r in tasks.get(base).requests({**it.doc, key: ""})]
    assert none.requests[0][0].startswith("\nQuestion: ")


def test_settings_are_named_canonically_and_checked():
    assert tasks.get("sciq-rag").name == "sciq-rag"
    assert tasks.get("sciq-rag:budget=64:gate=grad").name == "sciq-rag:gate=grad:k=3:budget=64"
    assert tasks.get("boolq-rag:k=5").name == "boolq-rag:gate=always:k=5"
    assert tasks.get("sciq-rag:gate=never:k=5").name == "sciq-rag:gate=never"
    assert tasks.get("sciq-rag:gate=margin:threshold=0.05").name == "sciq-rag:gate=margin:k=3:threshold=0.05"
    with pytest.raises(UnknownNameError, match="'gat=grad' is not an option"):
        tasks.get("sciq-rag:gat=grad")
    with pytest.raises(ConfigError, match="unknown gate 'grd'"):
        tasks.get("sciq-rag:gate=grd")
    with pytest.raises(ConfigError, match="whole numbers"):
        tasks.get("sciq-rag:k=three")
    with pytest.raises(ConfigError, match="at least 1 passage"):
        tasks.get("sciq-rag:k=0")
    assert "sciq-rag:gate=entropy" in tasks and "sciq-rag:gate=entropi" not in tasks


def test_calibration_and_evaluation_folds_are_disjoint_and_cover_the_split():
    items = tasks.get("sciq").load(TaskContext()).items
    cal = [it.id for it in items if in_calibration("sciq", it.doc)]
    rag_items = tasks.get("sciq-rag").load(TaskContext()).items
    assert set(cal).isdisjoint(it.id for it in rag_items)
    assert len(cal) + len(rag_items) == len(items) == 1000
    assert 250 < len(cal) < 350  # 30% by hash
    assert [it.id for it in rag_items] == [it.id for it in items if it.id not in set(cal)]  # the split's order


def test_gates_run_as_calibrated_and_deterministic(data):
    from budgetlm.models.lm import HFLM
    from budgetlm.models.sources import tiny_random

    lm = HFLM(tiny_random())
    ctx = TaskContext(data_dir=data, seed=0)
    for gate in ("grad", "entropy", "margin"):
        task = tasks.get(f"sciq-rag:gate={gate}:k=2:budget=48")
        items = task.load(ctx).items
        first = task.run(lm, items, ctx)
        again = tasks.get(f"sciq-rag:gate={gate}:k=2:budget=48").run(lm, items, ctx)
        cal = first.metrics["acc"].extra["calibration"]
        assert cal == {**again.metrics["acc"].extra["calibration"], "seconds": cal["seconds"]}
        t = cal["threshold"]
        assert first.metrics["acc"].extra["rag"].startswith(f"gate={gate}:k=2:threshold=")
        for a, b in zip(first.records, again.records):
            assert (a["gate_score"], a["retrieved"], a["loglikelihoods"]) == (
                b["gate_score"],
                b["retrieved"],
                b["loglikelihoods"],
            )
            assert a["retrieved"] == float(a["gate_score"] >= t)
            assert len(a["passages"]) == (2 if a["retrieved"] else 0)
            assert math.isfinite(a["gate_score"]) and a["latency_s"] > 0
    always = tasks.get("sciq-rag:k=2:budget=48").run(lm, items, ctx)
    assert all(r["retrieved"] == 1.0 for r in always.records)
    assert all(r["prompt_tokens"] <= 48 + len(lm.encode(f"\nQuestion: {r['id']}")) + 200 for r in always.records)


class NoTorchModel:
    """An LM computed outside torch (as LlamaCppLM: `model` is None), answering single queries itself through the
    query hooks; it wraps tiny-random's HFLM for the numbers."""

    runtime = "llama.cpp"
    model = None

    def __init__(self, inner):
        self.inner, self.max_length, self.prefix_token = inner, inner.max_length, inner.prefix_token
        self.encode, self.fit_requests = inner.encode, inner.fit_requests

    def query_loglikelihood(self, reqs):
        return self.inner.loglikelihood(reqs)

    loglikelihood = query_loglikelihood

    def next_token_logprobs(self, prompt):
        from budgetlm.decode import query

        return query.next_token_logprobs(self.inner, prompt)

    def query_reset(self):
        pass


def test_gates_on_an_lm_without_a_torch_model(data):
    """entropy and margin need no gradient: they calibrate and run (the evidence has no grad score); grad is refused
    in one line, before any work."""
    from budgetlm.models.lm import HFLM
    from budgetlm.models.sources import tiny_random

    ctx = TaskContext(data_dir=data, seed=0)
    lm = NoTorchModel(HFLM(tiny_random()))
    for gate in ("entropy", "margin"):
        task = tasks.get(f"sciq-rag:gate={gate}:k=2")
        res = task.run(lm, task.load(ctx).items, ctx)
        assert res.metrics["acc"].extra["calibration"]["n"] > 0
    for name in ("sciq-rag:gate=grad", "sciq-rag:gate=grad:threshold=1"):
        task = tasks.get(name)
        with pytest.raises(ConfigError, match="^gate 'grad' needs the torch model's input-embedding gradient, which "
                           "the llama.cpp runtime does not give: use gate=entropy or gate=margin there$"):  # fmt: skip
            task.run(lm, task.load(ctx).items, ctx)


def cli(*args, env=None, timeout=600):
    return subprocess.run(
        [sys.executable, "-m", "budgetlm.cli", *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def test_rag_index_and_ask_end_to_end(tmp_path):
    env = {**os.environ, "BUDGETLM_CACHE": str(tmp_path / "cache")}
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("\n\n".join(SUPPORT))
    (docs / "b.txt").write_bytes(b"\xff\xfe not utf-8")
    out = cli("rag", "index", str(docs), "--out", str(tmp_path / "idx"), "--chunk-tokens", "32", "--bm25", env=env)
    assert out.returncode == 0, out.stderr
    assert "7 chunks" in out.stdout and "1 files skipped (not UTF-8)" in out.stdout
    assert f"skipped 1 files that are not UTF-8 text: {docs / 'b.txt'}" in out.stderr
    manifest = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    assert manifest["skipped_not_utf8"] == 1 and manifest["kind"].startswith("dense + bm25")
    args = ("rag", "ask", str(tmp_path / "idx"), "tiny-random", "At what temperature does water boil?")
    res = cli(*args, "--k", "2", "--budget", "40", "--max-new-tokens", "4", "--json", env=env)
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout)
    assert got["retrieved"] and got["passages"][0]["text"] == SUPPORT[1]
    assert got["setting"] == "gate=always:k=2:budget=40"
    assert set(got["seconds"]) == {"retrieve_s", "gate_s", "compress_s", "generate_s", "total_s"}
    never = json.loads(cli(*args, "--gate", "entropy", "--threshold", "1e9", "--json", env=env).stdout)
    assert not never["retrieved"] and never["context"] == "" and never["score"] > 0


def test_rag_tasks_run_after_the_others_and_report_in_the_order_asked(data, monkeypatch):
    """The decode runtime a RAG task builds may switch quantised layers' kernels for the process: the tasks scored by
    the batched pass run first, whatever the order asked, and the results keep the order asked."""
    from budgetlm.data.tasks.base import MultipleChoiceTask
    from budgetlm.evaluation.harness import evaluate
    from budgetlm.models.sources import tiny_random
    from budgetlm.rag.tasks import RagTask

    ran = []
    for cls in (MultipleChoiceTask, RagTask):
        real = cls.run
        monkeypatch.setattr(
            cls, "run", lambda self, *a, _real=real, **k: (ran.append(self.name), _real(self, *a, **k))[1]
        )
    asked = ["sciq-rag:gate=never", "sciq", "boolq-rag:gate=always:k=1", "boolq"]
    res = evaluate(tiny_random(), asked, data_dir=data)
    assert ran == ["sciq", "boolq", "sciq-rag:gate=never", "boolq-rag:gate=always:k=1"]
    assert list(res) == asked
