"""``finetune``: quantization-aware training and distillation of a compressed model.

The loop: for every batch, the objective (:mod:`tnquant.qat.objective`),
backward through the straight-through estimators of the quantizers, a
check that loss and gradient norm are finite, gradient clipping, one
optimizer step and one scheduler step. Around it: a progress bar, an
``eval_fn`` callback, atomic checkpoints that a run resumes from to the
same bits, and DistributedDataParallel under ``torchrun``.

Defaults, and why
-----------------
- ``optimizer='adamw'``, ``lr=1e-4``, ``weight_decay=0``: a fine-tuning
  rate for pretrained weights (transformer weights and the cores
  decomposed from them are ``1e-2``-``1e-1`` in magnitude; AdamW moves each
  by about ``lr`` per step, well under a percent); no decay, since the
  cores start from a decomposition of pretrained weights and the runs are
  short. Decay, when set, applies to cores and other matrices, never to
  scales, biases or norms. (Eight default steps take a MiniLM-L6 with
  low-rank 4-bit FFNs from 0.31 to 0.56 cosine similarity to its teacher.)
- ``scale_lr=None``: the scales share ``lr``. The quantizer already
  multiplies the LSQ scale gradient by ``1 / sqrt(numel * qmax)``; Adam
  normalises per parameter, so a scale moves by about ``lr`` per step, a
  small fraction of a typical weight scale (``max|W| / qmax``).
- ``schedule='cosine'`` with ``warmup=0.05`` (5 % of the steps): warm-up
  keeps freshly initialised LSQ scales and the first Adam moments from
  throwing cores off their decomposition.
- ``clip_grad_norm=1.0``: guards against the rare large gradient of an STE
  at a rounding boundary.
- ``train='all'``, ``loss='mse'``: everything trainable (cores, scales,
  biases, norms) and a loss that needs no logits.

Examples
--------
>>> import torch
>>> from torch import nn
>>> from tnquant import LowRank, factorize
>>> _ = torch.manual_seed(0)
>>> teacher = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))
>>> student = __import__("copy").deepcopy(teacher)
>>> _ = factorize(student, {"0": LowRank(rank=2)}, progress=False)
>>> data = [torch.randn(8, 16) for _ in range(4)]
>>> x = torch.randn(64, 16)
>>> gap = lambda: (student(x) - teacher(x)).pow(2).mean().item()
>>> before = gap()
>>> report = finetune(student, data, teacher, epochs=10, lr=1e-2, progress=False)
>>> len(report.history.loss), gap() < before
(40, True)
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.dropout import _DropoutNd
from tqdm.auto import tqdm

from tnquant.batches import call_model, move_batch
from tnquant.layers.quantized import weight_pairs
from tnquant.qat import resume
from tnquant.qat.checkpoint import (
    FORMAT,
    prune_checkpoints,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from tnquant.qat.config import FinetuneConfig
from tnquant.qat.data import EpochPlan
from tnquant.qat.distributed import DistContext
from tnquant.qat.history import FinetuneReport, History
from tnquant.qat.losses import LossFn
from tnquant.qat.objective import Objective
from tnquant.qat.optim import make_optimizer, make_scheduler, warmup_steps
from tnquant.qat.params import layer_rows, param_groups, select_parameters
from tnquant.quant import fused as _fused
from tnquant.quant.frozen import FrozenTensor
from tnquant.quant.quantizer import Quantizer

__all__ = ["finetune", "use_fused", "FUSED_AUTO_MIN"]

#: ``fused='auto'`` turns the compiled fake-quantization kernel on from this
#: many fake-quantized weights (its compilation, seconds, then pays back).
FUSED_AUTO_MIN = 2**20


def _device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    raise ValueError("model has no parameters to fine-tune")


def quantized_weights(model: nn.Module) -> int:
    """Number of weight (and core) elements that ``model`` fake-quantizes.

    Examples
    --------
    >>> from torch import nn
    >>> from tnquant import QuantSpec, quantize
    >>> model = nn.Sequential(nn.Linear(8, 4), nn.Linear(4, 2))
    >>> _ = quantize(model, weights={"0": QuantSpec()}, progress=False)
    >>> quantized_weights(model)
    32
    """
    total = 0
    for module in model.modules():
        for _, tensor, quantizer in weight_pairs(module):
            if isinstance(quantizer, Quantizer) and quantizer.mode == "quantize":
                total += tensor.numel()
    return total


def use_fused(model: nn.Module, fused: bool | str) -> bool:
    """What ``finetune(fused=...)`` does for ``model`` (see its docstring).

    Examples
    --------
    >>> from torch import nn
    >>> use_fused(nn.Linear(4, 4), "auto"), use_fused(nn.Linear(4, 4), False)
    (False, False)
    """
    if fused == "auto":
        return (quantized_weights(model) >= FUSED_AUTO_MIN
                and _fused.available(_device(model)))
    return bool(fused)


def dropout_off(model: nn.Module) -> list[tuple[_DropoutNd, float]]:
    """Set ``p = 0`` on every dropout module of ``model``; the ``(module, p)`` to restore.

    Zeroing ``p`` (rather than putting the modules in ``eval`` mode) also
    silences attention dropout that reads ``self.dropout.p`` in the parent's
    forward, as Hugging Face's BERT attention does.

    Examples
    --------
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.1))
    >>> saved = dropout_off(model)
    >>> model[1].p, [p for _, p in saved]
    (0.0, [0.1])
    """
    saved = [(m, float(m.p)) for m in model.modules() if isinstance(m, _DropoutNd) and m.p > 0]
    for m, _ in saved:
        m.p = 0.0
    return saved


def _is_lazy(p: nn.Parameter) -> bool:
    return isinstance(p, nn.parameter.UninitializedParameter) or p.numel() == 0


class _Trainer:
    """State of one ``finetune`` call: plan, optimizer, position, history."""

    def __init__(self, model: nn.Module, data: Any, objective: Objective, cfg: FinetuneConfig,
                 ctx: DistContext, dropout: bool) -> None:
        self.model, self.objective, self.cfg, self.ctx = model, objective, cfg, ctx
        self.device = _device(model)
        self.plan = EpochPlan(data, ctx.world, ctx.rank, cfg.shuffle, cfg.seed)
        self.total = cfg.total_steps(self.plan.steps_per_epoch)
        self.options = resume.run_options(cfg, objective, dropout)
        resumed = None if cfg.resume_from is None else resume.read_resume(
            cfg.resume_from, self._record(), self.options)  # checked before any work
        if cfg.checkpoint_dir is not None:
            resume.prepare_checkpoint_dir(cfg.checkpoint_dir, ctx.is_main)
        self._initialize_lazy()
        self.chosen = select_parameters(model, cfg.train)
        trained = {id(p) for named in self.chosen.values() for _, p in named}
        for p in model.parameters():
            p.requires_grad_(id(p) in trained)
        self.params = [p for named in self.chosen.values() for _, p in named]
        self.optimizer = make_optimizer(
            cfg.optimizer, param_groups(self.chosen, cfg.lr, cfg.scale_lr, cfg.weight_decay))
        self.scheduler = make_scheduler(self.optimizer, cfg.schedule, self.total,
                                        warmup_steps(cfg.warmup, self.total))
        self.history = History()
        self.step = self.epoch = self.epoch_steps = 0
        self.pending: dict[str, Any] | None = None
        self.epoch_rng: dict[str, Any] = {}
        self.epoch_gen: Tensor | None = None
        if resumed is not None:
            self._resume(*resumed)
        self.wrapped = ctx.wrap(model, self.device, cfg.ddp_kwargs)

    # ------------------------------------------------------------ set-up
    def _initialize_lazy(self) -> None:
        """One forward pass (eval, no_grad) when learnable quantizers are still empty.

        They take their initial qparams on their first call; the optimizer
        and DDP need their final shapes. Random states are left unchanged.
        """
        if not any(_is_lazy(p) for p in self.model.parameters()):
            return
        saved, gen = rng_state(), self.plan.generator
        gen_state = gen.get_state() if gen is not None else None
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                batch = self.objective.inputs(self.plan.first_batch())
                call_model(self.model, move_batch(batch, self.device))
        finally:
            self.model.train(was_training)
            set_rng_state(saved)
            if gen is not None and gen_state is not None:
                gen.set_state(gen_state)

    def _record(self) -> dict[str, Any]:
        return self.cfg.record(self.plan.steps_per_epoch, self.ctx.world)

    def _resume(self, state: dict[str, Any], path: os.PathLike[str]) -> None:
        """Continue from a checkpoint :func:`~tnquant.qat.resume.read_resume` checked."""
        resume.restore(state, path, self.model, self.optimizer, self.scheduler)
        self.step, self.epoch = int(state["step"]), int(state["epoch"])
        self.epoch_steps = int(state["epoch_steps"])
        self.history = History.from_dict(state["history"])
        self.history.resumed_from = self.step
        self.pending = state["ranks"][self.ctx.rank]

    # -------------------------------------------------------------- loop
    def run(self) -> FinetuneReport:
        cfg = self.cfg
        clock = (time.perf_counter(), self.history.time_s)
        bar = tqdm(total=self.total, initial=self.step, desc="finetune", dynamic_ncols=True,
                   disable=not (cfg.progress and self.ctx.is_main))
        self.model.train()
        self.objective.attach(self.model)
        try:
            while self.step < self.total:
                done = self.step
                self._run_epoch(bar, clock)
                if self.step == done:
                    raise RuntimeError(f"epoch {self.epoch - 1} of data gave no batch; "
                                       f"expected {self.plan.steps_per_epoch}")
        finally:
            self.objective.detach()
            bar.close()
            self.wrapped = self.model  # drops DDP and its gradient hooks
        self.history.time_s = clock[1] + time.perf_counter() - clock[0]
        return FinetuneReport(self.history, layer_rows(self.model, self.chosen))

    def _run_epoch(self, bar: Any, clock: tuple[float, float]) -> None:
        gen = self.plan.generator
        positioned: Callable[[], None] | None = None
        if self.pending is not None:
            pending, self.pending = self.pending, None
            set_rng_state(pending["epoch_rng"])
            loader_rng = pending.get("loader_rng")
            if gen is not None and loader_rng is not None:
                gen.set_state(loader_rng[0])

            def positioned() -> None:
                set_rng_state(pending["rng"])
                if gen is not None and loader_rng is not None:
                    gen.set_state(loader_rng[1])

        self.epoch_rng = rng_state()
        self.epoch_gen = gen.get_state() if gen is not None else None
        for batch in self.plan.batches(self.epoch, self.epoch_steps, positioned):
            self._train_step(batch)
            self.step += 1
            self.epoch_steps += 1
            self._after_step(bar, clock)
            if self.step >= self.total:
                return
        self.epoch += 1
        self.epoch_steps = 0

    def _nonfinite(self, what: str, value: float) -> FloatingPointError:
        self.optimizer.zero_grad(set_to_none=True)
        step = self.step + 1
        return FloatingPointError(
            f"{what} is {value} at step {step} (epoch {self.epoch}, batch {self.epoch_steps} "
            f"of the epoch on rank {self.ctx.rank}); stopped before the optimizer step, so the "
            f"parameters are those after step {step - 1}. Lower lr, set clip_grad_norm, or "
            "check that batch for NaN/Inf")

    def _train_step(self, batch: Any) -> None:
        batch = move_batch(batch, self.device)
        self.optimizer.zero_grad(set_to_none=True)
        total, terms = self.objective(self.wrapped, batch)
        value = float(total.detach())
        finite = math.isfinite(value)
        if not finite and not self.ctx.enabled:
            raise self._nonfinite("loss", value)
        # under DDP every rank runs backward (the gradient all-reduce must
        # complete) and a NaN spreads to all ranks, which then stop together
        total.backward()
        max_norm = self.cfg.clip_grad_norm
        norm = float(nn.utils.clip_grad_norm_(self.params, max_norm or math.inf))
        if not finite:
            raise self._nonfinite("loss", value)
        if not math.isfinite(norm):
            raise self._nonfinite("gradient norm", norm)
        lr = float(self.optimizer.param_groups[0]["lr"])
        self.optimizer.step()
        self.scheduler.step()
        self.history.log_step(self.step + 1, self.epoch, value, lr, terms.get("distill"),
                              terms.get("task"))

    def _after_step(self, bar: Any, clock: tuple[float, float]) -> None:
        cfg, step = self.cfg, self.step
        last = step >= self.total
        self.history.time_s = clock[1] + time.perf_counter() - clock[0]
        if cfg.eval_fn is not None and (last or (cfg.eval_every and step % cfg.eval_every == 0)):
            self._evaluate()
        if cfg.checkpoint_dir is not None and (
                last or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0)):
            self._checkpoint()
        bar.set_postfix(loss=f"{self.history.loss[-1]:.4g}", refresh=False)
        bar.update(1)

    def _evaluate(self) -> None:
        """``eval_fn(model)`` on rank 0, in eval mode under no_grad, RNG untouched."""
        if not self.ctx.is_main or self.cfg.eval_fn is None:
            return
        saved = rng_state()
        self.model.eval()
        try:
            with torch.no_grad():
                metrics = self.cfg.eval_fn(self.model)
        finally:
            self.model.train()
            set_rng_state(saved)
        self.history.log_eval(self.step, metrics)

    def _checkpoint(self) -> None:
        """Gather every rank's random state; rank 0 writes the checkpoint."""
        gen = self.plan.generator
        epoch, epoch_steps = self.epoch, self.epoch_steps
        epoch_rng, epoch_gen = self.epoch_rng, self.epoch_gen
        if epoch_steps >= self.plan.steps_per_epoch:  # the next epoch starts from here
            epoch, epoch_steps = epoch + 1, 0
            epoch_rng = rng_state()
            epoch_gen = gen.get_state() if gen is not None else None
        mine = {"rng": rng_state(), "epoch_rng": epoch_rng,
                "loader_rng": None if gen is None else [epoch_gen, gen.get_state()]}
        ranks = self.ctx.gather(mine)
        if not self.ctx.is_main or self.cfg.checkpoint_dir is None:
            return
        state = {
            "format": FORMAT, "step": self.step, "epoch": epoch, "epoch_steps": epoch_steps,
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "ranks": ranks,
            "config": self._record(), "history": self.history.to_dict(),
            "options": self.options, "optimizer_class": resume.class_name(self.optimizer)}
        save_checkpoint(state, self.cfg.checkpoint_dir, self.step)
        prune_checkpoints(self.cfg.checkpoint_dir, self.cfg.keep_checkpoints)


