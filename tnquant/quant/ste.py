"""Straight-through estimators (``autograd.Function`` s).

The rounding arithmetic they share with the pure functions (:func:`round_tensor`,
:func:`uniform_codes` / :func:`uniform_values`, :func:`pow2_scale`,
:func:`saturating_cast`) lives in :mod:`tnquant.quant.rounding` and is
re-exported here. The estimators:

- :class:`RoundSTE` / :func:`round_ste`: round forward, identity backward.
- :class:`ClippedSTE` / :func:`clipped_round`: round and clamp forward;
  the gradient is zero where the rounded value fell outside ``[qmin, qmax]``.
- :class:`LSQFakeQuantize` / :func:`lsq_fake_quantize`: uniform fake
  quantization with the LSQ scale gradient (Esser et al. 2019) and the LSQ+
  offset gradient (Bhalgat et al. 2020).
- :class:`CastSTE` / :func:`cast_fake_quantize`: a saturating cast to a float
  format and back.

Examples
--------
>>> import torch
>>> x = torch.tensor([0.4, 2.6], requires_grad=True)
>>> y = clipped_round(x, -2, 2)
>>> y.tolist()
[0.0, 2.0]
>>> y.sum().backward(); x.grad.tolist()
[1.0, 0.0]
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from torch.autograd import Function

from tnquant.quant import fused as _fused
from tnquant.quant.rounding import (
    pow2_scale,
    round_tensor,
    saturating_cast,
    uniform_codes,
    uniform_values,
)

__all__ = [
    "round_tensor",
    "uniform_codes",
    "uniform_values",
    "pow2_scale",
    "saturating_cast",
    "RoundSTE",
    "ClippedSTE",
    "LSQFakeQuantize",
    "CastSTE",
    "Pow2STE",
    "round_ste",
    "clipped_round",
    "lsq_fake_quantize",
    "lsq_grad_scale",
    "cast_fake_quantize",
    "pow2_ste",
]


class RoundSTE(Function):
    """``round_tensor(x, mode)`` forward, identity gradient."""

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, mode: str = "nearest_even", generator: torch.Generator | None = None
    ) -> Tensor:
        return round_tensor(x, mode, generator)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        return grad, None, None


class ClippedSTE(Function):
    """``clamp(round(x), qmin, qmax)`` forward; gradient 1 where ``qmin <= round(x) <= qmax``."""

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        qmin: float,
        qmax: float,
        mode: str = "nearest_even",
        generator: torch.Generator | None = None,
    ) -> Tensor:
        r = round_tensor(x, mode, generator)
        ctx.save_for_backward((r >= qmin) & (r <= qmax))
        return r.clamp(qmin, qmax)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None, None]:
        (inside,) = ctx.saved_tensors
        return grad * inside.to(grad.dtype), None, None, None, None


def round_ste(
    x: Tensor, mode: str = "nearest_even", generator: torch.Generator | None = None
) -> Tensor:
    """Round with a straight-through (identity) gradient.

    Examples
    --------
    >>> import torch
    >>> x = torch.tensor([0.7, -1.2], requires_grad=True)
    >>> y = round_ste(x); y.sum().backward()
    >>> y.tolist(), x.grad.tolist()
    ([1.0, -1.0], [1.0, 1.0])
    """
    return RoundSTE.apply(x, mode, generator)


def clipped_round(
    x: Tensor,
    qmin: float,
    qmax: float,
    mode: str = "nearest_even",
    generator: torch.Generator | None = None,
) -> Tensor:
    """``clamp(round(x), qmin, qmax)``; zero gradient where clamping acted.

    Examples
    --------
    >>> import torch
    >>> clipped_round(torch.tensor([-9.0, 3.4]), -8, 7).tolist()
    [-8.0, 3.0]
    """
    if qmin > qmax:
        raise ValueError(f"qmin must be <= qmax, got qmin={qmin}, qmax={qmax}")
    return ClippedSTE.apply(x, qmin, qmax, mode, generator)


class LSQFakeQuantize(Function):
    """Fake quantization with LSQ/LSQ+ gradients (see :func:`lsq_fake_quantize`)."""

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        scale: Tensor,
        zero_point: Tensor | None,
        qmin: int,
        qmax: int,
        grad_scale: float,
        rounding: str,
        generator: torch.Generator | None,
    ) -> Tensor:
        zp = None if zero_point is None else torch.round(zero_point.clamp(qmin, qmax))
        q, r = uniform_codes(x, scale, zp, qmin, qmax, rounding, generator)
        out = uniform_values(q, scale, zp)
        ctx.save_for_backward(x, scale, q, r, zp)
        ctx.qrange = (qmin, qmax)
        ctx.grad_scale = grad_scale
        ctx.zp_shape = None if zero_point is None else zero_point.shape
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, scale, q, r, zp = ctx.saved_tensors
        qmin, qmax = ctx.qrange
        inside = (r >= qmin) & (r <= qmax)
        grad_x = grad_s = grad_zp = None
        if ctx.needs_input_grad[0]:
            grad_x = grad * inside.to(grad.dtype)
        if ctx.needs_input_grad[1]:
            code = q if zp is None else q - zp  # clipped: qmin - zp or qmax - zp
            rounded = r if zp is None else r - zp  # round(x / s)
            d_s = torch.where(inside, rounded - x / scale, code)
            grad_s = (grad * d_s * ctx.grad_scale).sum_to_size(scale.shape)
        if zp is not None and ctx.needs_input_grad[2]:
            d_zp = torch.where(inside, torch.zeros_like(grad), -scale.expand_as(grad))
            grad_zp = (grad * d_zp * ctx.grad_scale).sum_to_size(ctx.zp_shape)
        return grad_x, grad_s, grad_zp, None, None, None, None, None


def lsq_fake_quantize(
    x: Tensor,
    scale: Tensor,
    zero_point: Tensor | None,
    qmin: int,
    qmax: int,
    grad_scale: float = 1.0,
    *,
    rounding: str = "nearest_even",
    generator: torch.Generator | None = None,
) -> Tensor:
    """LSQ / LSQ+ fake quantization: ``(clamp(round(x/s) + zp, qmin, qmax) - zp) * s``.

    With ``v = x / s``, ``r = round(v) + zp`` and "inside" meaning
    ``qmin <= r <= qmax``, the gradients are (Esser et al. 2019, eq. 3;
    Bhalgat et al. 2020):

    - ``d/dx``: 1 inside, 0 outside (clipped straight-through);
    - ``d/ds``: ``round(v) - v`` inside, ``qmin - zp`` or ``qmax - zp``
      outside, times ``grad_scale``;
    - ``d/dzp``: 0 inside, ``-s`` outside, times ``grad_scale``.

    The offset is a float zero point in code units, rounded (and clamped to
    ``[qmin, qmax]``) in the forward pass with a straight-through gradient,
    so that frozen qparams keep an integer zero point. LSQ+'s offset
    ``beta = -zp * s`` has the same "0 inside" rule. This matches
    ``torch._fake_quantize_learnable_per_tensor_affine``.

    Training calls take the compiled kernel of :mod:`tnquant.quant.fused`
    when it is enabled (same forward values bit for bit).

    Parameters
    ----------
    x
        Input, any float dtype.
    scale, zero_point
        Positive scale and optional zero point, broadcastable to ``x``;
        their gradients are summed back to their own shapes.
    qmin, qmax
        The code range.
    grad_scale
        LSQ's gradient scale ``1 / sqrt(N * Qp)``; see :func:`lsq_grad_scale`.
    rounding, generator
        Rounding mode of :func:`~tnquant.quant.primitives.round_tensor`.

    Examples
    --------
    >>> import torch
    >>> x = torch.tensor([0.3, 0.9, 5.0])
    >>> s = torch.tensor(0.5, requires_grad=True)
    >>> y = lsq_fake_quantize(x, s, None, -4, 3)
    >>> y.tolist()
    [0.5, 1.0, 1.5]
    >>> y.sum().backward(); round(s.grad.item(), 4)  # (1 - 0.6) + (2 - 1.8) + 3
    3.6
    """
    if qmin > qmax:
        raise ValueError(f"qmin must be <= qmax, got qmin={qmin}, qmax={qmax}")
    if (
        _fused.enabled()
        and torch.is_grad_enabled()
        and (
            x.requires_grad
            or scale.requires_grad
            or (zero_point is not None and zero_point.requires_grad)
        )
    ):
        out = _fused.fake_quantize(x, scale, zero_point, qmin, qmax, grad_scale, rounding)
        if out is not None:
            return out
    return LSQFakeQuantize.apply(x, scale, zero_point, qmin, qmax, grad_scale, rounding, generator)


def lsq_grad_scale(numel: int, qmax: int) -> float:
    """LSQ's gradient scale ``1 / sqrt(numel * qmax)`` (``qmax`` floored at 1).

    ``numel`` is the number of elements sharing one scale.

    Examples
    --------
    >>> lsq_grad_scale(100, 4)
    0.05
    """
    if numel < 1:
        raise ValueError(f"numel must be >= 1, got {numel}")
    return 1.0 / math.sqrt(numel * max(qmax, 1))


class CastSTE(Function):
    """Saturating cast to a float format and back; gradient 1 where ``|x|`` fits."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, dtype: torch.dtype) -> Tensor:
        info = torch.finfo(dtype)
        ctx.save_for_backward((x >= info.min) & (x <= info.max))
        return saturating_cast(x, dtype).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (inside,) = ctx.saved_tensors
        return grad * inside.to(grad.dtype), None


def cast_fake_quantize(x: Tensor, dtype: torch.dtype) -> Tensor:
    """``x`` rounded to the float format ``dtype`` (saturating), back in ``x.dtype``.

    Examples
    --------
    >>> import torch
    >>> cast_fake_quantize(torch.tensor([0.3, 500.0]), torch.float8_e4m3fn).tolist()
    [0.3125, 448.0]
    """
    return CastSTE.apply(x, dtype)


class Pow2STE(Function):
    """:func:`~tnquant.quant.primitives.pow2_scale` forward, identity gradient."""

    @staticmethod
    def forward(ctx: Any, scale: Tensor, rounding: str = "ceil") -> Tensor:
        return pow2_scale(scale, rounding)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


def pow2_ste(scale: Tensor, rounding: str = "ceil") -> Tensor:
    """A learnable scale snapped to a power of two, gradient passed straight through.

    Examples
    --------
    >>> import torch
    >>> s = torch.tensor(0.3, requires_grad=True)
    >>> p = pow2_ste(s); p.backward()
    >>> p.item(), s.grad.item()
    (0.5, 1.0)
    """
    return Pow2STE.apply(scale, rounding)
