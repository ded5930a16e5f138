"""Rounding arithmetic every forward pass shares, below the estimators and the functions.

:func:`round_tensor` (the rounding modes), :func:`uniform_codes` /
:func:`uniform_values`, :func:`pow2_scale` and :func:`saturating_cast` are
used by the straight-through estimators (:mod:`tnquant.quant.ste`), the
fused kernel (:mod:`tnquant.quant.fused`) and the pure functions
(:mod:`tnquant.quant.primitives`), so that fake-quantized values equal
``dequantize(quantize(x))`` bitwise. This module imports nothing of
``tnquant.quant``.

Examples
--------
>>> import torch
>>> round_tensor(torch.tensor([0.5, 1.5]), "half_up").tolist()
[1.0, 2.0]
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from tnquant.specs import ROUNDING_MODES

__all__ = ["round_tensor", "uniform_codes", "uniform_values", "pow2_scale", "saturating_cast"]


_SQRT_HALF = math.sqrt(0.5)


def round_tensor(
    x: Tensor, mode: str = "nearest_even", generator: torch.Generator | None = None
) -> Tensor:
    """Round ``x`` to integers (returned in ``x``'s float dtype).

    Parameters
    ----------
    x
        A float tensor.
    mode
        ``'nearest_even'`` (ties to even, :func:`torch.round`), ``'half_up'``
        (``floor(x + 0.5)``, ties towards +inf), ``'floor'``, or
        ``'stochastic'`` (``floor(x + u)`` with ``u ~ U[0, 1)``: rounds up
        with probability ``x - floor(x)``, unbiased in expectation).
        ``half_up`` and ``stochastic`` are computed from ``x - floor(x)``
        (exact), never from ``x + 0.5`` (which rounds ``0.49999997`` up).
        Note: ``'floor'`` fake quantization with a scale that is not a power
        of two is not idempotent (``(q * s) / s`` can fall one ulp below
        ``q``).
    generator
        Source of the uniform draws for ``'stochastic'`` (same device as
        ``x``); ``None`` uses the global generator.

    Examples
    --------
    >>> import torch
    >>> t = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5])
    >>> round_tensor(t).tolist()
    [0.0, 2.0, 2.0, -0.0, -2.0]
    >>> round_tensor(t, "half_up").tolist()
    [1.0, 2.0, 3.0, 0.0, -1.0]
    """
    if mode == "nearest_even":
        return torch.round(x)
    if mode == "floor":
        return torch.floor(x)
    if mode == "half_up":
        low = torch.floor(x)
        return low + (x - low >= 0.5).to(x.dtype)
    if mode == "stochastic":
        low = torch.floor(x)
        u = torch.rand(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        return low + (u < x - low).to(x.dtype)
    raise ValueError(f"rounding mode must be one of {list(ROUNDING_MODES)}, got {mode!r}")


def uniform_codes(
    x: Tensor,
    scale: Tensor,
    zero_point: Tensor | None,
    qmin: int,
    qmax: int,
    rounding: str = "nearest_even",
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """``q = clamp(round(x / scale) + zp, qmin, qmax)`` and the unclamped ``r``.

    All tensors broadcast together and share one float dtype; ``q`` and ``r``
    are float tensors holding integers.

    Examples
    --------
    >>> import torch
    >>> q, r = uniform_codes(torch.tensor([0.26, 9.0]), torch.tensor(0.5), None, -8, 7)
    >>> q.tolist(), r.tolist()
    ([1.0, 7.0], [1.0, 18.0])
    """
    r = round_tensor(x / scale, rounding, generator)
    if zero_point is not None:
        r = r + zero_point
    return r.clamp(qmin, qmax), r


def uniform_values(q: Tensor, scale: Tensor, zero_point: Tensor | None) -> Tensor:
    """``(q - zp) * scale`` (``q * scale`` when symmetric).

    Examples
    --------
    >>> import torch
    >>> uniform_values(torch.tensor([0.0, 255.0]), torch.tensor(0.5), torch.tensor(128.0)).tolist()
    [-64.0, 63.5]
    """
    return (q - zero_point) * scale if zero_point is not None else q * scale


def pow2_scale(scale: Tensor, rounding: str = "ceil") -> Tensor:
    """The power of two ``2^k`` nearest a positive ``scale``, exactly (via frexp).

    ``'ceil'``: ``k = ceil(log2 s)`` (never smaller than ``s``); ``'round'``:
    ``k = round(log2 s)``.

    Examples
    --------
    >>> import torch
    >>> pow2_scale(torch.tensor([0.3, 0.25, 0.36]), "ceil").tolist()
    [0.5, 0.25, 0.5]
    >>> pow2_scale(torch.tensor([0.3, 0.36]), "round").tolist()
    [0.25, 0.5]
    """
    if rounding not in ("ceil", "round"):
        raise ValueError(f"pow2 rounding must be one of ['ceil', 'round'], got {rounding!r}")
    mant, exp = torch.frexp(scale)  # scale = mant * 2**exp, mant in [0.5, 1)
    if rounding == "ceil":
        k = torch.where(mant == 0.5, exp - 1, exp)
    else:
        k = torch.where(mant >= _SQRT_HALF, exp, exp - 1)
    return torch.ldexp(torch.ones_like(scale), k)


def saturating_cast(x: Tensor, dtype: torch.dtype) -> Tensor:
    """``x`` clamped to the finite range of the float ``dtype``, then cast.

    Examples
    --------
    >>> import torch
    >>> saturating_cast(torch.tensor([1000.0, 0.3]), torch.float8_e4m3fn).float().tolist()
    [448.0, 0.3125]
    """
    info = torch.finfo(dtype)
    return x.clamp(info.min, info.max).to(dtype)
