"""The teacher of a distillation step: loading it, checking it speaks the student's tokens, and caching its
top-k next-token distributions on disk.

Teacher. A model spec (a bundled name, a model folder, a GGUF file, `tiny-random`) loaded with
models.sources.load (the loader budgetlm.api.load calls), in eval mode, every parameter frozen; by default the
student's base model (handle.base_id), i.e. the model as it was loaded before any compression step. Distillation
compares the two models position by position over the same token ids, so the teacher must tokenise exactly as the
student does: same vocabulary (token -> id), same ids for a probe text (normalisation and pre-tokenisation rules),
and the same number of output logits. Anything else is a one-line ConfigError raised before the student changes.

Top-k cache (`cache_topk: k`), for when teacher and student do not fit in memory together *while training*:
the teacher runs once, in inference mode (no activations kept, no gradients, no optimizer state), over the
examples the run will consume (train.data.DataOrder's first steps × batch_size × grad_accum positions, the
exact order fit() draws), and for every supervised position stores what text-ppl's reference stores
(data/tasks/offline.topk_reference): the teacher's top-k token ids (int32), their log-probabilities at the
step's temperature T, log softmax(z_t / T) (fp16: log-probs are the logits shifted by their log-normaliser, so
they carry the logits' information and fit fp16's range), and the log of the tail mass outside the top k
(fp32; -inf when k is the vocabulary size). The file is safetensors, written atomically, named by a hash of
(the teacher's identity, k, T, the examples' token ids and label masks, the format), so a changed teacher file,
temperature or data set is a different cache. The teacher is then freed and the student trains against the
cache alone; a later run with the same key never loads the teacher at all (its tokenizer's fingerprint, kept
in the cache's metadata, is what the student is checked against). The peak is max(student + teacher at
inference, student training) instead of their sum. The loss on the cache is the KL over the teacher's top-k
support plus one tail bucket (see kd.coarse_kl).

Teacher identity: for a file or folder, its resolved path and the size and mtime of its weight and config
files; for a bundled name or tiny-random, the name (and seed).
"""

from __future__ import annotations

import gc
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from budgetlm.data.tasks.offline import topk_reference
from budgetlm.errors import ConfigError, DataError
from budgetlm.models.handle import ModelHandle
from budgetlm.train.data import IGNORE, Example, collate
from budgetlm.utils import atomic_file

CACHE_FORMAT = "budgetlm.kd.topk/1"
PROBE = "Distil the teacher: 12 + 30 = 42.\n  Ünïcödé naïve café, 東京 — def f(x): return x ** 2  # ok!"
_TINY_SEED = re.compile(r"tiny-random \(seed (\d+)\)")


# --- loading and checking ------------------------------------------------------------------------------------
def load_teacher(spec: str) -> ModelHandle:
    """The teacher named by `spec`, in eval mode with every parameter frozen. tiny-random's derived name
    'tiny-random (seed N)' loads that seed. Loading leaves the global random generators as they were."""
    from budgetlm.models.sources import load
    from budgetlm.train.loop import rng_isolated

    m = _TINY_SEED.fullmatch(spec)
    with rng_isolated():  # tiny-random seeds torch's global generator while it builds
        teacher = load("tiny-random", seed=int(m[1])) if m else load(spec)
    return frozen(teacher)


def frozen(teacher: ModelHandle) -> ModelHandle:
    """The teacher in eval mode with every parameter frozen (in place)."""
    teacher.model.eval()
    teacher.model.requires_grad_(False)
    return teacher


def output_width(model: torch.nn.Module) -> int:
    """The number of logits the model produces per position."""
    head = model.get_output_embeddings()
    width = getattr(head, "out_features", None)
    return int(width if width is not None else head.weight.shape[0])


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of the vocabulary (token -> id) and of the ids of a probe text."""
    vocab = sorted(tokenizer.get_vocab().items())
    probe = tokenizer(PROBE, add_special_tokens=False)["input_ids"]
    return hashlib.sha256(json.dumps([vocab, probe]).encode()).hexdigest()[:16]


def tokenizer_difference(student_tok, teacher_tok) -> str | None:
    """Why the two tokenizers differ (vocabulary or probe-text ids), or None when they agree."""
    sv, tv = student_tok.get_vocab(), teacher_tok.get_vocab()
    if len(sv) != len(tv):
        return f"a vocabulary of {len(tv)} tokens, the student's has {len(sv)}"
    if sv != tv:
        moved = sum(1 for tok, i in tv.items() if sv.get(tok) != i)
        return f"{moved} of its {len(tv)} tokens have other ids than in the student's vocabulary"
    sp = student_tok(PROBE, add_special_tokens=False)["input_ids"]
    tp = teacher_tok(PROBE, add_special_tokens=False)["input_ids"]
    if sp != tp:
        return "the same vocabulary but other token ids for a probe text (different normalisation or pre-tokenizer)"
    return None


def tokenizer_error(method: str, name: str, why: str) -> ConfigError:
    return ConfigError(
        f"method '{method}': teacher '{name}' has a different tokenizer from the student's ({why}); distillation "
        "compares the models token by token, so use a teacher of the student's family (default: its base model)"
    )


def check_teacher(student: ModelHandle, teacher: ModelHandle, name: str, method: str) -> None:
    """One-line ConfigError unless the teacher tokenises as the student does and has as many logits."""
    why = tokenizer_difference(student.tokenizer, teacher.tokenizer)
    if why is None and output_width(teacher.model) != output_width(student.model):
        why = f"{output_width(teacher.model)} output logits, the student has {output_width(student.model)}"
    if why is not None:
        raise tokenizer_error(method, name, why)


def teacher_identity(spec: str) -> str:
    """What names the teacher's weights in a cache key (see the module docstring)."""
    path = Path(spec).expanduser()
    if not path.exists():
        return spec
    files = (
        [path]
        if path.is_file()
        else sorted(f for f in path.iterdir() if f.suffix in (".safetensors", ".gguf", ".json"))
    )
    return json.dumps([str(path.resolve())] + [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files])


