"""TuckerLinear (order 1 and tensorized) and TuckerConv2d against independent references."""

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
    tucker_kernel_np,
    tucker_kernel_tl,
    tucker_weight_np,
    tucker_weight_tl,
)
from tnquant import Tucker
from tnquant.layers import TuckerConv2d, TuckerLinear

IMPLS = ("factorized", "reconstructed", "auto")


@st.composite
def tucker_linear_setups(draw):
    order = draw(st.integers(1, 3))
    if order == 1:
        out_f, in_f = draw(st.integers(1, 8)), draw(st.integers(1, 8))
        r_out, r_in = draw(st.integers(1, 4)), draw(st.integers(1, 4))
        shapes = [(out_f, r_out), (r_out, r_in), (in_f, r_in)]
    else:
        outs = draw(st.lists(st.integers(1, 3), min_size=order, max_size=order))
        ins = draw(st.lists(st.integers(1, 3), min_size=order, max_size=order))
        ranks = draw(st.lists(st.integers(1, 3), min_size=2 * order, max_size=2 * order))
        shapes = [tuple(ranks)] + [(n, r) for n, r in zip(outs + ins, ranks, strict=True)]
        out_f = draw(st.integers(1, math.prod(outs)))
        in_f = draw(st.integers(1, math.prod(ins)))
    lead = tuple(draw(st.lists(st.integers(0, 3), max_size=2)))
    return shapes, out_f, in_f, lead, draw(st.booleans()), draw(st.integers(0, 2**31 - 1))


@settings(max_examples=150, deadline=None)
@given(tucker_linear_setups(), st.sampled_from(IMPLS))
def test_linear_forward_matches_dense_reference(setup, impl):
    shapes, out_f, in_f, lead, with_bias, seed = setup
    cores = random_cores(shapes, seed)
    bias = torch.randn(out_f, dtype=torch.float64) if with_bias else None
    layer = TuckerLinear(cores, in_features=in_f, out_features=out_f, bias=bias)
    layer.implementation = impl
    x = torch.randn(*lead, in_f, dtype=torch.float64)
    w = tucker_weight_np(cores, out_f, in_f)
    ref = np64(x) @ w.T + (np64(bias) if bias is not None else 0.0)
    got = layer(x)
    assert got.shape == (*lead, out_f)
    np.testing.assert_allclose(np64(got), ref, rtol=F64_RTOL, atol=1e-12)


@settings(max_examples=20, deadline=None)
@given(tucker_linear_setups())
def test_linear_to_dense_matches_tensorly(setup):
    shapes, out_f, in_f, _, _, seed = setup
    cores = random_cores(shapes, seed)
    layer = TuckerLinear(cores, in_features=in_f, out_features=out_f)
    np.testing.assert_allclose(
        np64(layer.to_dense().weight),
        np64(tucker_weight_tl(cores, out_f, in_f)),
        rtol=F64_RTOL,
        atol=1e-12,
    )


@pytest.mark.parametrize("impl", ["factorized", "reconstructed"])
@pytest.mark.parametrize(
    "shapes", [[(4, 2), (2, 3), (5, 3)], [(2, 2, 1, 2), (2, 2), (3, 2), (3, 1), (2, 2)]]
)
def test_linear_gradcheck(shapes, impl):
    cores = random_cores(shapes, 0)
    out_f = shapes[0][0] if len(shapes) == 3 else 5
    layer = TuckerLinear(cores, out_features=out_f, bias=torch.randn(out_f, dtype=torch.float64))
    layer.implementation = impl
    x = torch.randn(3, layer.in_features, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, *ps: layer(x), (x, *layer.parameters()))


@pytest.mark.parametrize("spec", [Tucker(rank="full"), Tucker(rank="full", order=2)])
def test_linear_full_rank_from_dense(spec):
    torch.manual_seed(0)
    dense = nn.Linear(11, 6, dtype=torch.float64)
    layer = TuckerLinear.from_dense(dense, spec)
    x = torch.randn(4, 11, dtype=torch.float64)
    assert rel_err(np64(layer(x)), np64(dense(x))) < EXACT_RTOL
    assert layer.order == spec.order


