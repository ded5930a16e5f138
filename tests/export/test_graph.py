"""Tests of tnquant.export.graph: pow2 folding, type derivation, refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from tnquant import FixedPoint, QuantSpec, Ternary, quantize
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
        TuckerLinear([torch.randn(6, 3), torch.randn(3, 2), torch.randn(5, 2)],
                     bias=torch.randn(6)),
        nn.ReLU(), nn.Linear(6, 2))
    quantize(model, weights=FixedPoint(8, 2), progress=False)
    narrow = FixedPoint(12, 5, rounding="RND", overflow="SAT")
    ops = build_graph(model, FixedPoint(8, 3), accum={"0.1": narrow}, result={"2": narrow})
    assert [op.name for op in ops] == ["0.0", "0.1", "0.2", "1", "2"]
    assert [op.kind for op in ops] == ["dense"] * 3 + ["relu", "dense"]
    assert [(op.in_features, op.out_features) for op in ops] == [(5, 2), (2, 3), (3, 6),
                                                                  (6, 6), (6, 2)]
    assert ops[1].accum_types == [narrow] and ops[-1].result_type == narrow
    assert ops[2].bias is not None and ops[0].bias is None
    for a, b in zip(ops[:-1], ops[1:], strict=True):
        assert b.input_type == a.result_type


def test_fixed_point_activation_quantizer_sets_the_step_type() -> None:
    layer = LowRankLinear([torch.randn(4, 2), torch.randn(2, 3)])
    model = nn.Sequential(layer)
    t = FixedPoint(10, 4, rounding="RND_CONV", overflow="SAT")
    quantize(model, cores=FixedPoint(6, 2), activations={"*.inter_0": t, "*.input": t},
             progress=False)
    ops = build_graph(model)
    assert ops[0].input_type == t and ops[0].result_type == t


def test_unsupported_layer_is_refused() -> None:
    with pytest.raises(ValueError, match="Conv2d has no fixed-point export"):
        build_graph(nn.Sequential(nn.Conv2d(1, 1, 1)), FixedPoint(8, 3))
    model = nn.Sequential(TTLinear([torch.randn(1, 2, 2, 2), torch.randn(2, 2, 2, 1)]))
    with pytest.raises(ValueError, match="input_spec is needed"):
        build_graph(model)
