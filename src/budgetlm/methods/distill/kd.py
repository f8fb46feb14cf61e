"""kd, hidden_kd: knowledge distillation steps that train the student through the one training loop.

Logit KD (Hinton et al., arXiv 1503.02531), per supervised position with student logits z_s, teacher logits
z_t and temperature T:

    L = w_kd · T² · KL(softmax(z_t / T) ‖ softmax(z_s / T))  +  (1 − w_kd) · CE(z_s, next token)

`reverse: true` uses KL(softmax(z_s / T) ‖ softmax(z_t / T)) instead (mode-seeking, as in MiniLLM). T² keeps the
gradient scale of the KL term independent of T. Both terms are means over the same positions: those whose
next token carries a label (train.data: the answer tokens of supervised task data, every token of corpus
text), so the task term is exactly train.loop's answer-token cross-entropy. The two modes are the data:
task-specific (`train.data.task`: a task's training split) or task-agnostic (`train.data.task: corpus`, the
default; language-model distillation as used to recover pruned models).

Hidden-state KD (`hidden_kd`, e.g. TinyBERT arXiv 1909.10351) adds w_hidden times the mean MSE or cosine
distance between matched student and teacher layers' hidden states (hidden.py: layer map for a shallower,
e.g. ShortGPT-pruned, student; learned projection for a narrower one) to the logit-KD loss above.

Training: train.loop.fit with this loss as its loss_fn, over exactly the student's parameters that require
grad: every parameter of a plain model (full distillation), or an adapter's when one was attached by an
earlier step (`[{method: lora}, {method: kd}]` distils into LoRA). A hidden-state projection is attached to the
model as the module `budgetlm_kd_projection` for the run (so fit trains it too) and removed afterwards. The
teacher runs in eval mode under no_grad with every parameter frozen: it is never updated.

Teacher outputs come from the teacher on the fly (teacher and student in memory together), or from a top-k
cache on disk (`cache_topk: k`, teacher.py) computed once before training. With the cache the KL is taken
over the teacher's top-k tokens plus one tail bucket holding the rest of the vocabulary (`coarse_kl`): with
p the teacher's and q the student's distribution at T, K the teacher's top k, P = 1 − Σ_K p, Q = 1 − Σ_K q,

    forward: Σ_K p_i (log p_i − log q_i) + P (log P − log Q)
    reverse: Σ_K q_i (log q_i − log p_i) + Q (log Q − log P)

the KL between the two distributions coarse-grained to k + 1 outcomes. By the log-sum inequality it never
exceeds the full KL, it is exact when k is the vocabulary size, and it is tight when the top k hold nearly all
the teacher's mass; its gradient pushes the student's top-k probabilities to the teacher's and its remaining
mass, as a whole, to the teacher's tail mass (data/tasks/offline.kl_topk is the same forward estimator,
used by text-ppl). The reverse direction clamps log P at −100 (a tail that underflowed to zero). The
hidden-state loss needs the teacher's hidden states, so it cannot run from the cache.

Defaults (on corpus text, 20 steps of batch 4 × 256 tokens, lr 1e-4) are a short smoke run; a recovery or
distillation budget is set in `train`. `targets`/`ignore` are not used: what trains is what requires grad.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator, model_validator

from budgetlm.errors import ConfigError, DataError
from budgetlm.methods.base import MethodConfig, StepContext, StepReport, implements, register_method
from budgetlm.methods.distill import hidden as hid
from budgetlm.methods.distill.teacher import (
    TopKCache,
    check_teacher,
    frozen,
    load_teacher,
    supervised,
    teacher_cache,
)
from budgetlm.models.handle import ModelHandle
from budgetlm.train.config import CORPUS, DataConfig, TrainConfig
from budgetlm.train.data import DataOrder, TrainData, build_data

PROJECTION = "budgetlm_kd_projection"  # the model attribute holding hidden-state projections during training
DEFAULT_TRAIN = TrainConfig(steps=20, data=DataConfig(task=CORPUS))
MIN_LOG_TAIL = -100.0


@register_method("kd")
class KD(MethodConfig):
    """Logit distillation: T²·KL(teacher ‖ student) at temperature T (or reverse KL) mixed with the task loss."""

    teacher: str | None = None  # model spec; None: the student's base model, as loaded before compression
    temperature: float = Field(1.0, gt=0)
    w_kd: float = Field(0.5, ge=0, le=1)  # weight of the KD term; the task cross-entropy gets 1 - w_kd
    reverse: bool = False  # KL(student ‖ teacher) instead of KL(teacher ‖ student)
    cache_topk: int | None = Field(None, ge=1)  # cache the teacher's top-k log-probs on disk instead of on the fly
    cache_dir: str | None = None  # where the cache lives; None: $BUDGETLM_CACHE/kd (~/.cache/budgetlm/kd)
    train: TrainConfig = DEFAULT_TRAIN

    @field_validator("train")
    @classmethod
    def _no_checkpoints(cls, v: TrainConfig) -> TrainConfig:
        if v.save_every:
            raise ValueError("a distillation step trains without a checkpoint folder: set save_every to 0")
        return v


@register_method("hidden_kd")
class HiddenKD(KD):
    """Hidden-state distillation: MSE or cosine between mapped layers' hidden states (projected), plus logit KD."""

    layers: list[int] | None = None  # student layers to match; None: all
    layer_map: dict[int, int] | None = None  # student layer -> teacher layer; None: see hidden.py
    loss: Literal["mse", "cosine"] = "cosine"
    w_hidden: float = Field(1.0, gt=0)

    @model_validator(mode="after")
    def _on_the_fly(self) -> HiddenKD:
        if self.cache_topk is not None:
            raise ValueError("hidden-state KD needs the teacher's hidden states on the fly; drop cache_topk")
        return self


