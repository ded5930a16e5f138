"""The generated HLS C++ project, compiled with g++, vs the integer emulator, bit for bit.

Dense (LowRank + Linear, biases and none), TT and ReLU layers, narrow user types that
round, saturate and wrap, and 20 of 300 inputs far outside the input range.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tests.export.test_hls import NARROW, _inputs, _model
from tnquant import TT, FixedPoint, QuantSpec, factorize, quantize
from tnquant.export import fixed_point
from tnquant.export.cproject import ap_types_dir, run_project, write_project

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++"),
    pytest.mark.skipif(ap_types_dir() is None, reason="needs hls4ml's ap_types headers"),
]
IN_T = FixedPoint(10, 3, rounding="RND", overflow="SAT")


def _tt_model() -> nn.Module:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(12, 20), nn.ReLU(), nn.Linear(20, 5, bias=False), nn.ReLU())
    factorize(model, {"0": TT(rank=3, order=2)}, progress=False)
    quantize(
        model,
        weights=QuantSpec(6, scale="pow2", granularity="channel"),
        cores=QuantSpec(6, scale="pow2"),
        progress=False,
    )
    return model


def _tt_inputs() -> np.ndarray:
    x = np.random.default_rng(0).normal(size=(300, 12)) * 3
    x[:20] *= 10
    return x


@pytest.mark.parametrize("case", ["lowrank-narrow", "tt-relu-last"])
def test_the_c_project_is_bit_exact_with_the_emulator(case: str, tmp_path: Path) -> None:
    if case == "lowrank-narrow":
        model, x, types = _model(), _inputs(), NARROW
    else:
        model, x, types = (
            _tt_model(),
            _tt_inputs(),
            {"result": {"0": FixedPoint(12, 5, rounding="RND", overflow="SAT")}},
        )
    em = fixed_point(model, tmp_path / "files", IN_T, hls4ml=False, **types)
    project = write_project(em, tmp_path / "project", x)
    got = run_project(project, x)
    np.testing.assert_array_equal(got, em.predict(x))
    # the emulator's vectors travel with the project, and the top function has its pragmas
    want = np.loadtxt(project / "tb_data" / "tb_output_predictions.dat", ndmin=2)
    np.testing.assert_array_equal(want, em.predict(x))
    top = (project / "firmware" / "tnquant_top.cpp").read_text()
    assert "#pragma HLS PIPELINE" in top and "#pragma HLS ARRAY_PARTITION" in top
    if case.startswith("tt"):
        assert (project / "firmware" / "tnquant_tt_layers.h").is_file()


def test_a_broken_build_says_what_g_plus_plus_said(tmp_path: Path) -> None:
    em = fixed_point(_model(), tmp_path / "files", IN_T, hls4ml=False)
    project = write_project(em, tmp_path / "project")
    (project / "firmware" / "tnquant_top.cpp").write_text("this is not C++\n")
    with pytest.raises(RuntimeError, match="g\\+\\+ failed on .*project"):
        run_project(project, _inputs()[:2])
