"""Fixed point ``ap_fixed<W,I,Q,O>`` / ``ap_ufixed<W,I,Q,O>``, bit-exact.

A value is ``mantissa * 2**-(W - I)`` with a ``W``-bit two's-complement
(``ap_fixed``) or unsigned (``ap_ufixed``) mantissa. A conversion first
rounds the exact value to a whole mantissa (the ``Q`` mode), then resolves
overflow on the rounded integer (the ``O`` mode), as the Vivado/Vitis HLS
``ap_fixed_base`` constructor and assignment operator do (the ``ap_types``
headers shipped with hls4ml: ``quantization_adjust`` and
``overflow_adjust``):

======================  ====================================================
``TRN`` (default)       floor (toward -inf)
``TRN_ZERO``            toward zero
``RND``                 nearest, ties toward +inf
``RND_ZERO``            nearest, ties toward zero
``RND_MIN_INF``         nearest, ties toward -inf
``RND_INF``             nearest, ties away from zero
``RND_CONV``            nearest, ties to even
``WRAP`` (default)      keep the low ``W`` bits (two's complement if signed)
``SAT``                 clamp to ``[qmin, qmax]``
``SAT_ZERO``            out of range gives 0
``SAT_SYM``             signed: clamp to ``[-qmax, qmax]`` (the most negative
                        mantissa is never produced, even from an in-range
                        value); unsigned, or signed ``W == 1``: as ``SAT``
======================  ====================================================

The float path (:func:`to_mantissa`) works on the exact value ``x * 2**frac``
in float64; the integer path (:func:`cast_mantissa`, for the integer
emulator) requantizes int64 mantissas with shifts only, on numpy arrays or
torch tensors alike (it lives in :mod:`tnquant.quant.ap_int` and is
re-exported here). Both agree with the C++ headers bit for bit (see the
tests). ``ap_ufixed<64, I>`` is refused: its mantissas do not fit int64.

Examples
--------
>>> import torch
>>> from tnquant.specs import AP_ROUNDING, FixedPoint
>>> spec = FixedPoint(8, 3, rounding="RND", overflow="SAT")
>>> to_mantissa(torch.tensor([0.5, 0.515625, 100.0]), spec)
tensor([ 16,  17, 127])
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from tnquant.quant.ap_int import (
    _as_int64,
    _check_spec,
    _increment,
    _ldexp,
    _resolve,
    apply_overflow,
    cast_mantissa,
    mantissa_bounds,
    range_of,
    round_shift,
    saturate,
    wrap,
)
from tnquant.quant.qparams import QParams, all_finite, qparam_shape
from tnquant.specs import FixedPoint

__all__ = [
    "range_of",
    "mantissa_bounds",
    "to_mantissa",
    "from_mantissa",
    "cast_mantissa",
    "round_shift",
    "apply_overflow",
    "wrap",
    "saturate",
    "fixed_point_quantize",
    "fixed_point_fake_quantize",
]

# |frac| beyond this changes nothing for a finite float64 (see _scaled).
_FRAC_CLAMP = 2000


# --------------------------------------------------------------------------- #
# float <-> mantissa
# --------------------------------------------------------------------------- #


def _scaled(x64: Tensor, frac: int) -> Tensor:
    """``x64 * 2**frac`` in float64, exact unless it over/underflows.

    Beyond ``|frac| > 2000`` every non-zero finite float64 overflows (a
    multiple of ``2**926``: out of range and zero modulo ``2**64``) or falls
    below ``2**-976`` (only its sign matters), so ``frac`` is clamped. A
    negative value that underflows to zero keeps a tiny negative value so
    floor-like modes still give ``-1``.
    """
    f = max(-_FRAC_CLAMP, min(_FRAC_CLAMP, frac))
    a = f // 2
    v = x64 * math.ldexp(1.0, a) * math.ldexp(1.0, f - a)
    if f < 0:
        v = torch.where((x64 < 0) & (v == 0), -math.ldexp(1.0, -1074), v)
    return v


def _check_float(x: Any, name: str = "x") -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if not all_finite(x):
        bad = ~torch.isfinite(x)
        raise ValueError(
            f"{name} must be finite, got {int(bad.sum())} NaN/Inf value(s) out of {x.numel()}"
        )
    return x


def to_mantissa(x: Tensor, spec: FixedPoint) -> Tensor:
    """Convert floats to ``spec`` mantissas (int64), as ``ap_fixed``'s double ctor.

    The exact value ``x * 2**frac`` is formed in float64, rounded with
    ``spec.rounding`` and overflow-resolved with ``spec.overflow``.

    Parameters
    ----------
    x
        A floating-point tensor (any float dtype; float32/float16 are widened
        exactly). NaN or Inf raise ``ValueError``.
    spec
        The target ``FixedPoint`` type.

    Returns
    -------
    An int64 tensor of mantissas in ``[spec.qmin, spec.qmax]``, same shape and
    device as ``x``.

    Examples
    --------
    >>> x = torch.tensor([0.3, -0.3, 5.0], dtype=torch.float64)
    >>> to_mantissa(x, FixedPoint(6, 3))                 # floor(x * 8), wrap
    tensor([  2,  -3, -24])
    >>> to_mantissa(x, FixedPoint(6, 3, rounding="RND_CONV", overflow="SAT"))
    tensor([ 2, -2, 31])
    """
    _check_spec(spec)
    _check_float(x)
    v = _scaled(x.to(torch.float64), spec.frac)
    finite = torch.isfinite(v)
    fl = torch.floor(v)
    d = torch.where(finite, v - fl, 0.0)
    odd = torch.where(finite, torch.fmod(fl, 2.0), 0.0) != 0
    inc = _increment(d >= 0.5, (d != 0) & (d != 0.5), v < 0, odd, spec.rounding)
    r = fl + inc
    lo = float(spec.qmin)
    top = math.ldexp(1.0, spec.width - 1 if spec.signed else spec.width)  # qmax + 1
    below, above = r < lo, r >= top
    if spec.overflow == "WRAP":
        span = math.ldexp(1.0, spec.width)
        w = torch.fmod(torch.where(finite, r, 0.0), span)  # exact, |w| < 2**W
        if spec.signed:  # +-2**W is exact here (Sterbenz)
            w = torch.where(w >= top, w - span, torch.where(w < lo, w + span, w))
            return w.to(torch.int64)
        return w.to(torch.int64) & ((1 << spec.width) - 1)
    value = torch.where(below | above, 0.0, r).to(torch.int64)
    return _resolve(value, below, above, spec)


def from_mantissa(m: Any, spec: FixedPoint, dtype: torch.dtype = torch.float32) -> Tensor:
    """The values ``m * 2**-(W - I)`` of ``spec`` mantissas, in ``dtype``.

    Computed in float64 (exact for ``|m| <= 2**53``) and rounded once to
    ``dtype``. ``m`` may be a torch tensor or a numpy array of integers.
    A value beyond ``dtype``'s largest (``ap_fixed<8,1030>`` in float32,
    ``ap_fixed<8,2000>`` even in float64) raises ``ValueError``, never gives
    an infinity.

    Examples
    --------
    >>> from_mantissa(torch.tensor([16, -3]), FixedPoint(8, 3))
    tensor([ 0.5000, -0.0938])
    """
    _check_spec(spec)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    m = _as_int64(m)
    if not isinstance(m, Tensor):
        m = torch.from_numpy(m)
    out = _scaled(m.to(torch.float64), -spec.frac).to(dtype)
    _check_values_fit(out, spec, dtype)
    return out


def _reach(spec: FixedPoint) -> float:
    """The largest magnitude of a value of ``spec`` (``inf`` beyond float64)."""
    return _ldexp(float(max(-spec.qmin, spec.qmax)), -spec.frac)


def _check_values_fit(values: Tensor, spec: FixedPoint, dtype: torch.dtype) -> None:
    """Refuse ``values`` of ``spec`` that overflowed ``dtype`` (checked only when they could)."""
    top = torch.finfo(dtype).max
    if _reach(spec) <= top or all_finite(values):
        return
    bad = int((~torch.isfinite(values)).sum())
    raise ValueError(
        f"{spec}: {bad} of {values.numel()} value(s) are beyond {dtype}'s largest "
        f"value {top:.6g} (the type reaches {_reach(spec):.6g}); use a wider dtype "
        f"or fewer integer bits"
    )


# --------------------------------------------------------------------------- #
# quantizer entry points
# --------------------------------------------------------------------------- #


def fixed_point_quantize(x: Tensor, spec: FixedPoint) -> tuple[Tensor, QParams]:
    """Quantize ``x`` to ``spec``: int64 mantissas and their ``QParams``.

    ``qparams.scale`` is ``2**-(W - I)`` in an all-ones-shaped tensor (one
    block: the whole tensor), in ``x``'s dtype widened to at least float32
    (to float64 where the step is not a float32 number); ``zero_point`` is
    ``None``; ``qmin``/``qmax`` are the spec's. Raises ``ValueError`` for a
    step beyond float64, or codes whose values are beyond ``x``'s dtype
    (``dequantize`` would give infinities).

    Examples
    --------
    >>> codes, qp = fixed_point_quantize(torch.tensor([[0.25, -1.0]]), FixedPoint(8, 3))
    >>> codes
    tensor([[  8, -32]])
    >>> qp.scale, qp.block_size
    (tensor([[0.0312]]), (1, 2))
    """
    codes = to_mantissa(x, spec)
    step = spec.scale  # ValueError beyond float64
    if _reach(spec) > torch.finfo(x.dtype).max:
        from_mantissa(codes, spec, x.dtype)  # raises where a value overflows x.dtype
    shape = tuple(x.shape)
    scale_dtype = torch.promote_types(x.dtype, torch.float32)
    if torch.tensor(step, dtype=scale_dtype).item() != step:
        scale_dtype = torch.float64
    scale = torch.full(qparam_shape(shape, shape), step, dtype=scale_dtype, device=x.device)
    qparams = QParams(
        scale=scale,
        zero_point=None,
        qmin=spec.qmin,
        qmax=spec.qmax,
        block_size=shape,
        shape=shape,
        dtype=x.dtype,
    )
    return codes, qparams


class _FixedPointSTE(torch.autograd.Function):
    """Forward: the ``spec`` value of ``x``; backward: identity (STE)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, spec: FixedPoint) -> Tensor:
        return from_mantissa(to_mantissa(x, spec), spec, dtype=x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


def fixed_point_fake_quantize(x: Tensor, spec: FixedPoint) -> Tensor:
    """``x`` snapped to ``spec``'s grid, in ``x``'s dtype, with an identity gradient.

    Equal to ``from_mantissa(to_mantissa(x, spec), spec, x.dtype)``; the
    backward pass is the straight-through estimator (gradient passed
    unchanged, also where the value saturated or wrapped).

    Examples
    --------
    >>> x = torch.tensor([0.3, 9.0], requires_grad=True)
    >>> y = fixed_point_fake_quantize(x, FixedPoint(6, 3, rounding="RND", overflow="SAT"))
    >>> y
    tensor([0.2500, 3.8750], grad_fn=<_FixedPointSTEBackward>)
    >>> y.sum().backward(); x.grad
    tensor([1., 1.])
    """
    _check_spec(spec)
    _check_float(x)
    return _FixedPointSTE.apply(x, spec)
