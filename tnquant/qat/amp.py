"""Mixed precision in ``finetune``: ``amp='bf16'`` or ``'fp16'``, float32 master weights.

With ``amp`` set, every training step runs the student's forward pass (and
the teacher's, and the loss) under ``torch.autocast`` with that dtype; the
backward pass and the optimizer step run outside it, on float32 parameters:

- the master weights are float32. A model whose parameters (or floating
  buffers) are float16 or bfloat16 is cast to float32 for the run (the
  same ``Parameter`` objects, so nothing else changes) and cast back to its
  dtypes on return, also when the run fails;
- ``'fp16'`` scales the loss with ``torch.amp.GradScaler`` (on CPU too,
  torch >= 2.3): a step whose gradients overflowed is skipped (the
  parameters stay, the scale halves) and listed in ``history.skipped``; the
  learning-rate schedule advances anyway, so the run keeps its length;
- the quantizers fake-quantize in float32 under autocast (the elementwise
  ops of :mod:`tnquant.quant.ste` are not autocast ops, and
  :func:`~tnquant.quant.handlers.fake_quantize_blocks` upcasts a half
  input), so the codes of a weight are those of a float32 run; only the
  matmuls after them run in the low precision.

Without ``amp``, trainable float16 parameters are refused before any step
(:func:`check_param_dtypes`): AdamW's ``eps=1e-8`` is 0 in float16 and the
squared gradients underflow, so such a run turns NaN within a few steps.
Trainable bfloat16 parameters do train (bfloat16 has float32's range) but
keep 8 significant bits: an update smaller than ``2**-8`` of a weight is
lost, so a fine-tuning rate moves them coarsely or not at all; a warning
says so and suggests ``amp='bf16'``.

Examples
--------
>>> import torch
>>> from torch import nn
>>> model = nn.Linear(4, 2).half()
>>> restore = master_weights(model)
>>> model.weight.dtype
torch.float32
>>> restore_dtypes(restore); model.weight.dtype
torch.float16
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parameter import UninitializedBuffer, UninitializedParameter
from torch.optim import Optimizer

__all__ = [
    "AMP_CHOICES",
    "check_amp",
    "check_param_dtypes",
    "master_weights",
    "restore_dtypes",
    "Precision",
]

#: The values of ``finetune(amp=...)`` (besides ``None``) and the autocast dtype of each.
AMP_CHOICES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16}

_HALF = (torch.float16, torch.bfloat16)


def check_amp(amp: Any) -> None:
    """Raise ``ValueError`` unless ``amp`` is ``None`` or a name in :data:`AMP_CHOICES`.

    Examples
    --------
    >>> check_amp("bf16")
    >>> check_amp("float16")
    Traceback (most recent call last):
    ...
    ValueError: amp must be one of ['bf16', 'fp16'] or None, got 'float16'
    """
    if amp is not None and not (isinstance(amp, str) and amp in AMP_CHOICES):
        raise ValueError(f"amp must be one of {list(AMP_CHOICES)} or None, got {amp!r}")


def check_param_dtypes(named: list[tuple[str, nn.Parameter]], amp: str | None) -> None:
    """Refuse trainable float16 parameters without ``amp``; warn on bfloat16 ones.

    ``named``: the ``(name, parameter)`` pairs the run would train. With
    ``amp`` set nothing is refused (the run trains float32 master weights).

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> check_param_dtypes([("w", nn.Parameter(torch.zeros(2, dtype=torch.float16)))], None)
    Traceback (most recent call last):
    ...
    ValueError: finetune: 1 trainable parameter is float16 (w); ...
    """
    if amp is not None:
        return
    half = [n for n, p in named if p.dtype == torch.float16]
    if half:
        many = len(half) > 1
        shown = ", ".join(half[:3]) + (", ..." if len(half) > 3 else "")
        raise ValueError(
            f"finetune: {len(half)} trainable parameter{'s are' if many else ' is'} "
            f"float16 ({shown}); an optimizer step on float16 weights underflows (AdamW's "
            "eps=1e-8 is 0 in float16) and the loss turns NaN within a few steps. Pass "
            "amp='fp16' (or 'bf16'): finetune then trains float32 master weights under "
            "autocast and casts them back to float16 on return; or call model.float() first"
        )
    bf16 = [n for n, p in named if p.dtype == torch.bfloat16]
    if bf16:
        warnings.warn(
            f"finetune: {len(bf16)} trainable parameter(s) are bfloat16 ({bf16[0]}, ...): "
            "they train, but with 8 significant bits an update below 2**-8 of a weight is "
            "lost; amp='bf16' trains float32 master weights (cast back on return)",
            UserWarning,
            stacklevel=3,
        )


def _tensors(model: nn.Module) -> Iterator[Tensor]:
    seen: set[int] = set()
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in seen or isinstance(t, (UninitializedParameter, UninitializedBuffer)):
            continue
        seen.add(id(t))
        yield t


def master_weights(model: nn.Module) -> list[tuple[Tensor, torch.dtype]]:
    """Cast the float16 / bfloat16 parameters and buffers of ``model`` to float32, in place.

    Empty tensors (learnable quantizer scales that have not run yet) are
    left as they are: the quantizer picks their dtype when it fills them.

    The tensors stay the same objects (``t.data`` is replaced), so optimizer
    groups and ``requires_grad`` flags are untouched. Returns what
    :func:`restore_dtypes` needs to cast them back.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Linear(2, 2).to(torch.bfloat16)
    >>> [dtype for _, dtype in master_weights(model)]
    [torch.bfloat16, torch.bfloat16]
    """
    restore = []
    for t in _tensors(model):
        if t.dtype in _HALF and t.numel() > 0:  # an empty LSQ scale takes its dtype on init
            restore.append((t, t.dtype))
            t.data = t.data.float()
    return restore


def restore_dtypes(restore: list[tuple[Tensor, torch.dtype]]) -> None:
    """Cast the tensors :func:`master_weights` changed back to their dtypes (rounding them).

    Examples
    --------
    >>> import torch
    >>> w = torch.nn.Parameter(torch.ones(1, dtype=torch.float16))
    >>> w.data = w.data.float(); restore_dtypes([(w, torch.float16)]); w.dtype
    torch.float16
    """
    for t, dtype in restore:
        t.data = t.data.to(dtype)


def _make_scaler(device: torch.device) -> Any:
    scaler_cls = getattr(torch.amp, "GradScaler", None)
    if scaler_cls is not None:
        try:
            return scaler_cls(device.type)
        except (RuntimeError, ValueError) as e:
            raise ValueError(
                f"amp='fp16' needs a GradScaler on {device.type}, which torch "
                f"{torch.__version__} refuses ({e}); use amp='bf16'"
            ) from None
    if device.type == "cuda":  # torch < 2.3
        return torch.cuda.amp.GradScaler()
    raise ValueError(
        f"amp='fp16' on {device.type} needs torch.amp.GradScaler (torch >= 2.3), this is "
        f"torch {torch.__version__}; use amp='bf16'"
    )


def _check_device(amp: str, device: torch.device) -> None:
    available = getattr(torch.amp, "is_autocast_available", None)
    if available is not None and not available(device.type):
        raise ValueError(f"amp={amp!r}: torch has no autocast for {device.type} devices")
    if amp == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("amp='bf16': this CUDA device does not support bfloat16; use amp='fp16'")


class Precision:
    """The autocast context and the loss scaler of one run (``amp=None``: neither).

    Parameters
    ----------
    amp
        ``None``, ``'bf16'`` or ``'fp16'``.
    device
        The student's device (autocast and the scaler are per device type).

    Examples
    --------
    >>> import torch
    >>> p = Precision("bf16", torch.device("cpu"))
    >>> with p.autocast():
    ...     y = torch.nn.Linear(2, 2)(torch.ones(1, 2))
    >>> y.dtype, p.scaler is None
    (torch.bfloat16, True)
    """

    def __init__(self, amp: str | None, device: torch.device) -> None:
        check_amp(amp)
        self.amp, self.device = amp, device
        self.dtype = None if amp is None else AMP_CHOICES[amp]
        if amp is not None:
            _check_device(amp, device)
        self.scaler = _make_scaler(device) if amp == "fp16" else None

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """``torch.autocast`` for the run's device and dtype, or a no-op."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def backward(self, loss: Tensor, optimizer: Optimizer) -> None:
        """``loss.backward()``, through the scaler (then unscaled gradients) with fp16."""
        if self.scaler is None:
            loss.backward()
            return
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(optimizer)

    def step(self, optimizer: Optimizer) -> bool:
        """The optimizer step; ``False`` when the scaler skipped it (overflowed gradients)."""
        if self.scaler is None:
            optimizer.step()
            return True
        before = self.scaler.get_scale()
        self.scaler.step(optimizer)
        self.scaler.update()
        return not self.scaler.get_scale() < before

    def state_dict(self) -> dict[str, Any] | None:
        """The scaler's state (a checkpoint entry), or ``None`` without a scaler."""
        return None if self.scaler is None else dict(self.scaler.state_dict())

    def load_state_dict(self, state: Any, where: str) -> None:
        """Restore the scaler from a checkpoint's ``'scaler'`` entry (checked first)."""
        if self.scaler is None or state is None:
            return
        if not isinstance(state, dict) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in state.values()
        ):
            raise ValueError(f"{where}: its 'scaler' entry is not a GradScaler state: {state!r}")
        self.scaler.load_state_dict(state)
