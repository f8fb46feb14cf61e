"""The one training loop: fine-tuning, recovery after pruning and distillation all run through `fit`.

`fit(handle, cfg)` trains exactly the parameters that have requires_grad=True (whatever made them so: an
adapter attached by a method, or every parameter for full fine-tuning) with torch's AdamW, decoupled weight
decay on matrices only (biases and norm scales are not decayed), the linear warm-up + cosine schedule of
config.py (a LambdaLR), gradient-norm clipping and gradient accumulation.

Loss. The default is next-token cross-entropy on the answer tokens (labels != -100, see data.py), summed
over the tokens of all the micro-batches of one update and divided by their total count, so an update with
grad_accum = 2 of batch b has the gradient of one batch of 2b (the mean over the same tokens), not the mean of
two per-batch means. A `loss_fn(model, batch) -> scalar` replaces it (distillation plugs in its KD loss);
its value is taken as the micro-batch's mean and weighted by 1 / grad_accum.

Options. Gradient checkpointing uses transformers' gradient_checkpointing_enable (non-reentrant, so frozen inputs
need no requires_grad hack) and is switched off again at the end. bf16 autocast is off by default: on some CPUs
bf16 matmuls run ~7x slower than fp32 (on others, with AMX or native AVX-512 bf16, 6-11x faster). Evaluation every
`eval_every` steps (and at the end) goes through the evaluation harness on `eval_tasks` with `eval_limit` items, in
eval mode, with the RNGs saved and restored around it so evaluating never changes the training trajectory; the
model is presented to the harness as derived (a provenance entry "train"), so text-ppl compares against the base
model's reference rather than writing one from the half-trained model.

Checkpoints and resume (checkpoint.py). With out_dir, a checkpoint is written every `save_every` steps and
at the end. `resume=True` restores the newest complete one (trainable tensors, AdamW state, scheduler,
step, RNG states, data position, history) and continues; every source of randomness the loop has is
either restored or a pure function of (seed, step), so the resumed run ends with exactly the weights of an
uninterrupted one. A folder with a different resolved config or different trainable parameters is refused.
`on_step(info)` is called after every update (after its checkpoint, if any); an exception it raises stops
the run like a kill would.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from budgetlm.errors import ConfigError, DataError
from budgetlm.models.handle import ModelHandle
from budgetlm.progress import Progress
from budgetlm.train import checkpoint as ckpt
from budgetlm.train.config import TrainConfig, lr_factor
from budgetlm.train.data import IGNORE, DataOrder, TrainData, build_data, collate

LossFn = Callable[[torch.nn.Module, dict], torch.Tensor]
LINES_PER_RUN = 20  # off a terminal, progress writes a line every steps/LINES_PER_RUN steps (and at the end)


@dataclass
class StepInfo:
    step: int  # updates done
    loss: float
    lr: float
    grad_norm: float
    seconds: float
    checkpoint: Path | None  # the checkpoint written after this step, if any


@dataclass
class TrainResult:
    steps: int
    losses: list[float]  # per update: the mean loss over its micro-batches
    lrs: list[float]
    grad_norms: list[float]  # before clipping
    step_times: list[float]  # seconds per update
    peak_rss_bytes: int  # of this process's part of the run
    trainable_params: int
    data_source: str
    examples: int
    evals: dict[int, dict] = field(default_factory=dict)  # step -> {task: {metric: Metric as dict}}
    resumed_from: int | None = None
    out_dir: Path | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["out_dir"] = str(self.out_dir) if self.out_dir else None
        return d


# --- the loss ----------------------------------------------------------------------------------------------
def answer_loss_sum(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """Sum over the batch's target tokens of the next-token cross-entropy (fp32 logits)."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    logits = out.logits[:, :-1].float()
    target = batch["labels"][:, 1:]
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=IGNORE, reduction="sum"
    )


def count_targets(batch: dict) -> int:
    return int((batch["labels"][:, 1:] != IGNORE).sum())


