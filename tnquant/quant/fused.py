"""Fused fake quantization for training: one compiled kernel forward, one backward.

:func:`~tnquant.quant.ste.lsq_fake_quantize` in eager mode runs about ten
element-wise passes over a weight per training step (divide, round, clamp,
multiply forward; masks, the LSQ scale term and its reduction backward) and
keeps four weight-sized tensors alive for the backward pass. On a small
batch those passes cost more than the layer's matrix products. The fused
path computes the same function with :func:`torch.compile` (TorchInductor:
one generated loop forward, one backward that recomputes ``x / s`` instead
of saving it), so a training step pays about one pass forward and one
backward per quantized weight.

Exactness: the forward values are those of the eager path bit for bit (the
same IEEE divide, round, clamp and multiply per element; tested). The input
gradient is identical; the scale / zero-point gradients are the same sums
taken in another order (float rounding, ~1e-7 relative), so fused and eager
training runs diverge slowly; each is deterministic.

Use: ``finetune(..., fused=True)`` (its default ``'auto'`` turns it on for
runs with at least ``2**20`` fake-quantized weights and 100 steps, when
:func:`available`), or :func:`enable` / the :func:`fused` context manager
around your own loop. Only training calls use it (grad enabled and ``x`` or
``scale`` requiring grad) on tensors of at least :data:`FUSED_MIN_NUMEL`
elements, with rounding ``'nearest_even'``, ``'half_up'`` or ``'floor'``;
other calls, and every call when compilation fails (no C++
compiler, an unsupported platform), take the eager path (the failure is
warned about once).

Examples
--------
>>> import torch
>>> from tnquant.quant.ste import lsq_fake_quantize
>>> w = torch.randn(256, 128, requires_grad=True)
>>> s = torch.full((256, 1), 0.1, requires_grad=True)
>>> eager = lsq_fake_quantize(w, s, None, -8, 7)
>>> with fused():
...     out = lsq_fake_quantize(w, s, None, -8, 7)
>>> torch.equal(out, eager)
True
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor
from torch.autograd import Function

# a module reference, not names: tnquant.quant.ste imports this module while it loads
import tnquant.quant.ste as _ste

__all__ = ["enable", "enabled", "fused", "available", "fake_quantize", "FUSED_ROUNDINGS",
           "FUSED_MIN_NUMEL"]

#: Rounding modes the fused kernel implements (``'stochastic'`` stays eager).
FUSED_ROUNDINGS = ("nearest_even", "half_up", "floor")

#: Smallest tensor (elements) the fused path takes: below it the compiled call's fixed
#: cost (guards, autograd nodes; ~0.1 ms on a 2-core CPU) outweighs the passes it saves.
FUSED_MIN_NUMEL = 2**14

#: Graphs the compiled kernel may hold (ranks x affine x rounding x dtype x device).
RECOMPILE_LIMIT = 64

_STATE: dict[str, Any] = {"enabled": False, "fn": None, "broken": None}


class _FusedLSQ(Function):
    """LSQ/LSQ+ fake quantization that saves only its inputs (see :mod:`tnquant.quant.ste`)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, scale: Tensor, zero_point: Tensor | None, qmin: int,
                qmax: int, rounding: str) -> Tensor:
        ctx.save_for_backward(x, scale, zero_point)
        ctx.qrange = (qmin, qmax)
        ctx.rounding = rounding
        r = _ste.round_tensor(x / scale, rounding)
        if zero_point is None:
            return r.clamp(qmin, qmax) * scale
        zp = torch.round(zero_point.clamp(qmin, qmax))
        return ((r + zp).clamp(qmin, qmax) - zp) * scale

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, scale, zero_point = ctx.saved_tensors
        qmin, qmax = ctx.qrange
        v = x / scale
        rounded = _ste.round_tensor(v, ctx.rounding)
        zp = None if zero_point is None else torch.round(zero_point.clamp(qmin, qmax))
        r = rounded if zp is None else rounded + zp
        inside = (r >= qmin) & (r <= qmax)
        grad_x = grad_s = grad_zp = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.where(inside, grad, torch.zeros_like(grad))
        if ctx.needs_input_grad[1]:
            code = r.clamp(qmin, qmax) if zp is None else r.clamp(qmin, qmax) - zp
            d_s = torch.where(inside, rounded - v, code)
            grad_s = (grad * d_s).sum_to_size(scale.shape)
        if zero_point is not None and ctx.needs_input_grad[2]:
            d_zp = torch.where(inside, torch.zeros_like(grad), -scale.expand_as(grad))
            grad_zp = (grad * d_zp).sum_to_size(zero_point.shape)
        return grad_x, grad_s, grad_zp, None, None, None


