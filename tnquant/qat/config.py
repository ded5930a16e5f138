"""The options of ``finetune``, in one place and checked once (:class:`FinetuneConfig`).

``finetune(model, data, teacher, config=FinetuneConfig(...))`` takes them as
one object, ``finetune(model, data, teacher, lr=...)`` as keywords (any field
of :class:`FinetuneConfig`), and with both the keywords override the fields
of ``config``. The recipe's ``[finetune]`` table of ``tnquant compress`` is
derived from these fields (names, defaults) and from the choice constants
below (:data:`~tnquant.qat.losses.LOSSES`,
:data:`~tnquant.qat.losses.TASK_LOSSES`, :data:`~tnquant.qat.optim.OPTIMIZERS`,
:data:`~tnquant.qat.optim.SCHEDULES`, :data:`~tnquant.qat.params.TRAIN_CHOICES`,
:data:`~tnquant.qat.amp.AMP_CHOICES`).

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
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields, replace
from typing import Any

from torch import Tensor

from tnquant.qat.amp import check_amp
from tnquant.qat.losses import LossFn
from tnquant.qat.objective import check_objective
from tnquant.qat.optim import OPTIMIZERS, SCHEDULES, warmup_steps
from tnquant.qat.params import TRAIN_CHOICES
from tnquant.qat.teacher_cache import DEFAULT_CACHE_BYTES, check_cache_options

__all__ = ["FinetuneConfig", "merge_config"]


def _number(
    name: str,
    value: Any,
    *,
    minimum: float = 0.0,
    strict: bool = True,
    integer: bool = False,
    allow_none: bool = False,
) -> None:
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
    """Every option of ``finetune``; validated on creation (each bad field named).

    Parameters
    ----------
    epochs, max_steps
        Length of the run: ``epochs`` passes over ``data`` or ``max_steps``
        optimizer steps, whichever is shorter (``epochs=None``: by steps).
    lr, scale_lr, weight_decay
        Learning rate of the cores and other parameters; of the quantizer
        scales (``None``: ``lr``); decoupled weight decay of the cores and
        other matrices (never of scales, biases or norms).
    optimizer
        ``'adamw'``, ``'adam'``, ``'sgd'`` (momentum 0.9) or
        ``callable(param_groups) -> Optimizer``; the groups (``'cores'``,
        ``'scales'``, ``'other'``, ``'no_decay'``) carry their ``lr`` and
        ``weight_decay``, which override the optimizer's defaults.
    schedule, warmup
        ``'cosine'``, ``'linear'`` (to zero) or ``'constant'``, after a linear
        warm-up of ``warmup`` steps (an int) or that fraction of the run (a
        float); see :mod:`tnquant.qat.optim`.
    clip_grad_norm
        Clip the gradient norm of the trained parameters; ``None``: no clip.
    train
        ``'all'``, ``'cores'``, ``'scales'`` or ``'cores+scales'`` (see
        :mod:`tnquant.qat.params`). The others are frozen during the run; every
        ``requires_grad`` flag is restored on return. Parameters frozen by
        the caller stay frozen.
    shuffle, seed
        Shuffle a list of batches every epoch, from ``seed`` and the epoch
        only. Dropout draws from torch's global generator: seed it yourself
        for reproducible runs.
    eval_fn, eval_every
        ``eval_fn(model) -> dict`` run on rank 0 in ``eval`` mode under
        ``no_grad`` every ``eval_every`` steps and after the last step,
        without disturbing any random state; logged in ``history.evals``.
    checkpoint_dir, checkpoint_every, keep_checkpoints
        Write ``step_XXXXXXXX.pt`` (model, optimizer, scheduler, position,
        random states, history; see :mod:`tnquant.qat.checkpoint`) every
        ``checkpoint_every`` steps and after the last step, atomically,
        from rank 0; keep the latest ``keep_checkpoints`` (``None``: all).
        Temporaries a killed run left there (``.step_*.pt.*.tmp``) are removed.
    resume_from
        A checkpoint file, or a directory (its newest readable checkpoint; an
        unreadable one is skipped with a warning). The run continues at its
        step, and with the same arguments and data ends with the same
        parameters, bit for bit, as an uninterrupted run. Other data, number
        of processes or options are refused up front (``ValueError`` listing
        every difference); only ``progress``, ``eval_fn``, ``eval_every``,
        ``checkpoint_*``, ``keep_checkpoints``, ``ddp``, ``ddp_kwargs`` and
        ``fused`` may change (:mod:`tnquant.qat.resume`).
    ddp, ddp_kwargs
        ``'auto'``: DistributedDataParallel when a process group of more than
        one process exists or ``torchrun`` launched this process (see
        :mod:`tnquant.qat.distributed`); ``True``: require it; ``False``:
        never. ``ddp_kwargs`` go to ``DistributedDataParallel`` (with
        ``hidden``, ``find_unused_parameters`` defaults to ``True``: the
        layers after the hooked ones get no gradient).
    fused
        Fake-quantize with the compiled kernel of :mod:`tnquant.quant.fused`
        (same forward values, ~4x less quantizer time per step; the first
        steps pay a few seconds of compilation). ``'auto'``: on when the
        model fake-quantizes at least ``2**20`` weights
        (``tnquant.qat.finetune.FUSED_AUTO_MIN``) and the kernel builds on the
        model's device; ``True``: on (eager if it cannot build, with a
        warning); ``False``: off. The process-wide setting is restored on
        return.
    amp
        Mixed precision: ``'bf16'`` or ``'fp16'`` runs the forward passes
        (student, teacher, loss) under ``torch.autocast`` with that dtype,
        ``'fp16'`` with a ``torch.amp.GradScaler`` (CPU too); the optimizer
        steps float32 master weights (a float16 / bfloat16 model is cast to
        float32 for the run and back on return; ``eval_fn`` runs under the
        same autocast); steps the scaler skipped are listed in
        ``history.skipped``. ``None`` (default): the model's own dtype;
        trainable float16 parameters are then refused before any step,
        bfloat16 ones train with a warning. See :mod:`tnquant.qat.amp`.
    progress
        Show a progress bar with the loss (rank 0).
    loss, temperature
        Distillation loss: ``'mse'``, ``'cosine'``, ``'kl'`` (on logits,
        softened by ``temperature``) or ``callable(student, teacher)``.
    outputs
        ``callable(model_output) -> Tensor`` giving what to distil (e.g.
        ``lambda out: out.last_hidden_state``); default
        :func:`~tnquant.qat.losses.default_outputs` (the one rule of
        :func:`tnquant.core.model_output`: a tensor, the first tensor of a
        tuple, ``.logits`` or ``.last_hidden_state``).
    hidden
        Names of submodules (present in both models, e.g.
        ``'encoder.layer.0'``) whose outputs are distilled, by forward hooks,
        instead of the model output; the loss is their mean.
    task_loss, alpha
        ``callable(student_output, target) -> scalar`` on labelled batches (or
        a name in :data:`~tnquant.qat.losses.TASK_LOSSES`:
        ``'cross_entropy'``); with a teacher the total is
        ``alpha * task + (1 - alpha) * distill``. Without teacher and task
        loss the model's own loss is minimised (a scalar output, or
        ``out.loss`` as Hugging Face models return).
    teacher_cache, teacher_cache_bytes
        Reuse the teacher's targets across epochs instead of calling the
        teacher on every step (:mod:`tnquant.qat.teacher_cache`; the run
        computes the same parameters either way). ``'auto'`` (default): when
        ``data`` is a list or tuple of batches, caching up to
        ``teacher_cache_bytes`` of targets (default ``2**30``, 1 GiB; the
        batches past it call the teacher each time); ``True``: every batch
        of any sequence, unbounded; ``False``: never.
    dropout
        ``False``: set ``p = 0`` on every dropout module of the model for the
        run (restored on return), so that the student chases the teacher's
        eval-mode function without noise; ``True``: the model's own dropout.
        ``None`` (default): ``False`` with a teacher, ``True`` without.
        Distilling a 3-bit MiniLM-L6 without dropout ends at mean cosine
        0.982 to the teacher instead of 0.968 (BENCHMARKS.md).

    Defaults, and why
    -----------------
    - ``optimizer='adamw'``, ``lr=1e-4``, ``weight_decay=0``: a fine-tuning
      rate for pretrained weights (transformer weights and the cores
      decomposed from them are ``1e-2``-``1e-1`` in magnitude; AdamW moves
      each by about ``lr`` per step, well under a percent); no decay, since
      the cores start from a decomposition of pretrained weights and the
      runs are short. Decay, when set, applies to cores and other matrices,
      never to scales, biases or norms. (Eight default steps take a
      MiniLM-L6 with low-rank 4-bit FFNs from 0.31 to 0.56 cosine
      similarity to its teacher.)
    - ``scale_lr=None``: the scales share ``lr``. The quantizer already
      multiplies the LSQ scale gradient by ``1 / sqrt(numel * qmax)``; Adam
      normalises per parameter, so a scale moves by about ``lr`` per step, a
      small fraction of a typical weight scale (``max|W| / qmax``).
    - ``schedule='cosine'`` with ``warmup=0.05`` (5 % of the steps): warm-up
      keeps freshly initialised LSQ scales and the first Adam moments from
      throwing cores off their decomposition.
    - ``clip_grad_norm=1.0``: guards against the rare large gradient of an
      STE at a rounding boundary.
    - ``train='all'``, ``loss='mse'``: everything trainable (cores, scales,
      biases, norms) and a loss that needs no logits.

    Examples
    --------
    >>> FinetuneConfig(lr=0.0)
    Traceback (most recent call last):
    ...
    ValueError: lr must be a number > 0, got 0.0
    >>> FinetuneConfig(loss="kl", temperature=2.0).temperature
    2.0
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
    amp: str | None = None
    progress: bool = True
    loss: str | LossFn = "mse"
    temperature: float = 1.0
    outputs: Callable[[Any], Tensor] | None = None
    hidden: Iterable[str] | None = None
    task_loss: str | Callable[[Any, Any], Tensor] | None = None
    alpha: float = 0.5
    dropout: bool | None = None
    teacher_cache: bool | str = "auto"
    teacher_cache_bytes: int = DEFAULT_CACHE_BYTES

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
            raise TypeError(
                f"eval_fn must be a callable (model) -> dict, got {type(self.eval_fn).__name__}"
            )
        if self.eval_every is not None and self.eval_fn is None:
            raise ValueError("eval_every is set but eval_fn is None; pass eval_fn=")
        self._check_run()
        if self.checkpoint_every is not None and self.checkpoint_dir is None:
            raise ValueError(
                "checkpoint_every is set but checkpoint_dir is None; pass checkpoint_dir="
            )
        if not (isinstance(self.ddp, bool) or _choice(self.ddp, ("auto",))):
            raise ValueError(f"ddp must be True, False or 'auto', got {self.ddp!r}")
        if self.ddp_kwargs is not None and not isinstance(self.ddp_kwargs, dict):
            raise TypeError(
                f"ddp_kwargs must be a dict or None, got {type(self.ddp_kwargs).__name__}"
            )
        if not (isinstance(self.fused, bool) or _choice(self.fused, ("auto",))):
            raise ValueError(f"fused must be True, False or 'auto', got {self.fused!r}")
        check_amp(self.amp)
        if not isinstance(self.progress, bool):
            raise TypeError(f"progress must be a bool, got {type(self.progress).__name__}")
        check_objective(
            self.loss, self.temperature, self.outputs, self.hidden, self.task_loss, self.alpha
        )
        if self.dropout is not None and not isinstance(self.dropout, bool):
            raise TypeError(f"dropout must be True, False or None, got {self.dropout!r}")
        check_cache_options(self.teacher_cache, self.teacher_cache_bytes)

    def _check_choices(self) -> None:
        if not callable(self.optimizer) and not _choice(self.optimizer, OPTIMIZERS):
            raise ValueError(
                f"optimizer must be one of {sorted(OPTIMIZERS)} or a callable "
                f"(param_groups) -> Optimizer, got {self.optimizer!r}"
            )
        if not _choice(self.schedule, SCHEDULES):
            raise ValueError(f"schedule must be one of {list(SCHEDULES)}, got {self.schedule!r}")
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
                raise TypeError(
                    f"{name} must be a path (str or os.PathLike) or None, got "
                    f"{type(value).__name__}"
                )
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
        return {
            "steps_per_epoch": steps_per_epoch,
            "world": world,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "total_steps": self.total_steps(steps_per_epoch),
        }


def merge_config(config: FinetuneConfig | None, options: dict[str, Any]) -> FinetuneConfig:
    """``config`` (default :class:`FinetuneConfig()`) with the keyword ``options`` overriding it.

    Raises
    ------
    TypeError
        If ``config`` is not a ``FinetuneConfig`` or an option is not one of its fields.

    Examples
    --------
    >>> merge_config(FinetuneConfig(lr=1e-3, epochs=3), {"lr": 1e-2}).lr
    0.01
    >>> merge_config(None, {"lrr": 1.0})
    Traceback (most recent call last):
    ...
    TypeError: finetune got an unexpected keyword argument 'lrr'; its options are ...
    """
    if config is not None and not isinstance(config, FinetuneConfig):
        raise TypeError(f"config must be a FinetuneConfig or None, got {type(config).__name__}")
    names = [f.name for f in fields(FinetuneConfig)]
    for key in options:
        if key not in names:
            raise TypeError(
                f"finetune got an unexpected keyword argument {key!r}; its options "
                f"are the fields of FinetuneConfig: {', '.join(names)}"
            )
    if config is None:
        return FinetuneConfig(**options)
    return replace(config, **options) if options else config
