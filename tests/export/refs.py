"""Independent references for the export tests: exact rationals, one ap_fixed cast at a time."""

from __future__ import annotations

import math
from fractions import Fraction

from tnquant.specs import FixedPoint


def ref_cast(value: Fraction, spec: FixedPoint) -> int:
    """The mantissa ``ap_fixed`` gives ``value`` (Fractions, written from the HLS manual)."""
    scaled = value * (Fraction(2) ** spec.frac)
    fl = math.floor(scaled)
    rem = scaled - fl
    half = Fraction(1, 2)
    q = spec.rounding
    if q == "TRN":
        r = fl
    elif q == "TRN_ZERO":
        r = fl if scaled >= 0 or rem == 0 else fl + 1
    elif rem != half:
        r = fl + (1 if rem > half else 0)
    elif q == "RND":
        r = fl + 1
    elif q == "RND_ZERO":
        r = fl if scaled > 0 else fl + 1
    elif q == "RND_MIN_INF":
        r = fl
    elif q == "RND_INF":
        r = fl + 1 if scaled > 0 else fl
    else:  # RND_CONV
        r = fl if fl % 2 == 0 else fl + 1
    lo, hi = spec.qmin, spec.qmax
    if spec.overflow == "WRAP":
        span = 1 << spec.width
        return (r - lo) % span + lo
    if spec.overflow == "SAT_ZERO":
        return r if lo <= r <= hi else 0
    if spec.overflow == "SAT_SYM" and spec.signed:
        lo = -hi
    return min(max(r, lo), hi)


def value(m: int, spec: FixedPoint) -> Fraction:
    return Fraction(int(m)) / (Fraction(2) ** spec.frac)


def ref_dense(x: list[int], w: list[list[int]], bias: list[int] | None, in_t: FixedPoint,
              w_t: FixedPoint, bias_t: FixedPoint | None, accum: FixedPoint,
              result: FixedPoint) -> list[int]:
    """hls4ml dense_latency, element by element, in exact rationals."""
    out = []
    for o, row in enumerate(w):
        acc = ref_cast(value(bias[o], bias_t), accum) if bias is not None and bias_t else 0
        for xi, wi in zip(x, row, strict=True):
            p = ref_cast(value(xi, in_t) * value(wi, w_t), accum)
            acc = ref_cast(value(acc, accum) + value(p, accum), accum)
        out.append(ref_cast(value(acc, accum), result))
    return out
