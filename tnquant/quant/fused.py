"""Fused fake quantization for training: one pass forward, one backward per weight.

:func:`~tnquant.quant.ste.lsq_fake_quantize` in eager mode runs about ten
element-wise passes over a weight per training step (divide, round, clamp,
multiply forward; masks, the LSQ scale term and its reduction backward) and
keeps four weight-sized tensors alive for the backward pass. On a small
batch those passes cost more than the layer's matrix products. The fused
path computes the same function in one loop forward and one backward that
recomputes ``x / s`` instead of saving it. Two backends:

- ``'cpp'``: on CPU tensors, the C++ kernel of
  :mod:`tnquant.quant.cpu_kernel` (built once with g++, ~25 s), called
  through a plain autograd function: a few microseconds of fixed cost per
  call, so it pays on small cores too;
- ``'compile'``: :func:`torch.compile` (TorchInductor; Triton on a GPU) of
  the same function, for every device; each call also pays ~0.2 ms of
  guards and wrappers on a CPU, so tensors under :data:`FUSED_MIN_NUMEL`
  elements stay eager.

``'auto'`` (the default) takes ``'cpp'`` for the CPU tensors it handles
and ``'compile'`` for the others; :func:`enable` / :func:`fused` choose.

Exactness: the forward values are those of the eager path bit for bit (the
same IEEE divide, round, clamp and multiply per element; tested). The input
gradient is identical; the scale / zero-point gradients are the same sums
taken in another order (float rounding, ~1e-7 relative), so fused and eager
training runs diverge slowly; each is deterministic.

Use: ``finetune(..., fused=True)`` (its default ``'auto'`` turns it on for
runs with at least ``2**20`` fake-quantized weights and 100 steps, when
:func:`available`), or :func:`enable` / the :func:`fused` context manager
around your own loop. Only training calls use it (grad enabled and ``x`` or
``scale`` requiring grad), with rounding ``'nearest_even'``, ``'half_up'``
or ``'floor'``; other calls, and every call when neither backend builds (no
C++ compiler, an unsupported platform), take the eager path (a failure is
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

from tnquant.quant import cpu_kernel
from tnquant.quant.rounding import round_tensor

__all__ = [
    "enable",
    "enabled",
    "fused",
    "available",
    "fake_quantize",
    "FUSED_ROUNDINGS",
    "FUSED_MIN_NUMEL",
    "BACKENDS",
]

#: Rounding modes both fused backends implement (``'stochastic'`` stays eager).
FUSED_ROUNDINGS = tuple(cpu_kernel.ROUNDINGS)

#: Smallest tensor (elements) the ``'compile'`` backend takes: below it the compiled call's
#: fixed cost (guards, wrappers, autograd nodes; ~0.2 ms on a 2-core CPU) outweighs the
#: passes it saves.
FUSED_MIN_NUMEL = 2**14

#: Backends :func:`enable` accepts (see the module docs).
BACKENDS = ("auto", "cpp", "compile")

#: Graphs the compiled kernel may hold (ranks x affine x rounding x dtype x device).
RECOMPILE_LIMIT = 64

_STATE: dict[str, Any] = {"enabled": False, "backend": "auto", "fn": None, "broken": None}


class _FusedLSQ(Function):
    """LSQ/LSQ+ fake quantization that saves only its inputs (see :mod:`tnquant.quant.ste`)."""

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        scale: Tensor,
        zero_point: Tensor | None,
        qmin: int,
        qmax: int,
        rounding: str,
    ) -> Tensor:
        ctx.save_for_backward(x, scale, zero_point)
        ctx.qrange = (qmin, qmax)
        ctx.rounding = rounding
        r = round_tensor(x / scale, rounding)
        if zero_point is None:
            return r.clamp(qmin, qmax) * scale
        zp = torch.round(zero_point.clamp(qmin, qmax))
        return ((r + zp).clamp(qmin, qmax) - zp) * scale

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, scale, zero_point = ctx.saved_tensors
        qmin, qmax = ctx.qrange
        v = x / scale
        rounded = round_tensor(v, ctx.rounding)
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


def _call(
    x: Tensor, scale: Tensor, zero_point: Tensor | None, qmin: int, qmax: int, rounding: str
) -> Tensor:
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


def enable(on: bool = True, backend: str | None = None) -> bool:
    """Turn the fused path on or off for the whole process; returns the previous setting.

    ``backend`` (one of :data:`BACKENDS`) also sets the backend when given.

    Examples
    --------
    >>> previous = enable(False)
    >>> enabled()
    False
    >>> _ = enable(previous)
    """
    if backend is not None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
        _STATE["backend"] = backend
    previous = bool(_STATE["enabled"])
    _STATE["enabled"] = bool(on)
    return previous


def enabled() -> bool:
    """Whether training calls of ``lsq_fake_quantize`` try the fused path."""
    return bool(_STATE["enabled"])


@contextmanager
def fused(on: bool = True, backend: str | None = None) -> Iterator[None]:
    """Context manager: the fused path on (or off) inside, the previous setting after.

    ``backend``: one of :data:`BACKENDS` inside (default: keep the current one).
    """
    previous, previous_backend = enabled(), _STATE["backend"]
    enable(on, backend)
    try:
        yield
    finally:
        enable(previous, previous_backend)


def available(device: torch.device | str = "cpu") -> bool:
    """Whether a fused backend builds and runs on ``device`` (tried once, then remembered).

    On the CPU: the C++ kernel (backend ``'auto'`` or ``'cpp'``) or the
    compiled one (``'auto'`` or ``'compile'``); elsewhere the compiled one.

    Examples
    --------
    >>> isinstance(available(), bool)
    True
    """
    key = torch.device(device).type
    backend = _STATE["backend"]
    if key == "cpu" and backend in ("auto", "cpp") and cpu_kernel.available():
        return True
    if backend == "cpp":
        return False
    checked = _STATE.setdefault("checked", set())
    if _STATE["broken"] is None and key not in checked:
        checked.add(key)
        x = torch.linspace(-1, 1, 16, device=device, requires_grad=True)
        s = torch.full((1,), 0.25, device=device, requires_grad=True)
        try:
            out = _compiled_fake_quantize(x, s, None, -4, 3, 1.0, "nearest_even")
            if out is not None:  # the backward kernel is compiled on the first backward
                out.sum().backward()
        except Exception as err:  # noqa: BLE001 - a failing compiler means "not available"
            _STATE["broken"] = f"{type(err).__name__}: {err}"
    return _STATE["broken"] is None


def fake_quantize(
    x: Tensor,
    scale: Tensor,
    zero_point: Tensor | None,
    qmin: int,
    qmax: int,
    grad_scale: float,
    rounding: str,
) -> Tensor | None:
    """The fused result, or ``None`` when no backend takes the call (the caller goes eager).

    Same arguments and gradients as :func:`~tnquant.quant.ste.lsq_fake_quantize`.
    """
    if rounding not in FUSED_ROUNDINGS:
        return None
    backend = _STATE["backend"]
    if backend != "compile" and x.device.type == "cpu":
        out = cpu_kernel.fake_quantize(x, scale, zero_point, qmin, qmax, grad_scale, rounding)
        if out is not None or backend == "cpp":
            return out
    if backend == "cpp" or x.numel() < FUSED_MIN_NUMEL:
        return None
    return _compiled_fake_quantize(x, scale, zero_point, qmin, qmax, grad_scale, rounding)


def _compiled_fake_quantize(
    x: Tensor,
    scale: Tensor,
    zero_point: Tensor | None,
    qmin: int,
    qmax: int,
    grad_scale: float,
    rounding: str,
) -> Tensor | None:
    fn = _compiled()
    if fn is None:
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
        warnings.warn(
            f"tnquant: fused fake quantization is unavailable ({_STATE['broken']}"
            f"); using the eager path",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
