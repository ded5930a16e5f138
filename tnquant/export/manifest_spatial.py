"""The ``spatial`` field of a ``conv2d``/``depthwise2d``/pooling op in ``manifest.json``.

A spatial op carries ``{"in_shape": [C, H, W], "out_shape": [O, Ho, Wo],
"kernel": [kh, kw], "stride": [..], "padding": [..], "dilation": [..]}``;
other ops have no such key. :func:`read_spatial` checks every entry, that
``out_shape`` is what the window gives on ``in_shape``, that the flat sizes
are ``in_features``/``out_features``, a convolution's kernel ``(O, C, kh, kw)``
(a depthwise one's ``(C, 1, kh, kw)``, ``O == C``) against the shapes, a
pool's channels and its result type (max: the input type; average:
:func:`~tnquant.export.conv_ops.avg_pool_type`), raising
:class:`~tnquant.io.IntegrityError` naming the field.

Examples
--------
>>> from tnquant.specs import FixedPoint
>>> t = FixedPoint(8, 3)
>>> op = Op("p", "maxpool2d", "p", 16, 4, t, t, in_shape=(1, 4, 4), out_shape=(1, 2, 2),
...         params={"kernel": (2, 2), "stride": (2, 2), "padding": (0, 0), "dilation": (1, 1)})
>>> spatial_dict(op)["out_shape"]
[1, 2, 2]
>>> back = Op("p", "maxpool2d", "p", 16, 4, t, t)
>>> read_spatial(Path("manifest.json"), "ops[0]", back, [], spatial_dict(op))
>>> back.out_shape, back.params["stride"]
((1, 2, 2), (2, 2))
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from tnquant.export.conv_ops import avg_pool_type, conv_out_size
from tnquant.export.ir import CONVS, ONE_D, Op
from tnquant.io import IntegrityError

__all__ = ["spatial_dict", "read_spatial", "PARAMS"]

PARAMS = ("kernel", "stride", "padding", "dilation")
_KEYS = {"in_shape", "out_shape", *PARAMS}
_MAX_SIDE = 1 << 14


def spatial_dict(op: Op) -> dict[str, Any]:
    """The JSON-safe ``spatial`` field of a spatial op."""
    out: dict[str, Any] = {
        "in_shape": [int(n) for n in op.in_shape],
        "out_shape": [int(n) for n in op.out_shape],
    }
    out.update({k: [int(n) for n in op.params[k]] for k in PARAMS})
    return out


def _fail(path: Path, where: str, expected: str, got: Any) -> IntegrityError:
    return IntegrityError(f"{path}: {where} must be {expected}, got {got!r}"[:400])


def _ints(path: Path, where: str, v: Any, n: int, lo: int) -> tuple[int, ...]:
    ok = isinstance(v, list) and len(v) == n
    ok = ok and all(
        isinstance(a, int) and not isinstance(a, bool) and lo <= a <= _MAX_SIDE for a in v
    )
    if not ok:
        raise _fail(path, where, f"a list of {n} ints in {lo}..{_MAX_SIDE}", v)
    return tuple(v)


def read_spatial(path: Path, w: str, op: Op, shapes: list[tuple[int, ...]], raw: Any) -> None:
    """Check the ``spatial`` field ``raw`` of op ``w`` and set ``op``'s shapes and params."""
    if not isinstance(raw, dict) or set(raw) != _KEYS:
        raise _fail(path, f"{w}.spatial", f"a JSON object of the keys {sorted(_KEYS)}", raw)
    ins = _ints(path, f"{w}.spatial.in_shape", raw["in_shape"], 3, 1)
    outs = _ints(path, f"{w}.spatial.out_shape", raw["out_shape"], 3, 1)
    p = {k: _ints(path, f"{w}.spatial.{k}", raw[k], 2, 0 if k == "padding" else 1) for k in PARAMS}
    want = tuple(
        conv_out_size(ins[1 + a], p["kernel"][a], p["stride"][a], p["padding"][a], p["dilation"][a])
        for a in (0, 1)
    )
    if outs[1:] != want:
        raise _fail(
            path, f"{w}.spatial.out_shape", f"[O, {want[0]}, {want[1]}] (the window on "
            f"in_shape {list(ins)})", list(outs),
        )  # fmt: skip
    for key, shape, feats in (("in", ins, op.in_features), ("out", outs, op.out_features)):
        if math.prod(shape) != feats:
            raise _fail(path, f"{w}.spatial.{key}_shape", f"a shape of {feats} elements "
                        f"({key}_features)", list(shape))  # fmt: skip
    if op.kind in ONE_D and (
        ins[1] != 1
        or outs[1] != 1
        or (p["kernel"][0], p["stride"][0], p["dilation"][0]) != (1, 1, 1)
        or p["padding"][0] != 0
    ):
        raise _fail(path, f"{w}.spatial", f"a (C, 1, L) map and a (1, k) window (a {op.kind} op)",
                    raw)  # fmt: skip
    if op.kind in CONVS:
        depthwise = op.kind == "depthwise2d"
        kernel = (outs[0], 1 if depthwise else ins[0], *p["kernel"])
        if shapes[0] != kernel or (depthwise and outs[0] != ins[0]):
            raise _fail(
                path, f"{w}.weight_shapes[0]", f"[{'C, 1' if depthwise else 'O, C'}, kh, kw] = "
                f"{list(kernel)} (from spatial{', O == C' if depthwise else ''})",
                list(shapes[0]),
            )  # fmt: skip
    else:
        if outs[0] != ins[0] or p["padding"] != (0, 0) or p["dilation"] != (1, 1):
            raise _fail(path, f"{w}.spatial", "a pool keeping its channels, no padding and no "
                        "dilation", raw)  # fmt: skip
        result = op.input_type
        if op.kind in ("avgpool2d", "avgpool1d"):
            try:
                result = avg_pool_type(op.input_type, p["kernel"])
            except ValueError as err:
                raise IntegrityError(f"{path}: {w}.spatial.kernel: {err}") from None
        if op.result_type != result and op.result_derived[0]:  # else: a cast, as given
            raise _fail(path, f"{w}.result_type", f"{result} (the {op.kind} of {op.input_type})",
                        str(op.result_type))  # fmt: skip
    op.in_shape, op.out_shape, op.params = ins, outs, p
