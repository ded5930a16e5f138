"""TTLinear against numpy / TensorLy reconstructions of its cores."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from tests.layers.refs import (
    EXACT_RTOL,
    F64_RTOL,
    np64,
    random_cores,
    rel_err,
    tt_weight_np,
    tt_weight_tl,
)
from tnquant import TT
from tnquant.layers import TTLinear

IMPLS = ("factorized", "reconstructed", "auto")


@st.composite
def tt_setups(draw):
    d = draw(st.integers(1, 3))
    outs = draw(st.lists(st.integers(1, 4), min_size=d, max_size=d))
    ins = draw(st.lists(st.integers(1, 4), min_size=d, max_size=d))
    ranks = [1, *draw(st.lists(st.integers(1, 3), min_size=d - 1, max_size=d - 1)), 1]
    shapes = [(ranks[k], outs[k], ins[k], ranks[k + 1]) for k in range(d)]
    out_f = draw(st.integers(1, math.prod(outs)))
    in_f = draw(st.integers(1, math.prod(ins)))
    lead = tuple(draw(st.lists(st.integers(0, 3), max_size=2)))
    return shapes, out_f, in_f, lead, draw(st.booleans()), draw(st.integers(0, 2**31 - 1))


def _layer(shapes, out_f, in_f, with_bias, seed, dtype=torch.float64):
    cores = random_cores(shapes, seed, dtype)
    bias = torch.randn(out_f, dtype=dtype) if with_bias else None
    return TTLinear(cores, in_features=in_f, out_features=out_f, bias=bias), cores, bias


@settings(max_examples=150, deadline=None)
@given(tt_setups(), st.sampled_from(IMPLS))
def test_forward_matches_dense_reference(setup, impl):
    shapes, out_f, in_f, lead, with_bias, seed = setup
    layer, cores, bias = _layer(shapes, out_f, in_f, with_bias, seed)
    layer.implementation = impl
    x = torch.randn(*lead, in_f, dtype=torch.float64)
    w = tt_weight_np(cores, out_f, in_f)
    ref = np64(x) @ w.T + (np64(bias) if bias is not None else 0.0)
    got = layer(x)
    assert got.shape == (*lead, out_f)
    np.testing.assert_allclose(np64(got), ref, rtol=F64_RTOL, atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(tt_setups())
def test_to_dense_matches_tensorly(setup):
    shapes, out_f, in_f, _, with_bias, seed = setup
    layer, cores, bias = _layer(shapes, out_f, in_f, with_bias, seed)
    dense = layer.to_dense()
    assert isinstance(dense, nn.Linear)
    assert (dense.in_features, dense.out_features) == (in_f, out_f)
    np.testing.assert_allclose(
        np64(dense.weight), np64(tt_weight_tl(cores, out_f, in_f)), rtol=F64_RTOL, atol=1e-12
    )
    if with_bias:
        assert torch.equal(dense.bias, bias)
    else:
        assert dense.bias is None


def test_padding_never_changes_outputs():
    # cores cover 4*4 = 16 inputs and 3*3 = 9 outputs; the layer uses 13 -> 7
    cores = random_cores([(1, 3, 4, 2), (2, 3, 4, 1)], 1)
    layer = TTLinear(cores, in_features=13, out_features=7)
    x = torch.randn(5, 13, dtype=torch.float64)
    full = tt_weight_np(cores, 9, 16)
    # the padded columns hold non-zero weights: zero padding must hide them
    assert np.abs(full[:, 13:]).max() > 0.1
    for impl in ("factorized", "reconstructed"):
        layer.implementation = impl
        np.testing.assert_allclose(np64(layer(x)), np64(x) @ full[:7, :13].T, rtol=F64_RTOL)


@pytest.mark.parametrize("impl", ["factorized", "reconstructed"])
def test_gradcheck(impl):
    cores = random_cores([(1, 2, 3, 2), (2, 3, 2, 2), (2, 2, 2, 1)], 2)
    layer = TTLinear(
        cores, in_features=10, out_features=11, bias=torch.randn(11, dtype=torch.float64)
    )
    layer.implementation = impl
    x = torch.randn(3, 10, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, *ps: layer(x), (x, *layer.parameters()))


@pytest.mark.parametrize(("out_f", "in_f", "order"), [(12, 10, 2), (13, 7, 3), (16, 16, 2)])
def test_full_rank_from_dense_reproduces_dense(out_f, in_f, order):
    torch.manual_seed(0)
    dense = nn.Linear(in_f, out_f, dtype=torch.float64)
    spec = TT(rank="full", order=order)
    layer = TTLinear.from_dense(dense, spec)
    x = torch.randn(4, in_f, dtype=torch.float64)
    assert rel_err(np64(layer(x)), np64(dense(x))) < EXACT_RTOL
    assert layer.spec is spec
    info = layer.decomposition_info
    assert info["rel_error"] < EXACT_RTOL
    assert info["ranks"] == layer.ranks == tuple(c.shape[3] for c in layer.cores[:-1])
    assert layer.in_features == in_f and layer.out_features == out_f


def test_from_dense_ratio_counts():
    torch.manual_seed(0)
    dense = nn.Linear(64, 48)
    layer = TTLinear.from_dense(dense, TT(ratio=0.2, order=2))
    core_params = sum(c.numel() for c in layer.cores)
    assert layer.n_params == core_params + 48
    assert layer.dense_params == 64 * 48 + 48
    assert layer.compression_ratio == pytest.approx((64 * 48 + 48) / (core_params + 48))
    assert layer.compression_ratio > 2
    assert layer.cores[0].dtype == torch.float32
    assert isinstance(layer.cores, nn.ParameterList)


def test_from_dense_refuses_wrong_module_and_spec():
    from tnquant import Tucker

    with pytest.raises(TypeError, match="expects an nn.Linear, got Conv2d"):
        TTLinear.from_dense(nn.Conv2d(2, 2, 1), TT(rank=2))
    with pytest.raises(TypeError, match="expects a TT spec, got Tucker"):
        TTLinear.from_dense(nn.Linear(4, 4), Tucker(rank=2))


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float16, 5e-3), (torch.bfloat16, 3e-2)])
def test_half_precision_matches_float32(dtype, tol):
    cores = random_cores([(1, 4, 4, 3), (3, 4, 4, 3), (3, 2, 2, 1)], 3, torch.float32, 0.5)
    layer = TTLinear(cores, in_features=30, out_features=30, bias=torch.randn(30))
    x = torch.randn(6, 30)
    for impl in ("factorized", "reconstructed"):
        layer.implementation = impl
        ref = layer(x)
        half = TTLinear(
            [c.to(dtype) for c in cores],
            in_features=30,
            out_features=30,
            bias=layer.bias.detach().to(dtype),
        )
        half.implementation = impl
        out = half(x.to(dtype))
        assert out.dtype == dtype
        assert rel_err(np64(out), np64(ref)) < tol


def test_wrong_input_size_names_expected_and_got():
    layer = TTLinear(random_cores([(1, 2, 3, 1)], 0), in_features=3)
    with pytest.raises(ValueError, match=r"expects input of shape \(\.\.\., 3\), got \(2, 4\)"):
        layer(torch.randn(2, 4, dtype=torch.float64))
    with pytest.raises(TypeError, match="expects a torch.Tensor, got list"):
        layer([1.0, 2.0, 3.0])


def test_bad_cores_are_refused():
    with pytest.raises(ValueError, match=r"bond rank.*must be 2, got 3"):
        TTLinear(random_cores([(1, 2, 2, 2), (3, 2, 2, 1)], 0))
    with pytest.raises(ValueError, match=r"boundary rank r_0\) must be 1, got 2"):
        TTLinear(random_cores([(2, 2, 2, 1)], 0))
    with pytest.raises(ValueError, match="must be 4-d"):
        TTLinear([torch.randn(2, 2)])
    with pytest.raises(ValueError, match=r"prod\(in_shape\) must be >= in_features"):
        TTLinear(random_cores([(1, 2, 2, 1)], 0), in_features=3)
    with pytest.raises(ValueError, match=r"bias must have shape \(2,\), got \(3,\)"):
        TTLinear(random_cores([(1, 2, 2, 1)], 0), bias=torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="share dtype"):
        TTLinear([torch.randn(1, 2, 2, 2), torch.randn(2, 2, 2, 1, dtype=torch.float64)])


def test_flops_against_hand_count():
    # d = 2, shapes (1, o1, i1, r), (r, o2, i2, 1)
    o1, i1, o2, i2, r, b = 4, 5, 3, 6, 2, 7
    layer = TTLinear(random_cores([(1, o1, i1, r), (r, o2, i2, 1)], 0))
    right_to_left = 2 * b * i1 * i2 * o2 * r + 2 * b * i1 * r * o2 * o1
    left_to_right = 2 * b * i1 * i2 * o1 * r + 2 * b * i2 * r * o1 * o2
    rebuild = 2 * o1 * i1 * o2 * i2 * r
    flops = layer.flops(b)
    assert flops["factorized"] <= min(right_to_left, left_to_right)
    assert flops["dense"] == 2 * b * o1 * o2 * i1 * i2
    assert flops["reconstructed"] == rebuild + flops["dense"]
    assert flops["chosen"] in ("factorized", "reconstructed")


def test_auto_takes_reconstruction_when_it_is_cheaper():
    # high ranks, big batch: rebuilding the 16x16 weight once beats the chain
    layer = TTLinear(random_cores([(1, 4, 4, 16), (16, 4, 4, 1)], 0))
    assert layer.flops(4096)["chosen"] == "reconstructed"
    x = torch.randn(4096, 16, dtype=torch.float64)
    w = tt_weight_np(layer.cores, 16, 16)
    np.testing.assert_allclose(np64(layer(x)), np64(x) @ w.T, rtol=F64_RTOL)


def test_intermediates_and_default_spec():
    layer = TTLinear(random_cores([(1, 2, 2, 3), (3, 2, 2, 2), (2, 2, 2, 1)], 0))
    assert layer.intermediate_names() == ("inter_0", "inter_1")
    assert sorted(layer.chain_order) == [0, 1, 2]
    assert layer.spec == TT(rank=(3, 2), in_shape=(2, 2, 2), out_shape=(2, 2, 2))
    assert layer.ranks == (3, 2)
    assert "in_shape=(2, 2, 2)" in repr(layer)


def test_from_dense_passes_the_name_to_decomposition_errors():
    dense = nn.Linear(4, 4)
    with torch.no_grad():
        dense.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="blocks.0.fc has 1 non-finite"):
        TTLinear.from_dense(dense, TT(rank=2, order=2), name="blocks.0.fc")