def finetune(
    model: nn.Module,
    data: Any,
    teacher: nn.Module | None = None,
    *,
    loss: str | LossFn = "mse",
    temperature: float = 1.0,
    outputs: Callable[[Any], Tensor] | None = None,
    hidden: Iterable[str] | None = None,
    task_loss: Callable[[Any, Any], Tensor] | None = None,
    alpha: float = 0.5,
    epochs: int | None = 1,
    max_steps: int | None = None,
    lr: float = 1e-4,
    scale_lr: float | None = None,
    weight_decay: float = 0.0,
    optimizer: str | Callable[[list[dict[str, Any]]], torch.optim.Optimizer] = "adamw",
    schedule: str = "cosine",
    warmup: int | float = 0.05,
    clip_grad_norm: float | None = 1.0,
    train: str = "all",
    shuffle: bool = False,
    seed: int = 0,
    eval_fn: Callable[[nn.Module], dict[str, Any]] | None = None,
    eval_every: int | None = None,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    checkpoint_every: int | None = None,
    keep_checkpoints: int | None = 2,
    resume_from: str | os.PathLike[str] | None = None,
    ddp: bool | str = "auto",
    ddp_kwargs: dict[str, Any] | None = None,
    fused: bool | str = "auto",
    dropout: bool | None = None,
    progress: bool = True,
) -> FinetuneReport:
    """Fine-tune ``model`` in place: cores and quantizer scales through the STEs.

    Parameters
    ----------
    model
        A model, factorized and/or quantized or neither. Trained in place.
    data
        A list/tuple of batches, a ``DataLoader``, or one tensor (one batch).
        Each batch reaches the model by :func:`tnquant.batches.call_model`;
        it is an ``(inputs, target)`` pair only when ``task_loss`` is given.
        Batches are moved to the model's device. See
        :mod:`tnquant.qat.data` for the order and the sharding under DDP.
    teacher
        Model to distil from (typically the original dense one), called on
        the same inputs in ``eval`` mode under ``no_grad``; ``None``: no
        distillation.
    loss, temperature
        Distillation loss: ``'mse'``, ``'cosine'``, ``'kl'`` (on logits,
        softened by ``temperature``) or ``callable(student, teacher)``.
    outputs
        ``callable(model_output) -> Tensor`` giving what to distil (e.g.
        ``lambda out: out.last_hidden_state``); default
        :func:`~tnquant.qat.losses.default_outputs` (a tensor, the first
        element of a tuple, ``.logits`` or ``.last_hidden_state``).
    hidden
        Names of submodules (present in both models, e.g.
        ``'encoder.layer.0'``) whose outputs are distilled, by forward hooks,
        instead of the model output; the loss is their mean.
    task_loss, alpha
        ``callable(student_output, target) -> scalar`` on labelled batches;
        with a teacher the total is ``alpha * task + (1 - alpha) * distill``.
        Without teacher and task loss the model's own loss is minimised (a
        scalar output, or ``out.loss`` as Hugging Face models return).
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
        model fake-quantizes at least ``2**20`` weights (``FUSED_AUTO_MIN``)
        and the kernel builds on the model's device; ``True``: on (eager if
        it cannot build, with a warning); ``False``: off. The process-wide
        setting is restored on return.
    dropout
        ``False``: set ``p = 0`` on every dropout module of ``model`` for the
        run (restored on return), so that the student chases the teacher's
        eval-mode function without noise; ``True``: the model's own dropout.
        ``None`` (default): ``False`` with a teacher, ``True`` without.
        Distilling a 3-bit MiniLM-L6 without dropout ends at mean cosine
        0.982 to the teacher instead of 0.968 (BENCHMARKS.md).
    progress
        Show a progress bar with the loss (rank 0).

    Returns
    -------
    FinetuneReport
        Rows: trained elements per layer (cores, scales, other).
        ``.history``: loss and learning rate per step, the distillation and
        task terms, evaluations, wall time.

    Raises
    ------
    FloatingPointError
        On a NaN/Inf loss or gradient norm, naming the step, before the
        optimizer step (the parameters are those of the previous step).

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> _ = torch.manual_seed(0)
    >>> model = nn.Linear(4, 1)
    >>> x = torch.randn(32, 4); y = x.sum(1, keepdim=True)
    >>> data = [(x[i:i + 8], y[i:i + 8]) for i in range(0, 32, 8)]
    >>> report = finetune(model, data, task_loss=nn.functional.mse_loss, epochs=20,
    ...                   lr=0.1, progress=False)
    >>> loss = report.history.loss  # one value per step, 4 steps per epoch
    >>> len(loss), sum(loss[-4:]) < 0.01 * sum(loss[:4])
    (80, True)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(model, nn.parallel.DistributedDataParallel):
        raise TypeError("pass the unwrapped model: finetune wraps it in "
                        "DistributedDataParallel itself")
    if any(isinstance(m, FrozenTensor) for m in model.modules()):
        raise ValueError("model holds converted (integer, frozen) tensors: fine-tune before "
                         "tnquant.convert, which ends training")
    if teacher is model:
        raise ValueError("teacher must be a separate model (e.g. the original dense one), "
                         "got the student itself")
    if dropout is not None and not isinstance(dropout, bool):
        raise TypeError(f"dropout must be True, False or None, got {dropout!r}")
    if dropout is None:
        dropout = teacher is None
    objective = Objective(teacher, loss, temperature, outputs, hidden, task_loss, alpha)
    if objective.hidden:  # the layers after the hooked ones get no gradient
        ddp_kwargs = {"find_unused_parameters": True, **(ddp_kwargs or {})}
    cfg = FinetuneConfig(
        epochs=epochs, max_steps=max_steps, lr=lr, scale_lr=scale_lr,
        weight_decay=weight_decay, optimizer=optimizer, schedule=schedule, warmup=warmup,
        clip_grad_norm=clip_grad_norm, train=train, shuffle=shuffle, seed=seed,
        eval_fn=eval_fn, eval_every=eval_every, checkpoint_dir=checkpoint_dir,
        checkpoint_every=checkpoint_every, keep_checkpoints=keep_checkpoints,
        resume_from=resume_from, ddp=ddp, ddp_kwargs=ddp_kwargs, fused=fused,
        progress=progress)
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    teacher_training = teacher.training if teacher is not None else False
    ctx = DistContext.setup(cfg.ddp, _device(model))
    dropouts = [] if dropout else dropout_off(model)
    try:
        if teacher is not None:
            teacher.eval()
        with _fused.fused(use_fused(model, cfg.fused)):
            return _Trainer(model, data, objective, cfg, ctx, dropout).run()
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        for module, p_drop in dropouts:
            module.p = p_drop
        model.train(was_training)
        if teacher is not None:
            teacher.train(teacher_training)
        ctx.teardown()
