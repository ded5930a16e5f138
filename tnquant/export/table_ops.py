"""Sigmoid, Tanh and Softmax in the fixed-point export: hls4ml's lookup tables.

==============  ====================  ===============================================
route           module                op
==============  ====================  ===============================================
``'sigmoid'``   ``nn.Sigmoid``        ``sigmoid``: hls4ml's 1024-entry table
``'tanh'``      ``nn.Tanh``           ``tanh``: hls4ml's 1024-entry table
``'softmax'``   ``nn.Softmax(-1)``    ``softmax``: hls4ml's ``stable`` implementation
==============  ====================  ===============================================

The emulator is the exact model of hls4ml's kernels in
:mod:`tnquant.export.tables` and :mod:`tnquant.export.softmax` (tables built
as the C builds them, checked against hls4ml's header and C simulation), so
emulator and hls4ml agree bit for bit. The torch model computes the exact
functions, so it and the emulator differ by the table's approximation
(``drift`` and the report show how much): a table activation is the one
op the export cannot make equal to the fake-quant model.

Parameters are fixed, so nothing more is stored than the result type:

- ``sigmoid``/``tanh``: hls4ml's defaults, ``table_size = 1024`` and
  ``table_t = ap_fixed<18,8>`` (:data:`TABLE`); the derived result type is
  ``table_t`` (every table value exactly); ``result={'<layer>': ...}`` or a
  following ``'input'`` quantizer narrows it.
- ``softmax``: hls4ml's default types collapse a wide input to the constant
  ``1/n`` (hls4ml reads ``x_max - x`` from the top 10 bits of a type as wide
  as the input; :mod:`tnquant.export.tables`), so the export uses
  :func:`~tnquant.export.softmax.softmax_types` of the input type and ``n``
  instead: ``inp_norm_t = ap_ufixed<10, min(4, I)>`` (differences up to 16,
  rounded, saturated), ``ap_ufixed<18,1>`` exp and inverse tables, an exact
  ``accum_t`` and a matching ``inv_inp_t`` (max error about 0.004 against the
  float softmax), written into hls4ml's config as layer keys. The derived
  result is :data:`SOFTMAX_RESULT`, ``ap_ufixed<18,1,RND,SAT>``.

Examples
--------
>>> import numpy as np
>>> from tnquant.specs import FixedPoint
>>> t = FixedPoint(10, 4, rounding="RND", overflow="SAT")
>>> op = table_op("head", "softmax", t, 3, None)
>>> str(op.result_type), op.in_features
('ap_ufixed<18,1,RND,SAT>', 3)
>>> y = run_table(op, np.array([[64, 0, -64]]))
>>> bool(y[0, 0] > y[0, 1] > y[0, 2])
True
"""

from __future__ import annotations

from typing import Any, cast

import numpy as np
from torch import nn

from tnquant.export.elementwise import _size
from tnquant.export.ir import Op, TypeOverride, label, lookup_override
from tnquant.export.softmax import softmax, softmax_types
from tnquant.export.tables import DEFAULT_TABLE_T, sigmoid, tanh
from tnquant.specs import FixedPoint

__all__ = [
    "TABLES",
    "TABLE",
    "SOFTMAX_RESULT",
    "table_op",
    "table_ops",
    "run_table",
    "derived_result",
    "hls4ml_keys",
    "softmax_config",
    "table_bits",
]

#: the op kinds of this module
TABLES = ("sigmoid", "tanh", "softmax")
#: (table_size, table_t) of sigmoid and tanh: hls4ml's defaults
TABLE = (1024, DEFAULT_TABLE_T)
#: the derived result type of a softmax
SOFTMAX_RESULT = FixedPoint(18, 1, signed=False, rounding="RND", overflow="SAT")


def softmax_config(in_type: FixedPoint, n: int) -> dict[str, Any]:
    """The softmax types and sizes the export uses for ``n`` inputs of ``in_type``.

    Examples
    --------
    >>> cfg = softmax_config(FixedPoint(12, 5), 10)
    >>> cfg["implementation"], str(cfg["inp_norm_t"])
    ('stable', 'ap_ufixed<10,4,RND,SAT>')
    """
    return softmax_types(in_type, n_slice=n)


