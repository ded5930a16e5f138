"""Sigmoid, Tanh and Softmax through the export: the jet tagger with its softmax head.

The emulator's tables are checked against hls4ml's own in ``test_tables.py``;
here the whole network (16-64-32-32-5, Tanh, Sigmoid, ReLU, Softmax) goes
through ``fixed_point``, the strict loader and hls4ml's C simulation, which
must agree with the emulator bit for bit on 300 inputs (20 far outside the
input range). Against the torch model the tables are an approximation: the
test bounds it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tnquant import FixedPoint, QuantSpec, quantize
from tnquant.export import IntegerModel, fixed_point, qonnx, to_hls4ml, write_project
from tnquant.export.table_ops import SOFTMAX_RESULT, TABLE

IN_T = FixedPoint(10, 3, rounding="RND", overflow="SAT")
#: the hidden results narrowed, as an FPGA user does (and hls4ml's tables read 16 bits)
RESULT = {
    "0": FixedPoint(14, 5, rounding="RND", overflow="SAT"),
    "2": FixedPoint(14, 5, rounding="RND", overflow="SAT"),
    "4": FixedPoint(14, 5, rounding="RND", overflow="SAT"),
    "6": FixedPoint(14, 5, rounding="RND", overflow="SAT"),
}


def _tagger() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 32), nn.Sigmoid(), nn.Linear(32, 32),
        nn.ReLU(), nn.Linear(32, 5), nn.Softmax(dim=-1),
    ).double()  # fmt: skip
    quantize(model, weights=QuantSpec(6, scale="pow2", granularity="channel"), progress=False)
    return model.eval()


def _inputs() -> np.ndarray:
    x = np.random.default_rng(0).normal(size=(300, 16)) * 2
    x[:20] *= 10
    return x


def test_the_jet_tagger_exports_and_loads_bit_exact(tmp_path: Path) -> None:
    model = _tagger()
    em = fixed_point(model, tmp_path, IN_T, result=RESULT)
    kinds = [op.kind for op in em.ops]
    assert kinds == ["dense", "tanh", "dense", "sigmoid", "dense", "relu", "dense", "softmax"]
    assert em.ops[1].result_type == TABLE[1] and em.ops[-1].result_type == SOFTMAX_RESULT
    x = _inputs()
    y = em.predict(x)
    np.testing.assert_array_equal(IntegerModel.load(tmp_path).predict(x), y)
    assert len(np.unique(y)) > 100  # the softmax does not collapse to a constant
    with torch.no_grad():
        ref = model(torch.from_numpy(np.ldexp(em.quantize_input(x).astype(float), -IN_T.frac)))
    assert np.abs(y - ref.numpy()).max() < 0.05  # the tables approximate the functions
    assert np.abs(y.sum(axis=1) - 1).max() < 0.02
    cfg = json.loads((tmp_path / "hls4ml_config.json").read_text())
    softmax = list(cfg["LayerName"].values())[-1]
    assert softmax["Implementation"] == "stable" and "inp_norm_t" in softmax
    rows = {r["name"]: r for r in em.report().rows}
    assert rows["1"]["memory_bits"] == 1024 * 18  # the tanh table


def test_the_emulator_reads_the_tables_of_the_result_type(tmp_path: Path) -> None:
    narrow = {**RESULT, "7": FixedPoint(8, 0, signed=False, rounding="RND", overflow="SAT")}
    em = fixed_point(_tagger(), tmp_path, IN_T, result=narrow)
    y = em.predict(_inputs())
    assert set(np.unique(np.ldexp(y, 8)).astype(int).tolist()) <= set(range(256))


def test_the_routes_without_tables_say_where_to_go(tmp_path: Path) -> None:
    model = _tagger()
    em = fixed_point(model, tmp_path / "files", IN_T, result=RESULT)
    with pytest.raises(ValueError, match=r"op '1' \(tanh: a lookup table\) is not in the C\+\+"):
        write_project(em, tmp_path / "project")
    with pytest.raises(ValueError, match=r"op '1' \(tanh\) has no QONNX form.*to_hls4ml"):
        qonnx(model, tmp_path / "m.onnx", IN_T, result=RESULT)


def test_softmax_over_another_dim_is_refused() -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.Softmax(dim=0))
    quantize(model, weights=QuantSpec(6, scale="pow2"), progress=False)
    with pytest.raises(ValueError, match=r"1: Softmax\(dim=0\) is not over the features"):
        fixed_point(model, "/nonexistent/never", IN_T)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
def test_hls4ml_c_simulation_of_the_tagger_is_bit_exact(tmp_path: Path) -> None:
    pytest.importorskip("hls4ml")
    model = _tagger()
    em = fixed_point(model, tmp_path / "files", IN_T, result=RESULT)
    hls_model = to_hls4ml(model, tmp_path / "hls", IN_T, result=RESULT)
    hls_model.compile()
    x = _inputs()
    got = np.asarray(hls_model.predict(np.ascontiguousarray(x))).reshape(len(x), -1)
    np.testing.assert_array_equal(got, em.predict(x))
