"""The training loop of ``finetune``: one :class:`Trainer` per call.

For every batch: the objective (:mod:`tnquant.qat.objective`, under
autocast with ``amp``: :mod:`tnquant.qat.amp`), backward through the
straight-through estimators of the quantizers (through the loss scaler with
``amp='fp16'``), a check that loss and gradient norm are finite, gradient
clipping, one optimizer step and one scheduler step. Around it: a progress
bar, an ``eval_fn`` callback, atomic checkpoints that a run resumes from to
the same bits (:mod:`tnquant.qat.resume`), and DistributedDataParallel under
``torchrun`` (:mod:`tnquant.qat.distributed`). :func:`tnquant.qat.finetune.finetune`
sets the model up, runs a :class:`Trainer` and restores the model.

Examples
--------
>>> import torch
>>> from torch import nn
>>> from tnquant.qat.config import FinetuneConfig
>>> from tnquant.qat.distributed import DistContext
>>> from tnquant.qat.objective import Objective
>>> model = nn.Linear(2, 1)
>>> cfg = FinetuneConfig(epochs=2, progress=False)
>>> ctx = DistContext.setup(False, torch.device("cpu"))
>>> data = [(torch.ones(4, 2), torch.zeros(4, 1))]
>>> trainer = Trainer(model, data, Objective(task_loss=nn.functional.mse_loss), cfg, ctx, True)
>>> len(trainer.run().history.loss)
2
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from tnquant.batches import call_model, move_batch
from tnquant.qat import resume
from tnquant.qat.amp import Precision
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
from tnquant.qat.objective import Objective
from tnquant.qat.optim import make_optimizer, make_scheduler, warmup_steps
from tnquant.qat.params import layer_rows, param_groups, select_parameters
from tnquant.qat.teacher_cache import TeacherCache

__all__ = ["Trainer", "model_device"]


def model_device(model: nn.Module) -> torch.device:
    """The device of the first parameter of ``model`` (it must have one)."""
    for p in model.parameters():
        return p.device
    raise ValueError("model has no parameters to fine-tune")


def _is_lazy(p: nn.Parameter) -> bool:
    return isinstance(p, nn.parameter.UninitializedParameter) or p.numel() == 0


class Trainer:
    """State of one ``finetune`` call: plan, optimizer, position, history."""

    def __init__(
        self,
        model: nn.Module,
        data: Any,
        objective: Objective,
        cfg: FinetuneConfig,
        ctx: DistContext,
        dropout: bool,
    ) -> None:
        self.model, self.objective, self.cfg, self.ctx = model, objective, cfg, ctx
        self.device = model_device(model)
        self.precision = Precision(cfg.amp, self.device)
        self.plan = EpochPlan(data, ctx.world, ctx.rank, cfg.shuffle, cfg.seed)
        if objective.teacher is not None:
            objective.cache = TeacherCache.for_data(
                self.plan.data, cfg.teacher_cache, cfg.teacher_cache_bytes
            )
        self.total = cfg.total_steps(self.plan.steps_per_epoch)
        self.options = resume.run_options(cfg, objective, dropout)
        resumed = (
            None
            if cfg.resume_from is None
            else resume.read_resume(cfg.resume_from, self._record(), self.options)
        )  # checked before any work
        if cfg.checkpoint_dir is not None:
            resume.prepare_checkpoint_dir(cfg.checkpoint_dir, ctx.is_main)
        self._initialize_lazy()
        self.chosen = select_parameters(model, cfg.train)
        trained = {id(p) for named in self.chosen.values() for _, p in named}
        for p in model.parameters():
            p.requires_grad_(id(p) in trained)
        self.params = [p for named in self.chosen.values() for _, p in named]
        self.optimizer = make_optimizer(
            cfg.optimizer, param_groups(self.chosen, cfg.lr, cfg.scale_lr, cfg.weight_decay)
        )
        self.scheduler = make_scheduler(
            self.optimizer, cfg.schedule, self.total, warmup_steps(cfg.warmup, self.total)
        )
        self.history = History()
        self.step = self.epoch = self.epoch_steps = 0
        self.pending: dict[str, Any] | None = None
        self.epoch_rng: dict[str, Any] = {}
        self.epoch_gen: Tensor | None = None
        if resumed is not None:
            self._resume(*resumed)
        self.calls_before = self.history.teacher_calls  # teacher passes of earlier segments
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
            with torch.no_grad(), self.precision.autocast():
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
        resume.restore(state, Path(path), self.model, self.optimizer, self.scheduler)
        self.precision.load_state_dict(state.get("scaler"), f"resume_from: {path}")
        self.step, self.epoch = int(state["step"]), int(state["epoch"])
        self.epoch_steps = int(state["epoch_steps"])
        self.history = History.from_dict(state["history"])
        self.history.resumed_from = self.step
        self.pending = state["ranks"][self.ctx.rank]

    # -------------------------------------------------------------- loop
    def run(self) -> FinetuneReport:
        cfg = self.cfg
        clock = (time.perf_counter(), self.history.time_s)
        bar = tqdm(
            total=self.total,
            initial=self.step,
            desc="finetune",
            dynamic_ncols=True,
            disable=not (cfg.progress and self.ctx.is_main),
        )
        self.model.train()
        self.objective.attach(self.model)
        try:
            while self.step < self.total:
                done = self.step
                self._run_epoch(bar, clock)
                if self.step == done:
                    raise RuntimeError(
                        f"epoch {self.epoch - 1} of data gave no batch; "
                        f"expected {self.plan.steps_per_epoch}"
                    )
        finally:
            self.objective.detach()
            bar.close()
            self.wrapped = self.model  # drops DDP and its gradient hooks
            self.objective.cache.clear()  # the counts stay in the history
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
        for key, batch in self.plan.keyed_batches(self.epoch, self.epoch_steps, positioned):
            self._train_step(batch, key)
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
            "check that batch for NaN/Inf"
        )

    def _train_step(self, batch: Any, key: int | None = None) -> None:
        batch = move_batch(batch, self.device)
        self.optimizer.zero_grad(set_to_none=True)
        with self.precision.autocast():
            total, terms = self.objective(self.wrapped, batch, key)
        cache = self.objective.cache
        self.history.teacher_calls = self.calls_before + cache.calls
        self.history.teacher_cache_bytes = cache.nbytes
        value = float(total.detach())
        finite = math.isfinite(value)
        if not finite and not self.ctx.enabled:
            raise self._nonfinite("loss", value)
        # under DDP every rank runs backward (the gradient all-reduce must
        # complete) and a NaN spreads to all ranks, which then stop together
        self.precision.backward(total, self.optimizer)
        max_norm = self.cfg.clip_grad_norm
        norm = float(nn.utils.clip_grad_norm_(self.params, max_norm or math.inf))
        if not finite:
            raise self._nonfinite("loss", value)
        if not math.isfinite(norm) and self.precision.scaler is None:
            raise self._nonfinite("gradient norm", norm)
        lr = float(self.optimizer.param_groups[0]["lr"])
        if not self.precision.step(self.optimizer):  # fp16: overflowed, the scale halves
            self.history.skipped.append(self.step + 1)
            with warnings.catch_warnings():  # a skipped first step is not a misuse
                warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step", Warning)
                self.scheduler.step()
        else:
            self.scheduler.step()
        self.history.log_step(
            self.step + 1, self.epoch, value, lr, terms.get("distill"), terms.get("task")
        )

    def _after_step(self, bar: Any, clock: tuple[float, float]) -> None:
        cfg, step = self.cfg, self.step
        last = step >= self.total
        self.history.time_s = clock[1] + time.perf_counter() - clock[0]
        if cfg.eval_fn is not None and (last or (cfg.eval_every and step % cfg.eval_every == 0)):
            self._evaluate()
        if cfg.checkpoint_dir is not None and (
            last or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0)
        ):
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
            with torch.no_grad(), self.precision.autocast():
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
        mine = {
            "rng": rng_state(),
            "epoch_rng": epoch_rng,
            "loader_rng": None if gen is None else [epoch_gen, gen.get_state()],
        }
        ranks = self.ctx.gather(mine)
        if not self.ctx.is_main or self.cfg.checkpoint_dir is None:
            return
        state = {
            "format": FORMAT,
            "step": self.step,
            "epoch": epoch,
            "epoch_steps": epoch_steps,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "ranks": ranks,
            "config": self._record(),
            "history": self.history.to_dict(),
            "options": self.options,
            "optimizer_class": resume.class_name(self.optimizer),
            "scaler": self.precision.state_dict(),
        }
        save_checkpoint(state, self.cfg.checkpoint_dir, self.step)
        prune_checkpoints(self.cfg.checkpoint_dir, self.cfg.keep_checkpoints)
