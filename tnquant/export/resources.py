"""The resource picture of an exported network: multiplies by kind and width, EBOPs.

:func:`op_resources` reads each contraction step of an :class:`~tnquant.export.ir.Op`
(a ``dense`` op is one step, a ``tt`` op one step per core) with its actual
integer weights, and counts per inference (one input sample):

``zero``
    Products with a zero weight: no hardware (hls4ml drops them too).
``shift``
    Products with a weight ``±2^k``: a shift (and a negation), no multiplier.
``multiplies``
    The other products: real multipliers.
``by_width``
    ``{(input_width, weight_bits): count}`` of the real multiplies, where
    ``weight_bits`` is the weight's *effective* width (below).
``ebops``
    Effective bit operations, the resource surrogate of HGQ (Sun et al.,
    "Gradient-based Automatic Mixed Precision Quantization for Neural
    Networks On-Chip", arXiv:2405.00645): the sum over every product with a
    non-zero weight of ``input_width * weight_bits``. ``weight_bits`` of an
    integer code ``m`` is the number of bits from its highest to its lowest
    set bit, ``bit_length(|m|) - trailing_zeros(|m|)`` (so ``±2^k`` is 1 bit
    and a zero weight 0); the input counts its declared width (HGQ counts
    each activation's own effective width: ours is the upper bound for one
    type per tensor).
``memory_bits``
    Weight and bias bits stored (every element at its type's width).

Examples
--------
>>> import numpy as np
>>> from tnquant.export.ir import Op
>>> from tnquant.specs import FixedPoint
>>> t, w_t = FixedPoint(8, 3), FixedPoint(4, 1)
>>> op = Op("0", "dense", "0", 3, 2, t, t, weights=[np.array([[0, 4, 3], [-1, 5, 0]])],
...         weight_types=[w_t], accum_types=[t], step_types=[t])
>>> r = op_resources(op)[0]
>>> r["zero"], r["shift"], r["multiplies"], r["by_width"], r["ebops"]
(2, 2, 2, {(8, 2): 1, (8, 3): 1}, 56)
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import numpy as np

from tnquant.export.ir import CONVS, Op

__all__ = ["op_resources", "effective_bits", "totals"]


def effective_bits(m: np.ndarray) -> np.ndarray:
    """Bits from the highest to the lowest set bit of every ``|m|`` (0 for 0).

    Examples
    --------
    >>> effective_bits(np.array([0, 1, -2, 3, 12, -7])).tolist()
    [0, 1, 1, 2, 2, 3]
    """
    a = np.abs(np.asarray(m, dtype=np.int64))
    odd = a // np.maximum(a & -a, 1)  # |m| without its trailing zeros (exact; 0 stays 0)
    out = np.zeros(a.shape, dtype=np.int64)
    while odd.any():  # bit_length, one bit per pass (at most 63)
        out += odd > 0
        odd = odd >> 1
    return out


def _step(
    name: str, w: np.ndarray, uses: int, in_width: int, bias_bits: int, w_width: int
) -> dict[str, Any]:
    bits = effective_bits(w).reshape(-1)
    zero = int(np.count_nonzero(bits == 0)) * uses
    shift = int(np.count_nonzero(bits == 1)) * uses
    real = bits[bits > 1]
    counts = Counter(real.tolist())
    by_width = {(in_width, int(b)): int(c) * uses for b, c in sorted(counts.items())}
    return {
        "name": name,
        "products": int(w.size) * uses,
        "zero": zero,
        "shift": shift,
        "multiplies": int(real.size) * uses,
        "by_width": by_width,
        "ebops": int(bits.sum()) * uses * in_width,
        "memory_bits": int(w.size) * w_width + bias_bits,
    }


def op_resources(op: Op) -> list[dict[str, Any]]:
    """One row per contraction step of ``op`` (none for a ReLU), as in the module docs."""
    if op.kind == "dense":
        bias_bits = 0
        if op.bias is not None and op.bias_type is not None:
            bias_bits = int(op.bias.size) * op.bias_type.width
        w_t = op.weight_types[0]
        return [_step(op.name, op.weights[0], 1, op.input_type.width, bias_bits, w_t.width)]
    if op.kind in CONVS:  # every weight is used once per output position
        bias_bits = 0
        if op.bias is not None and op.bias_type is not None:
            bias_bits = int(op.bias.size) * op.bias_type.width
        w_t, uses = op.weight_types[0], op.out_shape[1] * op.out_shape[2]
        return [_step(op.name, op.weights[0], uses, op.input_type.width, bias_bits, w_t.width)]
    if op.kind != "tt":
        return []
    cores = op.weights
    in_shape = [c.shape[2] for c in cores]
    out_pad = math.prod(c.shape[1] for c in cores)
    rows, cur, q, d = [], op.input_type, 1, len(cores)
    for s in range(d):
        k = d - 1 - s
        _, o, _, _ = cores[k].shape
        p = math.prod(in_shape[:k])
        bias_bits = 0
        if s == d - 1 and op.bias is not None and op.bias_type is not None:
            bias_bits = out_pad * op.bias_type.width
        w_width = op.weight_types[k].width
        rows.append(_step(f"{op.name}.{s}", cores[k], p * q, cur.width, bias_bits, w_width))
        cur, q = op.step_types[s], o * q
    return rows


def totals(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The rows summed (``by_width`` merged).

    Examples
    --------
    >>> totals([{"zero": 1, "by_width": {(8, 2): 3}}, {"zero": 2, "by_width": {(8, 2): 1}}])
    {'zero': 3, 'by_width': {(8, 2): 4}}
    """
    out: dict[str, Any] = {}
    for row in rows:
        for key, value in row.items():
            if key == "by_width":
                merged = Counter(out.get(key, {}))
                merged.update(value)
                out[key] = dict(sorted(merged.items()))
            elif isinstance(value, int):
                out[key] = out.get(key, 0) + value
    return out
