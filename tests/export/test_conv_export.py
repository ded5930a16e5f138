"""A small CNN through the fixed-point export: torch == emulator == load == hls4ml, bit for bit.

``Conv2d(1, 4, 3, padding=1) -> ReLU -> MaxPool2d(2) -> Conv2d(4, 8, 3, padding=1) -> ReLU
-> AvgPool2d(2) -> Flatten -> Linear(32, 10)`` on 8x8 inputs (the size of scikit-learn's
digits), per-channel power-of-two weights, the conv results narrowed by ``'output'``
quantizers (so that the torch fake-quant model casts where the emulator does). The
reference for the emulator is the torch model run in float64 on the quantized inputs.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from tnquant import FixedPoint, QuantSpec, quantize
from tnquant.export import IntegerModel, fixed_point, to_hls4ml
from tnquant.export.manifest import MANIFEST, canonical
from tnquant.io import IntegrityError

IN_T = FixedPoint(10, 3, rounding="RND", overflow="SAT")
RES = FixedPoint(12, 5, rounding="RND", overflow="SAT")
OUT = FixedPoint(16, 6, rounding="RND", overflow="SAT")
SHAPE = (1, 8, 8)
N = 300


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 8, 3, padding=1),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(8 * 2 * 2, 10),
    )
    model = model.double().eval()
    quantize(
        model,
        weights=QuantSpec(6, scale="pow2", granularity="channel"),
        activations={"0.output": RES, "3.output": RES, "7.output": OUT},
        progress=False,
    )
    return model


def _inputs() -> np.ndarray:
    x = np.random.default_rng(1).normal(size=(N, *SHAPE)) * 2
    x[:20] *= 10  # far outside ap_fixed<10,3>: saturated by the input cast
    return x.reshape(N, -1)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, IntegerModel, Path]:
    model = _model()
    out = tmp_path_factory.mktemp("cnn")
    em = fixed_point(model, out, IN_T, input_shape=SHAPE, hls4ml=False)
    return model, em, out


def test_torch_emulator_and_load_agree_bit_for_bit(
    exported: tuple[nn.Module, IntegerModel, Path],
) -> None:
    model, em, out = exported
    x = _inputs()
    m = em.quantize_input(x)
    xq = torch.from_numpy(np.ldexp(m.astype(np.float64), -IN_T.frac)).reshape(N, *SHAPE)
    with torch.no_grad():
        want = model(xq).numpy()
    got = em.predict(x)
    assert got.shape == (N, 10)
    np.testing.assert_array_equal(got, want)
    loaded = IntegerModel.load(out)
    np.testing.assert_array_equal(loaded.run(m), em.run(m))
    assert [op.kind for op in loaded.ops] == [
        "conv2d", "relu", "maxpool2d", "conv2d", "relu", "avgpool2d", "dense",
    ]  # fmt: skip
    assert loaded.ops[3].in_shape == (4, 4, 4) and loaded.ops[5].out_shape == (8, 2, 2)
    assert str(loaded.ops[5].result_type) == "ap_fixed<14,5>"  # the exact mean: 2 more bits


def test_report_counts_conv_multiplies(exported: tuple[nn.Module, IntegerModel, Path]) -> None:
    _, em, _ = exported
    rows = {r["name"]: r for r in em.report().rows}
    assert rows["0"]["multiplies"] == 8 * 8 * 4 * 1 * 3 * 3
    assert rows["3"]["multiplies"] == 4 * 4 * 8 * 4 * 3 * 3
    assert rows["2"]["multiplies"] == rows["5"]["multiplies"] == 0
    w = em.ops[0].weights[0]
    nonzero = int(np.count_nonzero(w))
    assert rows["0"]["zero_products"] == (w.size - nonzero) * 64


def _forge(src: Path, dst: Path, edit: Any) -> Path:
    shutil.copytree(src, dst)
    man = json.loads((dst / MANIFEST).read_text())
    edit(man)
    man.pop("checksum")
    man["checksum"] = hashlib.sha256(canonical(man)).hexdigest()
    (dst / MANIFEST).write_bytes(canonical(man))
    return dst


def _set(path: list[Any], value: Any) -> Any:
    def edit(man: dict[str, Any]) -> None:
        obj = man
        for key in path[:-1]:
            obj = obj[key]
        obj[path[-1]] = value

    return edit


def _swap_map(man: dict[str, Any]) -> None:
    """A consistent (C, H, W) lie: the same flat size and channels, another map shape."""
    man["ops"][3]["spatial"]["in_shape"] = [4, 2, 8]
    man["ops"][3]["spatial"]["out_shape"] = [8, 2, 8]


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (_set(["ops", 0, "spatial", "in_shape"], [1, 4, 16]), r"ops\[0\]\.spatial\.out_shape"),
        (_set(["ops", 0, "spatial", "stride"], [2, 2]), r"ops\[0\]\.spatial\.out_shape"),
        (_set(["ops", 2, "spatial", "padding"], [1, 1]), r"ops\[2\]\.spatial"),
        (_set(["ops", 3, "spatial", "kernel"], [3, 3, 3]), r"ops\[3\]\.spatial\.kernel"),
        (_set(["ops", 5, "result_type"], "ap_fixed<12,5,RND,SAT>"), r"ops\[5\]"),
        (lambda man: man["ops"][0].pop("spatial"), r"ops\[0\].*spatial"),
        (_set(["ops", 6, "spatial"], {}), r"ops\[6\].*spatial"),
        (_swap_map, r"ops\[3\]\.spatial\.in_shape.*the feature map the spatial op before"),
    ],
)
def test_load_refuses_forged_shapes(
    exported: tuple[nn.Module, IntegerModel, Path], tmp_path: Path, edit: Any, match: str
) -> None:
    _, _, out = exported
    with pytest.raises(IntegrityError, match=match):
        IntegerModel.load(_forge(out, tmp_path / "forged", edit))


def _quantized(*mods: nn.Module) -> nn.Module:
    model = nn.Sequential(*mods).double()
    quantize(model, weights=QuantSpec(6, scale="pow2"), progress=False)
    return model


@pytest.mark.parametrize(
    ("mods", "shape", "match"),
    [
        ((nn.Conv2d(1, 2, 3),), None, r"^0: a convolution needs the input's \(C, H, W\)"),
        ((nn.Conv2d(4, 4, 3, groups=2),), (4, 8, 8), r"^0: a grouped convolution"),
        ((nn.Conv2d(1, 2, 3), nn.AvgPool2d(3)), (1, 8, 8), r"^1: .*power-of-two area"),
        ((nn.Conv2d(1, 2, 3), nn.MaxPool2d(2, padding=1)), (1, 8, 8), r"^1: MaxPool2d.*padding"),
        ((nn.Conv2d(2, 2, 3),), (1, 8, 8), r"^0: the convolution takes 2 channels"),
        ((nn.Conv2d(1, 2, 3), nn.Linear(72, 2)), (1, 8, 8), r"^1: .*nn.Flatten"),
        ((nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(70, 2)), (1, 8, 8), r"^2: .*72 reach"),
    ],
)
def test_refusals_name_the_layer(mods: tuple[nn.Module, ...], shape: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        fixed_point(_quantized(*mods), "/nonexistent/never", IN_T, input_shape=shape)


def test_cproject_and_qonnx_say_not_yet(exported: tuple[nn.Module, IntegerModel, Path]) -> None:
    from tnquant.export import qonnx, write_project

    model, em, out = exported
    with pytest.raises(ValueError, match=r"op '0' \(conv2d\) is not in the C\+\+ project yet"):
        write_project(em, out / "proj")
    with pytest.raises(ValueError, match=r"op '0' \(conv2d\) has no QONNX form yet"):
        qonnx(model, out / "m.onnx", IN_T, input_shape=SHAPE)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
@pytest.mark.parametrize("io_type", ["io_parallel", "io_stream"])
def test_hls4ml_csim_is_bit_exact(
    exported: tuple[nn.Module, IntegerModel, Path], io_type: str, tmp_path: Path
) -> None:
    pytest.importorskip("hls4ml")
    model, em, _ = exported
    hls_model = to_hls4ml(model, tmp_path / "hls", IN_T, input_shape=SHAPE, io_type=io_type)
    hls_model.compile()
    x = _inputs()
    got = np.asarray(hls_model.predict(np.ascontiguousarray(x))).reshape(N, -1)
    np.testing.assert_array_equal(got, em.predict(x))


def test_a_saturating_conv_accumulator_is_refused_under_io_stream(tmp_path: Path) -> None:
    pytest.importorskip("hls4ml")
    narrow = {"accum": {"0": FixedPoint(16, 8, rounding="RND", overflow="SAT")}}
    model = _model()
    with pytest.raises(ValueError, match=r"op '0': accum type .*io_stream's convolution"):
        to_hls4ml(model, tmp_path / "hls", IN_T, input_shape=SHAPE, io_type="io_stream", **narrow)
    wrap = {"accum": {"0": FixedPoint(16, 8, rounding="RND", overflow="WRAP")}}
    to_hls4ml(model, tmp_path / "ok", IN_T, input_shape=SHAPE, io_type="io_stream", **wrap)


def _tucker_model() -> nn.Module:
    """The CNN with its second convolution factorized: Tucker-2 (1x1, 3x3, 1x1)."""
    from tnquant import Tucker, factorize

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 8, 3, padding=1, stride=1), nn.ReLU(), nn.AvgPool2d(2),
        nn.Flatten(), nn.Linear(8 * 2 * 2, 10),
    ).double().eval()  # fmt: skip
    factorize(model, {"3": Tucker(rank=(4, 3))}, progress=False)
    quantize(
        model,
        weights=QuantSpec(6, scale="pow2", granularity="channel"),
        cores=QuantSpec(6, scale="pow2"),
        activations={
            "0.output": RES, "3.inter_0": RES, "3.inter_1": RES, "3.output": RES,
            "7.output": OUT,
        },
        progress=False,
    )  # fmt: skip
    return model


def test_a_tucker_conv_exports_as_three_convs_bit_exact(tmp_path: Path) -> None:
    model = _tucker_model()
    assert type(model[3]).__name__ == "TuckerConv2d"
    em = fixed_point(model, tmp_path, IN_T, input_shape=SHAPE, hls4ml=False)
    steps = [op for op in em.ops if op.layer == "3"]
    assert [(op.name, op.params["kernel"]) for op in steps] == [
        ("3.0", (1, 1)), ("3.1", (3, 3)), ("3.2", (1, 1)),
    ]  # fmt: skip
    assert [op.out_shape for op in steps] == [(3, 4, 4), (4, 4, 4), (8, 4, 4)]
    x = _inputs()
    m = em.quantize_input(x)
    xq = torch.from_numpy(np.ldexp(m.astype(np.float64), -IN_T.frac)).reshape(N, *SHAPE)
    with torch.no_grad():
        np.testing.assert_array_equal(em.predict(x), model(xq).numpy())
    np.testing.assert_array_equal(IntegerModel.load(tmp_path).run(m), em.run(m))
    (layer,) = [r for r in em.report().layers if r["layer"] == "3"]
    assert layer["multiplies"] < layer["dense_multiplies"]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
def test_a_tucker_conv_network_is_hls4ml_bit_exact(tmp_path: Path) -> None:
    pytest.importorskip("hls4ml")
    model = _tucker_model()
    em = fixed_point(model, tmp_path / "files", IN_T, input_shape=SHAPE, hls4ml=False)
    hls_model = to_hls4ml(model, tmp_path / "hls", IN_T, input_shape=SHAPE)
    hls_model.compile()
    x = _inputs()
    got = np.asarray(hls_model.predict(np.ascontiguousarray(x))).reshape(N, -1)
    np.testing.assert_array_equal(got, em.predict(x))