# --- the cache -----------------------------------------------------------------------------------------------
def example_key(input_ids: list[int], labels: list[int]) -> str:
    return hashlib.sha1(repr((input_ids, labels)).encode()).hexdigest()


def supervised(batch: dict) -> torch.Tensor:
    """[B, L-1] bool: the logit positions whose next token carries a label (every token of corpus text)."""
    return batch["labels"][:, 1:] != IGNORE


@dataclass
class TopKCache:
    """The teacher's top-k distributions of every supervised position of the cached examples."""

    ids: torch.Tensor  # int32 [N, k]
    logp: torch.Tensor  # fp16 [N, k], log softmax(z_t / T) of those ids
    tail: torch.Tensor  # fp32 [N], log of the mass outside the top k
    rows: dict[str, tuple[int, int]]  # example key -> its rows [start, end)
    path: Path
    hit: bool  # read from an existing file

    def lookup(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ids, logp, tail) for the batch's supervised positions, in row-major order (as `supervised` selects)."""
        parts = []
        lengths = batch["attention_mask"].sum(1).tolist()
        for r, n in enumerate(lengths):
            key = example_key(batch["input_ids"][r, :n].tolist(), batch["labels"][r, :n].tolist())
            if key not in self.rows:
                raise DataError(f"the top-k cache {self.path} has no entry for a training example; delete it")
            parts.append(self.rows[key])
        take = torch.cat([torch.arange(a, b) for a, b in parts])
        return self.ids[take].long(), self.logp[take].float(), self.tail[take]


def cache_key(teacher: str, k: int, temperature: float, examples: list[Example]) -> str:
    h = hashlib.sha256(json.dumps([CACHE_FORMAT, teacher_identity(teacher), k, temperature]).encode())
    for ex in examples:
        h.update(repr((ex.input_ids, ex.labels)).encode())
    return h.hexdigest()[:24]


@torch.no_grad()
def teacher_topk(
    teacher: torch.nn.Module, examples: list[Example], k: int, temperature: float, batch_size: int, pad_id: int
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per example: (ids int32 [n, k], log-probs fp32 [n, k], tail fp32 [n]) of its supervised positions."""
    out = []
    for i in range(0, len(examples), batch_size):
        batch = collate(examples[i : i + batch_size], pad_id)
        logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        mask = supervised(batch)
        for r in range(logits.shape[0]):
            logp = torch.log_softmax(logits[r, :-1][mask[r]].float() / temperature, dim=-1)
            out.append(topk_reference(logp, k))
    return out


def read_cache(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no iterator
    return tensors, meta


def teacher_cache(
    student: ModelHandle,
    teacher_spec: str,
    examples: list[Example],
    k: int,
    temperature: float,
    batch_size: int,
    folder: Path,
    method: str,
) -> TopKCache:
    """The top-k cache of `examples` (read, or computed with the teacher, written, and the teacher freed)."""
    from safetensors.torch import save_file

    uniq = list({example_key(ex.input_ids, ex.labels): ex for ex in examples}.values())
    path = folder / f"{cache_key(teacher_spec, k, temperature, uniq)}.safetensors"
    hit = path.is_file()
    if hit:
        tensors, meta = read_cache(path)
        if meta.get("format") != CACHE_FORMAT:
            raise DataError(f"top-k cache {path} has format {meta.get('format')!r}; delete it to rewrite it")
        if meta["tokenizer"] != tokenizer_fingerprint(student.tokenizer):
            raise tokenizer_error(method, teacher_spec, "its cached tokenizer fingerprint differs")
        if int(meta["vocab"]) != output_width(student.model):
            why = f"{meta['vocab']} output logits, the student has {output_width(student.model)}"
            raise tokenizer_error(method, teacher_spec, why)
    else:
        teacher = load_teacher(teacher_spec)
        check_teacher(student, teacher, teacher_spec, method)
        tok = teacher.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        parts = teacher_topk(teacher.model, uniq, k, temperature, batch_size, pad)
        meta = {
            "format": CACHE_FORMAT,
            "teacher": teacher_identity(teacher_spec),
            "k": str(k),
            "temperature": repr(temperature),
            "vocab": str(output_width(teacher.model)),
            "tokenizer": tokenizer_fingerprint(tok),
            "keys": json.dumps([example_key(ex.input_ids, ex.labels) for ex in uniq]),
        }
        del teacher
        gc.collect()
        offsets = [0]
        for ids, _, _ in parts:
            offsets.append(offsets[-1] + ids.shape[0])
        tensors = {
            "topk_ids": torch.cat([p[0] for p in parts]).contiguous(),
            "topk_logp": torch.cat([p[1] for p in parts]).half().contiguous(),
            "tail_logp": torch.cat([p[2] for p in parts]).contiguous(),
            "offsets": torch.tensor(offsets, dtype=torch.int64),
        }
        with atomic_file(path) as tmp:
            save_file(tensors, str(tmp), metadata=meta)
    off = tensors["offsets"].tolist()
    rows = {key: (off[i], off[i + 1]) for i, key in enumerate(json.loads(meta["keys"]))}
    return TopKCache(tensors["topk_ids"], tensors["topk_logp"], tensors["tail_logp"], rows, path, hit)
