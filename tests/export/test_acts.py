"""Activation quantizers (pow2 QuantSpec / FixedPoint) become the exported types, bit-exactly."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from tnquant import FixedPoint, QuantSpec, calibrate, quantize
from tnquant.export import IntegerModel, build_graph
from tnquant.export.acts import act_type
from tnquant.layers import LowRankLinear, TTLinear
from tnquant.quant import Quantizer


def _frozen(spec: QuantSpec, lo: float, hi: float) -> Quantizer:
    return Quantizer(spec).freeze(torch.tensor([lo, hi]))


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        # range [-3, 2] in 8 bits: scale ceil-pow2(3 / 127) = 2**-5, codes [-128, 127]
        (QuantSpec(8, scale="pow2"), FixedPoint(8, 3, rounding="RND_CONV", overflow="SAT")),
        (
            QuantSpec(8, scale="pow2", rounding="half_up", narrow_range=True),
            FixedPoint(8, 3, rounding="RND", overflow="SAT_SYM"),
        ),
        # range [0, 3] affine in 6 bits: scale 2**-4, zero point 0, codes [0, 63]
        (
            QuantSpec(6, symmetric=False, scale="pow2", rounding="floor"),
            FixedPoint(6, 2, signed=False, rounding="TRN", overflow="SAT"),
        ),
    ],
)
def test_pow2_spec_maps_to_the_cast_type(spec: QuantSpec, expected: FixedPoint) -> None:
    lo = -3.0 if spec.symmetric else 0.0
    q = _frozen(spec, lo, 2.0 if spec.symmetric else 3.0)
    t = act_type(q, "x")
    assert t == expected
    # the cast type's grid is the quantizer's: every code times the scale, nothing else
    scale = float(q.qparams().scale.flatten()[0])
    assert scale == t.scale
    codes = torch.arange(spec.qmin, spec.qmax + 1, dtype=torch.float64)
    assert torch.equal(q(codes * scale), codes * scale)
    assert (spec.qmin, spec.qmax) == ((-t.qmax if t.overflow == "SAT_SYM" else t.qmin), t.qmax)


@pytest.mark.parametrize(
    ("q", "match"),
    [
        (Quantizer(QuantSpec(8)).freeze(torch.tensor([-3.0, 2.0])), "float scales"),
        (Quantizer(QuantSpec(8, scale="pow2")), "no stored scale"),
        (Quantizer(QuantSpec(8, scale="pow2", rounding="stochastic")), "rounds 'stochastic'"),
        (
            Quantizer(QuantSpec(8, symmetric=False, scale="pow2")).freeze(
                torch.tensor([-1.0, 3.0])
            ),
            "zero point",
        ),
        (Quantizer(QuantSpec(dtype="bfloat16")), "not a fixed-point cast"),
    ],
)
def test_other_activation_quantizers_are_refused(q: Quantizer, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        act_type(q, "1.input")


def _coarse(n: int) -> torch.Tensor:
    """Biases on a 2**-3 grid: exact on every accumulator grid (finer), so not rounded."""
    return torch.round(torch.randn(n) * 8) / 8


def _act_model() -> nn.Module:
    torch.manual_seed(11)
    model = nn.Sequential(
        LowRankLinear([torch.randn(8, 3), torch.randn(3, 10)], bias=_coarse(8)),
        nn.ReLU(),
        TTLinear(
            [torch.randn(1, 2, 2, 2), torch.randn(2, 3, 4, 1)],
            in_features=8,
            out_features=5,
            bias=_coarse(5),
        ),
        nn.ReLU(),
        nn.Linear(5, 3),
    ).double()
    with torch.no_grad():
        model[4].bias.copy_(_coarse(3))
    acts: dict[str, Any] = {
        "0.input": QuantSpec(8, scale="pow2"),
        "0.inter_0": QuantSpec(7, scale="pow2", rounding="half_up"),
        "0.output": QuantSpec(9, scale="pow2", narrow_range=True),
        "2.input": QuantSpec(6, symmetric=False, scale="pow2", rounding="floor"),
        "2.inter_0": FixedPoint(10, 4, rounding="RND", overflow="SAT"),
        "4.input": QuantSpec(8, scale="pow2"),
        "4.output": QuantSpec(10, scale="pow2"),
    }
    quantize(
        model,
        cores=QuantSpec(6, scale="pow2", granularity="channel", axis=0),
        weights={"4": FixedPoint(7, 2, rounding="RND_CONV")},
        activations=acts,
        progress=False,
    )
    calib = torch.randn(256, 10, dtype=torch.float64) * 2
    calibrate(model, [calib], progress=False)
    return model


def test_emulator_equals_fake_quant_model_with_activation_quantizers() -> None:
    model = _act_model()
    ops = build_graph(model)  # no input_spec: the first layer's input quantizer gives it
    em = IntegerModel(ops)
    spec_of = {
        name: act_type(q, name)
        for name, q in (
            (f"{n}.{site}", q)
            for n, m in model.named_children()
            for site, q in (getattr(m, "act_quantizers", None) or {}).items()
        )
    }
    by_name = {op.name: op for op in ops}
    assert ops[0].input_type == spec_of["0.input"]
    assert by_name["0.0"].result_type == spec_of["0.inter_0"]
    assert by_name["0.1"].result_type == spec_of["0.output"]
    assert by_name["1"].result_type == spec_of["2.input"]  # the ReLU casts
    assert by_name["2"].step_types[0] == spec_of["2.inter_0"]
    assert by_name["3"].result_type == spec_of["4.input"]
    assert by_name["4"].result_type == spec_of["4.output"]
    for op in ops:  # the coarse biases are exported unrounded, so the test is exact
        if op.bias is not None and op.bias_type is not None:
            bias = model.get_submodule(op.layer).bias.detach().numpy()
            assert np.array_equal(np.ldexp(op.bias.astype(float), -op.bias_type.frac), bias)
    x = torch.randn(500, 10, dtype=torch.float64) * 3
    x[:20] *= 20  # saturate the input quantizer
    with torch.no_grad():
        ref = model(x).numpy()  # the torch model quantizes its own input
    np.testing.assert_array_equal(em.predict(x), ref)


def test_conflicting_input_quantizer_after_an_explicit_result_is_refused() -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    quantize(
        model, weights=FixedPoint(6, 2), activations={"1.input": FixedPoint(8, 2)}, progress=False
    )
    with pytest.raises(
        ValueError,
        match=r"1\.input quantizer .* differs from the result type "
        r"of op '0'",
    ):
        build_graph(model, FixedPoint(8, 3), result={"0": FixedPoint(12, 4)})
    # a derived result type is replaced: op 0 casts straight to the input quantizer's type
    ops = build_graph(model, FixedPoint(8, 3))
    assert ops[0].result_type == FixedPoint(8, 2) == ops[1].input_type
