"""The shared Linear forward: time-model planning and the inference cache.

Every output is compared with a numpy reconstruction of the weight from the
raw cores (tests/layers/refs.py), never with the layer's own other path.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from tests.layers.refs import F64_RTOL, np64, random_cores, tt_weight_np, tucker_weight_np
from tnquant.layers import LowRankLinear, TTLinear, TuckerLinear
from tnquant.layers.contract import plan_einsum
from tnquant.layers.tucker import _blocks, _tucker_paths


def lowrank():
    return LowRankLinear(
        random_cores([(12, 3), (3, 10)], 0), bias=torch.randn(12, dtype=torch.float64)
    ), lambda cs: np64(cs[0]) @ np64(cs[1])


def tucker1():
    return TuckerLinear(random_cores([(12, 3), (3, 2), (10, 2)], 1)), tucker_weight_np


def tucker3():
    shapes = [(2, 2, 3, 2, 2, 2), (3, 2), (2, 2), (4, 3), (2, 2), (3, 2), (2, 2)]
    layer = TuckerLinear(
        random_cores(shapes, 2),
        in_features=11,
        out_features=20,
        bias=torch.randn(20, dtype=torch.float64),
    )
    return layer, lambda cs: tucker_weight_np(cs, 20, 11)


def tt():
    shapes = [(1, 3, 2, 4), (4, 2, 3, 3), (3, 2, 2, 1)]
    layer = TTLinear(random_cores(shapes, 3), in_features=10, out_features=12)
    return layer, lambda cs: tt_weight_np(cs, 12, 10)


LAYERS = [lowrank, tucker1, tucker3, tt]


def reference(layer, weight_of, x):
    w = weight_of(list(layer.cores))
    bias = np64(layer.bias) if layer.bias is not None else 0.0
    return np64(x) @ w.T + bias


@pytest.mark.parametrize("make", LAYERS)
@pytest.mark.parametrize("impl", ["auto", "factorized", "reconstructed"])
@pytest.mark.parametrize("batch", [1, 7, 300])
def test_no_grad_forward_matches_reference(make, impl, batch):
    layer, weight_of = make()
    layer.implementation = impl
    x = torch.randn(batch, layer.in_features, dtype=torch.float64)
    with torch.no_grad():
        first = layer(x)
        second = layer(x)  # from the cache
        assert layer._prepared_cache
    ref = reference(layer, weight_of, x)
    np.testing.assert_allclose(np64(first), ref, rtol=F64_RTOL, atol=1e-12)
    np.testing.assert_allclose(np64(second), ref, rtol=F64_RTOL, atol=1e-12)


@pytest.mark.parametrize("make", LAYERS)
def test_cache_follows_every_kind_of_core_change(make):
    layer, weight_of = make()
    x = torch.randn(5, layer.in_features, dtype=torch.float64)

    def check():
        with torch.no_grad():
            got = layer(x)
        np.testing.assert_allclose(
            np64(got), reference(layer, weight_of, x), rtol=F64_RTOL, atol=1e-12
        )

    check()
    with torch.no_grad():  # in place: the version counter moves
        layer.cores[0].mul_(2)
    check()
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)  # an optimizer step
    layer(x).sum().backward()
    opt.step()
    check()
    fresh, _ = make()  # load_state_dict copies in place
    with torch.no_grad():
        for c in fresh.cores:
            c.add_(1)
    layer.load_state_dict(fresh.state_dict())
    check()
    layer.cores[-1] = nn.Parameter(layer.cores[-1].detach() * 3)  # a new parameter
    check()
    layer.cores[0].data = layer.cores[0].data * -1  # .data swapped: new storage
    check()


def test_cache_follows_dtype_and_copies():
    layer, weight_of = lowrank()
    x = torch.randn(4, 10, dtype=torch.float64)
    with torch.no_grad():
        layer(x)
        twin = copy.deepcopy(layer)
        with torch.no_grad():
            twin.cores[1].zero_()
        np.testing.assert_allclose(
            np64(twin(x)), np64(twin.bias).reshape(1, -1).repeat(4, 0), rtol=F64_RTOL
        )
        np.testing.assert_allclose(np64(layer(x)), reference(layer, weight_of, x), rtol=F64_RTOL)
        half = layer.to(torch.float32)
        got = half(x.float())
    assert got.dtype == torch.float32
    np.testing.assert_allclose(np64(got), reference(layer, weight_of, x), rtol=1e-4, atol=1e-4)


def test_no_cache_with_autograd_quantizers_or_when_off():
    layer, weight_of = lowrank()
    x = torch.randn(4, 10, dtype=torch.float64)
    out = layer(x)  # autograd on: no cache, gradients flow to the cores
    assert out.requires_grad and not layer._prepared_cache
    out.sum().backward()
    assert layer.cores[0].grad is not None
    layer.inference_cache = False
    with torch.no_grad():
        layer(x)
    assert not layer._prepared_cache
    layer.inference_cache = True

    class Double(nn.Module):
        def forward(self, t):
            return 2 * t

    layer.core_quantizers = nn.ModuleList([Double(), nn.Identity()])
    with torch.no_grad():
        got = layer(x)
    assert not layer._prepared_cache
    w = 2 * np64(layer.cores[0]) @ np64(layer.cores[1])
    np.testing.assert_allclose(np64(got), np64(x) @ w.T + np64(layer.bias), rtol=F64_RTOL)


def test_clear_cache_and_inference_mode():
    layer, weight_of = tt()
    x = torch.randn(3, 10, dtype=torch.float64)
    with torch.inference_mode():
        layer(x)
    assert layer._prepared_cache
    layer.clear_cache()
    assert not layer._prepared_cache
    with torch.no_grad():  # entries built under inference_mode are usable outside it
        layer(x)
        layer.cores[1].data.mul_(0)  # invisible to the version counter ...
        layer.clear_cache()  # ... hence clear_cache()
        got = layer(x)
    np.testing.assert_allclose(np64(got), reference(layer, weight_of, x), rtol=F64_RTOL, atol=1e-12)


def test_auto_reuses_the_cached_weight_at_large_batch():
    # high ranks: the TT chain costs more than the dense matmul, so with the
    # cache 'auto' runs F.linear on the kept weight
    layer = TTLinear(random_cores([(1, 4, 4, 16), (16, 4, 4, 1)], 0))
    assert layer.flops(512)["chosen"] == "reconstructed"
    with torch.no_grad():
        flops = layer.flops(512)
        assert flops["cached"] and flops["cheapest"] == flops["dense"] and flops["calls"] == 1
        x = torch.randn(512, 16, dtype=torch.float64)
        got = layer(x)
        (entry,) = layer._prepared_cache.values()
    w = tt_weight_np(layer.cores, 16, 16)
    np.testing.assert_allclose(np64(entry[2]), w, rtol=F64_RTOL)
    np.testing.assert_allclose(np64(got), np64(x) @ w.T, rtol=F64_RTOL)


def test_blocks_are_every_split_into_runs():
    assert _blocks(1) == [[[0]]]
    assert sorted(map(str, _blocks(3))) == sorted(
        map(str, [[[0], [1], [2]], [[0], [1, 2]], [[0, 1], [2]], [[0, 1, 2]]])
    )
    assert len(_blocks(4)) == 8


@pytest.mark.parametrize("d", [2, 3])
def test_every_tucker_candidate_order_is_right(d):
    ins, outs = [2, 3, 2][:d], [3, 2, 2][:d]
    ranks = [2, 1, 2, 2, 2, 1][: 2 * d]
    shapes = [tuple(ranks)] + [(n, r) for n, r in zip(outs + ins, ranks, strict=True)]
    layer = TuckerLinear(random_cores(shapes, d))
    x = torch.randn(4, layer.in_features, dtype=torch.float64)
    ref = np64(x) @ tucker_weight_np(list(layer.cores)).T
    paths = _tucker_paths(d)
    n = len(_blocks(d))
    assert len(paths) == n * n + 2 * n  # G alone, or folded into a one-run side
    for path in paths:
        prog = plan_einsum(
            layer._x_eq, layer._x_shapes(4), candidates=[path], search=False, variable=0
        )
        xt = x.reshape(4, *layer.in_shape)
        got = prog.run(xt, prog.prepare(list(layer.cores))).reshape(4, -1)
        np.testing.assert_allclose(np64(got), ref, rtol=F64_RTOL, atol=1e-12)
