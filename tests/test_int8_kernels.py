"""The int8-kernel fast path: same codes and scales, close (not equal) outputs, clear refusals."""

import numpy as np
import pytest
import torch
from torch import nn

from tnquant import QuantSpec, Ternary, convert, quantize
from tnquant.int8_kernels import int8_kernels_available, to_int8_kernels

pytestmark = pytest.mark.skipif(not int8_kernels_available(), reason="no quantized engine")


def _model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 16))


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("converted", [False, True])
def test_codes_and_scales_carried_over(granularity, bits, converted):
    model = _model()
    quantize(model, weights=QuantSpec(bits=bits, granularity=granularity), progress=False)
    expected = []
    for layer in (model[0], model[2]):
        codes, qp = layer.weight_quantizer.quantize_codes(layer.weight.detach())
        expected.append((codes.to(torch.int64), qp.scale.double().reshape(-1)))
    if converted:
        convert(model, progress=False)
    report = to_int8_kernels(model, progress=False)
    assert [r["status"] for r in report.rows] == ["int8 kernel"] * 2
    for layer, (codes, scale) in zip((model[0], model[2]), expected, strict=True):
        w = layer.weight()
        assert torch.equal(w.int_repr().to(torch.int64), codes)
        got = w.q_per_channel_scales().double()
        assert torch.equal(got, scale.expand_as(got))


def test_outputs_close_to_exact_model_within_activation_rounding():
    model = _model(1)
    quantize(model, weights=QuantSpec(bits=8, granularity="channel"), progress=False)
    convert(model, progress=False)
    x = torch.randn(64, 48)
    layer = model[0]
    w = layer.weight_quantizer.dequantize().double().numpy()
    exact = model(x)
    first_exact = layer(x).detach().double().numpy()
    to_int8_kernels(model, progress=False)
    first = model[0](x).double().numpy()
    # independent bound: dynamic uint8 quantization of the input (range incl. 0, 8 bits or
    # fbgemm's reduced 7) moves each input by <= step/2, so |dy| <= step/2 * sum_k |w_k|
    xs = x.double().numpy()
    step = (max(xs.max(), 0) - min(xs.min(), 0)) / 127
    bound = step / 2 * np.abs(w).sum(axis=1) + 1e-5
    assert np.all(np.abs(first - first_exact) <= bound[None, :])
    assert not np.array_equal(first, first_exact)  # inexact by design
    assert torch.allclose(model(x), exact, atol=0.05)


def test_ineligible_layers_kept_with_reasons():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 2)
    )
    quantize(
        model,
        weights={
            "0": QuantSpec(bits=8, symmetric=False),
            "1": QuantSpec(bits=8, granularity=("group", 4), axis=1),
            "2": Ternary(),
            "3": QuantSpec(bits=8),
        },
        activations={"3.input": QuantSpec(bits=8)},
        progress=False,
    )
    report = to_int8_kernels(model, progress=False)
    reasons = {r["name"]: r["reason"] for r in report.rows if r["status"] == "kept"}
    assert "symmetric=False" in reasons["0"]
    assert "group" in reasons["1"]
    assert "Ternary" in reasons["2"]
    assert "activation quantizers" in reasons["3"]
    assert set(reasons) == {"0", "1", "2", "3"}  # "4" has no quantizer: not a QuantLinear


def test_rejects_non_module():
    with pytest.raises(TypeError, match="nn.Module"):
        to_int8_kernels("model")


def test_convert_flag_takes_the_fast_path_and_notes_it():
    model = _model(2)
    quantize(
        model,
        weights={
            "0": QuantSpec(bits=8, granularity="channel"),
            "2": QuantSpec(bits=3, symmetric=False),
        },
        progress=False,
    )
    with pytest.warns(DeprecationWarning, match="kernels='int8_dynamic'"):
        report = convert(model, int8_kernels=True, progress=False)
    notes = {r["name"]: r["note"] for r in report.rows}
    assert notes == {"0": "int8 kernel", "2": None}
    assert type(model[0]).__module__.startswith("torch.ao.nn.quantized")
    assert type(model[2]).__name__ == "QuantLinear"


def test_convert_kernels_int8_dynamic_same_as_alias():
    model = _model(3)
    quantize(model, weights=QuantSpec(bits=8, granularity="channel"), progress=False)
    report = convert(model, kernels="int8_dynamic", progress=False)
    assert [r["note"] for r in report.rows] == ["int8 kernel", "int8 kernel"]
    with (
        pytest.warns(DeprecationWarning),
        pytest.raises(ValueError, match="conflicts with kernels='packed'"),
    ):
        convert(_model(), kernels="packed", int8_kernels=True, progress=False)
