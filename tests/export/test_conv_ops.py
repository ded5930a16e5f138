"""Convolution and pooling arithmetic against hls4ml's C simulation, bit for bit.

A float64 CNN whose weights are exact mantissas (Conv2d -> ReLU -> AvgPool2d ->
Conv2d -> ReLU -> MaxPool2d -> Flatten -> Linear) goes through hls4ml's PyTorch
front end with every precision set by hand; :mod:`tnquant.export.conv_ops` (and
the dense ``contract_step``) must give the same outputs on 300 inputs, 20 far
outside the input range, in io_parallel and io_stream.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from tnquant.export.conv_ops import avg_pool2d, avg_pool_type, conv2d, im2col, max_pool2d
from tnquant.export.emulator import contract_step
from tnquant.quant.fixed_point import to_mantissa
from tnquant.specs import FixedPoint

IN_T = FixedPoint(8, 3, rounding="RND", overflow="SAT")
W_T = FixedPoint(6, 2)
B_T = FixedPoint(10, 4)
RES = FixedPoint(10, 4, rounding="RND", overflow="SAT")


def _fp(w: int, i: int) -> FixedPoint:
    return FixedPoint(w, i)


def _lossless(in_t: FixedPoint, n: int) -> FixedPoint:
    frac = in_t.frac + W_T.frac
    integer = in_t.integer + W_T.integer + int(np.ceil(np.log2(n))) + 1
    return FixedPoint(integer + frac, integer)


rng = np.random.default_rng(0)
W1 = rng.integers(-31, 32, size=(4, 2, 3, 3))
B1 = rng.integers(-200, 200, size=4)
W2 = rng.integers(-31, 32, size=(6, 4, 3, 3))
B2 = rng.integers(-200, 200, size=6)
W3 = rng.integers(-31, 32, size=(3, 24))
B3 = rng.integers(-200, 200, size=3)
AVG = avg_pool_type(RES, (2, 2))
ACC1, ACC2, ACC3 = _lossless(IN_T, 18), _lossless(AVG, 36), _lossless(RES, 24)


def _emulate(x: np.ndarray) -> np.ndarray:
    m = to_mantissa(torch.from_numpy(x), IN_T).numpy().astype(np.int64)
    y = conv2d(m, W1, IN_T, W_T, ACC1, RES, B1, B_T, padding=(1, 1))
    y = np.maximum(y, 0)
    y = avg_pool2d(y, (2, 2), (2, 2))  # AVG type
    y = conv2d(y, W2, AVG, W_T, ACC2, RES, B2, B_T, padding=(1, 1))
    y = max_pool2d(np.maximum(y, 0), (2, 2), (2, 2))
    flat = y.reshape(len(y), -1)  # channels first, as torch's Flatten
    out = contract_step(flat[:, :, None], W3, RES, W_T, ACC3, RES, B3[:, None], B_T)[..., 0]
    return np.ldexp(out.astype(np.float64), -RES.frac)


def _torch_model() -> nn.Module:
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Conv2d(4, 6, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(24, 3),
    ).double()
    with torch.no_grad():
        for mod, w, b in ((model[0], W1, B1), (model[3], W2, B2), (model[7], W3, B3)):
            mod.weight.copy_(torch.from_numpy(np.ldexp(w.astype(np.float64), -W_T.frac)))
            mod.bias.copy_(torch.from_numpy(np.ldexp(b.astype(np.float64), -B_T.frac)))
    return model.eval()


def _inputs() -> np.ndarray:
    x = np.random.default_rng(1).normal(size=(300, 2, 8, 8)) * 2
    x[:20] *= 10
    return x


def test_im2col_order_and_conv_against_a_loop() -> None:
    x = np.random.default_rng(2).integers(-50, 50, size=(2, 3, 5, 6))
    w = np.random.default_rng(3).integers(-8, 8, size=(4, 3, 2, 3))
    t = FixedPoint(16, 8)
    got = conv2d(x, w, t, t, FixedPoint(40, 24), FixedPoint(40, 24), stride=(2, 1), padding=(1, 0))
    ho, wo = (5 + 2 - 2) // 2 + 1, (6 - 3) // 1 + 1
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (0, 0)))
    want = np.zeros((2, 4, ho, wo), dtype=np.int64)
    for i in range(ho):
        for j in range(wo):
            patch = xp[:, :, 2 * i : 2 * i + 2, j : j + 3]
            want[:, :, i, j] = np.einsum("bchw,ochw->bo", patch, w)
    np.testing.assert_array_equal(got, want)
    assert im2col(x, (2, 3), (2, 1), (1, 0), (1, 1)).shape == (2, ho * wo, 2 * 3 * 3)


def test_pools_by_hand() -> None:
    x = np.array([[[[1, -2, 3, 4], [5, 6, -7, 8], [0, 0, 1, 1], [2, 2, 1, -9]]]])
    assert max_pool2d(x, (2, 2), (2, 2)).tolist() == [[[[6, 8], [2, 1]]]]
    assert avg_pool2d(x, (2, 2), (2, 2)).tolist() == [[[[10, 8], [4, -6]]]]
    with pytest.raises(ValueError, match="power-of-two area"):
        avg_pool_type(RES, (3, 3))


def _config(hls4ml: Any, model: nn.Module) -> dict[str, Any]:
    wide = FixedPoint(40, 16)  # holds every value of the network: layers hls4ml adds copy exactly
    cfg = hls4ml.utils.config_from_pytorch_model(
        model,
        input_shape=(2, 8, 8),
        granularity="name",
        backend="Vivado",
        default_precision=str(wide),
        channels_last_conversion="full",
    )
    names = list(cfg["LayerName"])
    assert len(names) == 9, names
    prec = {
        names[0]: {"result": str(IN_T)},
        names[1]: {"weight": str(W_T), "bias": str(B_T), "accum": str(ACC1), "result": str(RES)},
        names[2]: {"result": str(RES)},
        names[3]: {"accum": str(FixedPoint(AVG.width + 2, AVG.integer + 2)), "result": str(AVG)},
        names[4]: {"weight": str(W_T), "bias": str(B_T), "accum": str(ACC2), "result": str(RES)},
        names[5]: {"result": str(RES)},
        names[6]: {"accum": str(RES), "result": str(RES)},
        names[7]: {"result": str(RES)},
        names[8]: {"weight": str(W_T), "bias": str(B_T), "accum": str(ACC3), "result": str(RES)},
    }
    for name, p in prec.items():
        cfg["LayerName"][name]["Precision"] = p
    cfg["Model"].update({"Strategy": "Latency", "ReuseFactor": 1})
    return cfg


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
@pytest.mark.parametrize("io_type", ["io_parallel", "io_stream"])
def test_cnn_arithmetic_is_hls4ml_bit_exact(io_type: str, tmp_path: Path) -> None:
    hls4ml = pytest.importorskip("hls4ml")
    model = _torch_model()
    hls_model = hls4ml.converters.convert_from_pytorch_model(
        model,
        input_shape=(2, 8, 8),
        hls_config=_config(hls4ml, model),
        output_dir=str(tmp_path / "hls"),
        backend="Vivado",
        io_type=io_type,
    )
    hls_model.compile()
    x = _inputs()
    got = np.asarray(hls_model.predict(np.ascontiguousarray(x.reshape(len(x), -1)))).reshape(
        len(x), -1
    )
    np.testing.assert_array_equal(got, _emulate(x))
