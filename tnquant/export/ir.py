"""The fixed-point IR: :class:`Op`, the type overrides, and the width check.

:func:`tnquant.export.graph.build_graph` turns a model into a list of
:class:`Op` s (the kinds and how their types are derived: see
:mod:`tnquant.export.graph`); :func:`check_widths` refuses one whose types
pass what the int64 emulator holds. The manifest, emulator, reports and
C headers read this IR.

Examples
--------
>>> t = FixedPoint(8, 3)
>>> op = Op("0", "relu", "0", 4, 4, t, t, step_types=[t])
>>> op.kind, str(op.result_type)
('relu', 'ap_fixed<8,3>')
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Union

import numpy as np

from tnquant.export.codes import MAX_WIDTH
from tnquant.specs import FixedPoint

__all__ = ["Op", "TypeOverride", "check_widths"]

TypeOverride = Union[FixedPoint, Mapping[str, FixedPoint], None]


@dataclass
class Op:
    """One op of the fixed-point IR (see the module docs for the kinds).

    ``weights`` hold int64 mantissas: ``[W (out, in)]`` for ``'dense'``, the
    TT cores ``(r_{k-1}, o_k, i_k, r_k)`` in model order for ``'tt'``.
    ``accum_types`` and ``step_types`` have one entry per contraction step
    (``'tt'``: step ``s`` contracts core ``d-1-s``); ``step_types[-1]`` is
    ``result_type``. ``accum_derived``/``result_derived`` (one per step) and
    ``bias_derived`` say which types :func:`build_graph` derived itself
    rather than took from ``accum=``/``result=``/``bias=`` or an activation
    quantizer (empty: none); the loader re-derives those and compares.
    """

    name: str
    kind: str
    layer: str
    in_features: int
    out_features: int
    input_type: FixedPoint
    result_type: FixedPoint
    weights: list[np.ndarray] = field(default_factory=list)
    weight_types: list[FixedPoint] = field(default_factory=list)
    bias: np.ndarray | None = None
    bias_type: FixedPoint | None = None
    accum_types: list[FixedPoint] = field(default_factory=list)
    step_types: list[FixedPoint] = field(default_factory=list)
    scales: list[list[int]] = field(default_factory=list)
    accum_derived: list[bool] = field(default_factory=list)
    result_derived: list[bool] = field(default_factory=list)
    bias_derived: bool = False


def check_widths(ops: list[Op]) -> None:
    """Refuse (``ValueError``) a type, or a product of a step's input and weights, past 62 bits.

    Examples
    --------
    >>> t = FixedPoint(40, 8)
    >>> check_widths([Op("0", "dense", "0", 1, 1, t, t, weight_types=[t])])
    Traceback (most recent call last):
    ...
    ValueError: op '0': products of ap_fixed<40,8> and ap_fixed<40,8> exceed 62 bits; narrow \
the previous result with result=
    """
    for op in ops:
        bias = [] if op.bias_type is None else [op.bias_type]
        for t in [op.input_type, *op.weight_types, *bias, *op.accum_types, *op.step_types]:
            if t.width > MAX_WIDTH:
                raise ValueError(
                    f"op {op.name!r} needs type {t} wider than {MAX_WIDTH} bits "
                    f"(the int64 emulator's limit); narrow it with result= or "
                    f"accum= (e.g. result={{'{op.name}': FixedPoint(24, 8, "
                    f"rounding='RND', overflow='SAT')}})"
                )
        d = len(op.weight_types)  # a TT step s takes step s-1's result and core d-1-s
        ins = [op.input_type] if op.kind != "tt" else [op.input_type, *op.step_types[: d - 1]]
        for x, w in zip(
            ins, op.weight_types[::-1] if op.kind == "tt" else op.weight_types, strict=False
        ):
            if x.width + w.width > MAX_WIDTH:
                raise ValueError(
                    f"op {op.name!r}: products of {x} and {w} exceed "
                    f"{MAX_WIDTH} bits; narrow the previous result with result="
                )
