"""The merge ops of a graph: a residual ``add`` and a ``concat`` of flat features.

Both follow hls4ml's ``nnet_merge.h``:

``'add'``
    ``res[i] = data1[i] + data2[i]``: the sum is exact (``ap_fixed``
    arithmetic widens), then cast to the result type. The derived result
    type is lossless: ``F = max(F1, F2)`` fractional bits and one integer
    bit above the larger input (``ap_fixed<I+F, I>``; unsigned when both
    inputs are unsigned).
``'concat'``
    ``res = [data1, data2]`` along the features (``torch.cat(..., dim=1)`` of
    ``(batch, n)`` tensors, hls4ml's ``concatenate1d``), every element cast
    to the result type; the derived type holds both inputs exactly.

``result=`` (a glob on the op name: the ``torch.fx`` node's qualified
name, e.g. ``'block.add'``) overrides the derived type.

Examples
--------
>>> a, b = FixedPoint(8, 3), FixedPoint(6, 4, signed=False)
>>> str(merge_result("add", [a, b])), str(merge_result("concat", [a, b]))
('ap_fixed<11,6>', 'ap_fixed<10,5>')
"""

from __future__ import annotations

import numpy as np

from tnquant.export.contract import _count
from tnquant.export.ir import Op, TypeOverride, lookup_override
from tnquant.quant.fixed_point import cast_mantissa
from tnquant.specs import FixedPoint

__all__ = ["merge_result", "merge_op", "run_merge"]


def _signed_integer(t: FixedPoint) -> int:
    """The integer bits of the narrowest signed type that holds every value of ``t``."""
    return t.integer if t.signed else t.integer + 1


def merge_result(kind: str, types: list[FixedPoint]) -> FixedPoint:
    """The lossless result type of an ``'add'`` or a ``'concat'`` of ``types``.

    Examples
    --------
    >>> str(merge_result("add", [FixedPoint(8, 3), FixedPoint(8, 3)]))
    'ap_fixed<9,4>'
    >>> str(merge_result("concat", [FixedPoint(8, 3), FixedPoint(8, 3)]))
    'ap_fixed<8,3>'
    """
    frac = max(t.frac for t in types)
    grow = 1 if kind == "add" else 0
    if all(not t.signed for t in types):
        integer = max(t.integer for t in types) + grow
        return FixedPoint(max(1, integer + frac), integer, signed=False)
    integer = max(_signed_integer(t) for t in types) + grow
    return FixedPoint(max(1, integer + frac), integer)


def merge_op(
    name: str,
    kind: str,
    inputs: list[tuple[str, FixedPoint, int, tuple[int, ...]]],
    overrides: dict[str, TypeOverride],
) -> Op:
    """The ``'add'``/``'concat'`` op ``name`` of ``inputs`` (``(op name, type, features, shape)``).

    Raises ``ValueError`` when the inputs do not fit the kind (an add of
    different sizes, a concat of feature maps).

    Examples
    --------
    >>> t = FixedPoint(8, 3)
    >>> op = merge_op("add", "add", [("0", t, 4, ()), ("@input", t, 4, ())], {"result": None})
    >>> op.inputs, str(op.result_type), op.out_features
    (('0', '@input'), 'ap_fixed<9,4>', 4)
    """
    names = [n for n, _, _, _ in inputs]
    types = [t for _, t, _, _ in inputs]
    sizes = [n for _, _, n, _ in inputs]
    shapes = [s for _, _, _, s in inputs]
    if len(inputs) != 2:
        raise ValueError(f"{name}: a {kind} of {len(inputs)} tensors; the export takes two")
    if kind == "add" and (sizes[0] != sizes[1] or shapes[0] != shapes[1]):
        raise ValueError(
            f"{name}: adds tensors of different sizes ({sizes[0]} features"
            f"{' ' + str(shapes[0]) if shapes[0] else ''} and {sizes[1]}"
            f"{' ' + str(shapes[1]) if shapes[1] else ''}); the export takes an add of equal shapes"
        )
    if kind == "concat" and any(shapes):
        raise ValueError(
            f"{name}: concatenates feature maps {shapes}; the export concatenates flat "
            f"(batch, features) tensors only (flatten them first)"
        )
    given = lookup_override(overrides.get("result"), [name], "result")
    result = given if given is not None else merge_result(kind, types)
    out = sizes[0] if kind == "add" else sum(sizes)
    return Op(
        name,
        kind,
        name,
        sizes[0],
        out,
        types[0],
        result,
        step_types=[result],
        result_derived=[given is None],
        inputs=tuple(names),
        merge_types=list(types),
        in_shape=shapes[0] if kind == "add" else (),
        out_shape=shapes[0] if kind == "add" else (),
    )


def run_merge(op: Op, arrs: list[np.ndarray], stats: dict[str, int] | None = None) -> np.ndarray:
    """hls4ml's ``add`` / ``concatenate1d`` on mantissas (``arrs`` of the op's merge types).

    Examples
    --------
    >>> t, u = FixedPoint(4, 2), FixedPoint(4, 3)
    >>> op = merge_op("s", "add", [("a", t, 2, ()), ("b", u, 2, ())], {"result": None})
    >>> run_merge(op, [np.array([[3, -1]]), np.array([[1, 1]])]).tolist()  # 0.75+0.5, -0.25+0.5
    [[5, 1]]
    """
    r_t = op.result_type
    if op.kind == "add":
        frac = max(t.frac for t in op.merge_types)
        total = sum(
            (
                a.astype(np.int64) << (frac - t.frac)
                for a, t in zip(arrs, op.merge_types, strict=True)
            ),
            np.zeros_like(arrs[0], dtype=np.int64),
        )
        if stats is not None:
            _count(stats, "result", total, frac, r_t)
        return cast_mantissa(total, frac, r_t).astype(np.int64)
    parts = []
    for a, t in zip(arrs, op.merge_types, strict=True):
        if stats is not None:
            _count(stats, "result", a, t.frac, r_t)
        parts.append(cast_mantissa(a, t.frac, r_t))
    return np.concatenate(parts, axis=-1).astype(np.int64)
