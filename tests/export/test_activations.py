"""ReLU6, Hardtanh, LeakyReLU and the layers that add no op, through every export route.

References, none of them the emulator's own code: the torch model itself (float64, after
``fixed_point`` snapped its biases and slopes), mantissa tables computed by hand, hls4ml's
C simulation (LeakyReLU: its ``leaky_relu`` with ``param_t`` set to alpha's type), the C++
project compiled with g++, and QONNX's ``execute_onnx``. Every model sees 300 inputs, 20 of
them far outside the input range (the input cast saturates, the clips bind).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from tnquant import FixedPoint, QuantSpec, quantize
from tnquant.export import IntegerModel, fixed_point, to_hls4ml
from tnquant.export.cproject import ap_types_dir, run_project, write_project
from tnquant.export.elementwise import slope_code
from tnquant.export.graph import build_graph
from tnquant.export.ir import Op

IN_T = FixedPoint(10, 3, rounding="RND", overflow="SAT")
WEIGHTS = QuantSpec(6, scale="pow2", granularity="channel")
GPP = shutil.which("g++") is not None


def _fp(w: int, i: int) -> FixedPoint:
    return FixedPoint(w, i, rounding="RND", overflow="SAT")


def _inputs(n_in: int = 8, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(300, n_in)) * 2.5
    x[:20] *= 10  # far outside the input range
    return x


def _quantized(model: nn.Module, acts: dict[str, Any] | None = None) -> nn.Module:
    """``model`` in float64, eval mode, hidden weights x4 (so that 6 binds), quantized."""
    with torch.no_grad():
        for m in list(model)[:-1]:
            if isinstance(m, nn.Linear):
                m.weight.mul_(4)
    quantize(model.double().eval(), weights=WEIGHTS, activations=acts, progress=False)
    return model


def _mlp(act: Callable[[], nn.Module], acts: dict[str, Any] | None = None) -> nn.Module:
    """8-16-16-4 with ``act`` after both hidden layers."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), act(), nn.Linear(16, 16), act(), nn.Linear(16, 4))
    return _quantized(model, acts)


def _noop_mlp() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Flatten(),
        nn.Linear(8, 16),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Linear(16, 16),
        nn.Identity(),
        nn.ReLU6(),
        nn.Linear(16, 4),
    )
    return _quantized(model)


#: LeakyReLU(0.01)'s lossless widths pass 62 bits after two layers: the next layers'
#: 'input' quantizers cast (in torch and the export alike)
NARROW_ACTS = {"2.input": _fp(14, 6), "4.input": _fp(14, 6)}
CASES: dict[str, Callable[[], nn.Module]] = {
    "relu6": lambda: _mlp(nn.ReLU6),
    "hardtanh": lambda: _mlp(lambda: nn.Hardtanh(-1, 2)),
    "leaky-0.125": lambda: _mlp(lambda: nn.LeakyReLU(0.125)),
    "leaky-0.01": lambda: _mlp(lambda: nn.LeakyReLU(0.01), NARROW_ACTS),
    "flatten-identity-dropout": _noop_mlp,
}


def _torch(model: nn.Module, em: IntegerModel, x: np.ndarray) -> np.ndarray:
    """The torch model on the inputs quantized to the input type (as the emulator reads them)."""
    xq = np.ldexp(em.quantize_input(x).astype(np.float64), -em.ops[0].input_type.frac)
    with torch.no_grad():
        return model(torch.from_numpy(xq)).numpy()


# --------------------------------------------------------------------------- #
# hand-computed tables
# --------------------------------------------------------------------------- #


def test_alpha_type_rule_by_hand() -> None:
    table = {  # slope: (mantissa, type), worked out on paper from the rule in the module docs
        0.125: (1, "ap_fixed<4,1>"),  # 1 * 2^-3, exact
        0.75: (3, "ap_fixed<3,1>"),  # 3 * 2^-2
        -0.5: (-1, "ap_fixed<2,1>"),
        3.0: (3, "ap_fixed<3,3>"),  # no fractional bits; 3 needs 3 signed integer bits
        0.01: (655, "ap_fixed<17,1>"),  # 0.01 * 2^16 = 655.36 -> 655
        0.2: (13107, "ap_fixed<17,1>"),  # 13107.2 -> 13107
        3 * 2.0**-17: (1, "ap_fixed<16,1>"),  # 1.5 at 2^-16 ties to even: 2, i.e. 1 * 2^-15
        5 * 2.0**-18: (1, "ap_fixed<17,1>"),  # 1.25 -> 1
        2.0**-20: (0, "ap_fixed<1,1>"),  # below half an LSB of 2^-16: 0
    }
    assert {s: (m, str(t)) for s, (m, t) in ((s, slope_code(s)) for s in table)} == table


