"""Tests of tnquant.export.graph: pow2 folding, type derivation, refusals."""

from __future__ import annotations

import re
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tnquant import FixedPoint, QuantSpec, Ternary, quantize
from tnquant.export import fixed_point
from tnquant.export.graph import build_graph, fixed_codes, lossless_accum
from tnquant.layers import LowRankLinear, TTLinear, TuckerLinear
from tnquant.quant import Quantizer


def test_pow2_per_channel_folds_exactly() -> None:
    torch.manual_seed(0)
    w = torch.randn(5, 7) * torch.tensor([0.1, 1.0, 4.0, 0.02, 1.0])[:, None]
    q = Quantizer(QuantSpec(bits=5, scale="pow2", granularity="channel", axis=0))
    m, spec, exps = fixed_codes(q, w, "w")
    # the reference: the fake-quant values, rescaled by the chosen binary point
    ref = q(w).double() * 2.0**spec.frac
    assert np.array_equal(m, ref.numpy().astype(np.int64))
    assert np.array_equal(m.astype(np.float64), ref.numpy())
    assert m.min() >= spec.qmin and m.max() <= spec.qmax
    assert spec.frac == -min(exps)


def test_non_pow2_scale_is_refused_with_the_tensor_name() -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    quantize(model, weights={"0": QuantSpec(4, scale="pow2"), "2": QuantSpec(4)}, progress=False)
    with pytest.raises(ValueError, match=r"2\.weight.*not a power of two.*scale='pow2'"):
        build_graph(model, FixedPoint(8, 3))


def test_unquantized_core_and_ternary_float_scale_are_refused() -> None:
    layer = LowRankLinear([torch.randn(4, 2), torch.randn(2, 3)])
    quantize(nn.Sequential(layer), cores={0: FixedPoint(6, 2)}, progress=False)
    with pytest.raises(ValueError, match=r"0\.cores\.1 has no quantizer"):
        build_graph(nn.Sequential(layer), FixedPoint(8, 3))
    model = nn.Sequential(nn.Linear(4, 3))
    quantize(model, weights=Ternary(), progress=False)
    with pytest.raises(ValueError, match="0.weight has scale"):
        build_graph(model, FixedPoint(8, 3))


def test_lossless_accum_widths() -> None:
    # W1.F1 x W2.F2 -> W1+W2 bits with F1+F2 fractional, + ceil(log2 n) integer bits
    acc = lossless_accum(FixedPoint(10, 4), FixedPoint(6, 1), 9)
    assert (acc.width, acc.frac) == (10 + 6 + 4, 6 + 5)
    acc = lossless_accum(FixedPoint(10, 4), FixedPoint(6, 1), 9, FixedPoint(20, 12))
    assert (acc.integer, acc.frac) == (13, 11)


def test_chain_layers_give_steps_and_overrides_apply() -> None:
    torch.manual_seed(1)
    model = nn.Sequential(
        TuckerLinear(
            [torch.randn(6, 3), torch.randn(3, 2), torch.randn(5, 2)], bias=torch.randn(6)
        ),
        nn.ReLU(),
        nn.Linear(6, 2),
    )
    quantize(model, weights=FixedPoint(8, 2), progress=False)
    narrow = FixedPoint(12, 5, rounding="RND", overflow="SAT")
    ops = build_graph(model, FixedPoint(8, 3), accum={"0.1": narrow}, result={"2": narrow})
    assert [op.name for op in ops] == ["0.0", "0.1", "0.2", "1", "2"]
    assert [op.kind for op in ops] == ["dense"] * 3 + ["relu", "dense"]
    assert [(op.in_features, op.out_features) for op in ops] == [
        (5, 2),
        (2, 3),
        (3, 6),
        (6, 6),
        (6, 2),
    ]
    assert ops[1].accum_types == [narrow] and ops[-1].result_type == narrow
    assert ops[2].bias is not None and ops[0].bias is None
    for a, b in zip(ops[:-1], ops[1:], strict=True):
        assert b.input_type == a.result_type


