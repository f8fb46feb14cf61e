"""The one training loop (fine-tuning, recovery after pruning, distillation), with checkpoints and resume."""

from budgetlm.train.config import DataConfig, TrainConfig
from budgetlm.train.loop import StepInfo, TrainResult, fit

__all__ = ["DataConfig", "StepInfo", "TrainConfig", "TrainResult", "fit"]
