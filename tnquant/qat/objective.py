"""The training objective of ``finetune``: distillation, task loss, or the model's own loss.

For a batch, with ``S`` the student's output and ``T`` the teacher's:

- teacher only: ``loss(outputs(S), outputs(T))``, or with ``hidden`` the
  mean over the named submodules of ``loss(S_name, T_name)``;
- task loss only: ``task_loss(S, target)``;
- both: ``alpha * task + (1 - alpha) * distill``;
- neither: the model's own loss: ``S`` itself when it is a scalar tensor,
  else ``S.loss`` or ``S['loss']`` (a Hugging Face model given ``labels``).

A batch is an ``(inputs, target)`` pair only when a task loss is given;
``inputs`` (else the whole batch) reaches the student and the teacher by
:func:`tnquant.batches.call_model`.

Examples
--------
>>> import torch
>>> from torch import nn
>>> student, teacher = nn.Linear(2, 1), nn.Linear(2, 1)
>>> objective = Objective(teacher=teacher, loss="mse")
>>> total, terms = objective(student, torch.ones(3, 2))
>>> total.shape, sorted(terms)
(torch.Size([]), ['distill'])
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from contextlib import ExitStack
from typing import Any, cast

import torch
from torch import Tensor, nn

from tnquant.batches import call_model, move_batch
from tnquant.qat.losses import (
    HiddenCollector,
    LossFn,
    default_outputs,
    resolve_loss,
    resolve_task_loss,
)
from tnquant.qat.teacher_cache import TeacherCache

__all__ = ["Objective", "model_loss", "check_objective"]


def model_loss(out: Any) -> Tensor:
    """The loss a model returned: a scalar tensor, ``out.loss`` or ``out['loss']``.

    Examples
    --------
    >>> import torch
    >>> model_loss({"loss": torch.tensor(2.0)}).item()
    2.0
    """
    value = out
    if not isinstance(value, Tensor):
        value = out.get("loss") if isinstance(out, Mapping) else getattr(out, "loss", None)
    if not isinstance(value, Tensor) or value.numel() != 1:
        raise ValueError(
            "without a teacher and a task_loss, finetune minimises the loss the model returns "
            "(a scalar tensor, or an output with .loss / ['loss'], e.g. a Hugging Face model "
            f"given labels); got an output of type {type(out).__name__}. Pass teacher= to "
            "distil, or task_loss=(output, target) -> loss with (inputs, target) batches"
        )
    return value.reshape(())


def check_objective(
    loss: Any, temperature: Any, outputs: Any, hidden: Any, task_loss: Any, alpha: Any
) -> list[str]:
    """Check the objective's options (as :class:`Objective` and ``FinetuneConfig`` take them).

    Returns ``hidden`` as a list of names (a single name becomes a list).

    Examples
    --------
    >>> check_objective("mse", 1.0, None, "encoder", None, 0.5)
    ['encoder']
    >>> check_objective("mse", 1.0, None, None, None, 2)
    Traceback (most recent call last):
    ...
    ValueError: alpha (the weight of the task loss) must be in [0, 1], got 2
    """
    if outputs is not None and not callable(outputs):
        raise TypeError(
            f"outputs must be a callable (output) -> Tensor, got {type(outputs).__name__}"
        )
    resolve_task_loss(task_loss)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha (the weight of the task loss) must be in [0, 1], got {alpha!r}")
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, (int, float))
        or not math.isfinite(temperature)
        or not temperature > 0
    ):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    resolve_loss(loss, temperature)  # a known name or a callable
    names = [hidden] if isinstance(hidden, str) else list(hidden) if hidden is not None else []
    if not all(isinstance(name, str) for name in names):
        raise TypeError(f"hidden must be submodule names (str), got {names!r}")
    return names


def _device_of(module: nn.Module) -> torch.device | None:
    for p in module.parameters():
        return p.device
    for b in module.buffers():
        return b.device
    return None


class Objective:
    """Computes the loss of one batch (see the module docs).

    Parameters
    ----------
    teacher
        Dense reference model, run in ``eval`` mode under ``no_grad``; or
        ``None``.
    loss
        ``'mse'``, ``'cosine'``, ``'kl'`` or ``callable(student, teacher)``.
    temperature
        Softening of ``'kl'``.
    outputs
        ``callable(model_output) -> Tensor`` picking what to distil;
        :func:`~tnquant.qat.losses.default_outputs` when ``None``.
    hidden
        Names of submodules (the same in student and teacher) whose outputs
        are distilled instead of the model output.
    task_loss
        ``callable(student_output, target) -> scalar`` on labelled batches, or a
        name in :data:`~tnquant.qat.losses.TASK_LOSSES`.
    alpha
        Weight of the task loss when both terms are present.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> objective = Objective(task_loss=nn.functional.mse_loss)
    >>> total, terms = objective(nn.Identity(), (torch.zeros(2), torch.ones(2)))
    >>> total.item(), terms
    (1.0, {'task': 1.0})
    """

    def __init__(
        self,
        teacher: nn.Module | None = None,
        loss: str | LossFn = "mse",
        temperature: float = 1.0,
        outputs: Callable[[Any], Tensor] | None = None,
        hidden: Iterable[str] | None = None,
        task_loss: str | Callable[[Any, Any], Tensor] | None = None,
        alpha: float = 0.5,
    ) -> None:
        if teacher is not None and not isinstance(teacher, nn.Module):
            raise TypeError(f"teacher must be an nn.Module or None, got {type(teacher).__name__}")
        self.hidden = check_objective(loss, temperature, outputs, hidden, task_loss, alpha)
        if teacher is None and (
            self.hidden
            or outputs is not None
            or temperature != 1.0
            or not (isinstance(loss, str) and loss == "mse")
        ):
            raise ValueError(
                "loss=, temperature=, outputs= and hidden= configure the "
                "distillation and need a teacher; got teacher=None"
            )
        self.teacher = teacher
        self.loss, self.temperature = loss, float(temperature)  # as given (checkpoint options)
        self.loss_fn = resolve_loss(loss, temperature) if teacher is not None else None
        self.outputs = outputs if outputs is not None else default_outputs
        self.task_loss = resolve_task_loss(task_loss)
        self.alpha = float(alpha)
        self.teacher_device = _device_of(teacher) if teacher is not None else None
        self._stack: ExitStack | None = None
        self._collectors: tuple[HiddenCollector, HiddenCollector] | None = None
        #: the teacher's targets by batch index (:mod:`tnquant.qat.teacher_cache`); off here,
        #: ``finetune`` sets the one its ``teacher_cache`` option asks for
        self.cache = TeacherCache(False)

    # ------------------------------------------------------------ set-up
    def attach(self, student: nn.Module) -> Objective:
        """Hook the ``hidden`` submodules of ``student`` (unwrapped) and the teacher."""
        self.detach()
        if self.hidden and self.teacher is not None:
            self._stack = ExitStack()
            s = self._stack.enter_context(HiddenCollector(student, self.hidden))
            t = self._stack.enter_context(HiddenCollector(self.teacher, self.hidden))
            self._collectors = (s, t)
        return self

    def detach(self) -> None:
        """Remove the hooks of :meth:`attach`."""
        if self._stack is not None:
            self._stack.close()
        self._stack = None
        self._collectors = None

    def inputs(self, batch: Any) -> Any:
        """What reaches the model: the whole batch, or ``inputs`` of ``(inputs, target)``."""
        if self.task_loss is None:
            return batch
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            what = f"a {type(batch).__name__}"
            if isinstance(batch, (tuple, list)):
                what += f" of length {len(batch)}"
            raise ValueError(
                f"with task_loss, every batch must be an (inputs, target) pair, got {what}"
            )
        return batch[0]

    # ----------------------------------------------------------- forward
    def teacher_targets(self, inputs: Any, key: int | None = None) -> list[Tensor]:
        """What the loss compares the student with: the teacher's distilled tensor(s).

        The ``hidden`` submodules' outputs, else ``outputs(teacher(inputs))``;
        read from :attr:`cache` for batch ``key`` when it holds them, else
        computed (in ``no_grad``) and offered to it.
        """
        cached = self.cache.get(key)
        if cached is not None:
            return cached
        teacher = cast(nn.Module, self.teacher)
        with torch.no_grad():
            t_out = call_model(teacher, move_batch(inputs, self.teacher_device))
        self.cache.calls += 1
        if self._collectors is not None:
            targets = self._collectors[1].take()
        else:
            targets = [self.outputs(t_out)]
        self.cache.put(key, targets)
        return targets

    def _distill(self, loss_fn: LossFn, out: Any, inputs: Any, key: int | None) -> Tensor:
        teachers = self.teacher_targets(inputs, key)
        if self._collectors is not None:
            students = self._collectors[0].take()
        else:
            students = [self.outputs(out)]
        terms = [loss_fn(s, t.to(s.device)) for s, t in zip(students, teachers, strict=True)]
        return torch.stack([_scalar(t, "loss") for t in terms]).mean()

    def __call__(
        self, model: nn.Module, batch: Any, key: int | None = None
    ) -> tuple[Tensor, dict[str, float]]:
        """``(total loss, {'distill': ..., 'task': ...})`` of one batch (``key``: its index)."""
        inputs = self.inputs(batch)
        out = call_model(model, inputs)
        terms: dict[str, float] = {}
        distill = task = None
        if self.teacher is not None and self.loss_fn is not None:
            distill = self._distill(self.loss_fn, out, inputs, key)
            terms["distill"] = float(distill.detach())
        if self.task_loss is not None:
            task = _scalar(self.task_loss(out, batch[1]), "task_loss")
            terms["task"] = float(task.detach())
        if distill is not None and task is not None:
            total = self.alpha * task + (1.0 - self.alpha) * distill
        elif distill is not None:
            total = distill
        elif task is not None:
            total = task
        else:
            total = model_loss(out)
        return total, terms


def _scalar(value: Any, what: str) -> Tensor:
    if not isinstance(value, Tensor) or value.numel() != 1:
        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(f"{what} must return a scalar tensor, got {shape}")
    return value.reshape(())
