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
torch tensors alike. Both agree with the C++ headers bit for bit (see the
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

import numpy as np
import torch
from torch import Tensor

from tnquant.quant.qparams import QParams, all_finite, qparam_shape
from tnquant.specs import AP_ROUNDING, FixedPoint

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


def _check_spec(spec: Any) -> FixedPoint:
    if not isinstance(spec, FixedPoint):
        raise TypeError(f"spec must be a FixedPoint, got {type(spec).__name__}")
    if not spec.signed and spec.width == 64:
        raise ValueError(f"{spec} mantissas do not fit int64; use a width of at most 63")
    return spec


def _check_width(width: Any, signed: bool) -> None:
    if isinstance(width, bool) or not isinstance(width, int):
        raise TypeError(f"width must be an int, got {width!r}")
    top = 64 if signed else 63
    if not 1 <= width <= top:
        kind = "signed" if signed else "unsigned"
        raise ValueError(f"width of a {kind} int64 mantissa must be in 1..{top}, got {width}")


def _as_int64(m: Any) -> Any:
    """``m`` as int64, keeping its kind (torch tensor or numpy array)."""
    if isinstance(m, Tensor):
        if m.dtype in (torch.bool, torch.uint64) or m.is_floating_point() or m.is_complex():
            raise TypeError(f"mantissas must be an integer tensor within int64, got {m.dtype}")
        return m.to(torch.int64)
    arr = np.asarray(m)
    if arr.dtype.kind not in "iu" or arr.dtype == np.uint64:
        raise TypeError(f"mantissas must be an integer array within int64, got {arr.dtype}")
    return arr.astype(np.int64)


def _where(cond: Any, a: Any, b: Any) -> Any:
    if isinstance(cond, Tensor):
        return torch.where(cond, a, b)
    return np.where(cond, a, b).astype(np.int64)


def _finish(out: Any, like: Any) -> Any:
    """Give numpy results back as int64 arrays (never numpy scalars)."""
    if isinstance(like, Tensor):
        return out
    return np.asarray(out, dtype=np.int64)


def _ldexp(value: float, exp: int) -> float:
    try:
        return math.ldexp(value, exp)
    except OverflowError:
        return math.copysign(math.inf, value)


def mantissa_bounds(spec: FixedPoint) -> tuple[int, int]:
    """The mantissa range a conversion to ``spec`` can produce, saturating.

    ``(qmin, qmax)``, except ``SAT_SYM`` on a signed type of width >= 2,
    which gives ``(-qmax, qmax)``.

    Examples
    --------
    >>> mantissa_bounds(FixedPoint(4, 2, overflow="SAT_SYM"))
    (-7, 7)
    >>> mantissa_bounds(FixedPoint(4, 2, signed=False))
    (0, 15)
    """
    _check_spec(spec)
    if spec.overflow == "SAT_SYM" and spec.signed and spec.width >= 2:
        return -spec.qmax, spec.qmax
    return spec.qmin, spec.qmax


def range_of(spec: FixedPoint) -> tuple[float, float]:
    """``(min_value, max_value)`` of the type: ``qmin * 2**-frac, qmax * 2**-frac``.

    The full range of all ``W``-bit mantissas (a ``SAT_SYM`` conversion never
    produces the minimum; see :func:`mantissa_bounds`). Rounded to float64
    for widths above 53.

    Examples
    --------
    >>> range_of(FixedPoint(8, 3))
    (-4.0, 3.96875)
    >>> range_of(FixedPoint(4, 6, signed=False))
    (0.0, 60.0)
    """
    _check_spec(spec)
    return _ldexp(float(spec.qmin), -spec.frac), _ldexp(float(spec.qmax), -spec.frac)


# --------------------------------------------------------------------------- #
# integer primitives: wrap, saturate, rounding shift, overflow
# --------------------------------------------------------------------------- #


def wrap(m: Any, width: int, signed: bool) -> Any:
    """Keep the low ``width`` bits of int64 mantissas ``m`` (``WRAP``).

    Signed results are the two's-complement reading of those bits, in
    ``[-2**(width-1), 2**(width-1) - 1]``; unsigned ones are in
    ``[0, 2**width - 1]``. Works on torch tensors and numpy arrays.

    Examples
    --------
    >>> import numpy as np
    >>> wrap(np.array([7, 8, -9, 20]), 4, signed=True)
    array([ 7, -8,  7,  4])
    >>> wrap(np.array([-1, 16, 18]), 4, signed=False)
    array([15,  0,  2])
    """
    _check_width(width, signed)
    m = _as_int64(m)
    if width == 64:
        return _finish(m, m)
    low = m & ((1 << width) - 1)
    if not signed:
        return _finish(low, m)
    half = 1 << (width - 1)
    return _finish(_where(low >= half, low - half - half, low), m)


def saturate(m: Any, width: int, signed: bool, symmetric: bool = False) -> Any:
    """Clamp int64 mantissas to the ``width``-bit range (``SAT``).

    ``symmetric=True`` (``SAT_SYM``) drops the most negative signed value
    (for ``width >= 2``; a 1-bit signed type keeps ``{-1, 0}`` as HLS does).

    Examples
    --------
    >>> import numpy as np
    >>> saturate(np.array([9, -9, -8, 3]), 4, signed=True)
    array([ 7, -8, -8,  3])
    >>> saturate(np.array([9, -9, -8, 3]), 4, signed=True, symmetric=True)
    array([ 7, -7, -7,  3])
    """
    _check_width(width, signed)
    m = _as_int64(m)
    if signed:
        hi = (1 << (width - 1)) - 1
        lo = -hi if symmetric and width >= 2 else -hi - 1
    else:
        lo, hi = 0, (1 << width) - 1
    return _finish(m.clip(lo, hi), m)


def _increment(qb: Any, r: Any, neg: Any, odd: Any, rounding: str) -> Any:
    """Whether to add one to the floor, from the bit after the LSB (``qb``),
    any bit below it (``r``), the sign of the source and the floor's parity."""
    if rounding == "TRN":
        return qb & False
    if rounding == "TRN_ZERO":
        return neg & (qb | r)
    if rounding == "RND":
        return qb
    if rounding == "RND_ZERO":
        return qb & (neg | r)
    if rounding == "RND_MIN_INF":
        return qb & r
    if rounding == "RND_INF":
        return qb & (~neg | r)
    return qb & (odd | r)  # RND_CONV


def round_shift(m: Any, shift: int, rounding: str = "TRN") -> Any:
    """``m / 2**shift`` rounded to an integer with an ``ap_fixed`` rounding mode.

    Pure integer arithmetic on int64 (numpy or torch); ``shift >= 0``.

    Examples
    --------
    >>> import numpy as np
    >>> m = np.array([5, 7, -5, -7])      # 1.25, 1.75, -1.25, -1.75 with shift 2
    >>> round_shift(m, 2, "TRN")
    array([ 1,  1, -2, -2])
    >>> round_shift(np.array([6, 10, -6]), 2, "RND_CONV")   # 1.5, 2.5, -1.5
    array([ 2,  2, -2])
    """
    if isinstance(shift, bool) or not isinstance(shift, int) or shift < 0:
        raise ValueError(f"shift must be an int >= 0, got {shift!r}")
    if rounding not in AP_ROUNDING:
        raise ValueError(f"rounding must be one of {list(AP_ROUNDING)}, got {rounding!r}")
    m = _as_int64(m)
    if shift == 0:
        return _finish(m, m)
    q = m >> min(shift, 63)
    if rounding == "TRN":
        return _finish(q, m)
    qb = ((m >> min(shift - 1, 63)) & 1) != 0
    r = (m & ((1 << (shift - 1)) - 1)) != 0 if shift <= 64 else m != 0
    inc = _increment(qb, r, m < 0, (q & 1) != 0, rounding)
    return _finish(q + inc, m)


def _resolve(value: Any, below: Any, above: Any, spec: FixedPoint) -> Any:
    """A saturating mode's result from in-range values and out-of-range flags."""
    if spec.overflow == "SAT_ZERO":
        return _where(below | above, 0, value)
    lo, hi = mantissa_bounds(spec)
    value = value.clip(lo, hi)
    return _where(below, lo, _where(above, hi, value))


def apply_overflow(m: Any, spec: FixedPoint) -> Any:
    """Resolve overflow of rounded int64 mantissas with ``spec``'s ``O`` mode.

    ``m`` holds whole mantissas of ``spec`` (already rounded), possibly out of
    range. Numpy arrays or torch tensors.

    Examples
    --------
    >>> import numpy as np
    >>> m = np.array([8, -8, -9, 20])
    >>> apply_overflow(m, FixedPoint(4, 2))                       # WRAP
    array([-8, -8,  7,  4])
    >>> apply_overflow(m, FixedPoint(4, 2, overflow="SAT_ZERO"))
    array([ 0, -8,  0,  0])
    """
    _check_spec(spec)
    m = _as_int64(m)
    if spec.overflow == "WRAP":
        return wrap(m, spec.width, spec.signed)
    return _finish(_resolve(m, m < spec.qmin, m > spec.qmax, spec), m)


def cast_mantissa(m: Any, frac_in: int, spec: FixedPoint) -> Any:
    """Requantize int64 mantissas with ``frac_in`` fractional bits into ``spec``.

    The value ``m * 2**-frac_in`` (any int64, e.g. an accumulator of
    products) is rounded with ``spec.rounding`` and overflow-resolved with
    ``spec.overflow``, exactly as assigning an ``ap_fixed`` of that value to
    an ``ap_fixed<W,I,Q,O>`` in HLS. Shifts and masks only, no floats; numpy
    in gives numpy out, torch in gives torch out (same device).

    Parameters
    ----------
    m
        Integer mantissas (numpy array or torch tensor, any int dtype that fits
        int64).
    frac_in
        Fractional bits of ``m`` (may be negative).
    spec
        The target type.

    Returns
    -------
    int64 mantissas of ``spec``.

    Examples
    --------
    >>> import numpy as np
    >>> # 0.6875 and -0.6875 with 4 fractional bits into ap_fixed<4,2,RND,SAT>
    >>> cast_mantissa(np.array([11, -11]), 4, FixedPoint(4, 2, rounding="RND", overflow="SAT"))
    array([ 3, -3])
    >>> cast_mantissa(np.array([3, -3]), 0, FixedPoint(4, 2))   # 3 -> 12 wraps to -4
    array([-4,  4])
    """
    _check_spec(spec)
    if isinstance(frac_in, bool) or not isinstance(frac_in, (int, np.integer)):
        raise TypeError(f"frac_in must be an int, got {frac_in!r}")
    frac_in = int(frac_in)
    m = _as_int64(m)
    shift = frac_in - spec.frac
    if shift >= 0:
        return apply_overflow(round_shift(m, shift, spec.rounding), spec)
    t = -shift  # exact left shift by t: value m * 2**t, no rounding
    if spec.overflow == "WRAP":
        if t >= spec.width:
            return _finish(m & 0, m)
        return _finish(wrap(m, spec.width - t, spec.signed) << t, m)
    lo_m = -((-spec.qmin) >> t)  # ceil(qmin / 2**t)
    hi_m = spec.qmax >> t  # floor(qmax / 2**t)
    below, above = m < lo_m, m > hi_m
    value = m.clip(lo_m, hi_m) << min(t, 63)
    return _finish(_resolve(value, below, above, spec), m)


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
    raise ValueError(f"{spec}: {bad} of {values.numel()} value(s) are beyond {dtype}'s largest "
                     f"value {top:.6g} (the type reaches {_reach(spec):.6g}); use a wider dtype "
                     f"or fewer integer bits")


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