# --- the losses ------------------------------------------------------------------------------------------------
class _RowKL(torch.autograd.Function):
    """Per row KL(softmax(a) ‖ softmax(b)) of logits already divided by T, differentiable in the student's logits
    only, with the analytic gradient: for the forward KL (teacher a, student b) d/db = softmax(b) − softmax(a);
    for the reverse KL (student a, teacher b) d/da = softmax(a) ⊙ (log softmax(a) − log softmax(b) − KL). Both are
    exactly zero when the two logit rows are equal, which autograd through log_softmax is not (it leaves rounding
    residuals of Σp ≠ 1 that Adam would amplify into a real update)."""

    @staticmethod
    def forward(ctx, student: torch.Tensor, teacher: torch.Tensor, reverse: bool) -> torch.Tensor:
        ls, lt = torch.log_softmax(student, -1), torch.log_softmax(teacher, -1)
        a, b = (ls, lt) if reverse else (lt, ls)
        kl = (a.exp() * (a - b)).sum(-1)
        ctx.reverse = reverse
        ctx.save_for_backward(ls, lt, kl)
        return kl

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        ls, lt, kl = ctx.saved_tensors
        if ctx.reverse:
            g = ls.exp() * (ls - lt - kl[:, None])
        else:
            g = ls.exp() - lt.exp()
        return grad[:, None] * g, None, None


def logit_kd(z_s: torch.Tensor, z_t: torch.Tensor, temperature: float, reverse: bool = False) -> torch.Tensor:
    """T² · mean over rows of KL(softmax(z_t/T) ‖ softmax(z_s/T)) (reverse: KL(student ‖ teacher)); [N, V] logits.
    The teacher's logits get no gradient."""
    kl = _RowKL.apply(z_s.float() / temperature, z_t.detach().float() / temperature, reverse)
    return kl.mean() * temperature**2


def coarse_kl(
    ids: torch.Tensor, logp_t: torch.Tensor, tail_t: torch.Tensor, logq: torch.Tensor, reverse: bool = False
) -> torch.Tensor:
    """Per row, the KL over the teacher's top-k tokens plus one tail bucket (module docstring). ids [N, k] of
    the teacher's top k, logp_t [N, k] their teacher log-probs, tail_t [N] the log of the teacher's remaining
    mass, logq [N, V] the student's log-probs. Safe to differentiate when k = V (no tail then)."""
    logq_k = logq.gather(-1, ids)
    if ids.shape[-1] >= logq.shape[-1]:  # the top k are the whole vocabulary: no tail bucket
        a, b = (logq_k, logp_t) if reverse else (logp_t, logq_k)
        return (a.exp() * (a - b)).sum(-1)
    tail_q = torch.logsumexp(logq.scatter(-1, ids, float("-inf")), dim=-1)
    if reverse:
        tail_p = tail_t.clamp(min=MIN_LOG_TAIL)
        return (logq_k.exp() * (logq_k - logp_t)).sum(-1) + tail_q.exp() * (tail_q - tail_p)
    p_tail = tail_t.exp()
    safe = torch.where(p_tail > 0, tail_t, tail_q.detach())  # an empty teacher tail contributes 0
    return (logp_t.exp() * (logp_t - logq_k)).sum(-1) + p_tail * (safe - tail_q)


def cached_kd(z_s: torch.Tensor, cached: tuple, temperature: float, reverse: bool = False) -> torch.Tensor:
    """T² · mean over rows of coarse_kl against cached (ids, logp, tail) of the teacher at temperature T."""
    logq = torch.log_softmax(z_s.float() / temperature, dim=-1)
    return coarse_kl(*cached, logq, reverse).mean() * temperature**2


