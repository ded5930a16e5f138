"""The manifest fields of a graph: ``inputs`` (any op) and ``merge_types`` (merge ops).

An op that reads an op other than the one before it lists it in
``"inputs"`` (:data:`tnquant.export.ir.INPUT` for the model input); a merge
op (``'add'``, ``'concat'``: :mod:`tnquant.export.merge_ops`) lists both
inputs and their types in ``"merge_types"``. A chain's manifest has neither
key. Every name must be an op before it (checked by
:func:`tnquant.export.ir.check_graph` once all ops are read).

Examples
--------
>>> from pathlib import Path
>>> sorted(graph_keys(Path("m.json"), "ops[0]", {"kind": "add", "inputs": [], "merge_types": []}))
['inputs', 'merge_types']
"""

from __future__ import annotations

import re
import reprlib
from pathlib import Path
from typing import Any

from tnquant.export.batchnorm_ops import derived_result as bn_result
from tnquant.export.ir import MERGES, Op
from tnquant.export.merge_ops import merge_result
from tnquant.io import IntegrityError
from tnquant.specs import FixedPoint

__all__ = [
    "graph_keys",
    "graph_dict",
    "read_graph",
    "merge_contraction",
    "check_affine",
    "fail",
    "show",
]

_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxlong = 3, 70, 70, 40


def show(value: Any) -> str:
    """``repr(value)``, bounded in length and depth whatever came."""
    return _REPR.repr(value)


def fail(path: Path, where: str, expected: str, got: Any) -> IntegrityError:
    """The loader's error: ``<path>: <where> must be <expected>, got <got>``."""
    return IntegrityError(f"{path}: {where} must be {expected}, got {show(got)}")


_NAME = re.compile(r"[ -.0-\[\]-~]{0,256}")


def graph_keys(path: Path, w: str, d: Any) -> set[str]:
    """The optional graph keys op entry ``d`` may have (a merge op must have both)."""
    if not isinstance(d, dict):
        return set()
    if d.get("kind") in MERGES:
        missing = {"inputs", "merge_types"} - set(d)
        if missing:
            raise IntegrityError(f"{path}: {w} ({d['kind']!r}) needs {sorted(missing)} keys")
        return {"inputs", "merge_types"}
    if "merge_types" in d:
        raise IntegrityError(f"{path}: {w} ({d.get('kind')!r}) has no use for 'merge_types'")
    return {"inputs"}


def graph_dict(op: Op) -> dict[str, Any]:
    """The graph keys of ``op``'s manifest entry (none for an op of a chain)."""
    out: dict[str, Any] = {}
    if op.inputs:
        out["inputs"] = list(op.inputs)
    if op.kind in MERGES:
        out["merge_types"] = [str(t) for t in op.merge_types]
    return out


def merge_contraction(op: Op) -> str:
    """The ``contraction`` line of a merge op."""
    if op.kind == "add":
        return "y = result(x0 + x1), the sum exact (hls4ml add)"
    return "y = [result(x0), result(x1)] along the features (hls4ml concatenate1d)"


def read_graph(path: Path, w: str, d: dict[str, Any], op: Op, read_type: Any) -> None:
    """Set ``op.inputs`` and ``op.merge_types`` from entry ``d``, checked against the kind."""
    if "inputs" in d:
        ins = d["inputs"]
        n = 2 if op.kind in MERGES else 1
        if not isinstance(ins, list) or len(ins) != n:
            raise IntegrityError(f"{path}: {w}.inputs must be a list of {n} op names, got "
                                 f"{ins!r:.80}")  # fmt: skip
        for j, name in enumerate(ins):
            if not isinstance(name, str) or not _NAME.fullmatch(name):
                raise IntegrityError(
                    f"{path}: {w}.inputs[{j}] must be an op name, got {name!r:.80}"
                )
        op.inputs = tuple(ins)
    if op.kind not in MERGES:
        return
    types = d["merge_types"]
    if not isinstance(types, list) or len(types) != len(op.inputs):
        raise IntegrityError(
            f"{path}: {w}.merge_types must be a list of {len(op.inputs)} types, got {types!r:.80}"
        )
    op.merge_types = [read_type(path, f"{w}.merge_types[{j}]", t) for j, t in enumerate(types)]
    if op.merge_types[0] != op.input_type:
        raise IntegrityError(
            f"{path}: {w}.merge_types[0] must be the input_type {op.input_type}, got "
            f"{op.merge_types[0]}"
        )
    if op.weight_types or op.accum_types or op.bias_type is not None:
        raise IntegrityError(f"{path}: {w} ({op.kind}) has no weights, accumulator or bias")
    if op.kind == "add" and op.out_features != op.in_features:
        raise IntegrityError(
            f"{path}: {w}.out_features must be in_features {op.in_features} (an add), got "
            f"{op.out_features}"
        )
    want: FixedPoint = merge_result(op.kind, op.merge_types)
    if op.result_derived[0] and op.result_type != want:
        raise IntegrityError(
            f"{path}: {w}.result_type must be {want} (derived from the merge types), got "
            f"{op.result_type}"
        )


def check_affine(path: Path, w: str, op: Op, shapes: list[tuple[int, ...]]) -> None:
    """A BatchNorm: a scale per feature, the shift on the products' grid, the derived result."""
    if shapes[0] != (op.in_features,) or op.out_features != op.in_features:
        want = f"[{op.in_features}] (a scale per feature; out_features = in_features)"
        raise fail(path, f"{w}.weight_shapes[0]", want, list(shapes[0]))
    bt, wt = op.bias_type, op.weight_types[0]
    assert bt is not None
    frac = op.input_type.frac + wt.frac
    if op.bias_derived and (bt.frac != frac or bt != FixedPoint(bt.width, bt.integer)):
        want = f"ap_fixed<W,I> with the products' {frac} fractional bits (derived)"
        raise fail(path, f"{w}.bias_type", want, str(bt))
    derived = bn_result(op)
    if op.result_derived[0] and op.result_type != derived:
        want = f"{derived} (x * scale + shift, derived)"
        raise fail(path, f"{w}.result_type", want, str(op.result_type))
