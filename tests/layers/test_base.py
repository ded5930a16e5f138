"""The FactorizedLayer contract: quantizer hooks, counts, module plumbing."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from tests.layers.refs import F64_RTOL, np64, random_cores, tt_weight_np
from tnquant.layers import (
    CPConv2d,
    FactorizedLayer,
    LowRankLinear,
    TTEmbedding,
    TTLinear,
    TuckerConv2d,
    TuckerLinear,
)


class Round(nn.Module):
    """A stand-in core quantizer: round to a grid of 1/4."""

    def forward(self, t):
        return torch.round(t * 4) / 4


class Record(nn.Module):
    """A stand-in activation quantizer: doubles its input and records the shape."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def forward(self, t):
        self.shapes.append(tuple(t.shape))
        return 2 * t


def all_layers():
    f64 = torch.float64
    return [
        LowRankLinear(random_cores([(6, 2), (2, 5)], 0), bias=torch.randn(6, dtype=f64)),
        TuckerLinear(random_cores([(6, 3), (3, 2), (5, 2)], 1)),
        TuckerLinear(random_cores([(2, 2, 1, 2), (2, 2), (3, 2), (3, 1), (2, 2)], 2)),
        TTLinear(random_cores([(1, 2, 3, 2), (2, 3, 2, 1)], 3), in_features=5),
        TuckerConv2d(random_cores([(4, 2), (2, 2, 3, 3), (3, 2)], 4), padding=1),
        CPConv2d(random_cores([(4, 2), (3, 2), (3, 2), (3, 2)], 5), padding=1),
        TTEmbedding(random_cores([(1, 3, 2, 2), (2, 3, 2, 2), (2, 2, 2, 1)], 6)),
    ]


def _input(layer):
    if isinstance(layer, TTEmbedding):
        return torch.tensor([[0, 5], [17, 3]])
    if isinstance(layer, (TuckerConv2d, CPConv2d)):
        return torch.randn(2, layer.in_channels, 5, 5, dtype=torch.float64)
    return torch.randn(3, layer.in_features, dtype=torch.float64)


@pytest.mark.parametrize("layer", all_layers(), ids=lambda m: type(m).__name__)
def test_core_quantizers_feed_every_forward(layer):
    x = _input(layer)
    plain = [c.detach().clone() for c in layer.cores]
    rounded = [torch.round(c * 4) / 4 for c in plain]
    # the reference: a layer built from the already-rounded cores
    twin = copy.deepcopy(layer)
    with torch.no_grad():
        for p, r in zip(twin.cores, rounded, strict=True):
            p.copy_(r)
    layer.core_quantizers = nn.ModuleList([Round() for _ in layer.cores])
    for impl in layer.implementations:
        layer.implementation = twin.implementation = impl
        np.testing.assert_allclose(np64(layer(x)), np64(twin(x)), rtol=F64_RTOL, atol=1e-12)
    # the stored cores are left as they were
    assert all(torch.equal(c, p) for c, p in zip(layer.cores, plain, strict=True))
    np.testing.assert_allclose(np64(layer.to_dense().weight), np64(twin.to_dense().weight))
    layer.core_quantizers = nn.ModuleList([Round()])
    with pytest.raises(ValueError, match="one module per core"):
        layer(x)
    layer.core_quantizers = None
    assert layer.effective_cores()[0] is layer.cores[0]


@pytest.mark.parametrize("layer", all_layers(), ids=lambda m: type(m).__name__)
def test_intermediate_quantizers_run_the_chain(layer):
    x = _input(layer)
    reference = layer(x)
    names = layer.intermediate_names()
    quantizers = {n: Record() for n in names}
    quantizers["output"] = Record()
    layer.act_quantizers = nn.ModuleDict(quantizers)
    out = layer(x)
    # each intermediate doubled once: a multilinear chain scales by 2 ** len(names),
    # and the output quantizer doubles once more (the bias is added before it)
    bias = getattr(layer, "bias", None)
    if bias is None:
        expected = reference * 2 ** (len(names) + 1)
    else:
        shape = (-1, 1, 1) if isinstance(layer, (TuckerConv2d, CPConv2d)) else (-1,)
        expected = 2 * ((reference - bias.reshape(shape)) * 2 ** len(names) + bias.reshape(shape))
    np.testing.assert_allclose(np64(out), np64(expected), rtol=1e-9, atol=1e-12)
    for n in names:
        assert len(quantizers[n].shapes) == 1
    layer.act_quantizers = nn.ModuleDict({"inter_99": Record()})
    with pytest.raises(ValueError, match="got act_quantizers for"):
        layer(x)


def test_input_quantizer_and_reconstructed_refusal():
    layer = LowRankLinear(random_cores([(6, 2), (2, 5)], 0))
    x = torch.randn(3, 5, dtype=torch.float64)
    ref = layer(x)
    layer.act_quantizers = nn.ModuleDict({"input": Record()})
    np.testing.assert_allclose(np64(layer(x)), 2 * np64(ref), rtol=F64_RTOL)
    layer.act_quantizers = nn.ModuleDict({"inter_0": Record()})
    layer.implementation = "reconstructed"
    with pytest.raises(ValueError, match="has no intermediate results"):
        layer(x)


def test_tt_intermediates_follow_the_chain_order():
    cores = random_cores([(1, 2, 3, 2), (2, 3, 2, 3), (3, 2, 2, 1)], 7)
    layer = TTLinear(cores)
    rec = {n: Record() for n in layer.intermediate_names()}
    layer.act_quantizers = nn.ModuleDict(rec)
    x = torch.randn(4, 12, dtype=torch.float64)
    out = layer(x)
    w = tt_weight_np(cores, 12, 12)
    np.testing.assert_allclose(np64(out), 4 * np64(x) @ w.T, rtol=F64_RTOL)
    # every intermediate keeps the batch first and holds B * (remaining inputs) * rank * outs
    for shapes in (r.shapes for r in rec.values()):
        assert shapes[0][0] == 4


def test_module_plumbing():
    layer = TTLinear(
        random_cores([(1, 2, 3, 2), (2, 3, 2, 1)], 3),
        in_features=5,
        bias=torch.zeros(6, dtype=torch.float64),
    )
    assert isinstance(layer, FactorizedLayer)
    names = [n for n, _ in layer.named_parameters()]
    assert sorted(names) == ["bias", "cores.0", "cores.1"]
    fresh = TTLinear(
        random_cores([(1, 2, 3, 2), (2, 3, 2, 1)], 9),
        in_features=5,
        bias=torch.ones(6, dtype=torch.float64),
    )
    fresh.load_state_dict(layer.state_dict())
    x = torch.randn(2, 5, dtype=torch.float64)
    np.testing.assert_allclose(np64(fresh(x)), np64(layer(x)), rtol=F64_RTOL)
    half = copy.deepcopy(layer).to(torch.float32)
    assert half(x.float()).dtype == torch.float32
    assert layer.core_quantizers is None and layer.act_quantizers is None
    assert "compression" in repr(layer) and "ranks=(2,)" in repr(layer)


def test_plan_cache_is_bounded(monkeypatch):
    from tnquant.layers import base

    monkeypatch.setattr(base, "MAX_PLANS", 4)
    layer = LowRankLinear(random_cores([(6, 2), (2, 5)], 0))
    w = np64(layer.cores[0]) @ np64(layer.cores[1])
    for n in range(1, 12):
        x = torch.randn(n, 5, dtype=torch.float64)
        np.testing.assert_allclose(np64(layer(x)), np64(x) @ w.T, rtol=F64_RTOL)
        assert len(layer._plans) <= 4