def answer_loss(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """Mean next-token cross-entropy over the batch's target tokens (the default loss, per micro-batch)."""
    return answer_loss_sum(model, batch) / max(1, count_targets(batch))


# --- helpers -----------------------------------------------------------------------------------------------
def trainable_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def rng_isolated():
    """Whatever runs inside leaves torch's, python's and numpy's generators as it found them."""
    saved = ckpt.rng_state()
    try:
        yield
    finally:
        ckpt.set_rng_state(*saved)


def make_optimizer(params: dict[str, torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.AdamW:
    decay = [p for p in params.values() if p.ndim >= 2]
    plain = [p for p in params.values() if p.ndim < 2]
    groups = [
        g
        for g in ({"params": decay, "weight_decay": cfg.weight_decay}, {"params": plain, "weight_decay": 0.0})
        if g["params"]
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)


def _evaluate(handle: ModelHandle, cfg: TrainConfig, step: int) -> dict:
    from budgetlm.evaluation.harness import evaluate

    view = ModelHandle(
        handle.model,
        handle.tokenizer,
        handle.source,
        [*handle.provenance, {"method": "train", "step": step}],
        handle.base_id,
    )
    was_training = handle.model.training
    handle.model.eval()
    try:
        with rng_isolated():
            res = evaluate(view, cfg.eval_tasks, limit=cfg.eval_limit, seed=cfg.eval_seed, data_dir=cfg.data.data_dir)
    finally:
        handle.model.train(was_training)
    return {task: {m: v.to_dict() for m, v in ms.items()} for task, ms in res.items()}


# --- fit ---------------------------------------------------------------------------------------------------
def fit(
    handle: ModelHandle,
    cfg: TrainConfig | dict,
    out_dir: Path | str | None = None,
    resume: bool = False,
    loss_fn: LossFn | None = None,
    *,
    on_step: Callable[[StepInfo], None] | None = None,
    progress: bool = True,
    data: TrainData | None = None,
) -> TrainResult:
    """Train handle.model's requires_grad parameters in place; see the module docstring. `data` overrides the
    examples cfg.data names (distillation's cached inputs, tests)."""
    from budgetlm.hardware.memory import PeakRSS

    cfg = TrainConfig.parse(cfg)
    model = handle.model
    params = trainable_parameters(model)
    if not params:
        raise ConfigError("train: no parameter of the model requires grad; attach an adapter or unfreeze parameters")
    if cfg.eval_tasks:
        from budgetlm.data.tasks import contamination
        from budgetlm.evaluation.harness import resolve_tasks

        resolve_tasks(cfg.eval_tasks)
        trained = contamination.trained_on(handle.provenance)  # refused before training, not at its first eval
        fix = "drop {eval} from eval_tasks or train a model not trained on {train}"
        contamination.check(trained, cfg.eval_tasks, "train (the model's provenance)", fix)
    out = Path(out_dir) if out_dir is not None else None
    if (resume or cfg.save_every) and out is None:
        raise ConfigError("train: resume and save_every need out_dir; pass the run's folder")
    start = ckpt.latest_checkpoint(out) if resume else None
    if out is not None and not resume and ckpt.list_checkpoints(out):
        raise ConfigError(f"train: {out} already holds checkpoints; pass resume=True to continue or use a new out_dir")
    state = None
    if start is not None:
        state = ckpt.read_state(start)
        ckpt.check_compatible(start, state, cfg.resolved(), params)

    data = data or build_data(handle.tokenizer, cfg.data, cfg.max_len, cfg.seed, cfg.eval_seed)
    order = DataOrder(len(data.examples), cfg.seed)
    fingerprint = data.fingerprint()
    if state is not None and state["data"]["fingerprint"] != fingerprint:
        raise DataError(
            f"resume folder {out}: the training examples differ from the saved run's (same config, other data); "
            "restore the data files or use a new out_dir"
        )
    tok = handle.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    per_step = cfg.batch_size * cfg.grad_accum

    seed_everything(cfg.seed)
    optimizer = make_optimizer(params, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    history: dict[str, list] = {"losses": [], "lrs": [], "grad_norms": [], "step_times": []}
    evals: dict[int, dict] = {}
    step = 0
    if start is not None:
        state, torch_rng = ckpt.load_checkpoint(start, params, optimizer)
        scheduler.load_state_dict(state["scheduler"])
        step = state["step"]
        history = {k: list(v) for k, v in state["history"].items() if k != "evals"}
        evals = {int(k): v for k, v in state["history"].get("evals", {}).items()}
        ckpt.set_rng_state(torch_rng, state["rng"])

    was_training = model.training
    checkpointing = cfg.grad_checkpointing and not getattr(model, "is_gradient_checkpointing", False)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    # a bar with the loss on a terminal; elsewhere a line every steps/LINES_PER_RUN steps, at most one a second
    bar = Progress(
        "train", cfg.steps, enabled=progress, completed=step, throttled=True, every=cfg.steps // LINES_PER_RUN
    )
    resumed_from = step if start is not None else None
    try:
        with PeakRSS("train") as mem:
            while step < cfg.steps:
                t0 = time.perf_counter()
                idx = order.take(step * per_step, per_step)
                micro = [
                    collate([data.examples[i] for i in idx[m * cfg.batch_size : (m + 1) * cfg.batch_size]], pad_id)
                    for m in range(cfg.grad_accum)
                ]
                loss = accumulate_gradients(model, micro, loss_fn, cfg.bf16)
                lr = optimizer.param_groups[0]["lr"]
                norm = _clip(params, cfg.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                seconds = time.perf_counter() - t0
                for key, val in zip(history, (loss, lr, norm, seconds)):
                    history[key].append(val)
                bar.advance(f"step {step}: loss {loss:.4f}, lr {lr:.2e}")
                if cfg.eval_tasks and (step == cfg.steps or (cfg.eval_every and step % cfg.eval_every == 0)):
                    evals[step] = _evaluate(handle, cfg, step)
                written = None
                if out is not None and (step == cfg.steps or (cfg.save_every and step % cfg.save_every == 0)):
                    snap = ckpt.Snapshot(
                        step,
                        cfg.resolved(),
                        scheduler.state_dict(),
                        {
                            "seed": cfg.seed,
                            "consumed": step * per_step,
                            "examples": len(data.examples),
                            "fingerprint": fingerprint,
                        },
                        {**history, "evals": {str(k): v for k, v in evals.items()}},
                    )
                    written = ckpt.save_checkpoint(out, snap, params, optimizer, cfg.keep_checkpoints)
                if on_step is not None:
                    on_step(StepInfo(step, loss, lr, norm, seconds, written))
    finally:
        bar.close()
        optimizer.zero_grad(set_to_none=True)
        if checkpointing:
            model.gradient_checkpointing_disable()
        model.train(was_training)
    return TrainResult(
        steps=step,
        losses=history["losses"],
        lrs=history["lrs"],
        grad_norms=history["grad_norms"],
        step_times=history["step_times"],
        peak_rss_bytes=mem.peak_bytes,
        trainable_params=sum(p.numel() for p in params.values()),
        data_source=data.source,
        examples=len(data.examples),
        evals=evals,
        resumed_from=resumed_from,
        out_dir=out,
    )


def accumulate_gradients(model: torch.nn.Module, micro: list[dict], loss_fn: LossFn | None, bf16: bool) -> float:
    """Backward over the micro-batches of one update; returns the update's loss."""
    total = sum(count_targets(b) for b in micro) if loss_fn is None else 0
    if loss_fn is None and total == 0:
        raise DataError("a training batch has no answer tokens left (answers cut by max_len?); raise max_len")
    acc = 0.0
    for batch in micro:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn(model, batch) / len(micro) if loss_fn else answer_loss_sum(model, batch) / total
        loss.backward()
        acc += float(loss.detach())
    if not math.isfinite(acc):
        raise DataError(f"the training loss became {acc}; lower lr or check the data")
    return acc


def _clip(params: dict[str, torch.nn.Parameter], max_norm: float | None) -> float:
    grads = [p for p in params.values() if p.grad is not None]
    if not grads:
        return 0.0
    if max_norm is None:
        return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in grads])))
    return float(torch.nn.utils.clip_grad_norm_(grads, max_norm))
