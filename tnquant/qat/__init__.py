"""Quantization-aware fine-tuning: ``finetune`` (one ``FinetuneConfig``), its trainer, losses.

Examples
--------
>>> import torch
>>> from torch import nn
>>> from tnquant.qat import finetune
>>> model = nn.Linear(3, 1)
>>> report = finetune(model, [torch.randn(4, 3)], teacher=nn.Linear(3, 1), progress=False)
>>> report.stage, len(report.history.loss)
('finetune', 1)
"""

from tnquant.qat.checkpoint import latest_checkpoint, load_checkpoint
from tnquant.qat.config import FinetuneConfig
from tnquant.qat.finetune import finetune
from tnquant.qat.history import FinetuneReport, History
from tnquant.qat.losses import (
    LOSSES,
    TASK_LOSSES,
    HiddenCollector,
    cosine_loss,
    default_outputs,
    kl_loss,
    mse_loss,
)
from tnquant.qat.params import TRAIN_CHOICES, parameter_sets

__all__ = [
    "finetune",
    "FinetuneConfig",
    "FinetuneReport",
    "History",
    "LOSSES",
    "mse_loss",
    "cosine_loss",
    "kl_loss",
    "default_outputs",
    "TASK_LOSSES",
    "HiddenCollector",
    "TRAIN_CHOICES",
    "parameter_sets",
    "latest_checkpoint",
    "load_checkpoint",
]