def _call(x: Tensor, scale: Tensor, zero_point: Tensor | None, qmin: int, qmax: int,
          rounding: str) -> Tensor:
    return _FusedLSQ.apply(x, scale, zero_point, qmin, qmax, rounding)


class _GradScale(Function):
    """Identity forward; the gradient times ``factor`` (LSQ's gradient scale)."""

    @staticmethod
    def forward(ctx: Any, t: Tensor, factor: float) -> Tensor:
        ctx.factor = factor
        return t.view_as(t)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.factor, None


def _compiled() -> Callable[..., Tensor] | None:
    if _STATE["broken"] is not None:
        return None
    if _STATE["fn"] is None:
        # dynamic shapes and code ranges: one graph per (rank, affine, rounding), not per layer
        _STATE["fn"] = torch.compile(_call, dynamic=True, fullgraph=True)
    return _STATE["fn"]


def enable(on: bool = True) -> bool:
    """Turn the fused path on or off for the whole process; returns the previous setting.

    Examples
    --------
    >>> previous = enable(False)
    >>> enabled()
    False
    >>> _ = enable(previous)
    """
    previous = bool(_STATE["enabled"])
    _STATE["enabled"] = bool(on)
    return previous


def enabled() -> bool:
    """Whether training calls of ``lsq_fake_quantize`` try the fused path."""
    return bool(_STATE["enabled"])


@contextmanager
def fused(on: bool = True) -> Iterator[None]:
    """Context manager: the fused path on (or off) inside, the previous setting after."""
    previous = enable(on)
    try:
        yield
    finally:
        enable(previous)


def available(device: torch.device | str = "cpu") -> bool:
    """Whether the compiled kernel builds and runs on ``device`` (tried once, then remembered).

    Examples
    --------
    >>> isinstance(available(), bool)
    True
    """
    checked = _STATE.setdefault("checked", set())
    key = torch.device(device).type
    if _STATE["broken"] is None and key not in checked:
        checked.add(key)
        x = torch.linspace(-1, 1, 16, device=device, requires_grad=True)
        s = torch.full((1,), 0.25, device=device, requires_grad=True)
        try:
            out = fake_quantize(x, s, None, -4, 3, 1.0, "nearest_even")
            if out is not None:  # the backward kernel is compiled on the first backward
                out.sum().backward()
        except Exception as err:  # noqa: BLE001 - a failing compiler means "not available"
            _STATE["broken"] = f"{type(err).__name__}: {err}"
    return _STATE["broken"] is None


def fake_quantize(x: Tensor, scale: Tensor, zero_point: Tensor | None, qmin: int, qmax: int,
                  grad_scale: float, rounding: str) -> Tensor | None:
    """The fused kernel's result, or ``None`` when it cannot run (the caller goes eager).

    Same arguments and gradients as :func:`~tnquant.quant.ste.lsq_fake_quantize`.
    """
    fn = _compiled()
    if fn is None or rounding not in FUSED_ROUNDINGS:
        return None
    if grad_scale != 1.0:
        scale = _GradScale.apply(scale, grad_scale)
        if zero_point is not None:
            zero_point = _GradScale.apply(zero_point, grad_scale)
    try:
        # one graph per (rank, affine, rounding, dtype, device): allow more than dynamo's
        # default number of graphs for this function only
        with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
            return fn(x, scale, zero_point, qmin, qmax, rounding)
    except Exception as err:  # noqa: BLE001 - any compiler failure falls back to eager
        _STATE["broken"] = f"{type(err).__name__}: {err}"
        warnings.warn(f"tnquant: fused fake quantization is unavailable ({_STATE['broken']}"
                      f"); using the eager path", RuntimeWarning, stacklevel=3)
        return None
