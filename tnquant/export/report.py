"""Fixed-point bit budget and resource estimate of an exported network.

:func:`build_report` reads the IR (:class:`~tnquant.export.graph.Op`) and
counts, per contraction step (one row per ``dense`` op, one per core of a
``tt`` op, named ``'<layer>.<s>'`` as in the ``accum=``/``result=`` globs):

``weights``, ``weight_width``, ``weight_bits``
    Stored weight/core elements, their ``ap_fixed`` width, and the product.
``bias``, ``bias_width``, ``bias_bits``
    The same for the bias (on the last step of a layer).
``accum_width``, ``result_width``
    The accumulator and result types of the step.
``multiplies``
    Products per inference (one input sample) in the exported order: ``out *
    in`` for a dense step; ``P * M * N * Q`` for TT step ``s`` on core ``k``
    of shape ``(r0, o, i, r1)`` (``P`` = product of the (padded) input modes
    before ``k``, ``M = r0 * o``, ``N = i * r1``, ``Q`` = product of the output
    modes after ``k``), as the emulator and ``tt_linear.h`` compute them,
    padding included.
``memory_bits``
    ``weight_bits + bias_bits``: what the FPGA stores (ROM/registers).
``zero_products``, ``shift_products``, ``multipliers``, ``by_width``
    The products by the weight's actual code (:mod:`tnquant.export.resources`):
    zero weights (no hardware), ``±2^k`` weights (a shift, no multiplier)
    and the real multiplies, these counted by operand widths as
    ``{"<input width>x<weight bits>": count}``.
``code_bits``
    The width the codes need: 1 when every row of the weight is ``{-c, +c}``
    (binary: one sign bit, XNOR-style), 2 when every row is within
    ``{-c, 0, +c}`` (ternary), else ``weight_width``.
``bops``, ``ebops``
    Bit operations: ``multiplies * input_width * weight_width`` (declared
    widths), and HGQ's effective bit operations (each non-zero product's
    input width times the weight code's effective bits; see
    :mod:`tnquant.export.resources`, which cites the definition).

``notes`` (:attr:`ExportReport.notes`) list what the export did to a tensor
that the numbers above do not show: per-channel power-of-two scales at the
quantizer's ``2^-24`` floor (:mod:`tnquant.export.codes`), one line per
tensor. They come from the model (``Op.notes``), so a report rebuilt from a
loaded directory has none; ``report.json`` / ``report.md`` keep them.

Per layer it sets these against the **dense layer it replaces**: ``out *
in`` multiplies and ``out * in * W`` weight bits (``W`` the widest weight
type of the layer, i.e. the dense weight quantized like its cores) plus the
same bias, and ``dense_bops`` (its ``out * in`` products at the layer's
input width and that weight width) against the layer's ``bops``.
Activations, adders and control logic are not counted: this is an estimate
for comparing factorizations, not a synthesis report.

Examples
--------
>>> import torch
>>> from torch import nn
>>> from tnquant import FixedPoint, quantize
>>> from tnquant.export.graph import build_graph
>>> from tnquant.layers import LowRankLinear
>>> model = nn.Sequential(LowRankLinear([torch.randn(64, 4), torch.randn(4, 32)]))
>>> _ = quantize(model, cores=FixedPoint(8, 2), progress=False)
>>> rep = build_report(build_graph(model, FixedPoint(10, 4)))
>>> rep.totals["multiplies"], rep.totals["dense_multiplies"]
(384, 2048)
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tnquant.export.graph import Op
from tnquant.export.ir import CONVS
from tnquant.export.resources import op_resources
from tnquant.export.table_ops import TABLES, table_bits

__all__ = ["ExportReport", "build_report", "REPORT_JSON", "REPORT_MD"]

REPORT_JSON = "report.json"
REPORT_MD = "report.md"


def _row(
    name: str, op: Op, shape: list[int], w_type: Any, step: int, mults: int, bias: bool
) -> dict[str, Any]:
    n_w = math.prod(shape) if shape else 0
    n_b = int(op.bias.size) if bias and op.bias is not None else 0
    b_width = op.bias_type.width if n_b and op.bias_type is not None else 0
    w_width = w_type.width if w_type is not None else 0
    accum = op.accum_types[step] if op.accum_types else None
    result = op.step_types[step] if op.step_types else op.result_type
    return {
        "name": name,
        "layer": op.layer,
        "kind": op.kind,
        "shape": shape,
        "input_width": op.input_type.width,
        "weights": n_w,
        "weight_type": str(w_type) if w_type is not None else None,
        "weight_width": w_width,
        "weight_bits": n_w * w_width,
        "bias": n_b,
        "bias_type": str(op.bias_type) if n_b else None,
        "bias_width": b_width,
        "bias_bits": n_b * b_width,
        "accum_type": str(accum) if accum is not None else None,
        "accum_width": accum.width if accum is not None else 0,
        "result_type": str(result),
        "result_width": result.width,
        "multiplies": mults,
        "memory_bits": n_w * w_width + n_b * b_width,
    }


def _code_bits(w: np.ndarray, width: int) -> int:
    """1 for rows of ``{-c, +c}``, 2 for rows within ``{-c, 0, +c}``, else ``width``."""
    rows = np.abs(w.reshape(w.shape[0], -1))
    top = rows.max(axis=1, keepdims=True)
    if not ((rows == 0) | (rows == top)).all():
        return width
    return 1 if (rows != 0).all() else min(2, width)


def _with_resources(row: dict[str, Any], res: dict[str, Any], w: np.ndarray) -> dict[str, Any]:
    row["zero_products"] = res["zero"]
    row["shift_products"] = res["shift"]
    row["multipliers"] = res["multiplies"]
    row["by_width"] = {f"{a}x{b}": n for (a, b), n in res["by_width"].items()}
    row["code_bits"] = _code_bits(w, row["weight_width"])
    row["bops"] = row["multiplies"] * row["input_width"] * row["weight_width"]
    row["ebops"] = res["ebops"]
    return row


def _op_rows(op: Op) -> list[dict[str, Any]]:
    if op.kind in CONVS:  # each weight once per output position
        w = op.weights[0]
        mults = int(w.size) * op.out_shape[1] * op.out_shape[2]
        row = _row(op.name, op, list(w.shape), op.weight_types[0], 0, mults, True)
        return [_with_resources(row, op_resources(op)[0], w)]
    if op.kind not in ("dense", "tt"):  # elementwise: ReLU; clip bounds, a LeakyReLU's alpha
        if op.kind in TABLES:  # the lookup tables are its memory
            row = _row(op.name, op, [], None, 0, 0, False)
            row["memory_bits"] = table_bits(op)
            return [row]
        if not op.weights:
            return [_row(op.name, op, [], None, 0, 0, False)]
        mults = op.in_features if op.kind in ("leaky_relu", "batchnorm") else 0  # one per element
        shape = list(op.weights[0].shape)
        return [_row(op.name, op, shape, op.weight_types[0], 0, mults, False)]
    res = op_resources(op)
    if op.kind == "dense":
        w = op.weights[0]
        row = _row(op.name, op, list(w.shape), op.weight_types[0], 0, int(w.size), True)
        return [_with_resources(row, res[0], w)]
    d = len(op.weights)
    in_modes = [int(c.shape[2]) for c in op.weights]
    out_modes = [int(c.shape[1]) for c in op.weights]
    rows = []
    for s in range(d):
        k = d - 1 - s
        r0, o, i, r1 = (int(n) for n in op.weights[k].shape)
        mults = math.prod(in_modes[:k]) * (r0 * o) * (i * r1) * math.prod(out_modes[k + 1 :])
        row = _row(f"{op.name}.{s}", op, [r0, o, i, r1], op.weight_types[k], s, mults, s == d - 1)
        row["input_width"] = (op.input_type if s == 0 else op.step_types[s - 1]).width
        rows.append(_with_resources(row, res[s], op.weights[k].reshape(r0 * o, i * r1)))
    return rows


def _ratio(a: int, b: int) -> float:
    return float(a) / b if b else 0.0


@dataclass
class ExportReport:
    """Per-step bit budget, per-layer factorized-vs-dense estimate, totals, drift.

    Attributes
    ----------
    rows
        One dict per contraction step (see the module docs for the keys).
    layers
        One dict per exported layer with weights: ``in_features``,
        ``out_features``, ``multiplies``, ``memory_bits``, ``dense_width``,
        ``dense_multiplies``, ``dense_memory_bits``, ``multiply_ratio`` and
        ``memory_ratio`` (dense / factorized).
    totals
        Sums of the above over the network.
    drift
        Per-layer drift of the emulator from the torch model
        (:func:`tnquant.export.drift.drift`), or ``None``.
    types
        ``'input'`` and ``'output'``: the network's ``ap_fixed`` types.
    notes
        One line per tensor the export changed in a way the rows do not show
        (see the module docs).

    Examples
    --------
    >>> rep = ExportReport(rows=[], layers=[], totals={"multiplies": 0})
    >>> rep.to_dict()["totals"]
    {'multiplies': 0}
    """

    rows: list[dict[str, Any]]
    layers: list[dict[str, Any]]
    totals: dict[str, Any]
    drift: list[dict[str, Any]] | None = None
    types: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict: ``types``, ``rows``, ``layers``, ``totals``, ``drift``, ``notes``.

        Examples
        --------
        >>> sorted(ExportReport([], [], {}).to_dict())
        ['drift', 'layers', 'notes', 'rows', 'totals', 'types']
        """
        return {
            "types": dict(self.types),
            "rows": [dict(r) for r in self.rows],
            "layers": [dict(r) for r in self.layers],
            "totals": dict(self.totals),
            "drift": None if self.drift is None else [dict(r) for r in self.drift],
            "notes": list(self.notes),
        }

    def table(self) -> str:
        """The report as markdown tables (steps, layers vs dense, totals, drift).

        Examples
        --------
        >>> print(ExportReport([], [], {"multiplies": 3}).table().splitlines()[-1])
        | multiplies | 3 |
        """
        out = []
        if self.types:
            out.append(
                f"input `{self.types.get('input')}` -> output `{self.types.get('output')}`\n"
            )
        cols = [
            "name",
            "kind",
            "shape",
            "weight_type",
            "weight_bits",
            "bias_bits",
            "accum_width",
            "result_width",
            "code_bits",
            "multiplies",
            "zero_products",
            "shift_products",
            "multipliers",
            "ebops",
            "memory_bits",
        ]
        out += ["## Steps", "", _md(cols, self.rows), ""]
        cols = [
            "layer",
            "in_features",
            "out_features",
            "multiplies",
            "dense_multiplies",
            "multiply_ratio",
            "memory_bits",
            "dense_memory_bits",
            "memory_ratio",
            "bops",
            "dense_bops",
            "bops_ratio",
            "ebops",
        ]
        out += ["## Layers vs dense", "", _md(cols, self.layers), ""]
        if self.drift is not None:
            cols = [
                "layer",
                "max_abs",
                "max_rel",
                "max_abs_lsb",
                "accum_overflow",
                "result_overflow",
                "overflow_modes",
            ]
            out += ["## Drift from the torch model", "", _md(cols, self.drift), ""]
        if self.notes:
            out += ["## Notes", "", *[f"- {n}" for n in self.notes], ""]
        out += ["## Totals", "", "| total | value |", "|---|---|"]
        out += [f"| {k} | {_fmt(v)} |" for k, v in self.totals.items()]
        return "\n".join(out)

    def save(self, out_dir: str | Path) -> tuple[Path, Path]:
        """Write ``report.json`` and ``report.md`` into ``out_dir``.

        Examples
        --------
        >>> import tempfile
        >>> [p.name for p in ExportReport([], [], {}).save(tempfile.mkdtemp())]
        ['report.json', 'report.md']
        """
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        js, md = out / REPORT_JSON, out / REPORT_MD
        js.write_text(json.dumps(self.to_dict(), indent=1))
        md.write_text(self.table() + "\n")
        return js, md


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):
        return "x".join(str(n) for n in v) if all(isinstance(n, int) for n in v) else str(v)
    return "" if v is None else str(v)