def test_clip_and_leaky_tables_by_hand() -> None:
    t = FixedPoint(6, 3)  # 3 fractional bits: mantissa m is m/8
    x = np.array([[-32, -9, -8, -1, 0, 1, 5, 16, 17, 31]])
    bounds = np.array([-8, 16])  # Hardtanh(-1, 2)
    clip = Op("c", "clip", "c", 10, 10, t, t, weights=[bounds], weight_types=[t], step_types=[t])
    assert IntegerModel([clip]).run(x).tolist() == [[-8, -8, -8, -1, 0, 1, 5, 16, 16, 16]]
    # cast to ap_fixed<4,2,RND,SAT> (2 fractional bits, at most 1.75): -1/8 -> -0.5 LSB -> 0
    # (ties up), 1/8 -> 0.5 -> 1, 5/8 -> 2.5 -> 3, 2.0 -> 8 -> saturates at 7
    u = _fp(4, 2)
    clip_cast = Op("c", "clip", "c", 10, 10, t, u, weights=[bounds], weight_types=[t])
    assert IntegerModel([clip_cast]).run(x).tolist() == [[-4, -4, -4, 0, 0, 1, 3, 7, 7, 7]]
    # alpha = 0.125 (1 on 3 fractional bits), result ap_fixed<10,4> (6 fractional bits):
    # x > 0 -> x * 8; else x * 1 (already 3 + 3 fractional bits)
    a_t, r_t = FixedPoint(4, 1), FixedPoint(10, 4)
    leaky = Op("l", "leaky_relu", "l", 10, 10, t, r_t, weights=[np.array([1])], weight_types=[a_t])
    assert IntegerModel([leaky]).run(x).tolist() == [[-32, -9, -8, -1, 0, 8, 40, 128, 136, 248]]
    # alpha = 655 * 2^-16 (0.01), cast to ap_fixed<8,1,RND,SAT> (7 fractional bits):
    # -4.0 * alpha = -20960 * 2^-19 = -5.117 LSB -> -5; -9/8: -5895 * 2^-19 = -1.44 -> -1;
    # -1/8: -0.16 -> 0; 5/8 -> 80; 31/8 = 3.875 -> 496 -> saturates at 127
    a_t, r_t = FixedPoint(17, 1), _fp(8, 1)
    leaky = Op("l", "leaky_relu", "l", 5, 5, t, r_t, weights=[np.array([655])], weight_types=[a_t])
    assert IntegerModel([leaky]).run(np.array([[-32, -9, -1, 5, 31]])).tolist() == [
        [-5, -1, 0, 80, 127]
    ]
    _, stats = IntegerModel([leaky]).trace(np.array([[-32, -9, -1, 5, 31]]))[0]
    assert stats == {"result": 5, "result_overflow": 1}


# --------------------------------------------------------------------------- #
# torch == emulator == the loaded directory
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("case", list(CASES))
def test_torch_emulator_and_loaded_export_are_bit_exact(case: str, tmp_path: Path) -> None:
    model = CASES[case]()
    x = _inputs()
    em = fixed_point(model, tmp_path, IN_T, hls4ml=False)
    want = em.predict(x)
    np.testing.assert_array_equal(_torch(model, em, x), want)
    np.testing.assert_array_equal(IntegerModel.load(tmp_path).predict(x), want)
    trace = em.trace(em.quantize_input(x))
    for op, (out, _) in zip(em.ops, trace, strict=True):
        if op.kind == "clip":  # both bounds bind on these inputs
            lo, hi = (int(v) for v in op.weights[0])
            assert (out == lo).sum() > 10 and (out == hi).sum() > 10, op.name
        if op.kind == "leaky_relu":
            assert (out < 0).sum() > 100, op.name
    if case == "flatten-identity-dropout":
        assert [(op.name, op.kind) for op in em.ops] == [
            ("1", "dense"), ("2", "relu"), ("4", "dense"), ("6", "clip"), ("7", "dense"),
        ]  # fmt: skip
        xq = np.ldexp(em.quantize_input(x).astype(np.float64), -IN_T.frac).reshape(300, 2, 4)
        with torch.no_grad():  # the torch model flattens (300, 2, 4) itself
            np.testing.assert_array_equal(model(torch.from_numpy(xq)).numpy(), want)


