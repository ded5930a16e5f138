"""A 1-D CNN through the fixed-point export: torch == emulator == load == hls4ml, bit for bit.

``Conv1d(2, 4, 3, padding=1) -> ReLU -> MaxPool1d(2) -> TuckerConv1d (Tucker-2 of
Conv1d(4, 8, 3, padding=1), ranks (4, 3)) -> ReLU -> AvgPool1d(2) ->
AdaptiveAvgPool1d(1) -> Flatten -> Linear(8, 5)`` on ``(C, L) = (2, 16)`` inputs,
per-channel power-of-two weights, results narrowed by ``'output'``/``'inter_k'``
quantizers. References: the torch fake-quant model in float64 on the quantized
inputs, and hls4ml's C simulation (``Conv1D``, ``Pooling1D``) in io_parallel and
io_stream, two compiles.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tnquant import FixedPoint, QuantSpec, Tucker, factorize, quantize
from tnquant.export import IntegerModel, fixed_point, to_hls4ml

IN_T = FixedPoint(10, 3, rounding="RND", overflow="SAT")
RES = FixedPoint(12, 5, rounding="RND", overflow="SAT")
OUT = FixedPoint(16, 6, rounding="RND", overflow="SAT")
SHAPE = (2, 16)
N = 300


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv1d(2, 4, 3, padding=1), nn.ReLU(), nn.MaxPool1d(2),
        nn.Conv1d(4, 8, 3, padding=1), nn.ReLU(), nn.AvgPool1d(2), nn.AdaptiveAvgPool1d(1),
        nn.Flatten(), nn.Linear(8, 5),
    ).double().eval()  # fmt: skip
    factorize(model, {"3": Tucker(rank=(4, 3))}, progress=False)
    quantize(
        model,
        weights=QuantSpec(6, scale="pow2", granularity="channel"),
        cores=QuantSpec(6, scale="pow2"),
        activations={
            "0.output": RES, "3.inter_0": RES, "3.inter_1": RES, "3.output": RES,
            "8.output": OUT,
        },
        progress=False,
    )  # fmt: skip
    return model


def _inputs() -> np.ndarray:
    x = np.random.default_rng(1).normal(size=(N, *SHAPE)) * 2
    x[:20] *= 10  # far outside ap_fixed<10,3>: saturated by the input cast
    return x.reshape(N, -1)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, IntegerModel, Path]:
    model = _model()
    out = tmp_path_factory.mktemp("cnn1d")
    return model, fixed_point(model, out, IN_T, input_shape=SHAPE, hls4ml=False), out


def test_torch_emulator_and_load_agree_bit_for_bit(
    exported: tuple[nn.Module, IntegerModel, Path],
) -> None:
    model, em, out = exported
    assert type(model[3]).__name__ == "TuckerConv1d"
    assert [(op.name, op.kind) for op in em.ops] == [
        ("0", "conv1d"), ("1", "relu"), ("2", "maxpool1d"), ("3.0", "conv1d"),
        ("3.1", "conv1d"), ("3.2", "conv1d"), ("4", "relu"), ("5", "avgpool1d"),
        ("6", "avgpool1d"), ("8", "dense"),
    ]  # fmt: skip
    assert em.ops[0].in_shape == (2, 1, 16) and em.ops[7].out_shape == (8, 1, 4)
    assert em.ops[4].params["kernel"] == (1, 3) and em.ops[4].weights[0].shape == (4, 3, 1, 3)
    x = _inputs()
    m = em.quantize_input(x)
    xq = torch.from_numpy(np.ldexp(m.astype(np.float64), -IN_T.frac)).reshape(N, *SHAPE)
    with torch.no_grad():
        want = model(xq).numpy()
    assert int((em.predict(x) != want).sum()) == 0
    loaded = IntegerModel.load(out)
    assert [op.kind for op in loaded.ops] == [op.kind for op in em.ops]
    np.testing.assert_array_equal(loaded.run(m), em.run(m))
    assert str(loaded.ops[7].result_type) == "ap_fixed<13,5>"  # the exact mean of 2: 1 more bit
    assert loaded.ops[8].params["kernel"] == (1, 4) and loaded.ops[8].out_shape == (8, 1, 1)
    assert str(loaded.ops[8].result_type) == "ap_fixed<15,5>"  # of 4: 2 more


def test_report_counts_conv1d_multiplies_by_hand(
    exported: tuple[nn.Module, IntegerModel, Path],
) -> None:
    _, em, _ = exported
    report = em.report()
    rows = {r["name"]: r for r in report.rows}
    assert rows["0"]["multiplies"] == 4 * 2 * 3 * 16  # O x C x k, per output position
    assert rows["3.0"]["multiplies"] == 3 * 4 * 8
    assert rows["3.1"]["multiplies"] == 4 * 3 * 3 * 8
    assert rows["3.2"]["multiplies"] == 8 * 4 * 8
    (layer,) = [r for r in report.layers if r["layer"] == "3"]
    assert layer["dense_multiplies"] == 8 * 4 * 3 * 8


def _quantized(*mods: nn.Module) -> nn.Module:
    model = nn.Sequential(*mods).double()
    quantize(model, weights=QuantSpec(6, scale="pow2"), progress=False)
    return model


@pytest.mark.parametrize(
    ("mods", "shape", "match"),
    [
        ((nn.Conv1d(2, 4, 3),), None, r"^0: a Conv1d needs the input's \(C, L\)"),
        ((nn.Conv1d(2, 4, 3, groups=2),), (2, 16), r"^0: a grouped Conv1d \(groups=2\)"),
        ((nn.Conv1d(2, 4, 3, padding="same"),), (2, 16), r"^0: padding='same'"),
        ((nn.Conv1d(2, 4, 3),), (2, 4, 4), r"^0: a Conv1d reads a \(C, L\) map"),
        ((nn.Conv1d(2, 4, 3), nn.AvgPool1d(3)), (2, 16), r"^1: .*power-of-two area"),
        ((nn.Conv1d(2, 4, 3), nn.MaxPool1d(2, padding=1)), (2, 16), r"^1: MaxPool1d .*padding"),
        ((nn.Conv1d(2, 4, 3), nn.AdaptiveAvgPool1d(1)), (2, 16), r"^1: .*power-of-two area"),
        ((nn.Conv1d(2, 4, 3), nn.AdaptiveAvgPool1d(2)), (2, 16), r"^1: .*output_size=1"),
    ],
)
def test_refusals_name_the_layer(mods: tuple[nn.Module, ...], shape: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        fixed_point(_quantized(*mods), "/nonexistent/never", IN_T, input_shape=shape)  # type: ignore[arg-type]


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
    assert int((got != em.predict(x)).sum()) == 0