def test_linear_layouts_and_names():
    order1 = TuckerLinear(random_cores([(6, 3), (3, 2), (5, 2)], 0))
    assert order1.intermediate_names() == ("inter_0", "inter_1")
    assert order1.spec == Tucker(rank=(3, 2)) and order1.ranks == (3, 2)
    order2 = TuckerLinear(random_cores([(2, 2, 1, 2), (2, 2), (3, 2), (3, 1), (2, 2)], 0))
    assert (order2.out_shape, order2.in_shape) == ((2, 3), (3, 2))
    assert order2.intermediate_names() == ("inter_0", "inter_1", "inter_2", "inter_3")
    with pytest.raises(ValueError, match=r"cores\[2\].shape\[1\] \(G.shape\[1\]\) must be 2"):
        TuckerLinear(random_cores([(2, 2, 1, 2), (2, 2), (3, 3), (3, 1), (2, 2)], 0))
    with pytest.raises(ValueError, match="takes"):
        TuckerLinear(random_cores([(2, 2, 2), (2, 2), (3, 2), (3, 2)], 0))
    with pytest.raises(ValueError, match=r"expects input of shape \(\.\.\., 5\), got \(1, 6\)"):
        order1(torch.randn(1, 6, dtype=torch.float64))


# --------------------------------------------------------------------------- #
# TuckerConv2d
# --------------------------------------------------------------------------- #

PADDINGS = st.one_of(
    st.integers(0, 2),
    st.tuples(st.integers(0, 2), st.integers(0, 2)),
    st.sampled_from(["same", "valid"]),
)


@st.composite
def conv_setups(draw):
    o, i = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    padding = draw(PADDINGS)
    stride = (1, 1) if padding == "same" else (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    mode = draw(st.sampled_from(["zeros", "zeros", "reflect", "replicate", "circular"]))
    h = draw(st.integers(2 * max(kh, kw) + 1, 8))
    w = draw(st.integers(2 * max(kh, kw) + 1, 8))
    n = draw(st.integers(1, 2))
    return (
        (o, i, kh, kw),
        padding,
        stride,
        dilation,
        mode,
        (n, i, h, w),
        draw(st.booleans()),
        draw(st.integers(0, 2**31 - 1)),
    )


def dense_conv_reference(kernel, bias, x, stride, padding, dilation, mode):
    """The reference: an nn.Conv2d built here, holding the kernel computed by the test."""
    o, i, kh, kw = kernel.shape
    conv = nn.Conv2d(
        i,
        o,
        (kh, kw),
        stride=stride,
        padding=padding,
        dilation=dilation,
        bias=bias is not None,
        padding_mode=mode,
        dtype=torch.float64,
    )
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(kernel))
        if bias is not None:
            conv.bias.copy_(bias)
        return conv(x)


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@settings(max_examples=100, deadline=None)
@given(conv_setups(), st.sampled_from(IMPLS), st.integers(1, 3), st.integers(1, 3))
def test_conv_forward_matches_dense_reference(setup, impl, r_out, r_in):
    (o, i, kh, kw), padding, stride, dilation, mode, xshape, with_bias, seed = setup
    cores = random_cores([(o, r_out), (r_out, r_in, kh, kw), (i, r_in)], seed)
    bias = torch.randn(o, dtype=torch.float64) if with_bias else None
    layer = TuckerConv2d(
        cores, stride=stride, padding=padding, dilation=dilation, padding_mode=mode, bias=bias
    )
    layer.implementation = impl
    x = torch.randn(xshape, dtype=torch.float64)
    ref = dense_conv_reference(tucker_kernel_np(cores), bias, x, stride, padding, dilation, mode)
    got = layer(x)
    assert got.shape == ref.shape
    np.testing.assert_allclose(np64(got), np64(ref), rtol=F64_RTOL, atol=1e-12)


def test_conv_to_dense_matches_tensorly():
    cores = random_cores([(5, 2), (2, 3, 3, 2), (4, 3)], 0)
    layer = TuckerConv2d(
        cores,
        stride=(2, 1),
        padding=(1, 0),
        dilation=(1, 2),
        padding_mode="reflect",
        bias=torch.ones(5, dtype=torch.float64),
    )
    dense = layer.to_dense()
    assert isinstance(dense, nn.Conv2d)
    np.testing.assert_allclose(np64(dense.weight), np64(tucker_kernel_tl(cores)), rtol=F64_RTOL)
    assert (dense.stride, dense.padding, dense.dilation, dense.padding_mode) == (
        (2, 1),
        (1, 0),
        (1, 2),
        "reflect",
    )
    assert torch.equal(dense.bias, layer.bias)