def test_fixed_point_snaps_the_slope_and_the_unsnapped_model_differs(tmp_path: Path) -> None:
    model = CASES["leaky-0.01"]()
    x = _inputs()
    notes = [n for op in build_graph(model, IN_T) for n in op.notes]
    assert notes == [
        f"{k}: negative_slope 0.01 is exported as 0.0099945068359375 (655 * 2^-16, the "
        f"nearest with 16 fractional bits)"
        for k in (1, 3)
    ]
    em = fixed_point(model, tmp_path, IN_T, hls4ml=False)
    assert model[1].negative_slope == model[3].negative_slope == 655 / 65536
    for k in (1, 3):
        model[k].negative_slope = 0.01
    assert (_torch(model, em, x) != em.predict(x)).any()  # so the snapping is what makes it exact
    em2 = fixed_point(model, tmp_path, IN_T, hls4ml=False)  # exporting again: same numbers
    np.testing.assert_array_equal(em2.predict(x), em.predict(x))


def test_slopes_are_snapped_without_biases_and_restored_on_failure(tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = _quantized(
        nn.Sequential(
            nn.Linear(8, 16, bias=False), nn.LeakyReLU(0.01), nn.Linear(16, 4, bias=False)
        )
    )
    x = _inputs()
    em = fixed_point(model, tmp_path / "ok", IN_T, hls4ml=False)
    assert model[1].negative_slope == 655 / 65536
    np.testing.assert_array_equal(_torch(model, em, x), em.predict(x))
    routes = json.loads((tmp_path / "ok" / "manifest.json").read_text())["routes"]
    assert set(routes.values()) == {"hls4ml"}
    model[1].negative_slope = 0.01
    with pytest.raises(ValueError):
        fixed_point(model, tmp_path / "bad", IN_T, hls4ml=False, sample=np.zeros((2, 3)))
    assert model[1].negative_slope == 0.01  # a failed export leaves the model as it was


def test_clip_ops_are_routed_to_the_c_project_in_the_manifest(tmp_path: Path) -> None:
    model = _mlp(nn.ReLU6)
    fixed_point(model, tmp_path, IN_T, hls4ml=False)
    routes = json.loads((tmp_path / "manifest.json").read_text())["routes"]
    assert routes["1"] == routes["3"] == "c-headers" and routes["0"] == "hls4ml"
    IntegerModel.load(tmp_path)  # the loader agrees with what was written


# --------------------------------------------------------------------------- #
# hls4ml (LeakyReLU), the C++ project (all), QONNX (where expressible)
# --------------------------------------------------------------------------- #


def _leaky_hls_model() -> nn.Module:
    """Both slopes, the no-op layers, and a LeakyReLU whose result a quantizer casts (RND/SAT)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Flatten(),
        nn.Linear(8, 16),
        nn.LeakyReLU(0.125),
        nn.Dropout(0.3),
        nn.Linear(16, 16),
        nn.LeakyReLU(0.01),
        nn.Identity(),
        nn.Linear(16, 4),
    )
    return _quantized(model, {"7.input": _fp(12, 5)})


@pytest.mark.slow
@pytest.mark.skipif(not GPP, reason="needs g++")
@pytest.mark.parametrize("io_type", ["io_parallel", "io_stream"])
def test_hls4ml_c_simulation_of_leaky_relu_is_bit_exact(io_type: str, tmp_path: Path) -> None:
    pytest.importorskip("hls4ml")
    model = _leaky_hls_model()
    x = _inputs()
    em = fixed_point(model, tmp_path / "files", IN_T)
    assert [op.kind for op in em.ops] == ["dense", "leaky_relu", "dense", "leaky_relu", "dense"]
    hls_model = to_hls4ml(model, tmp_path / "hls", IN_T, io_type=io_type)
    hls_model.compile()
    got = np.asarray(hls_model.predict(np.ascontiguousarray(x))).reshape(len(x), -1)
    np.testing.assert_array_equal(got, em.predict(x))
    np.testing.assert_array_equal(_torch(model, em, x), got)
    leaky = [
        layer for layer in hls_model.get_layers() if layer.get_attr("activation") == "leakyrelu"
    ]
    ops = [op for op in em.ops if op.kind == "leaky_relu"]
    assert len(leaky) == len(ops) == 2
    for layer, op in zip(leaky, ops, strict=True):  # hls4ml took alpha's type, not a guess
        p = layer.get_attr("param_t").precision
        assert (p.width, p.integer) == (op.weight_types[0].width, op.weight_types[0].integer)
        assert float(layer.get_attr("activ_param")) == float(op.weights[0][0]) * 2.0**-p.fractional


def _all_kinds_model() -> nn.Module:
    """Every new kind in one chain; the Hardtanh and the LeakyReLU(0.01) cast to narrow types."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Flatten(),
        nn.Linear(8, 16),
        nn.ReLU6(),
        nn.Dropout(0.3),
        nn.Linear(16, 16),
        nn.LeakyReLU(0.125),
        nn.Identity(),
        nn.Linear(16, 16),
        nn.Hardtanh(-1, 2),
        nn.Linear(16, 16),
        nn.LeakyReLU(0.01),
        nn.Linear(16, 4),
    )
    return _quantized(model, {"9.input": _fp(12, 4), "11.input": _fp(12, 4)})


