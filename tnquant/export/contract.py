"""hls4ml's dense contraction step on int64 mantissas (``nnet_dense_latency.h``).

:func:`contract_step` is the arithmetic the emulator (:mod:`tnquant.export.emulator`,
whose module docs give hls4ml's order of casts) and the convolutions
(:mod:`tnquant.export.conv_ops`) share; moved here so that both import it
without a cycle.
"""

from __future__ import annotations

import numpy as np

from tnquant.quant.fixed_point import apply_overflow, cast_mantissa, mantissa_bounds, round_shift
from tnquant.specs import FixedPoint

__all__ = ["contract_step", "count"]


def _overflows(m: np.ndarray, frac_in: int, spec: FixedPoint) -> int:
    """How many of ``m * 2**-frac_in`` overflow ``spec`` once rounded (saturate or wrap)."""
    lo, hi = mantissa_bounds(spec)
    shift = frac_in - spec.frac
    if shift >= 0:
        r = round_shift(m, shift, spec.rounding)
    else:  # exact left shift: compare against the bounds shifted right instead
        t = -shift
        r, lo, hi = m, -((-lo) >> t), hi >> t
    return int(np.count_nonzero((r < lo) | (r > hi)))


def _count(
    stats: dict[str, int] | None, key: str, m: np.ndarray, frac_in: int, spec: FixedPoint
) -> None:
    if stats is not None:
        stats[key] = stats.get(key, 0) + int(m.size)
        stats[key + "_overflow"] = stats.get(key + "_overflow", 0) + _overflows(m, frac_in, spec)


def contract_step(
    x: np.ndarray,
    w: np.ndarray,
    in_type: FixedPoint,
    w_type: FixedPoint,
    accum: FixedPoint,
    result: FixedPoint,
    bias: np.ndarray | None = None,
    bias_type: FixedPoint | None = None,
    stats: dict[str, int] | None = None,
) -> np.ndarray:
    """One hls4ml-exact contraction: ``x (..., n, Q)`` with ``w (m, n)`` -> ``(..., m, Q)``.

    ``bias`` (mantissas of ``bias_type``) broadcasts against ``(m, Q)``. With
    ``stats`` (a dict), counts are added to it: ``'accum'`` (casts to the
    accumulator: bias, products, sums after every add) and ``'result'``
    (casts to the result), each with ``'<key>_overflow'``, how many of them
    fell outside the type once rounded (saturated or wrapped).

    Examples
    --------
    >>> import numpy as np
    >>> x = np.array([[[3], [2]]])                 # (1, 2, 1), ap_fixed<4,4>
    >>> w = np.array([[1, 1]])                     # (1, 2)
    >>> t = FixedPoint(4, 4)
    >>> stats = {}
    >>> contract_step(x, w, t, t, FixedPoint(3, 3, overflow="SAT"), t, stats=stats).tolist()
    [[[3]]]
    >>> stats
    {'accum': 4, 'accum_overflow': 1, 'result': 1, 'result_overflow': 0}
    """
    frac = in_type.frac + w_type.frac
    shape = (*x.shape[:-2], w.shape[0], x.shape[-1])
    if bias is None or bias_type is None:
        acc = np.zeros(shape, dtype=np.int64)
    else:
        b = np.broadcast_to(bias, shape)
        _count(stats, "accum", b, bias_type.frac, accum)
        acc = np.broadcast_to(cast_mantissa(bias, bias_type.frac, accum), shape).copy()
    for j in range(w.shape[1]):
        prod = x[..., None, j, :] * w[:, j, None]
        _count(stats, "accum", prod, frac, accum)
        total = acc + cast_mantissa(prod, frac, accum)
        _count(stats, "accum", total, accum.frac, accum)
        acc = apply_overflow(total, accum)
    _count(stats, "result", acc, accum.frac, result)
    return np.asarray(cast_mantissa(acc, accum.frac, result), dtype=np.int64)


count = _count
