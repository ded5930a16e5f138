"""The bit-budget report: multiply and bit counts against hand counts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tnquant import FixedPoint, QuantSpec, quantize
from tnquant.export import IntegerModel, build_graph, build_report, fixed_point
from tnquant.layers import LowRankLinear, TTLinear

IN_T = FixedPoint(8, 3)


def _tt_layer(bias: bool = True) -> TTLinear:
    torch.manual_seed(7)
    cores = [torch.randn(1, 3, 2, 2), torch.randn(2, 2, 3, 3), torch.randn(3, 2, 2, 1)]
    return TTLinear(cores, in_features=10, out_features=11, bias=torch.randn(11) if bias else None)


def test_dense_layer_counts() -> None:
    model = nn.Sequential(nn.Linear(7, 5, bias=False))
    quantize(model, weights=FixedPoint(6, 2), progress=False)
    rep = build_report(build_graph(model, IN_T))
    (row,) = rep.rows
    assert row["multiplies"] == 5 * 7  # one product per weight
    assert row["weight_bits"] == 35 * 6 and row["bias_bits"] == 0
    # lossless: 8 + 6 bits of product, + ceil(log2 7) = 3 bits of growth
    assert row["accum_width"] == 17 and row["result_width"] == 17
    (layer,) = rep.layers
    assert layer["dense_multiplies"] == 35 and layer["multiply_ratio"] == 1.0
    assert layer["dense_memory_bits"] == layer["memory_bits"] == 210


def test_lowrank_counts_against_dense() -> None:
    # W = U (12, 3) @ V (3, 10): x V^T costs 3*10, then U costs 12*3
    model = nn.Sequential(
        LowRankLinear([torch.randn(12, 3), torch.randn(3, 10)], bias=torch.randn(12))
    )
    quantize(model, cores={0: FixedPoint(8, 2), 1: FixedPoint(5, 1)}, progress=False)
    rep = build_report(build_graph(model, IN_T, bias=FixedPoint(10, 4)))
    assert [r["name"] for r in rep.rows] == ["0.0", "0.1"]
    assert [r["multiplies"] for r in rep.rows] == [30, 36]
    assert [r["weight_bits"] for r in rep.rows] == [30 * 5, 36 * 8]
    assert [r["bias_bits"] for r in rep.rows] == [0, 12 * 10]
    (layer,) = rep.layers
    assert layer["multiplies"] == 66 and layer["dense_multiplies"] == 120
    # the dense layer it replaces, quantized like the widest core (8 bits), same bias
    assert layer["dense_memory_bits"] == 120 * 8 + 120
    assert layer["memory_bits"] == 150 + 288 + 120
    assert rep.totals["multiply_ratio"] == pytest.approx(120 / 66)


def test_tt_counts_by_hand() -> None:
    model = nn.Sequential(_tt_layer())
    quantize(model, cores=FixedPoint(7, 2), progress=False)
    rep = build_report(build_graph(model, IN_T))
    # in modes (2, 3, 2) = 12 (10 padded), out modes (3, 2, 2) = 12, contracted right to left:
    # core 2 (3,2,2,1): P = 2*3, M = 3*2, N = 2*1, Q = 1     ->  72
    # core 1 (2,2,3,3): P = 2,   M = 2*2, N = 3*3, Q = 2     -> 144
    # core 0 (1,3,2,2): P = 1,   M = 1*3, N = 2*2, Q = 2*2   ->  48
    assert [r["name"] for r in rep.rows] == ["0.0", "0.1", "0.2"]
    assert [r["multiplies"] for r in rep.rows] == [72, 144, 48]
    assert [r["weights"] for r in rep.rows] == [12, 36, 12]
    assert [r["weight_bits"] for r in rep.rows] == [84, 252, 84]
    assert rep.rows[-1]["bias"] == 11 and rep.rows[0]["bias"] == 0
    (layer,) = rep.layers
    assert (layer["multiplies"], layer["dense_multiplies"]) == (264, 110)
    assert layer["dense_memory_bits"] == 110 * 7 + rep.rows[-1]["bias_bits"]


def test_multiplies_equal_the_products_the_emulator_computes() -> None:
    # without biases every product is cast once and added once: accum casts = 2 * products
    model = nn.Sequential(
        LowRankLinear([torch.randn(10, 2), torch.randn(2, 9)]), nn.ReLU(), _tt_layer(bias=False)
    )
    quantize(model, cores=QuantSpec(6, scale="pow2"), progress=False)
    em = IntegerModel(build_graph(model, IN_T))
    batch = 3
    trace = em.trace(np.zeros((batch, 9), dtype=np.int64))
    per_op = [st.get("accum", 0) // (2 * batch) for _, st in trace]
    rep = em.report()
    by_op: dict[str, int] = {}
    for r in rep.rows:
        op = r["name"] if r["layer"] != "2" else "2"
        by_op[op] = by_op.get(op, 0) + r["multiplies"]
    assert per_op == [by_op[op.name] for op in em.ops]
    assert rep.totals["multiplies"] == 18 + 20 + 264


def test_fixed_point_writes_the_report(tmp_path: Path) -> None:
    model = nn.Sequential(
        LowRankLinear([torch.randn(5, 2), torch.randn(2, 6)]), nn.ReLU(), nn.Linear(5, 3)
    )
    quantize(model, weights=QuantSpec(6, scale="pow2"), progress=False)
    em = fixed_point(model, tmp_path, FixedPoint(9, 3), hls4ml=False)
    data = json.loads((tmp_path / "report.json").read_text())
    assert data == json.loads(json.dumps(em.report().to_dict()))
    assert data["drift"] is None
    assert data["totals"]["multiplies"] == 12 + 10 + 15
    assert data["totals"]["dense_multiplies"] == 30 + 15
    md = (tmp_path / "report.md").read_text()
    assert "## Layers vs dense" in md and "| 0.1 | dense |" in md
    assert IntegerModel.load(tmp_path).report().to_dict() == em.report().to_dict()


def test_empty_graph_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one op"):
        build_report([])
