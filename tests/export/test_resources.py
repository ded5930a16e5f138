"""The resource counts against a brute-force walk over every product of the emulator's loops."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import torch
from torch import nn

from tnquant import TT, FixedPoint, QuantSpec, factorize, quantize
from tnquant.export.graph import build_graph
from tnquant.export.report import build_report
from tnquant.export.resources import effective_bits, op_resources, totals
from tnquant.layers import LowRankLinear


def _bits(m: int) -> int:
    m = abs(int(m))
    if m == 0:
        return 0
    while m % 2 == 0:
        m //= 2
    return m.bit_length()


def _brute(op) -> Counter:
    """Every (input width, weight) product the emulator forms for one sample, one by one."""
    seen: Counter = Counter()
    if op.kind == "dense":
        for m in op.weights[0].reshape(-1):
            seen[(op.input_type.width, int(m))] += 1
        return seen
    cores = op.weights
    in_shape = [c.shape[2] for c in cores]
    cur, q, d = op.input_type, 1, len(cores)
    for s in range(d):
        k = d - 1 - s
        r0, o, i, r1 = cores[k].shape
        w = cores[k].reshape(r0 * o, i * r1)
        for _p in range(math.prod(in_shape[:k])):
            for mm in range(r0 * o):
                for _q in range(q):
                    for j in range(i * r1):
                        seen[(cur.width, int(w[mm, j]))] += 1
        cur, q = op.step_types[s], o * q
    return seen


def _check(ops) -> None:
    for op in ops:
        if op.kind == "relu":
            assert op_resources(op) == []
            continue
        got = totals(op_resources(op))
        want = _brute(op)
        assert got["products"] == sum(want.values())
        assert got["zero"] == sum(c for (_, m), c in want.items() if m == 0)
        assert got["shift"] == sum(c for (_, m), c in want.items() if _bits(m) == 1)
        widths: Counter = Counter()
        for (a, m), c in want.items():
            if _bits(m) > 1:
                widths[(a, _bits(m))] += c
        assert got["by_width"] == dict(widths)
        assert got["ebops"] == sum(a * _bits(m) * c for (a, m), c in want.items())


def test_effective_bits_by_hand() -> None:
    table = {0: 0, 1: 1, -1: 1, 2: 1, 3: 2, 6: 2, -12: 2, 5: 3, 127: 7, -128: 1, 2**40 + 2**10: 31}
    got = effective_bits(np.array(list(table), dtype=np.int64)).tolist()
    assert got == list(table.values())


def test_lowrank_and_dense_counts_match_the_brute_force_walk() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        LowRankLinear([torch.randn(12, 3), torch.randn(3, 16)], bias=torch.randn(12)),
        nn.ReLU(),
        nn.Linear(12, 5),
    )
    with torch.no_grad():
        model[2].weight[:, ::3] = 0  # zero weights: no hardware
    quantize(model, weights=QuantSpec(4, scale="pow2"), cores=FixedPoint(6, 2), progress=False)
    ops = build_graph(model, FixedPoint(10, 4))
    _check(ops)
    rows = [r for op in ops for r in op_resources(op)]
    assert sum(r["zero"] for r in rows) >= 5 * 4


def test_tt_counts_match_the_brute_force_walk_and_the_report() -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(12, 20))
    factorize(model, {"0": TT(rank=3, order=2)}, progress=False)
    quantize(model, cores=QuantSpec(3, scale="pow2"), progress=False)
    ops = build_graph(model, FixedPoint(10, 4))
    _check(ops)
    # the products of every step are the report's multiplies (zero and shift included)
    report = build_report(ops)
    assert totals(op_resources(ops[0]))["products"] == report.totals["multiplies"]


def test_binary_and_ternary_report_1_and_2_bits_and_no_multiplier() -> None:
    from tnquant import Binary, Ternary, calibrate

    for spec, bits in [
        (Binary(scale="pow2"), 1),
        (Binary(granularity="channel", scale="pow2"), 1),
        (Ternary(scale="pow2"), 2),
        (Ternary(method="ttq", scale="pow2"), 2),
    ]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 5))
        quantize(model, weights=spec, progress=False)
        calibrate(model, [torch.randn(64, 16)], progress=False)
        report = build_report(build_graph(model, FixedPoint(10, 4)))
        dense = [r for r in report.rows if r["kind"] == "dense"]
        assert [r["code_bits"] for r in dense] == [bits, bits], spec
        assert report.totals["multipliers"] == 0, spec
        assert report.totals["zero_products"] + report.totals["shift_products"] == 16 * 32 + 32 * 5
        # every non-zero code is one effective bit: EBOPs = its products at their input width
        assert report.totals["ebops"] == sum(r["shift_products"] * r["input_width"] for r in dense)


def test_factorized_bops_against_the_dense_layer_by_hand() -> None:
    torch.manual_seed(2)
    model = nn.Sequential(LowRankLinear([torch.randn(64, 4), torch.randn(4, 32)]))
    quantize(model, cores=FixedPoint(8, 2), progress=False)
    report = build_report(build_graph(model, FixedPoint(10, 4)))
    (layer,) = report.layers
    v_step, u_step = report.rows  # V (4 x 32) reads the 10-bit input; U (64 x 4) its result
    assert v_step["bops"] == 4 * 32 * 10 * 8
    assert u_step["bops"] == 64 * 4 * v_step["result_width"] * 8
    assert layer["dense_bops"] == 64 * 32 * 10 * 8
    assert layer["bops"] == v_step["bops"] + u_step["bops"]
    assert layer["ebops"] == sum(
        totals(op_resources(op))["ebops"] for op in build_graph(model, FixedPoint(10, 4))
    )