class DistillLoss:
    """loss_fn(model, batch) for train.loop.fit: the KD step's loss on one micro-batch (a mean over its
    supervised positions)."""

    def __init__(
        self,
        cfg: KD,
        teacher: torch.nn.Module | None = None,
        cache: TopKCache | None = None,
        mapping: dict[int, int] | None = None,
        proj: torch.nn.ModuleDict | None = None,
    ):
        self.cfg, self.teacher, self.cache, self.mapping, self.proj = cfg, teacher, cache, mapping, proj

    def __call__(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        cfg, mapping = self.cfg, self.mapping or {}
        mask = supervised(batch)
        if not mask.any():
            raise DataError("a training batch has no answer tokens left (answers cut by max_len?); raise max_len")
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
        with hid.capture(model, list(mapping)) as hs:
            z_s = model(**inputs).logits[:, :-1][mask].float()
        loss = z_s.new_zeros(())
        if cfg.w_kd < 1:
            loss = loss + (1 - cfg.w_kd) * F.cross_entropy(z_s, batch["labels"][:, 1:][mask])
        if self.cache is not None:
            return loss + cfg.w_kd * cached_kd(z_s, self.cache.lookup(batch), cfg.temperature, cfg.reverse)
        if cfg.w_kd == 0 and not mapping:
            return loss
        with torch.no_grad(), hid.capture(self.teacher, list(mapping.values())) as ht:
            z_t = self.teacher(**inputs).logits[:, :-1][mask].float()
        if cfg.w_kd > 0:
            loss = loss + cfg.w_kd * logit_kd(z_s, z_t, cfg.temperature, cfg.reverse)
        if mapping:
            real = batch["attention_mask"].bool()
            loss = loss + cfg.w_hidden * hid.hidden_loss(hs, ht, mapping, self.proj, real, cfg.loss)
        return loss


# --- the step --------------------------------------------------------------------------------------------------
def consumed(data: TrainData, train: TrainConfig) -> list:
    """The examples fit() will draw, in its order (DataOrder is a pure function of the seed and position)."""
    order = DataOrder(len(data.examples), train.seed)
    idx = order.take(0, train.steps * train.batch_size * train.grad_accum)
    return [data.examples[i] for i in idx]


def cache_folder(cfg: KD) -> Path:
    from budgetlm.models.sources import cache_dir

    return Path(cfg.cache_dir).expanduser() if cfg.cache_dir else cache_dir() / "kd"


def distill(handle: ModelHandle, cfg: KD, ctx: StepContext, teacher: ModelHandle | None = None) -> StepReport:
    """Distil `teacher` (default: loaded from cfg.teacher or the student's base; a given one is frozen in place)
    into handle.model in place."""
    from budgetlm.train.loop import fit

    model, method = handle.model, cfg.method_name
    spec = teacher.source if teacher is not None else (cfg.teacher or handle.base_id)
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError(f"method '{method}': no parameter of the student requires grad; attach an adapter first")
    tr = cfg.train
    data = build_data(handle.tokenizer, tr.data, tr.max_len, tr.seed, tr.eval_seed)
    notes, stats = [], {}
    cache = None
    if cfg.cache_topk is not None:
        t0 = time.perf_counter()
        cache = teacher_cache(
            handle, spec, consumed(data, tr), cfg.cache_topk, cfg.temperature, tr.batch_size, cache_folder(cfg), method
        )
        how = "read" if cache.hit else f"computed in {time.perf_counter() - t0:.1f} s"
        notes.append(f"teacher top-{cfg.cache_topk} cache {how}: {cache.path} ({cache.ids.shape[0]} positions)")
        stats["cache"] = {"path": str(cache.path), "hit": cache.hit, "positions": int(cache.ids.shape[0])}
    else:
        teacher = frozen(teacher) if teacher is not None else load_teacher(spec)
        check_teacher(handle, teacher, spec, method)
    mapping, proj = None, None
    if isinstance(cfg, HiddenKD):
        mapping, how = hid.layer_map(model, teacher.model, cfg.layers, cfg.layer_map, method)
        if not mapping:
            raise ConfigError(f"method '{method}': layer_map {cfg.layer_map} keeps none of layers {cfg.layers}")
        proj = hid.projections(model, teacher.model, mapping, ctx.seed)
        n_proj = sum(p.numel() for p in proj.parameters()) if proj is not None else 0
        stats["hidden"] = {"layer_map": mapping, "chosen_by": how, "projection_params": n_proj}
        notes.append(f"hidden states ({cfg.loss}) of student layers -> teacher layers {mapping} ({how})")
    loss_fn = DistillLoss(cfg, None if cache else teacher.model, cache, mapping, proj)
    if proj is not None:
        model.add_module(PROJECTION, proj)
    try:
        result = fit(handle, tr, loss_fn=loss_fn, progress=ctx.progress, data=data)
    finally:
        if proj is not None:
            delattr(model, PROJECTION)
    stats["train"] = summary = result.to_dict()
    stats["teacher"] = spec
    kl = f"{'reverse' if cfg.reverse else 'forward'} KL at T={cfg.temperature}"
    notes.insert(0, f"distilled from '{spec}' ({kl}, w_kd={cfg.w_kd}) on {result.data_source}")
    notes.append(
        f"trained {result.trainable_params:,} parameters for {tr.steps} steps: loss {summary['losses'][0]:.4f} -> "
        f"{summary['losses'][-1]:.4f}"
    )
    return StepReport(method, cfg.model_dump(), stats=stats, notes=notes)


@implements(KD)
@implements(HiddenKD)
def apply(handle: ModelHandle, cfg: KD, ctx: StepContext) -> StepReport:
    return distill(handle, cfg, ctx)
