"""``finetune``: quantization-aware training and distillation of a compressed model.

The verb checks the model and the options (one :class:`FinetuneConfig`, or
its fields as keywords) and the dtypes of the parameters it would train
(float16 needs ``amp``: :mod:`tnquant.qat.amp`), switches dropout, the
fused kernel and, with ``amp``, float32 master weights as asked, runs the
loop of :mod:`tnquant.qat.trainer` and restores every flag and dtype it
changed. The options, their defaults and why: :class:`FinetuneConfig`.

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

from typing import Any

from torch import nn
from torch.nn.modules.dropout import _DropoutNd

from tnquant.qat.amp import check_param_dtypes, master_weights, restore_dtypes
from tnquant.qat.config import FinetuneConfig, merge_config
from tnquant.qat.distributed import DistContext
from tnquant.qat.history import FinetuneReport
from tnquant.qat.objective import Objective
from tnquant.qat.params import TRAIN_CHOICES, parameter_sets
from tnquant.qat.trainer import Trainer, model_device
from tnquant.quant import fused as _fused
from tnquant.quant.frozen import FrozenTensor
from tnquant.quant.quantizer import Quantizer
from tnquant.registry import weight_pairs

__all__ = ["finetune", "use_fused", "FUSED_AUTO_MIN", "FinetuneConfig"]

#: ``fused='auto'`` turns the compiled fake-quantization kernel on from this
#: many fake-quantized weights (its compilation, seconds, then pays back).
FUSED_AUTO_MIN = 2**20


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
        return quantized_weights(model) >= FUSED_AUTO_MIN and _fused.available(model_device(model))
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


def _check_models(model: Any, teacher: Any) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(model, nn.parallel.DistributedDataParallel):
        raise TypeError(
            "pass the unwrapped model: finetune wraps it in DistributedDataParallel itself"
        )
    if any(isinstance(m, FrozenTensor) for m in model.modules()):
        raise ValueError(
            "model holds converted (integer, frozen) tensors: fine-tune before "
            "tnquant.convert, which ends training"
        )
    if teacher is model:
        raise ValueError(
            "teacher must be a separate model (e.g. the original dense one), got the student itself"
        )


def _trainable(model: nn.Module, train: str) -> list[tuple[str, nn.Parameter]]:
    """The parameters ``train`` would take (empty learnable scales included)."""
    sets = parameter_sets(model)
    return [(n, p) for key in TRAIN_CHOICES[train] for n, p in sets[key] if p.requires_grad]


def finetune(
    model: nn.Module,
    data: Any,
    teacher: nn.Module | None = None,
    *,
    config: FinetuneConfig | None = None,
    **options: Any,
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
    config
        The options of the run, :class:`~tnquant.qat.config.FinetuneConfig`
        (its docstring says what each does, its default and why); ``None``:
        the defaults.
    **options
        Any field of :class:`~tnquant.qat.config.FinetuneConfig` (``epochs``,
        ``lr``, ``loss``, ``task_loss``, ``checkpoint_dir``, ``dropout``...);
        given with ``config`` they override its fields. An unknown name raises
        ``TypeError``.

    Returns
    -------
    FinetuneReport
        Rows: trained elements per layer (cores, scales, other).
        ``.history``: loss and learning rate per step, the distillation and
        task terms, evaluations, wall time.

    Raises
    ------
    ValueError
        Before any step, when a parameter to train is float16 and ``amp`` is
        not set (see :mod:`tnquant.qat.amp`).
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
    >>> cfg = FinetuneConfig(task_loss=nn.functional.mse_loss, epochs=20, progress=False)
    >>> report = finetune(model, data, config=cfg, lr=0.1)  # the keyword overrides cfg
    >>> loss = report.history.loss  # one value per step, 4 steps per epoch
    >>> len(loss), sum(loss[-4:]) < 0.01 * sum(loss[:4])
    (80, True)
    """
    _check_models(model, teacher)
    cfg = merge_config(config, options)
    check_param_dtypes(_trainable(model, cfg.train), cfg.amp)
    dropout = teacher is None if cfg.dropout is None else cfg.dropout
    objective = Objective(
        teacher, cfg.loss, cfg.temperature, cfg.outputs, cfg.hidden, cfg.task_loss, cfg.alpha
    )
    if objective.hidden:  # the layers after the hooked ones get no gradient
        cfg = merge_config(
            cfg, {"ddp_kwargs": {"find_unused_parameters": True, **(cfg.ddp_kwargs or {})}}
        )
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    teacher_training = teacher.training if teacher is not None else False
    ctx = DistContext.setup(cfg.ddp, model_device(model))
    dropouts = [] if dropout else dropout_off(model)
    dtypes = master_weights(model) if cfg.amp is not None else []
    try:
        if teacher is not None:
            teacher.eval()
        with _fused.fused(use_fused(model, cfg.fused)):
            return Trainer(model, data, objective, cfg, ctx, dropout).run()
    finally:
        restore_dtypes(dtypes)
        for p, flag in flags:
            p.requires_grad_(flag)
        for module, p_drop in dropouts:
            module.p = p_drop
        model.train(was_training)
        if teacher is not None:
            teacher.train(teacher_training)
        ctx.teardown()
