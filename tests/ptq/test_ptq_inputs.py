"""calibrate / GPTQ / bias correction refuse unusable models and data before changing anything."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tnquant import QuantSpec
from tnquant.ptq import calibrate, correct_biases, gptq
from tnquant.quantization import quantize


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))
    quantize(
        model,
        weights=QuantSpec(bits=4, granularity="channel"),
        activations={"*.input": QuantSpec(bits=8)},
        progress=False,
    )
    return model


def _weight_quantizers(model: nn.Module) -> list:
    return [model[0].weight_quantizer, model[2].weight_quantizer]


def _act_quantizers(model: nn.Module) -> list:
    return [model[0].act_quantizers["input"], model[2].act_quantizers["input"]]


def _data(n: int = 3) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(16, 6, generator=gen) for _ in range(n)]


def test_meta_model_is_refused_with_how_to_materialize():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(6, 8))
    quantize(model, weights=QuantSpec(bits=8), activations=QuantSpec(bits=8), progress=False)
    for verb, call in (
        ("calibrate", lambda: calibrate(model, _data(), progress=False)),
        ("GPTQ", lambda: gptq(model, _data(), progress=False)),
        ("bias correction", lambda: correct_biases(model, _data(), progress=False)),
    ):
        with pytest.raises(
            ValueError,
            match=rf"{verb} needs the model's values, but parameter "
            rf"'0.weight' is on the meta device.*to_empty",
        ):
            call()


def test_empty_data_is_refused_before_the_weights_are_frozen():
    model = _model()
    with pytest.raises(
        ValueError, match="calibrate needs at least one batch of data, got an empty list"
    ):
        calibrate(model, [], progress=False)
    assert not any(q.initialized for q in _weight_quantizers(model))


def test_data_is_not_needed_without_activation_quantizers():
    model = nn.Sequential(nn.Linear(6, 8))
    quantize(model, weights=QuantSpec(bits=8), progress=False)
    calibrate(model, [], progress=False)
    calibrate(model, None, progress=False)  # type: ignore[arg-type]
    assert model[0].weight_quantizer.initialized


def test_data_that_is_not_iterable_is_refused():
    with pytest.raises(
        TypeError, match="calibrate: data must be an iterable of batches.*got NoneType"
    ):
        calibrate(_model(), None, progress=False)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="GPTQ: data must be an iterable of batches"):
        gptq(_model(), 3, progress=False)


def test_non_finite_batch_is_named_and_observers_are_restored():
    model = _model()
    modes = [q.mode for q in _act_quantizers(model)]
    data = _data()
    data[1][3, :2] = float("nan")
    data[1][0, 0] = float("-inf")
    with pytest.raises(
        ValueError,
        match=r"calibrate: batch 1 of data holds 3 non-finite values "
        r"\(NaN or inf\) in the batch, a float32 tensor of "
        r"shape \(16, 6\)",
    ):
        calibrate(model, data, progress=False)
    assert [q.mode for q in _act_quantizers(model)] == modes
    assert not any(q.initialized for q in _act_quantizers(model))


def test_non_finite_batch_in_gptq_and_bias_correction():
    model = _model()
    calibrate(model, _data(), progress=False)
    data = _data()
    data[2][0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"GPTQ: batch 2 of data holds 1 non-finite value "):
        gptq(model, data, progress=False)
    with pytest.raises(ValueError, match=r"bias correction: batch 2 of data holds 1 non-finite"):
        correct_biases(model, data, progress=False)
    with pytest.raises(ValueError, match=r"calibrate: batch 2 of data"):
        calibrate(model, data, bias_correction=True, progress=False)


def test_non_finite_weights_are_named():
    model = _model()
    with torch.no_grad():
        model[2].weight[1, 1] = float("inf")
    with pytest.raises(ValueError, match=r"calibrate: parameter '2.weight' holds 1 non-finite"):
        calibrate(model, _data(), progress=False)
    assert not any(q.initialized for q in _weight_quantizers(model))


def test_one_shot_iterators_where_the_data_is_read_several_times():
    model = _model()
    calibrate(model, iter(_data()), progress=False)  # read once: fine
    with pytest.raises(TypeError, match="GPTQ reads the data several times"):
        gptq(model, (x for x in _data()), progress=False)
    with pytest.raises(TypeError, match="bias correction reads the data several times"):
        correct_biases(model, iter(_data()), progress=False)
