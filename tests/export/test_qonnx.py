"""QONNX export: QONNX's own executor and hls4ml's QONNX reader vs the integer emulator.

References: ``qonnx.core.onnx_exec.execute_onnx`` (QONNX's ``Quant`` in numpy,
the rest in onnxruntime) and hls4ml's C simulation of the project its QONNX
front end builds from the file; both must equal :meth:`IntegerModel.predict`
bit for bit on 300 inputs, 20 of them far outside the input range.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from tests.export.models import lowrank_mlp
from tnquant import TT, FixedPoint, QuantSpec, factorize, quantize
from tnquant.export import fixed_point
from tnquant.export.qonnx import QONNX_DOMAIN, qonnx

onnx = pytest.importorskip("onnx")
pytest.importorskip("qonnx")
from qonnx.core.modelwrapper import ModelWrapper  # noqa: E402
from qonnx.core.onnx_exec import execute_onnx  # noqa: E402


def _fp(w: int, i: int, rounding: str, overflow: str = "SAT") -> FixedPoint:
    return FixedPoint(w, i, rounding=rounding, overflow=overflow)


_lowrank = lowrank_mlp  # the shared model (tests/export/models.py)


def _tt() -> nn.Module:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(12, 20), nn.ReLU(), nn.Linear(20, 5))
    factorize(model, {"0": TT(rank=3, order=2)}, progress=False)
    quantize(
        model,
        weights=QuantSpec(6, scale="pow2", granularity="channel"),
        cores=QuantSpec(6, scale="pow2"),
        progress=False,
    )
    return model


def _inputs(n_in: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(300, n_in)) * 2.5
    x[:20] *= 10  # far outside the input range: the input cast saturates
    return x.astype(np.float32)


# every ap_fixed rounding mode, SAT and SAT_SYM, on the input and the results
CASES: dict[str, tuple[Any, int, FixedPoint, dict[str, Any]]] = {
    "lowrank-rnd-inf": (
        _lowrank,
        8,
        _fp(10, 3, "RND"),
        {"result": {"0.0": _fp(12, 5, "RND_INF"), "0.1": _fp(12, 5, "TRN", "SAT_SYM")}},
    ),
    "lowrank-conv-zero": (
        _lowrank,
        8,
        _fp(10, 3, "RND_CONV", "SAT_SYM"),
        {
            "result": {
                "0.0": _fp(10, 4, "RND_ZERO"),
                "0.1": _fp(8, 3, "RND_CONV"),
                "2": _fp(9, 2, "TRN_ZERO"),
            }
        },
    ),
    "tt-min-inf": (
        _tt,
        12,
        _fp(10, 3, "RND_MIN_INF"),
        {"result": {"0": _fp(12, 6, "RND"), "2": _fp(14, 6, "RND_MIN_INF")}},
    ),
}  # fmt: skip


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    return execute_onnx(ModelWrapper(str(path)), {"global_in": x})["global_out"]


@pytest.mark.parametrize("case", list(CASES))
def test_qonnx_execute_onnx_is_bit_exact(case: str, tmp_path: Path) -> None:
    build, n_in, in_t, types = CASES[case]
    model = build()
    x = _inputs(n_in)
    em = fixed_point(model, tmp_path / "files", in_t, hls4ml=False, **types)
    path = qonnx(model, tmp_path / "m.onnx", in_t, batch_size=len(x), **types)
    got = _run(path, x)
    want = em.predict(x)
    np.testing.assert_array_equal(got, want)
    # the rounding modes matter on these inputs: truncating everywhere gives other outputs
    trn = {
        k: {n: _fp(t.width, t.integer, "TRN", t.overflow) for n, t in v.items()}
        for k, v in types.items()
    }
    em_trn = fixed_point(
        model, tmp_path / "trn", _fp(in_t.width, in_t.integer, "TRN"), hls4ml=False, **trn
    )
    assert (em_trn.predict(x) != want).any()


def test_the_file_holds_quant_nodes_with_the_exported_types(tmp_path: Path) -> None:
    model = _lowrank()
    in_t = _fp(10, 3, "TRN")
    types = {"result": {"0.0": _fp(12, 5, "TRN"), "0.1": _fp(12, 5, "RND_CONV")}}
    em = fixed_point(model, tmp_path / "files", in_t, hls4ml=False, **types)
    proto = onnx.load(str(qonnx(model, tmp_path / "m.onnx", in_t, **types)))
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    quants = [n for n in proto.graph.node if n.op_type == "Quant"]
    assert all(n.domain == QONNX_DOMAIN for n in quants)
    by_input = {n.input[0]: n for n in quants}
    for op in em.ops:
        if op.kind != "dense":
            continue
        (w_name,) = [k for k in inits if re.fullmatch(rf"{re.escape(op.name)}\.w0_\d+", k)]
        node = by_input[w_name]
        t = op.weight_types[0]
        assert float(inits[node.input[3]]) == t.width  # bitwidth
        assert float(inits[node.input[1]]) == 2.0**-t.frac  # scale
        values = inits[w_name].T.astype(np.float64)
        np.testing.assert_array_equal(np.ldexp(op.weights[0].astype(np.float64), -t.frac), values)
    assert {n.op_type for n in proto.graph.node} == {"Quant", "MatMul", "Add", "Relu"}


@pytest.mark.parametrize(
    ("types", "message"),
    [
        ({"result": {"0.0": _fp(12, 5, "TRN", "WRAP")}}, r"op '0.0': .*overflow='WRAP'.*'SAT'"),
        (
            {"accum": {"2": _fp(12, 5, "TRN", "SAT")}, "result": {"0.*": _fp(10, 4, "TRN")}},
            r"op '2' step 0: accum type .* narrower than the lossless",
        ),
        ({}, r"op '0.1' step 0: its accumulator .* 24-bit .*result=\{'0.0': FixedPoint\(16"),
    ],
)
def test_what_qonnx_cannot_express_is_refused_by_name(
    types: dict, message: str, tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match=message):
        qonnx(_lowrank(), tmp_path / "m.onnx", _fp(10, 3, "TRN"), **types)
    assert not (tmp_path / "m.onnx").exists()


def test_a_wrapping_input_type_and_a_bad_batch_size_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"the input: ap_fixed<10,3> has overflow='WRAP'"):
        qonnx(_lowrank(), tmp_path / "m.onnx", FixedPoint(10, 3))
    with pytest.raises(ValueError, match="batch_size must be a positive int, got 0"):
        qonnx(_lowrank(), tmp_path / "m.onnx", _fp(10, 3, "TRN"), batch_size=0)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
def test_hls4ml_reads_the_qonnx_file_and_its_c_simulation_is_bit_exact(tmp_path: Path) -> None:
    """hls4ml's QONNX front end takes ROUND/FLOOR (RND_CONV/TRN) and SAT/SAT_SYM types."""
    hls4ml = pytest.importorskip("hls4ml")
    from qonnx.transformation.channels_last import ConvertToChannelsLastAndClean
    from qonnx.transformation.gemm_to_matmul import GemmToMatMul
    from qonnx.util.cleanup import cleanup_model

    model = _lowrank()
    in_t = _fp(10, 3, "TRN")
    types = {
        "result": {
            "0.0": _fp(12, 5, "RND_CONV"),
            "0.1": _fp(12, 5, "TRN", "SAT_SYM"),
            "2": _fp(10, 4, "RND_CONV"),
        }
    }
    em = fixed_point(model, tmp_path / "files", in_t, hls4ml=False, **types)
    wrapper = cleanup_model(ModelWrapper(str(qonnx(model, tmp_path / "m.onnx", in_t, **types))))
    wrapper = cleanup_model(
        wrapper.transform(ConvertToChannelsLastAndClean()).transform(GemmToMatMul())
    )
    # a wide default: float inputs reach the input Quant exactly, unmarked layers lose nothing
    config = hls4ml.utils.config.config_from_onnx_model(
        wrapper, granularity="name", backend="Vivado", default_precision="fixed<64,24>"
    )
    hls_model = hls4ml.converters.convert_from_onnx_model(
        wrapper, output_dir=str(tmp_path / "hls"), backend="Vivado", hls_config=config
    )
    hls_model.compile()
    x = _inputs(8, seed=3)
    got = np.asarray(hls_model.predict(np.ascontiguousarray(x))).reshape(len(x), -1)
    np.testing.assert_array_equal(got, em.predict(x))
