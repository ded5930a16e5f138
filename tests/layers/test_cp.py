"""CPConv2d against a conv with the CP kernel rebuilt in the test."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from tests.layers.refs import (
    EXACT_RTOL,
    F64_RTOL,
    cp_kernel_np,
    cp_kernel_tl,
    np64,
    random_cores,
    rel_err,
)
from tests.layers.test_tucker import conv_setups, dense_conv_reference
from tnquant import CP
from tnquant.layers import CPConv2d

IMPLS = ("factorized", "reconstructed", "auto")


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@settings(max_examples=100, deadline=None)
@given(conv_setups(), st.sampled_from(IMPLS), st.integers(1, 4))
def test_forward_matches_dense_reference(setup, impl, rank):
    (o, i, kh, kw), padding, stride, dilation, mode, xshape, with_bias, seed = setup
    cores = random_cores([(o, rank), (i, rank), (kh, rank), (kw, rank)], seed)
    bias = torch.randn(o, dtype=torch.float64) if with_bias else None
    layer = CPConv2d(
        cores, stride=stride, padding=padding, dilation=dilation, padding_mode=mode, bias=bias
    )
    layer.implementation = impl
    x = torch.randn(xshape, dtype=torch.float64)
    ref = dense_conv_reference(cp_kernel_np(cores), bias, x, stride, padding, dilation, mode)
    got = layer(x)
    assert got.shape == ref.shape
    np.testing.assert_allclose(np64(got), np64(ref), rtol=F64_RTOL, atol=1e-12)


def test_to_dense_matches_tensorly():
    cores = random_cores([(5, 3), (4, 3), (3, 3), (2, 3)], 0)
    layer = CPConv2d(cores, padding="same", dilation=2)
    dense = layer.to_dense()
    assert isinstance(dense, nn.Conv2d)
    assert dense.kernel_size == (3, 2) and dense.padding == "same" and dense.dilation == (2, 2)
    np.testing.assert_allclose(np64(dense.weight), np64(cp_kernel_tl(cores)), rtol=F64_RTOL)


@pytest.mark.parametrize("impl", ["factorized", "reconstructed"])
def test_gradcheck(impl):
    cores = random_cores([(3, 2), (2, 2), (3, 2), (2, 2)], 1)
    layer = CPConv2d(
        cores,
        stride=(1, 2),
        padding=(1, 1),
        padding_mode="circular",
        bias=torch.randn(3, dtype=torch.float64),
    )
    layer.implementation = impl
    x = torch.randn(2, 2, 4, 5, dtype=torch.float64, requires_grad=True)
    # fast mode (random projections): the slow mode's 100+ backward passes through
    # float64 convolutions take ~20 s here for the same verdict
    assert torch.autograd.gradcheck(
        lambda x, *ps: layer(x), (x, *layer.parameters()), fast_mode=True
    )


def test_full_rank_from_dense_reproduces_dense():
    torch.manual_seed(0)
    dense = nn.Conv2d(3, 4, (3, 2), padding=1, bias=False, dtype=torch.float64)
    layer = CPConv2d.from_dense(dense, CP(rank="full"))
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    assert rel_err(np64(layer(x)), np64(dense(x))) < EXACT_RTOL
    assert layer.bias is None
    rank = layer.ranks[0]
    assert layer.n_params == rank * (4 + 3 + 3 + 2)
    assert layer.compression_ratio == pytest.approx(4 * 3 * 6 / layer.n_params)


def test_from_dense_low_rank_and_refusals():
    torch.manual_seed(0)
    dense = nn.Conv2d(8, 8, 3, padding=1)
    layer = CPConv2d.from_dense(dense, CP(rank=4))
    assert layer.ranks == (4,) and layer.spec == CP(rank=4)
    assert 0 < layer.decomposition_info["rel_error"] < 1
    with pytest.raises(ValueError, match="groups=1 convolutions, got groups=4"):
        CPConv2d.from_dense(nn.Conv2d(8, 8, 3, groups=4), CP(rank=2))
    with pytest.raises(TypeError, match="expects a CP spec, got TT"):
        from tnquant import TT

        CPConv2d.from_dense(dense, TT(rank=2))
    with pytest.raises(ValueError, match=r"A_h.shape\[1\].*must be 2, got 3"):
        CPConv2d(random_cores([(3, 2), (2, 2), (3, 3), (2, 2)], 0))


def test_intermediates_and_flops():
    layer = CPConv2d(random_cores([(4, 2), (3, 2), (3, 2), (3, 2)], 0), padding=1)
    assert layer.intermediate_names() == ("inter_0", "inter_1", "inter_2")
    n, h, w = 2, 5, 5
    expect = 2 * n * 2 * (h * w * 3 + h * w * 3 + h * w * 3 + h * w * 4)
    assert layer.flops((n, 3, h, w))["factorized"] == expect
    assert layer.flops((n, 3, h, w))["dense"] == 2 * n * h * w * 4 * 3 * 9


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float16, 5e-3), (torch.bfloat16, 3e-2)])
def test_half_precision(dtype, tol):
    cores = random_cores([(6, 3), (5, 3), (3, 3), (3, 3)], 2, torch.float32, 0.7)
    x = torch.randn(2, 5, 7, 7)
    for impl in ("factorized", "reconstructed"):
        ref = CPConv2d(cores, padding=1)
        half = CPConv2d([c.to(dtype) for c in cores], padding=1)
        ref.implementation = half.implementation = impl
        out = half(x.to(dtype))
        assert out.dtype == dtype
        assert rel_err(np64(out), np64(ref(x))) < tol


def test_no_grad_reconstructed_kernel_follows_core_changes():
    from tests.layers.test_tucker import dense_conv_reference as ref_conv

    cores = random_cores([(5, 3), (4, 3), (3, 3), (3, 3)], 4)
    layer = CPConv2d(cores, padding="same")
    layer.implementation = "reconstructed"
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    for scale in (1.0, 3.0):
        with torch.no_grad():
            layer.cores[2].mul_(scale)
            got = layer(x)
        ref = ref_conv(cp_kernel_np(list(layer.cores)), None, x, 1, "same", 1, "zeros")
        np.testing.assert_allclose(np64(got), np64(ref), rtol=F64_RTOL, atol=1e-12)
    assert layer._kernel_cache is not None
    out = layer(x)  # autograd on: rebuilt from the cores, gradients flow
    out.sum().backward()
    assert layer.cores[0].grad is not None
