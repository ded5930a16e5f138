"""The hls4ml route: C simulation of the generated project vs the integer emulator, bit for bit.

Each hls4ml ``compile()`` builds a C++ library (about 10 s); the two builds are
module-scoped fixtures. Skipped without g++ or hls4ml.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from tests.export.models import lowrank_mlp
from tnquant import FixedPoint, QuantSpec, calibrate, quantize
from tnquant.export import fixed_point, to_hls4ml
from tnquant.layers import LowRankLinear

hls4ml = pytest.importorskip("hls4ml")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")]

IN_T = FixedPoint(10, 3, rounding="RND", overflow="SAT")
NARROW: dict[str, Any] = {  # narrow user types: every product and add rounds / saturates / wraps
    "accum": {
        "0.0": FixedPoint(9, 3, rounding="RND_CONV", overflow="SAT_SYM"),
        "2": FixedPoint(10, 3, rounding="RND", overflow="SAT"),
    },
    "result": {
        "0.1": FixedPoint(8, 3, rounding="RND", overflow="SAT"),
        "2": FixedPoint(9, 2, rounding="TRN", overflow="WRAP"),
    },
}


_model = lowrank_mlp  # the shared model (tests/export/models.py)


def _inputs() -> np.ndarray:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 8)) * 2.5
    x[:20] *= 10  # far outside the input range: the input cast saturates
    return x


@pytest.fixture(scope="module", params=["lossless", "narrow"])
def exported(request: Any, tmp_path_factory: Any) -> tuple[Any, Any, Path]:
    kwargs: dict[str, Any] = NARROW if request.param == "narrow" else {}
    out = tmp_path_factory.mktemp(f"export_{request.param}")
    model = _model()
    em = fixed_point(model, out / "files", IN_T, **kwargs)
    hls_model = to_hls4ml(model, out / "hls", IN_T, **kwargs)
    hls_model.compile()
    return em, hls_model, out


def test_hls4ml_c_simulation_is_bit_exact(exported: tuple[Any, Any, Path]) -> None:
    em, hls_model, _ = exported
    x = _inputs()
    got = np.asarray(hls_model.predict(np.ascontiguousarray(x))).reshape(len(x), -1)
    np.testing.assert_array_equal(got, em.predict(x))


def test_hls4ml_took_the_exported_types(exported: tuple[Any, Any, Path]) -> None:
    em, hls_model, out = exported
    cfg = json.loads((out / "files" / "hls4ml_config.json").read_text())
    assert cfg["Model"]["Strategy"] == "Latency" and cfg["Model"]["ReuseFactor"] == 1
    dense = [op for op in em.ops if op.kind == "dense"]
    names = [n for n in cfg["LayerName"]][1:]
    layers = {layer.name: layer for layer in hls_model.get_layers()}
    for name, op in zip(names, em.ops, strict=True):
        prec = cfg["LayerName"][name]["Precision"]
        assert prec["result"] == str(op.result_type)
        if op in dense:
            assert prec["accum"] == str(op.accum_types[0])
            assert prec["weight"] == str(op.weight_types[0])
            # hls4ml parsed it: the generated accum type has the same width and modes
            acc = layers[name].get_attr("accum_t").precision
            assert (acc.width, acc.integer) == (op.accum_types[0].width, op.accum_types[0].integer)
    assert "ap_fixed" in em.output_type


def test_activation_quantizers_hls4ml_bit_exact(tmp_path: Path) -> None:
    """pow2 activation quantizers as hls4ml types: a ReLU casting to ap_ufixed, narrow results."""
    torch.manual_seed(3)

    def coarse(n: int) -> torch.Tensor:  # on every accumulator grid: biases are not rounded
        return torch.round(torch.randn(n) * 8) / 8

    model = nn.Sequential(
        LowRankLinear([torch.randn(6, 3), torch.randn(3, 8)], bias=coarse(6)),
        nn.ReLU(),
        nn.Linear(6, 4),
    ).double()
    with torch.no_grad():
        model[2].bias.copy_(coarse(4))
    quantize(
        model,
        cores=QuantSpec(6, scale="pow2", granularity="channel", axis=0),
        weights={"2": QuantSpec(5, scale="pow2")},
        activations={
            "0.input": QuantSpec(8, scale="pow2"),
            "0.inter_0": QuantSpec(7, scale="pow2", rounding="half_up"),
            "0.output": QuantSpec(9, scale="pow2", narrow_range=True),
            "2.input": QuantSpec(6, symmetric=False, scale="pow2", rounding="floor"),
            "2.output": QuantSpec(8, scale="pow2"),
        },
        progress=False,
    )
    calibrate(model, [torch.randn(256, 8, dtype=torch.float64) * 2], progress=False)
    em = fixed_point(model, tmp_path / "files")
    assert "ap_ufixed" in str(em.ops[2].result_type)  # the ReLU casts to 2.input
    hls_model = to_hls4ml(model, tmp_path / "hls")
    hls_model.compile()
    x = _inputs()
    got = np.asarray(hls_model.predict(np.ascontiguousarray(x))).reshape(len(x), -1)
    np.testing.assert_array_equal(got, em.predict(x))
    with torch.no_grad():
        np.testing.assert_array_equal(got, model(torch.from_numpy(x)).numpy())


WRAP_ACCUM: dict[str, Any] = {  # narrow accumulators that wrap: any summation order agrees
    "accum": {
        "0.0": FixedPoint(9, 3, rounding="RND_CONV", overflow="WRAP"),
        "2": FixedPoint(8, 3, rounding="RND", overflow="WRAP"),
    }
}
KNOBS = {
    "stream-resource-vitis": (
        {},
        {"io_type": "io_stream", "strategy": "Resource", "reuse_factor": 2, "backend": "Vitis"},
    ),
    "per-layer-wrap": (
        WRAP_ACCUM,
        {"strategy": {"2": "Resource", "*": "Latency"}, "reuse_factor": {"0.*": 3, "2": 4}},
    ),
}


@pytest.mark.parametrize("case", list(KNOBS))
def test_hls4ml_knobs_stay_bit_exact(case: str, tmp_path: Path) -> None:
    """io_stream, Resource, reuse factors (also per layer) and Vitis: C simulation == emulator."""
    types, knobs = KNOBS[case]
    model = _model()
    em = fixed_point(model, tmp_path / "files", IN_T, **types)
    hls_model = to_hls4ml(model, tmp_path / "hls", IN_T, **types, **knobs)
    hls_model.compile()
    x = _inputs()
    got = np.asarray(hls_model.predict(np.ascontiguousarray(x))).reshape(len(x), -1)
    np.testing.assert_array_equal(got, em.predict(x))
    config = hls_model.config.config
    assert config["IOType"] == knobs.get("io_type", "io_parallel")
    assert config["Backend"] == knobs.get("backend", "Vivado")
    layers = list(config["HLSConfig"]["LayerName"].items())[1:]
    dense = [(name, op) for (name, _), op in zip(layers, em.ops, strict=True) if op.kind == "dense"]
    rf, strategy = knobs["reuse_factor"], knobs["strategy"]
    for name, op in dense:
        layer = config["HLSConfig"]["LayerName"][name]
        want_rf = rf if isinstance(rf, int) else (3 if op.layer == "0" else 4)
        want_strategy = strategy if isinstance(strategy, str) else strategy.get(op.layer, "Latency")
        assert (layer["ReuseFactor"], layer["Strategy"]) == (want_rf, want_strategy), name


def test_a_saturating_accumulator_summed_in_another_order_is_refused(tmp_path: Path) -> None:
    model = _model()
    with pytest.raises(ValueError, match=r"op '2': accum type .*saturates.*overflow='WRAP'"):
        to_hls4ml(model, tmp_path / "hls", IN_T, **NARROW, reuse_factor={"2": 2})
    with pytest.raises(ValueError, match=r"op '0.0'.*Strategy 'Resource'"):
        to_hls4ml(model, tmp_path / "hls", IN_T, **NARROW, strategy="Resource")


@pytest.mark.parametrize(
    ("knob", "value", "message"),
    [
        (
            "io_type",
            "stream",
            r"io_type must be one of \['io_parallel', 'io_stream'\], got 'stream'",
        ),
        ("reuse_factor", 0, r"reuse_factor must be an int in 1..4096, got 0"),
        ("reuse_factor", {"0": 2.5}, r"reuse_factor\['0'\] must be an int in 1..4096, got 2.5"),
        (
            "strategy",
            {"*": "resource"},
            r"strategy\['\*'\] must be one of \['Latency', 'Resource'\]",
        ),
        ("backend", "Quartus", r"backend must be one of \['Vivado', 'Vitis'\]"),
        ("part", "", r"part must be a non-empty str or None"),
    ],
)
def test_hls4ml_knobs_are_checked_up_front(knob: str, value: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        to_hls4ml(nn.Sequential(nn.ReLU()), "/nonexistent/never-written", **{knob: value})


def test_fixed_point_writes_the_knobs_into_hls4ml_config(tmp_path: Path) -> None:
    from tnquant.export import HlsOptions

    em = fixed_point(
        _model(), tmp_path, IN_T, hls4ml=HlsOptions(strategy="Resource", reuse_factor={"2": 4})
    )
    cfg = json.loads((tmp_path / "hls4ml_config.json").read_text())
    names = list(cfg["LayerName"])[1:]
    for name, op in zip(names, em.ops, strict=True):
        if op.kind == "dense":
            layer = cfg["LayerName"][name]
            want = 4 if op.layer == "2" else 1
            assert (layer["ReuseFactor"], layer["Strategy"]) == (want, "Resource"), name


def test_binary_and_ternary_layers_hls4ml_bit_exact(tmp_path: Path) -> None:
    """Binary / ternary pow2 weights: 1- and 2-bit codes, no multiplier, C simulation exact."""
    from tnquant import Binary, Ternary
    from tnquant.export.resources import op_resources, totals

    torch.manual_seed(5)
    model = nn.Sequential(
        nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)
    ).double()
    quantize(
        model,
        weights={
            "0": Binary(granularity="channel", scale="pow2"),
            "2": Ternary(scale="pow2"),
            "4": Ternary(method="ttq", scale="pow2"),
        },
        progress=False,
    )
    calibrate(model, [torch.randn(128, 8, dtype=torch.float64)], progress=False)
    em = fixed_point(model, tmp_path / "files", IN_T)
    report = em.report()
    dense = [r for r in report.rows if r["kind"] == "dense"]
    assert [r["code_bits"] for r in dense] == [1, 2, 2]
    assert all(totals(op_resources(op)).get("multiplies", 0) == 0 for op in em.ops)
    hls_model = to_hls4ml(model, tmp_path / "hls", IN_T)
    hls_model.compile()
    x = _inputs()
    got = np.asarray(hls_model.predict(np.ascontiguousarray(x))).reshape(len(x), -1)
    np.testing.assert_array_equal(got, em.predict(x))
    # biases snapped by fixed_point: the torch model on the quantized input agrees too
    xq = np.ldexp(em.quantize_input(x).astype(np.float64), -IN_T.frac)
    with torch.no_grad():
        np.testing.assert_array_equal(model(torch.from_numpy(xq)).numpy(), got)