@pytest.mark.slow
@pytest.mark.skipif(not GPP, reason="needs g++")
@pytest.mark.skipif(ap_types_dir() is None, reason="needs hls4ml's ap_types headers")
def test_the_c_project_is_bit_exact_for_every_kind(tmp_path: Path) -> None:
    model = _all_kinds_model()
    x = _inputs()
    em = fixed_point(model, tmp_path / "files", IN_T, hls4ml=False)
    assert [op.kind for op in em.ops] == [
        "dense", "clip", "dense", "leaky_relu", "dense", "clip", "dense", "leaky_relu", "dense",
    ]  # fmt: skip
    assert em.ops[5].result_type == _fp(12, 4) != em.ops[5].input_type  # the Hardtanh casts
    np.testing.assert_array_equal(_torch(model, em, x), em.predict(x))
    got = run_project(write_project(em, tmp_path / "project", x), x)
    np.testing.assert_array_equal(got, em.predict(x))


QONNX_CASES: dict[str, tuple[Callable[[], nn.Module], dict[str, FixedPoint]]] = {
    # narrow results: QONNX executes in float32 (24-bit mantissas)
    "relu6": (CASES["relu6"], {"0": _fp(10, 4), "2": _fp(10, 4)}),
    "hardtanh": (CASES["hardtanh"], {"0": _fp(10, 4), "2": _fp(10, 4)}),
    "leaky-0.125": (CASES["leaky-0.125"], {k: _fp(10, 4) for k in "0123"}),
    "leaky-0.01": (  # 7-bit inputs: alpha * x (17 + 7 bits) stays exact in float32
        lambda: _mlp(lambda: nn.LeakyReLU(0.01)),
        {"0": _fp(7, 4), "1": _fp(10, 4), "2": _fp(7, 4), "3": _fp(10, 4)},
    ),
    "flatten-identity-dropout": (CASES["flatten-identity-dropout"], {"[14]": _fp(10, 4)}),
}


