"""Independent references for the export tests: exact rationals, one ap_fixed cast at a time."""

from __future__ import annotations

import math
from fractions import Fraction

from tnquant.specs import FixedPoint


def ref_round(value: Fraction, spec: FixedPoint) -> int:
    """The mantissa ``value`` rounds to in ``spec`` before any overflow handling."""
    scaled = value * (Fraction(2) ** spec.frac)
    fl = math.floor(scaled)
    rem = scaled - fl
    half = Fraction(1, 2)
    q = spec.rounding
    if q == "TRN":
        return fl
    if q == "TRN_ZERO":
        return fl if scaled >= 0 or rem == 0 else fl + 1
    if rem != half:
        return fl + (1 if rem > half else 0)
    if q == "RND":
        return fl + 1
    if q == "RND_ZERO":
        return fl if scaled > 0 else fl + 1
    if q == "RND_MIN_INF":
        return fl
    if q == "RND_INF":
        return fl + 1 if scaled > 0 else fl
    return fl if fl % 2 == 0 else fl + 1  # RND_CONV


def ref_bounds(spec: FixedPoint) -> tuple[int, int]:
    """The mantissas a saturating cast keeps (SAT_SYM drops the most negative one)."""
    lo, hi = spec.qmin, spec.qmax
    if spec.overflow == "SAT_SYM" and spec.signed:
        lo = -hi
    return lo, hi


def ref_cast(value: Fraction, spec: FixedPoint) -> int:
    """The mantissa ``ap_fixed`` gives ``value`` (Fractions, written from the HLS manual)."""
    r = ref_round(value, spec)
    lo, hi = spec.qmin, spec.qmax
    if spec.overflow == "WRAP":
        span = 1 << spec.width
        return (r - lo) % span + lo
    if spec.overflow == "SAT_ZERO":
        return r if lo <= r <= hi else 0
    lo, hi = ref_bounds(spec)
    return min(max(r, lo), hi)


def ref_overflows(value: Fraction, spec: FixedPoint) -> bool:
    """Whether casting ``value`` to ``spec`` saturates or wraps."""
    lo, hi = ref_bounds(spec) if spec.overflow != "WRAP" else (spec.qmin, spec.qmax)
    return not lo <= ref_round(value, spec) <= hi


def value(m: int, spec: FixedPoint) -> Fraction:
    return Fraction(int(m)) / (Fraction(2) ** spec.frac)


def ref_dense(
    x: list[int],
    w: list[list[int]],
    bias: list[int] | None,
    in_t: FixedPoint,
    w_t: FixedPoint,
    bias_t: FixedPoint | None,
    accum: FixedPoint,
    result: FixedPoint,
) -> list[int]:
    """hls4ml dense_latency, element by element, in exact rationals."""
    out = []
    for o, row in enumerate(w):
        acc = ref_cast(value(bias[o], bias_t), accum) if bias is not None and bias_t else 0
        for xi, wi in zip(x, row, strict=True):
            p = ref_cast(value(xi, in_t) * value(wi, w_t), accum)
            acc = ref_cast(value(acc, accum) + value(p, accum), accum)
        out.append(ref_cast(value(acc, accum), result))
    return out


def ref_dense_counted(
    x: list[int],
    w: list[list[int]],
    bias: list[int],
    in_t: FixedPoint,
    w_t: FixedPoint,
    bias_t: FixedPoint,
    accum: FixedPoint,
    result: FixedPoint,
) -> tuple[list[int], int, int]:
    """:func:`ref_dense` plus (accumulator casts, of which overflowed): bias, products, sums."""
    out, casts, over = [], 0, 0
    for o, row in enumerate(w):
        b = value(bias[o], bias_t)
        casts, over = casts + 1, over + ref_overflows(b, accum)
        acc = ref_cast(b, accum)
        for xi, wi in zip(x, row, strict=True):
            p = value(xi, in_t) * value(wi, w_t)
            casts, over = casts + 1, over + ref_overflows(p, accum)
            s = value(acc, accum) + value(ref_cast(p, accum), accum)
            casts, over = casts + 1, over + ref_overflows(s, accum)
            acc = ref_cast(s, accum)
        out.append(ref_cast(value(acc, accum), result))
    return out, casts, over
