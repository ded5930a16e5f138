"""The integer side of ``ap_fixed<W,I,Q,O>``: wrap, saturate, rounding shifts, overflow.

Pure int64 arithmetic (shifts and masks, no floats) on numpy arrays or torch
tensors alike, as the Vivado/Vitis HLS ``ap_fixed_base`` does it; the
rounding and overflow modes are tabled in :mod:`tnquant.quant.fixed_point`,
which re-exports every public name here. The integer emulator of
:mod:`tnquant.export` requantizes with :func:`cast_mantissa`.

Examples
--------
>>> import numpy as np
>>> from tnquant.specs import FixedPoint
>>> cast_mantissa(np.array([11, -11]), 4, FixedPoint(4, 2, rounding="RND", overflow="SAT"))
array([ 3, -3])
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from tnquant.specs import AP_ROUNDING, FixedPoint

__all__ = [
    "range_of",
    "mantissa_bounds",
    "cast_mantissa",
    "round_shift",
    "apply_overflow",
    "wrap",
    "saturate",
]


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
