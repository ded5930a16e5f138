"""Drift of the emulator from the torch model under narrowed types, against references."""

from __future__ import annotations

import json
from pathlib import Path
from typing import cast

import numpy as np
import pytest
import torch
from torch import nn

from tests.export.refs import ref_dense_counted
from tnquant import FixedPoint, quantize
from tnquant.export import IntegerModel, build_graph, drift, fixed_point
from tnquant.layers import LowRankLinear


def _grid(n: int, frac: int, seed: int, top: int = 200) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-top, top, (n,), generator=g).double() * 2.0**-frac


def test_lossless_export_has_zero_drift(tmp_path: Path) -> None:
    torch.manual_seed(0)
    in_t = FixedPoint(10, 4, rounding="RND_CONV", overflow="SAT")
    model = nn.Sequential(
        LowRankLinear([torch.randn(8, 3), torch.randn(3, 12)], bias=_grid(8, 6 + 3, 1).float()),
        nn.ReLU(),
        nn.Linear(8, 4),
    ).double()
    quantize(model, cores=FixedPoint(8, 5), weights={"2": FixedPoint(6, 3)}, progress=False)
    frac_last = build_graph(model, in_t)[-2].result_type.frac + 3
    with torch.no_grad():
        cast(nn.Linear, model[2]).bias.copy_(_grid(4, frac_last, 2))
    x = torch.randn(100, 12, dtype=torch.float64) * 3
    fixed_point(model, tmp_path, in_t, hls4ml=False, sample=x)
    rows = json.loads((tmp_path / "report.json").read_text())["drift"]
    assert [r["layer"] for r in rows] == ["0", "1", "2"]
    for r in rows:
        assert r["max_abs"] == 0.0 and r["max_rel"] == 0.0
        assert r["accum_overflow"] == 0.0 and r["result_overflow"] == 0.0
        assert r["overflow_modes"] == ""
    assert "## Drift from the torch model" in (tmp_path / "report.md").read_text()


@pytest.mark.parametrize(
    ("rounding", "overflow"),
    [("TRN", "WRAP"), ("RND", "SAT"), ("RND_CONV", "SAT_SYM"), ("TRN_ZERO", "SAT_ZERO")],
)
def test_narrow_accumulator_drift_matches_reference(rounding: str, overflow: str) -> None:
    torch.manual_seed(3)
    in_t = FixedPoint(8, 3, rounding="RND_CONV", overflow="SAT")  # as np.round + np.clip
    w_t, b_t = FixedPoint(6, 2), FixedPoint(10, 4)
    accum = FixedPoint(9, 4, rounding=rounding, overflow=overflow)  # lossless: 18 bits
    model = nn.Sequential(nn.Linear(6, 4)).double()
    with torch.no_grad():
        model[0].bias.copy_(_grid(4, b_t.frac, 5, top=300))
    quantize(model, weights=w_t, progress=False)
    em = IntegerModel(build_graph(model, in_t, accum=accum, bias=b_t))
    x = torch.randn(40, 6, dtype=torch.float64) * 4
    (row,) = drift(model, em, x)

    # reference: exact rationals, one cast at a time, overflows counted by hand
    xm = np.clip(np.round(x.numpy() * 2**in_t.frac), in_t.qmin, in_t.qmax).astype(int)
    layer = cast(nn.Module, model[0])
    with torch.no_grad():  # the weights the torch model multiplies by (its fake-quant values)
        wq = layer.weight_quantizer(layer.weight).numpy()
    wm = (wq * 2**w_t.frac).astype(int)
    assert np.array_equal(wm * 2.0**-w_t.frac, wq)
    bm = (model[0].bias.detach().numpy() * 2**b_t.frac).astype(int)
    outs, casts, over = [], 0, 0
    for r in xm:
        o, c, v = ref_dense_counted(
            r.tolist(), wm.tolist(), bm.tolist(), in_t, w_t, b_t, accum, accum
        )
        outs.append(o)
        casts, over = casts + c, over + v
    got = np.array(outs, dtype=np.float64) * 2.0**-accum.frac
    # the torch model (fake-quant weights, float64, exact) on the same quantized inputs
    with torch.no_grad():
        want = model(torch.from_numpy(xm * 2.0**-in_t.frac)).numpy()
    err = np.abs(got - want).max()
    assert over > 0 and err > 0  # the narrow accumulator really saturates / wraps
    assert row["max_abs"] == err
    assert row["max_rel"] == pytest.approx(err / np.abs(want).max(), rel=1e-12)
    assert row["max_abs_lsb"] == err * 2**accum.frac
    assert row["accum_overflow"] == over / casts
    assert row["result_overflow"] == 0.0
    assert row["overflow_modes"] == overflow  # only the accumulator overflowed


def test_drift_checks_its_arguments() -> None:
    model = nn.Sequential(nn.Linear(3, 2))
    quantize(model, weights=FixedPoint(6, 2), progress=False)
    em = IntegerModel(build_graph(model, FixedPoint(8, 3)))
    with pytest.raises(ValueError, match=r"shape \(batch >= 1, 3\)"):
        drift(model, em, np.zeros((4, 5)))
    with pytest.raises(TypeError, match="IntegerModel"):
        drift(model, object(), np.zeros((4, 3)))  # type: ignore[arg-type]