@pytest.mark.parametrize("case", list(QONNX_CASES))
def test_qonnx_execute_onnx_is_bit_exact(case: str, tmp_path: Path) -> None:
    pytest.importorskip("qonnx")
    import onnx
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.core.onnx_exec import execute_onnx

    from tnquant.export.qonnx import qonnx

    build, result = QONNX_CASES[case]
    model = build()
    x = _inputs().astype(np.float32)
    em = fixed_point(model, tmp_path / "files", IN_T, hls4ml=False, result=result)
    path = qonnx(model, tmp_path / "m.onnx", IN_T, batch_size=len(x), result=result)
    got = execute_onnx(ModelWrapper(str(path)), {"global_in": x})["global_out"]
    np.testing.assert_array_equal(got, em.predict(x))
    kinds = {n.op_type for n in onnx.load(str(path)).graph.node}
    want = {"relu6": "Clip", "hardtanh": "Clip", "flatten-identity-dropout": "Clip"}
    assert want.get(case, "LeakyRelu") in kinds


# --------------------------------------------------------------------------- #
# refusals
# --------------------------------------------------------------------------- #


def test_a_clip_has_no_hls4ml_route_and_says_where_to_go(tmp_path: Path) -> None:
    model = CASES["hardtanh"]()
    with pytest.raises(ValueError, match=r"op '1' \(clip.*no hls4ml route.*C\+\+ project.*QONNX"):
        to_hls4ml(model, tmp_path / "hls", IN_T)
    assert not (tmp_path / "hls").exists()
    fixed_point(model, tmp_path / "files", IN_T)  # the rest of the export still works
    assert not (tmp_path / "files" / "hls4ml_config.json").exists()


@pytest.mark.parametrize(
    ("module", "message"),
    [
        (nn.Hardtanh(-1, 0.3), r"1: Hardtanh max_val=0.3 is not on the grid of its input type "
         r"ap_fixed<\d+,\d+> \(multiples of 2\^-\d+\).*nearest is 0\.(2999|3000)\d+\)"),
        (nn.Flatten(0), r"1: Flatten\(start_dim=0, end_dim=-1\) is not a no-op"),
        (nn.LeakyReLU(float("inf")), r"1\.negative_slope must be a finite float"),
        (nn.GELU(), r"1: GELU has no fixed-point export; supported: .*nn\.LeakyReLU"),
        (nn.Sequential(nn.Identity(), nn.Softsign()), r"1\.1: Softsign has no fixed-point"),
    ],
)  # fmt: skip
def test_unexportable_modules_are_refused_by_name(module: nn.Module, message: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), module, nn.Linear(16, 4))
    quantize(model, weights=WEIGHTS, progress=False)
    with pytest.raises(ValueError, match=message):
        build_graph(model, IN_T)


def test_a_refused_root_module_is_named_as_the_model() -> None:
    with pytest.raises(ValueError, match=r"^\(the model\): GELU has no fixed-point export"):
        build_graph(nn.GELU(), IN_T)
    with pytest.raises(ValueError, match=r"^\(the model\): a leaky_relu op needs a layer before"):
        build_graph(nn.LeakyReLU(), IN_T)
    with pytest.raises(ValueError, match=r"^\(the model\) is a float nn\.Linear"):
        build_graph(nn.Linear(2, 2), IN_T)


def test_a_given_leaky_result_and_a_different_input_quantizer_are_refused() -> None:
    model = _mlp(lambda: nn.LeakyReLU(0.125), {"2.input": _fp(14, 6)})
    build_graph(model, IN_T)  # the quantizer alone: the LeakyReLU casts to it
    with pytest.raises(ValueError, match=r"2\.input quantizer .* differs from the result type "
                       r"of op '1'"):  # fmt: skip
        build_graph(model, IN_T, result={"1": _fp(16, 6)})


def test_the_report_counts_the_slope_products_and_the_constants() -> None:
    from tnquant.export.report import build_report

    report = build_report(build_graph(CASES["leaky-0.01"](), IN_T))
    leaky = [r for r in report.rows if r["kind"] == "leaky_relu"]
    assert [r["multiplies"] for r in leaky] == [16, 16]
    assert all(r["memory_bits"] == r["weight_width"] == 17 for r in leaky)  # alpha: ap_fixed<17,1>
    clip = build_report(build_graph(_mlp(nn.ReLU6), IN_T)).rows
    bounds = [r for r in clip if r["kind"] == "clip"]  # lo, hi on the clip's input type
    assert len(bounds) == 2 and all(r["memory_bits"] == 2 * r["weight_width"] for r in bounds)
    assert all(r["multiplies"] == 0 for r in bounds)
