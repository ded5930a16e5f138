"""Optimizers and learning-rate schedules of ``finetune``.

Schedules give the factor applied to each group's learning rate at the
``s``-th optimizer step (0-based) of ``total`` steps with ``warmup`` warm-up
steps:

- warm-up (``s < warmup``): ``(s + 1) / (warmup + 1)``, so no step is wasted
  at a zero rate;
- then, with ``p = (s - warmup) / (total - warmup)`` (in ``[0, 1)``):
  ``'constant'``: 1; ``'linear'``: ``1 - p``; ``'cosine'``:
  ``(1 + cos(pi p)) / 2``.

Examples
--------
>>> [round(schedule_factor("cosine", s, total=4, warmup=1), 3) for s in range(4)]
[0.5, 1.0, 0.75, 0.25]
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

__all__ = [
    "OPTIMIZERS",
    "SCHEDULES",
    "schedule_factor",
    "make_optimizer",
    "make_scheduler",
    "warmup_steps",
]

#: Named optimizers: ``name -> (class, extra defaults)``.
OPTIMIZERS: dict[str, tuple[type[Optimizer], dict[str, Any]]] = {
    "adamw": (torch.optim.AdamW, {}),
    "adam": (torch.optim.Adam, {}),
    "sgd": (torch.optim.SGD, {"momentum": 0.9}),
}

#: Named learning-rate schedules (see the module docs).
SCHEDULES = ("cosine", "linear", "constant")


def schedule_factor(kind: str, step: int, total: int, warmup: int) -> float:
    """The learning-rate factor of optimizer step ``step`` (0-based) out of ``total``.

    Examples
    --------
    >>> schedule_factor("linear", 2, total=4, warmup=0)
    0.5
    """
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if kind == "constant":
        return 1.0
    p = min(max((step - warmup) / max(total - warmup, 1), 0.0), 1.0)
    if kind == "linear":
        return 1.0 - p
    return 0.5 * (1.0 + math.cos(math.pi * p))


def warmup_steps(warmup: int | float, total: int) -> int:
    """Warm-up steps: an int as is, a float in ``[0, 1]`` as a fraction of ``total``.

    Examples
    --------
    >>> warmup_steps(0.05, 200), warmup_steps(3, 200)
    (10, 3)
    """
    if isinstance(warmup, bool) or not isinstance(warmup, (int, float)):
        raise TypeError(
            f"warmup must be an int (steps) or a float in [0, 1] (a fraction of "
            f"the steps), got {type(warmup).__name__}"
        )
    if isinstance(warmup, float):
        if not 0.0 <= warmup <= 1.0:
            raise ValueError(f"a float warmup is a fraction of the steps in [0, 1], got {warmup}")
        return int(round(warmup * total))
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0 steps, got {warmup}")
    return warmup


def make_optimizer(
    optimizer: str | Callable[[list[dict[str, Any]]], Optimizer], groups: list[dict[str, Any]]
) -> Optimizer:
    """The optimizer over ``groups`` (see :func:`~tnquant.qat.params.param_groups`).

    ``optimizer`` is a name in :data:`OPTIMIZERS` or a callable taking the
    groups and returning an ``Optimizer``; each group's ``lr`` and
    ``weight_decay`` override the optimizer's defaults.

    Examples
    --------
    >>> import torch
    >>> p = torch.nn.Parameter(torch.zeros(2))
    >>> type(make_optimizer("sgd", [{"params": [p], "lr": 0.1}])).__name__
    'SGD'
    """
    if callable(optimizer):
        opt = optimizer(groups)
        if not isinstance(opt, Optimizer):
            raise TypeError(
                f"optimizer(param_groups) must return a torch.optim.Optimizer, got "
                f"{type(opt).__name__}"
            )
        return opt
    if not isinstance(optimizer, str) or optimizer not in OPTIMIZERS:
        raise ValueError(
            f"optimizer must be one of {sorted(OPTIMIZERS)} or a callable "
            f"(param_groups) -> Optimizer, got {optimizer!r}"
        )
    cls, extra = OPTIMIZERS[optimizer]
    return cls(groups, **extra)


def make_scheduler(optimizer: Optimizer, kind: str, total: int, warmup: int) -> LambdaLR:
    """A ``LambdaLR`` following :func:`schedule_factor`.

    The factor is a closure, so a scheduler's state dict holds the step
    count only: a resumed run follows the schedule of its own arguments.

    Examples
    --------
    >>> import torch
    >>> p = torch.nn.Parameter(torch.zeros(1))
    >>> opt = torch.optim.SGD([p], lr=1.0)
    >>> sched = make_scheduler(opt, "linear", total=2, warmup=0)
    >>> opt.param_groups[0]["lr"]
    1.0
    """
    if kind not in SCHEDULES:
        raise ValueError(f"schedule must be one of {list(SCHEDULES)}, got {kind!r}")

    def factor(step: int) -> float:
        return schedule_factor(kind, step, total, warmup)

    return LambdaLR(optimizer, factor)