def derived_result(kind: str) -> FixedPoint:
    """The result type a table op gets when none is given.

    Examples
    --------
    >>> str(derived_result("tanh"))
    'ap_fixed<18,8>'
    """
    return SOFTMAX_RESULT if kind == "softmax" else TABLE[1]


def table_op(name: str, kind: str, in_type: FixedPoint, n: int, given: FixedPoint | None) -> Op:
    """The op of one table activation on ``n`` features of ``in_type``."""
    result = derived_result(kind) if given is None else given
    return Op(
        name, kind, name, n, n, in_type, result, step_types=[result],
        result_derived=[given is None],
    )  # fmt: skip


def table_ops(
    name: str,
    module: nn.Module,
    state: dict[str, Any],
    overrides: dict[str, TypeOverride],
    done: list[Op],
) -> list[Op]:
    """The route builder of ``nn.Sigmoid``, ``nn.Tanh`` and ``nn.Softmax`` (last dim)."""
    kind = {nn.Sigmoid: "sigmoid", nn.Tanh: "tanh", nn.Softmax: "softmax"}[type(module)]
    if kind == "softmax":
        dim = cast(nn.Softmax, module).dim
        if dim not in (-1, 1):
            raise ValueError(
                f"{label(name)}: Softmax(dim={dim}) is not over the features of the export's "
                f"(batch, features) chain; only dim=-1 (or 1) is taken"
            )
    t = state["type"]
    n = _size(done)
    given = lookup_override(overrides["result"], [name], "result")
    op = table_op(name, kind, t, n, given)
    state["explicit"] = given is not None
    state["type"], state["prev"] = op.result_type, name
    return [op]


def run_table(op: Op, arr: np.ndarray) -> np.ndarray:
    """The emulator of a table op: hls4ml's kernel on mantissas ``arr (batch, n)``."""
    if op.kind == "sigmoid":
        return sigmoid(arr, op.input_type, op.result_type, *TABLE)
    if op.kind == "tanh":
        return tanh(arr, op.input_type, op.result_type, *TABLE)
    cfg = softmax_config(op.input_type, op.in_features)
    return np.asarray(softmax(arr, op.input_type, op.result_type, **cfg), dtype=np.int64)


def hls4ml_keys(op: Op) -> dict[str, Any]:
    """The layer keys of hls4ml's config that make its kernel the emulator's (besides result).

    hls4ml reads the softmax table types as plain layer keys, and its
    accumulator from ``Precision['accum']``.

    Examples
    --------
    >>> t = FixedPoint(12, 5)
    >>> keys = hls4ml_keys(table_op("s", "sigmoid", t, 4, None))
    >>> keys["TableSize"], keys["table_t"]
    (1024, 'ap_fixed<18,8>')
    """
    if op.kind in ("sigmoid", "tanh"):
        return {"TableSize": TABLE[0], "table_t": str(TABLE[1])}
    cfg = softmax_config(op.input_type, op.in_features)
    keys: dict[str, Any] = {"Implementation": cfg["implementation"]}
    for key, value in cfg.items():
        if key not in ("implementation", "accum_t"):
            keys[key] = str(value) if isinstance(value, FixedPoint) else value
    keys["accum"] = str(cfg["accum_t"])  # goes into Precision
    return keys


def table_bits(op: Op) -> int:
    """The bits of a table op's lookup tables (what it stores on the FPGA).

    Examples
    --------
    >>> table_bits(table_op("s", "sigmoid", FixedPoint(12, 5), 4, None))
    18432
    """
    if op.kind in ("sigmoid", "tanh"):
        return TABLE[0] * TABLE[1].width
    cfg = softmax_config(op.input_type, op.in_features)
    exp_bits = cfg["exp_table_size"] * cfg["exp_table_t"].width
    return int(exp_bits + cfg["inv_table_size"] * cfg["inv_table_t"].width)