def test_fixed_point_activation_quantizer_sets_the_step_type() -> None:
    layer = LowRankLinear([torch.randn(4, 2), torch.randn(2, 3)])
    model = nn.Sequential(layer)
    t = FixedPoint(10, 4, rounding="RND_CONV", overflow="SAT")
    quantize(
        model, cores=FixedPoint(6, 2), activations={"*.inter_0": t, "*.input": t}, progress=False
    )
    ops = build_graph(model)
    assert ops[0].input_type == t and ops[0].result_type == t


def test_unsupported_layer_is_refused() -> None:
    with pytest.raises(ValueError, match="Conv2d has no fixed-point export"):
        build_graph(nn.Sequential(nn.Conv2d(1, 1, 1)), FixedPoint(8, 3))
    model = nn.Sequential(TTLinear([torch.randn(1, 2, 2, 2), torch.randn(2, 2, 2, 1)]))
    with pytest.raises(ValueError, match="input_spec is needed"):
        build_graph(model)


def _deep_chain() -> nn.Module:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4))
    quantize(model, weights=FixedPoint(16, 4), progress=False)
    return model


def test_accumulator_past_64_bits_names_the_op_and_how_to_narrow(tmp_path: Path) -> None:
    # lossless widths add up: 24 + 16 + 2 + 1 = 43, 43 + 19 = 62, 62 + 19 = 81 bits
    out = tmp_path / "out"
    with pytest.raises(
        ValueError,
        match=r"op '2': its accumulator needs 81 bits \(lossless: .*\), wider than 62 .* "
        r"narrow the input with result=\{'1': FixedPoint\(",
    ) as err:
        fixed_point(_deep_chain(), out, FixedPoint(24, 8), hls4ml=False)
    assert "accum={'2'" in str(err.value) and not out.exists()
    w, i = (int(v) for v in re.search(r"'1': FixedPoint\((\d+), (-?\d+)", str(err.value)).groups())  # type: ignore[union-attr]
    em = fixed_point(
        _deep_chain(),
        out,
        FixedPoint(24, 8),
        hls4ml=False,
        result={"1": FixedPoint(w, i, rounding="RND", overflow="SAT")},
    )
    assert em.ops[2].accum_types[0].width <= 62


def test_per_channel_type_is_as_wide_as_the_aligned_mantissas_reach() -> None:
    q = Quantizer(QuantSpec(bits=5, scale="pow2", granularity="channel", axis=0))
    q.freeze(torch.tensor([[4.0, 1.0, 1.0], [0.01, 0.0, 0.0]]))  # scales 2**-1 and 2**-10
    w = torch.tensor([[1.0, -0.5, 0.5], [0.01, -0.008, 0.004]])
    m, spec, exps = fixed_codes(q, w, "w")
    frac = -min(exps)
    ref = [[int(Fraction(v) * 2**frac) for v in row] for row in q(w).double().tolist()]
    assert m.tolist() == ref and exps == [-10, -1]
    hi = max(max(abs(v) for v in row) for row in ref)
    assert spec.width == max(5, hi.bit_length() + 1) == 12  # was 5 + 9 = 14
    assert spec.frac == frac


def test_tt_step_products_and_bias_types_past_62_bits_are_refused() -> None:
    torch.manual_seed(4)
    layer = TTLinear([torch.randn(1, 2, 2, 2), torch.randn(2, 2, 2, 1)], bias=torch.randn(4))
    model = nn.Sequential(layer)
    quantize(model, cores=FixedPoint(30, 2), progress=False)
    # step 1 multiplies step 0's 40-bit result by 30-bit cores: 70 bits
    with pytest.raises(
        ValueError,
        match=r"op '0\.1': its products need 70 bits \(its input ap_fixed<40,20> times its "
        r"weights ap_fixed<30,2>\).*narrow the input with result=\{'0\.0': FixedPoint\(",
    ):
        build_graph(
            model,
            FixedPoint(8, 3),
            result={"0.0": FixedPoint(40, 20)},
            accum={"0.1": FixedPoint(60, 30)},
        )
    with pytest.raises(
        ValueError,
        match=r"op '0\.1': its bias needs 63 bits \(ap_fixed<63,10>\), wider than 62 .*"
        r"bias=\{'0\.1': FixedPoint\(",
    ):
        build_graph(
            model,
            FixedPoint(8, 3),
            bias=FixedPoint(63, 10),
            accum=FixedPoint(40, 20),
            result=FixedPoint(16, 8),
        )
