"""Distillation losses, and how a model's output is read for them.

Three losses compare a student's tensor with a teacher's of the same shape
(the last dimension is the feature or class dimension):

- :func:`mse_loss`: mean squared error over all elements;
- :func:`cosine_loss`: ``1 - cos(student, teacher)`` along the last
  dimension, averaged over the other ones;
- :func:`kl_loss`: ``T**2 * KL(softmax(teacher / T) || softmax(student / T))``
  per row (all leading dims flattened), averaged over rows (Hinton et al.
  2015; the ``T**2`` keeps gradient magnitudes comparable across ``T``).

Losses are computed in at least float32 (half-precision outputs are
upcast), so a bf16 student distils from an fp32 teacher without overflow.

:func:`default_outputs` turns a model output into the tensor to compare by
the one rule of :func:`tnquant.core.model_output`: a tensor as is, the first
tensor of a tuple or list, ``.logits`` (else ``.last_hidden_state``) of a
Hugging Face ``ModelOutput`` or of a mapping. :data:`TASK_LOSSES` names the
task losses a recipe may ask for.
:class:`HiddenCollector` records the outputs of named submodules with
forward hooks (distillation on hidden states).

Examples
--------
>>> import torch
>>> s = torch.tensor([[1.0, 0.0]]); t = torch.tensor([[2.0, 0.0]])
>>> mse_loss(s, t).item(), cosine_loss(s, t).item()
(0.5, 0.0)
>>> kl_loss(t, t).item()
0.0
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tnquant.core.output import model_output

__all__ = [
    "LOSSES",
    "LossFn",
    "mse_loss",
    "cosine_loss",
    "kl_loss",
    "resolve_loss",
    "TASK_LOSSES",
    "resolve_task_loss",
    "default_outputs",
    "HiddenCollector",
]

#: ``loss(student, teacher) -> scalar tensor``
LossFn = Callable[[Tensor, Tensor], Tensor]


def _pair(student: Tensor, teacher: Tensor, what: str) -> tuple[Tensor, Tensor]:
    """Check shapes and bring both tensors to a common dtype of at least float32."""
    if not isinstance(student, Tensor) or not isinstance(teacher, Tensor):
        raise TypeError(
            f"{what} compares tensors, got {type(student).__name__} and {type(teacher).__name__}"
        )
    if student.shape != teacher.shape:
        raise ValueError(
            f"{what}: the student's output has shape {tuple(student.shape)}, the "
            f"teacher's {tuple(teacher.shape)}; they must be equal"
        )
    dtype = torch.promote_types(torch.promote_types(student.dtype, teacher.dtype), torch.float32)
    return student.to(dtype), teacher.detach().to(dtype)


def mse_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """Mean squared error between student and teacher outputs.

    Examples
    --------
    >>> import torch
    >>> mse_loss(torch.zeros(2, 2), torch.ones(2, 2)).item()
    1.0
    """
    s, t = _pair(student, teacher, "mse loss")
    return F.mse_loss(s, t)


def cosine_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """``1 - cosine similarity`` along the last dimension, averaged over the rest.

    Examples
    --------
    >>> import torch
    >>> cosine_loss(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 3.0]])).item()
    1.0
    """
    s, t = _pair(student, teacher, "cosine loss")
    return 1.0 - F.cosine_similarity(s, t, dim=-1).mean()


def kl_loss(student: Tensor, teacher: Tensor, temperature: float = 1.0) -> Tensor:
    """``T**2 * KL(p_teacher || p_student)`` on logits, softened by ``temperature``.

    The last dimension holds the classes; the KL divergence of each row is
    averaged over all leading dimensions.

    Examples
    --------
    >>> import math, torch
    >>> s = torch.zeros(1, 2); t = torch.tensor([[0.0, math.log(3.0)]])
    >>> round(kl_loss(s, t).item(), 6) == round(0.25 * math.log(0.5) + 0.75 * math.log(1.5), 6)
    True
    """
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, (int, float))
        or not temperature > 0
    ):
        raise ValueError(f"temperature must be a number > 0, got {temperature!r}")
    s, t = _pair(student, teacher, "kl loss")
    s = s.reshape(-1, s.shape[-1]) / temperature
    t = t.reshape(-1, t.shape[-1]) / temperature
    kl = F.kl_div(
        F.log_softmax(s, dim=-1), F.log_softmax(t, dim=-1), reduction="batchmean", log_target=True
    )
    return kl * temperature**2


#: The named distillation losses ``finetune(loss=...)`` accepts.
LOSSES: dict[str, Callable[..., Tensor]] = {"mse": mse_loss, "cosine": cosine_loss, "kl": kl_loss}


def resolve_loss(loss: str | LossFn, temperature: float = 1.0) -> LossFn:
    """The loss function for a name in :data:`LOSSES` or a callable (returned as is).

    ``temperature`` applies to ``'kl'`` only.

    Examples
    --------
    >>> import torch
    >>> resolve_loss("mse")(torch.zeros(2), torch.ones(2)).item()
    1.0
    """
    if callable(loss):
        return loss
    if not isinstance(loss, str) or loss not in LOSSES:
        raise ValueError(
            f"loss must be one of {sorted(LOSSES)} or a callable "
            f"(student, teacher) -> scalar, got {loss!r}"
        )
    if loss == "kl":
        kl_loss(torch.zeros(1, 1), torch.zeros(1, 1), temperature)  # validates temperature

        def kl(student: Tensor, teacher: Tensor) -> Tensor:
            return kl_loss(student, teacher, temperature)

        return kl
    return LOSSES[loss]


#: The named task losses ``finetune(task_loss=...)`` accepts (a recipe's ``task_loss``).
TASK_LOSSES: dict[str, Callable[..., Tensor]] = {"cross_entropy": F.cross_entropy}


def resolve_task_loss(
    task_loss: str | Callable[[Any, Any], Tensor] | None,
) -> Callable[[Any, Any], Tensor] | None:
    """The task loss for a name in :data:`TASK_LOSSES`, a callable (as is) or ``None``.

    Examples
    --------
    >>> import torch
    >>> resolve_task_loss("cross_entropy") is torch.nn.functional.cross_entropy
    True
    """
    if task_loss is None or callable(task_loss):
        return task_loss
    if not isinstance(task_loss, str) or task_loss not in TASK_LOSSES:
        raise TypeError(
            f"task_loss must be one of {sorted(TASK_LOSSES)} or a callable "
            f"(output, target) -> loss, got {task_loss!r}"
        )
    return TASK_LOSSES[task_loss]


def default_outputs(out: Any) -> Tensor:
    """The tensor to distil from a model output: :func:`tnquant.core.model_output`.

    A tensor as is; the first tensor of a tuple or list; ``.logits``, else
    ``.last_hidden_state``, of an object (Hugging Face ``ModelOutput``) or a
    mapping (else a mapping's first tensor). The search, the CLI and the
    pipeline read a model output by the same rule. Pass ``outputs=`` to
    ``finetune`` for anything else.

    Examples
    --------
    >>> import torch
    >>> default_outputs((torch.ones(1), torch.zeros(1))).item()
    1.0
    >>> default_outputs({"logits": torch.zeros(2)}).shape
    torch.Size([2])
    """
    try:
        return model_output(out)
    except TypeError:
        raise TypeError(
            f"cannot find the tensor to distil in a model output of type {type(out).__name__}: "
            "expected a tensor, a tuple/list holding one, or an object/mapping with "
            "'logits' or 'last_hidden_state'; pass outputs=lambda out: ... to finetune"
        ) from None


class HiddenCollector:
    """Records the output of named submodules of a model with forward hooks.

    Use as a context manager; ``outputs`` maps each name to the last output
    of that submodule (the first tensor when the submodule returns a tuple,
    see :func:`default_outputs`). Names are those of ``model.named_modules()``.

    Parameters
    ----------
    model
        The model whose submodules are hooked.
    names
        Submodule names; each must exist.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(2, 3), nn.ReLU())
    >>> with HiddenCollector(model, ["0"]) as hidden:
    ...     _ = model(torch.ones(1, 2))
    >>> hidden.outputs["0"].shape
    torch.Size([1, 3])
    """

    def __init__(self, model: nn.Module, names: Iterable[str]) -> None:
        self.names = list(names)
        modules = dict(model.named_modules())
        missing = [n for n in self.names if n not in modules]
        if missing:
            sample = [n for n in modules if n][:8]
            raise ValueError(
                f"hidden names must be submodules of the model, got {missing} "
                f"which are not (some names it has: {sample})"
            )
        self._modules = [modules[n] for n in self.names]
        self._handles: list[Any] = []
        self.outputs: dict[str, Tensor] = {}

    def _hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            self.outputs[name] = default_outputs(output)

        return hook

    def __enter__(self) -> HiddenCollector:
        self._handles = [
            m.register_forward_hook(self._hook(n))
            for n, m in zip(self.names, self._modules, strict=True)
        ]
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def take(self) -> list[Tensor]:
        """The recorded outputs in ``names`` order; clears the record.

        Raises ``RuntimeError`` when a submodule did not run.
        """
        missing = [n for n in self.names if n not in self.outputs]
        if missing:
            raise RuntimeError(f"hidden submodules {missing} did not run in the forward pass")
        values = [self.outputs[n] for n in self.names]
        self.outputs = {}
        return values
