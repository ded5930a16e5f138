"""CP convolutions, depthwise convs and global average pooling through the export, bit for bit.

A digits-sized CNN (8x8 inputs): ``Conv2d(1, 4, 3, padding=1) -> ReLU -> depthwise
Conv2d(4, 4, 3, padding=1, stride=2, groups=4) -> ReLU -> CPConv2d (rank 3 of a
Conv2d(4, 8, 3, padding=1): 1x1, depthwise 3x1, depthwise 1x3, 1x1) -> ReLU ->
AdaptiveAvgPool2d(1) -> Flatten -> Linear(8, 10)``. References: the torch
fake-quant model in float64 on the quantized inputs, a per-pixel integer loop for
the depthwise arithmetic (saturating after every add, so the order of the sum
matters), hand counts of the multiplies, and hls4ml's C simulation in io_parallel
and io_stream (hls4ml's ``DepthwiseConv2D``), two compiles.
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

from tnquant import CP, FixedPoint, QuantSpec, factorize, quantize
from tnquant.export import IntegerModel, fixed_point, to_hls4ml
from tnquant.export.codes import lossless_accum
from tnquant.export.conv_ops import depthwise2d
from tnquant.export.manifest import MANIFEST, canonical
from tnquant.io import IntegrityError

IN_T = FixedPoint(10, 3, rounding="RND", overflow="SAT")
RES = FixedPoint(12, 5, rounding="RND", overflow="SAT")
OUT = FixedPoint(16, 6, rounding="RND", overflow="SAT")
SHAPE = (1, 8, 8)
N = 300


def _cp_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1, stride=2, groups=4), nn.ReLU(),
        nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        nn.Flatten(), nn.Linear(8, 10),
    ).double().eval()  # fmt: skip
    factorize(model, {"4": CP(rank=3)}, progress=False)
    quantize(
        model,
        weights=QuantSpec(6, scale="pow2", granularity="channel"),
        cores=QuantSpec(6, scale="pow2"),
        activations={
            "0.output": RES, "2.output": RES, "4.inter_0": RES, "4.inter_1": RES,
            "4.inter_2": RES, "4.output": RES, "8.output": OUT,
        },
        progress=False,
    )  # fmt: skip
    return model


def _inputs() -> np.ndarray:
    x = np.random.default_rng(1).normal(size=(N, *SHAPE)) * 2
    x[:20] *= 10  # far outside ap_fixed<10,3>: saturated by the input cast
    return x.reshape(N, -1)


def _torch_out(model: nn.Module, em: IntegerModel, x: np.ndarray) -> np.ndarray:
    m = em.quantize_input(x)
    xq = torch.from_numpy(np.ldexp(m.astype(np.float64), -IN_T.frac)).reshape(N, *SHAPE)
    with torch.no_grad():
        return model(xq).numpy()


@pytest.fixture(scope="module")
def cp_export(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, IntegerModel, Path]:
    model = _cp_model()
    out = tmp_path_factory.mktemp("cp")
    return model, fixed_point(model, out, IN_T, input_shape=SHAPE, hls4ml=False), out


def test_a_cp_conv_is_four_convs_as_its_forward(
    cp_export: tuple[nn.Module, IntegerModel, Path],
) -> None:
    model, em, out = cp_export
    assert type(model[4]).__name__ == "CPConv2d"
    steps = [op for op in em.ops if op.layer == "4"]
    assert [(op.name, op.kind, op.params["kernel"], op.params["padding"]) for op in steps] == [
        ("4.0", "conv2d", (1, 1), (0, 0)),
        ("4.1", "depthwise2d", (3, 1), (1, 0)),
        ("4.2", "depthwise2d", (1, 3), (0, 1)),
        ("4.3", "conv2d", (1, 1), (0, 0)),
    ]
    assert [op.weights[0].shape for op in steps] == [
        (3, 4, 1, 1),
        (3, 1, 3, 1),
        (3, 1, 1, 3),
        (8, 3, 1, 1),
    ]
    assert [str(op.result_type) for op in steps[:3]] == [str(RES)] * 3  # the inter_k quantizers
    x = _inputs()
    m = em.quantize_input(x)
    got = em.predict(x)
    assert int((got != _torch_out(model, em, x)).sum()) == 0
    loaded = IntegerModel.load(out)
    assert [op.kind for op in loaded.ops] == [op.kind for op in em.ops]
    np.testing.assert_array_equal(loaded.run(m), em.run(m))


def test_a_depthwise_quant_conv_and_global_pool(
    cp_export: tuple[nn.Module, IntegerModel, Path],
) -> None:
    _, em, _ = cp_export
    dw = next(op for op in em.ops if op.layer == "2")
    assert (dw.kind, dw.weights[0].shape, dw.out_shape) == ("depthwise2d", (4, 1, 3, 3), (4, 4, 4))
    assert dw.params["stride"] == (2, 2)
    args = (dw.input_type, dw.weight_types[0])  # lossless over 3x3 products, not 4x3x3
    assert dw.accum_types[0] == lossless_accum(*args, 9, dw.bias_type)
    assert dw.accum_types[0] != lossless_accum(*args, 36, dw.bias_type)
    gap = next(op for op in em.ops if op.layer == "6")
    assert (gap.kind, gap.params["kernel"], gap.out_shape) == ("avgpool2d", (4, 4), (8, 1, 1))
    assert gap.result_type.frac == gap.input_type.frac + 4  # the exact mean of 16 values


def test_report_counts_cp_multiplies_by_hand(
    cp_export: tuple[nn.Module, IntegerModel, Path],
) -> None:
    _, em, _ = cp_export
    report = em.report()
    rows = {r["name"]: r for r in report.rows}
    pixels = 4 * 4
    assert rows["2"]["multiplies"] == 4 * 3 * 3 * pixels  # depthwise: C x kh x kw per pixel
    assert rows["4.0"]["multiplies"] == 3 * 4 * pixels  # 1x1: rank x C
    assert rows["4.1"]["multiplies"] == rows["4.2"]["multiplies"] == 3 * 3 * pixels
    assert rows["4.3"]["multiplies"] == 8 * 3 * pixels
    layers = {r["layer"]: r for r in report.layers}
    assert layers["4"]["multiplies"] == (12 + 9 + 9 + 24) * pixels
    assert layers["4"]["dense_multiplies"] == 8 * 4 * 3 * 3 * pixels  # the Conv2d it replaced
    assert layers["2"]["dense_multiplies"] == layers["2"]["multiplies"]  # not factorized


def _sat(v: int, t: FixedPoint) -> int:
    lo, hi = -(1 << (t.width - 1)), (1 << (t.width - 1)) - 1
    return min(max(v, lo), hi)


def test_depthwise_arithmetic_matches_a_per_pixel_loop() -> None:
    """Bias first, products added in (kh, kw) order, saturating after every add."""
    rng = np.random.default_rng(3)
    in_t, w_t = FixedPoint(8, 3), FixedPoint(6, 2)
    acc = FixedPoint(13, 4, overflow="SAT")  # frac 9 = 5 + 4: products land exactly
    bias_t = FixedPoint(8, 4)
    res = FixedPoint(8, 3, rounding="RND", overflow="SAT")
    x = rng.integers(-128, 128, size=(5, 3, 5, 6))
    w = rng.integers(-32, 32, size=(3, 1, 2, 3))
    b = rng.integers(-128, 128, size=3)
    got = depthwise2d(x, w, in_t, w_t, acc, res, b, bias_t, stride=(2, 1), padding=(1, 1))
    assert got.shape == (5, 3, 3, 6)
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    want = np.zeros_like(got)
    for n, c, i, j in np.ndindex(*got.shape):
        a = _sat(int(b[c]) << (acc.frac - bias_t.frac), acc)
        for u in range(2):
            for v in range(3):
                a = _sat(a + int(xp[n, c, 2 * i + u, j + v]) * int(w[c, 0, u, v]), acc)
        shift = acc.frac - res.frac
        want[n, c, i, j] = _sat((a + (1 << (shift - 1))) >> shift, res)
    np.testing.assert_array_equal(got, want)


def _quantized(*mods: nn.Module) -> nn.Module:
    model = nn.Sequential(*mods).double()
    quantize(model, weights=QuantSpec(6, scale="pow2"), progress=False)
    return model


@pytest.mark.parametrize(
    ("mods", "match"),
    [
        ((nn.Conv2d(4, 4, 3, groups=2),), r"^0: a grouped convolution \(groups=2, 4 -> 4"),
        ((nn.Conv2d(2, 4, 3, groups=2),), r"^0: a grouped convolution .*depth multiplier 1"),
    ],
)
def test_other_grouped_convs_are_refused(mods: tuple[nn.Module, ...], match: str) -> None:
    shape = (mods[0].in_channels, 8, 8)  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match=match):
        fixed_point(_quantized(*mods), "/nonexistent/never", IN_T, input_shape=shape)


def test_load_refuses_a_forged_depthwise_kernel(
    cp_export: tuple[nn.Module, IntegerModel, Path], tmp_path: Path
) -> None:
    _, em, out = cp_export
    k = next(i for i, op in enumerate(em.ops) if op.kind == "depthwise2d")
    dst = tmp_path / "forged"
    shutil.copytree(out, dst)
    man: dict[str, Any] = json.loads((dst / MANIFEST).read_text())
    man["ops"][k]["weight_shapes"][0] = [3, 3, 3, 1]  # an (O, C, kh, kw) dense kernel's shape
    man.pop("checksum")
    man["checksum"] = hashlib.sha256(canonical(man)).hexdigest()
    (dst / MANIFEST).write_bytes(canonical(man))
    with pytest.raises(IntegrityError, match=rf"ops\[{k}\]"):
        IntegerModel.load(dst)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
@pytest.mark.parametrize("io_type", ["io_parallel", "io_stream"])
def test_a_cp_conv_network_is_hls4ml_bit_exact(
    cp_export: tuple[nn.Module, IntegerModel, Path], io_type: str, tmp_path: Path
) -> None:
    pytest.importorskip("hls4ml")
    model, em, _ = cp_export
    hls_model = to_hls4ml(model, tmp_path / "hls", IN_T, input_shape=SHAPE, io_type=io_type)
    hls_model.compile()
    x = _inputs()
    got = np.asarray(hls_model.predict(np.ascontiguousarray(x))).reshape(N, -1)
    assert int((got != em.predict(x)).sum()) == 0