@pytest.mark.parametrize("impl", ["factorized", "reconstructed"])
def test_conv_gradcheck(impl):
    cores = random_cores([(3, 2), (2, 2, 3, 2), (2, 2)], 1)
    layer = TuckerConv2d(cores, stride=2, padding=1, bias=torch.randn(3, dtype=torch.float64))
    layer.implementation = impl
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64, requires_grad=True)
    # fast mode (random projections): the slow mode's 100+ backward passes through
    # float64 convolutions take ~20 s here for the same verdict
    assert torch.autograd.gradcheck(
        lambda x, *ps: layer(x), (x, *layer.parameters()), fast_mode=True
    )


def test_conv_full_rank_from_dense_and_unbatched_input():
    torch.manual_seed(0)
    dense = nn.Conv2d(4, 6, 3, stride=2, padding=1, dtype=torch.float64)
    layer = TuckerConv2d.from_dense(dense, Tucker(rank="full"))
    x = torch.randn(2, 4, 9, 9, dtype=torch.float64)
    assert rel_err(np64(layer(x)), np64(dense(x))) < EXACT_RTOL
    assert rel_err(np64(layer(x[0])), np64(dense(x[0]))) < EXACT_RTOL
    assert layer.n_params == 6 * 6 + 6 * 4 * 9 + 4 * 4 + 6
    assert layer.dense_params == 6 * 4 * 9 + 6


def test_conv_refusals():
    with pytest.raises(ValueError, match="only groups=1 convolutions, got groups=2"):
        TuckerConv2d.from_dense(nn.Conv2d(4, 4, 3, groups=2), Tucker(rank=2))
    with pytest.raises(ValueError, match="takes no gram"):
        TuckerConv2d.from_dense(nn.Conv2d(4, 4, 3), Tucker(rank=2), gram=torch.eye(4))
    with pytest.raises(TypeError, match="expects an nn.Conv2d, got Linear"):
        TuckerConv2d.from_dense(nn.Linear(4, 4), Tucker(rank=2))
    layer = TuckerConv2d(random_cores([(3, 2), (2, 2, 3, 3), (4, 2)], 0))
    with pytest.raises(
        ValueError, match=r"expects input of shape \(N, 4, H, W\).*got \(1, 3, 5, 5\)"
    ):
        layer(torch.randn(1, 3, 5, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="padding='same' needs stride 1"):
        TuckerConv2d(random_cores([(3, 2), (2, 2, 3, 3), (4, 2)], 0), padding="same", stride=2)
    with pytest.raises(ValueError, match="padding_mode must be one of"):
        TuckerConv2d(random_cores([(3, 2), (2, 2, 3, 3), (4, 2)], 0), padding_mode="mirror")


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float16, 5e-3), (torch.bfloat16, 3e-2)])
def test_conv_half_precision(dtype, tol):
    cores = random_cores([(6, 3), (3, 2, 3, 3), (5, 2)], 2, torch.float32, 0.5)
    x = torch.randn(2, 5, 7, 7)
    for impl in ("factorized", "reconstructed"):
        ref = TuckerConv2d(cores, padding=1)
        half = TuckerConv2d([c.to(dtype) for c in cores], padding=1)
        ref.implementation = half.implementation = impl
        out = half(x.to(dtype))
        assert out.dtype == dtype
        assert rel_err(np64(out), np64(ref(x))) < tol


@pytest.mark.parametrize("impl", IMPLS)
def test_conv_no_grad_keeps_the_kernel_until_a_core_changes(impl):
    cores = random_cores([(6, 3), (3, 2, 3, 3), (4, 2)], 5)
    layer = TuckerConv2d(cores, padding=1, bias=torch.randn(6, dtype=torch.float64))
    layer.implementation = impl
    x = torch.randn(64, 4, 6, 6, dtype=torch.float64)

    def check():
        ref = dense_conv_reference(
            tucker_kernel_np(list(layer.cores)), layer.bias, x, 1, 1, 1, "zeros"
        )
        with torch.no_grad():
            for _ in range(2):
                np.testing.assert_allclose(np64(layer(x)), np64(ref), rtol=F64_RTOL, atol=1e-12)

    check()
    if impl == "reconstructed":
        assert layer._kernel_cache is not None
    with torch.no_grad():
        layer.cores[1].mul_(-2)
    check()
    layer.cores[0] = nn.Parameter(layer.cores[0].detach() + 1)
    check()
    layer.clear_cache()
    assert layer._kernel_cache is None
    layer.inference_cache = False
    check()
    assert layer._kernel_cache is None
