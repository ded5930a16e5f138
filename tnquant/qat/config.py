"""The options of ``finetune``, checked once (:class:`FinetuneConfig`).

Examples
--------
>>> FinetuneConfig(epochs=2).total_steps(steps_per_epoch=10)
20
>>> FinetuneConfig(epochs=None, max_steps=7).total_steps(steps_per_epoch=3)
7
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tnquant.qat.optim import OPTIMIZERS, SCHEDULES, warmup_steps
from tnquant.qat.params import TRAIN_CHOICES

__all__ = ["FinetuneConfig"]


def _number(name: str, value: Any, *, minimum: float = 0.0, strict: bool = True,
            integer: bool = False, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    kinds: tuple[type, ...] = (int,) if integer else (int, float)
    what = "an int" if integer else "a number"
    bound = f"> {minimum:g}" if strict else f">= {minimum:g}"
    ok = not isinstance(value, bool) and isinstance(value, kinds)
    if ok:
        ok = math.isfinite(value) and (value > minimum if strict else value >= minimum)
    if not ok:
        none = " or None" if allow_none else ""
        raise ValueError(f"{name} must be {what} {bound}{none}, got {value!r}")


def _choice(value: Any, choices: Any) -> bool:
    """``value`` is a string among ``choices`` (no ``==`` on arbitrary objects, no hashing)."""
    return isinstance(value, str) and value in choices


@dataclass(frozen=True)
class FinetuneConfig:
    """Loop options of ``finetune`` (see its docstring); validated on creation.

    Examples
    --------
    >>> FinetuneConfig(lr=0.0)
    Traceback (most recent call last):
    ...
    ValueError: lr must be a number > 0, got 0.0
    """

    epochs: int | None = 1
    max_steps: int | None = None
    lr: float = 1e-4
    scale_lr: float | None = None
    weight_decay: float = 0.0
    optimizer: Any = "adamw"
    schedule: str = "cosine"
    warmup: int | float = 0.05
    clip_grad_norm: float | None = 1.0
    train: str = "all"
    shuffle: bool = False
    seed: int = 0
    eval_fn: Callable[[Any], Any] | None = None
    eval_every: int | None = None
    checkpoint_dir: str | os.PathLike[str] | None = None
    checkpoint_every: int | None = None
    keep_checkpoints: int | None = 2
    resume_from: str | os.PathLike[str] | None = None
    ddp: bool | str = "auto"
    ddp_kwargs: dict[str, Any] | None = None
    fused: bool | str = "auto"
    progress: bool = True

    def __post_init__(self) -> None:
        _number("epochs", self.epochs, integer=True, allow_none=True)
        _number("max_steps", self.max_steps, integer=True, allow_none=True)
        if self.epochs is None and self.max_steps is None:
            raise ValueError("give epochs or max_steps (or both), got neither")
        _number("lr", self.lr)
        _number("scale_lr", self.scale_lr, allow_none=True)
        _number("weight_decay", self.weight_decay, strict=False)
        _number("clip_grad_norm", self.clip_grad_norm, allow_none=True)
        for name in ("eval_every", "checkpoint_every", "keep_checkpoints"):
            _number(name, getattr(self, name), integer=True, allow_none=True)
        self._check_choices()
        if self.eval_fn is not None and not callable(self.eval_fn):
            raise TypeError(f"eval_fn must be a callable (model) -> dict, got "
                            f"{type(self.eval_fn).__name__}")
        if self.eval_every is not None and self.eval_fn is None:
            raise ValueError("eval_every is set but eval_fn is None; pass eval_fn=")
        self._check_run()
        if self.checkpoint_every is not None and self.checkpoint_dir is None:
            raise ValueError("checkpoint_every is set but checkpoint_dir is None; pass "
                             "checkpoint_dir=")
        if not (isinstance(self.ddp, bool) or _choice(self.ddp, ("auto",))):
            raise ValueError(f"ddp must be True, False or 'auto', got {self.ddp!r}")
        if self.ddp_kwargs is not None and not isinstance(self.ddp_kwargs, dict):
            raise TypeError(f"ddp_kwargs must be a dict or None, got "
                            f"{type(self.ddp_kwargs).__name__}")
        if not (isinstance(self.fused, bool) or _choice(self.fused, ("auto",))):
            raise ValueError(f"fused must be True, False or 'auto', got {self.fused!r}")
        if not isinstance(self.progress, bool):
            raise TypeError(f"progress must be a bool, got {type(self.progress).__name__}")

    def _check_choices(self) -> None:
        if not callable(self.optimizer) and not _choice(self.optimizer, OPTIMIZERS):
            raise ValueError(f"optimizer must be one of {sorted(OPTIMIZERS)} or a callable "
                             f"(param_groups) -> Optimizer, got {self.optimizer!r}")
        if not _choice(self.schedule, SCHEDULES):
            raise ValueError(f"schedule must be one of {list(SCHEDULES)}, got "
                             f"{self.schedule!r}")
        warmup_steps(self.warmup, 1)
        if not _choice(self.train, TRAIN_CHOICES):
            raise ValueError(f"train must be one of {list(TRAIN_CHOICES)}, got {self.train!r}")

    def _check_run(self) -> None:
        if not isinstance(self.shuffle, bool):
            raise TypeError(f"shuffle must be a bool, got {type(self.shuffle).__name__}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"seed must be an int, got {type(self.seed).__name__}")
        for name in ("checkpoint_dir", "resume_from"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (str, os.PathLike)):
                raise TypeError(f"{name} must be a path (str or os.PathLike) or None, got "
                                f"{type(value).__name__}")
            if value is not None and os.fspath(value) == "":
                raise ValueError(f"{name} must name a directory or file, got an empty path")

    def total_steps(self, steps_per_epoch: int) -> int:
        """Optimizer steps of the run: ``epochs`` epochs or ``max_steps``, the fewer."""
        steps = [s for s in (self.max_steps,) if s is not None]
        if self.epochs is not None:
            steps.append(self.epochs * steps_per_epoch)
        return min(steps)

    def record(self, steps_per_epoch: int, world: int) -> dict[str, Any]:
        """What a checkpoint stores to check that a resumed run continues the same one."""
        return {"steps_per_epoch": steps_per_epoch, "world": world, "seed": self.seed,
                "shuffle": self.shuffle, "total_steps": self.total_steps(steps_per_epoch)}