def _md(cols: list[str], rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def build_report(ops: list[Op], drift: list[dict[str, Any]] | None = None) -> ExportReport:
    """The :class:`ExportReport` of an exported network (see the module docs).

    Parameters
    ----------
    ops
        The IR (``IntegerModel.ops``).
    drift
        Per-layer drift rows to attach (from :func:`tnquant.export.drift.drift`).

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from tnquant import FixedPoint, quantize
    >>> from tnquant.export.graph import build_graph
    >>> model = nn.Sequential(nn.Linear(5, 3))
    >>> _ = quantize(model, weights=FixedPoint(6, 2), progress=False)
    >>> row = build_report(build_graph(model, FixedPoint(8, 3))).rows[0]
    >>> row["multiplies"], row["weight_bits"], row["accum_width"]
    (15, 90, 18)
    """
    if not ops:
        raise ValueError("build_report needs at least one op, got none")
    rows = [r for op in ops for r in _op_rows(op)]
    layers: list[dict[str, Any]] = []
    layer_kinds = ("dense", "tt", *CONVS)
    for name in dict.fromkeys(op.layer for op in ops if op.kind in layer_kinds):
        mine = [op for op in ops if op.layer == name]
        lrows = [r for r in rows if r["layer"] == name]
        n_in, n_out = mine[0].in_features, mine[-1].out_features
        width = max(r["weight_width"] for r in lrows)
        bias_bits = sum(r["bias_bits"] for r in lrows)
        mults = sum(r["multiplies"] for r in lrows)
        mem = sum(r["memory_bits"] for r in lrows)
        d_weights = n_in * n_out
        d_mults = d_weights
        if mine[0].kind in CONVS:  # the dense conv: O x C x kh x kw
            kh = max(op.params["kernel"][0] for op in mine)  # CP: its kh x 1 and 1 x kw steps
            kw = max(op.params["kernel"][1] for op in mine)
            per_out = 1 if len(mine) == 1 and mine[0].kind == "depthwise2d" else mine[0].in_shape[0]
            d_weights = mine[-1].out_shape[0] * per_out * kh * kw  # depthwise: O x 1 x kh x kw
            d_mults = d_weights * mine[-1].out_shape[1] * mine[-1].out_shape[2]
        d_mem = d_weights * width + bias_bits
        bops, ebops = sum(r["bops"] for r in lrows), sum(r["ebops"] for r in lrows)
        d_bops = d_mults * mine[0].input_type.width * width
        layers.append(
            {
                "layer": name,
                "kind": mine[0].kind,
                "steps": len(lrows),
                "in_features": n_in,
                "out_features": n_out,
                "multiplies": mults,
                "memory_bits": mem,
                "dense_width": width,
                "dense_multiplies": d_mults,
                "dense_memory_bits": d_mem,
                "multiply_ratio": _ratio(d_mults, mults),
                "memory_ratio": _ratio(d_mem, mem),
                "multipliers": sum(r["multipliers"] for r in lrows),
                "bops": bops,
                "ebops": ebops,
                "dense_bops": d_bops,
                "bops_ratio": _ratio(d_bops, bops),
            }
        )
    totals: dict[str, Any] = {
        k: sum(r[k] for r in rows)
        for k in ("weights", "weight_bits", "bias_bits", "memory_bits", "multiplies")
    }
    weighted = [r for r in rows if "ebops" in r]
    for k in ("zero_products", "shift_products", "multipliers", "bops", "ebops"):
        totals[k] = sum(r[k] for r in weighted)
    totals["max_accum_width"] = max(r["accum_width"] for r in rows)
    for k in ("dense_multiplies", "dense_memory_bits", "dense_bops"):
        totals[k] = sum(r[k] for r in layers)
    totals["bops_ratio"] = _ratio(totals["dense_bops"], totals["bops"])
    totals["multiply_ratio"] = _ratio(totals["dense_multiplies"], totals["multiplies"])
    totals["memory_ratio"] = _ratio(totals["dense_memory_bits"], totals["memory_bits"])
    return ExportReport(
        rows=rows,
        layers=layers,
        totals=totals,
        drift=drift,
        types={"input": str(ops[0].input_type), "output": str(ops[-1].result_type)},
        notes=[n for op in ops for n in op.notes],
    )
