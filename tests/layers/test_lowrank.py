"""LowRankLinear against the dense product of its factors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from tests.layers.refs import EXACT_RTOL, F64_RTOL, np64, random_cores, rel_err
from tnquant import LowRank
from tnquant.layers import LowRankLinear

IMPLS = ("factorized", "reconstructed", "auto")


@settings(max_examples=100, deadline=None)
@given(
    st.integers(1, 9),
    st.integers(1, 9),
    st.integers(1, 5),
    st.lists(st.integers(0, 3), max_size=3),
    st.booleans(),
    st.sampled_from(IMPLS),
    st.integers(0, 2**31 - 1),
)
def test_forward_matches_dense_reference(out_f, in_f, rank, lead, with_bias, impl, seed):
    u, v = random_cores([(out_f, rank), (rank, in_f)], seed)
    bias = torch.randn(out_f, dtype=torch.float64) if with_bias else None
    layer = LowRankLinear([u, v], bias=bias)
    layer.implementation = impl
    x = torch.randn(*lead, in_f, dtype=torch.float64)
    ref = np.einsum("...i,or,ri->...o", np64(x), np64(u), np64(v))
    if with_bias:
        ref = ref + np64(bias)
    got = layer(x)
    assert got.shape == (*lead, out_f)
    np.testing.assert_allclose(np64(got), ref, rtol=F64_RTOL, atol=1e-12)


def test_to_dense_and_counts():
    u, v = random_cores([(7, 3), (3, 5)], 0)
    layer = LowRankLinear([u, v], bias=torch.zeros(7, dtype=torch.float64))
    dense = layer.to_dense()
    np.testing.assert_allclose(np64(dense.weight), np64(u) @ np64(v), rtol=F64_RTOL)
    assert layer.n_params == 7 * 3 + 3 * 5 + 7
    assert layer.dense_params == 7 * 5 + 7
    assert layer.compression_ratio == pytest.approx(42 / 43)
    assert layer.spec == LowRank(rank=3)
    assert layer.intermediate_names() == ("inter_0",)


@pytest.mark.parametrize("impl", ["factorized", "reconstructed"])
def test_gradcheck(impl):
    layer = LowRankLinear(
        random_cores([(4, 2), (2, 5)], 1), bias=torch.randn(4, dtype=torch.float64)
    )
    layer.implementation = impl
    x = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, *ps: layer(x), (x, *layer.parameters()))


def test_full_rank_from_dense_reproduces_dense():
    torch.manual_seed(0)
    dense = nn.Linear(9, 6, dtype=torch.float64)
    layer = LowRankLinear.from_dense(dense, LowRank(rank="full"))
    x = torch.randn(3, 9, dtype=torch.float64)
    assert rel_err(np64(layer(x)), np64(dense(x))) < EXACT_RTOL
    assert layer.ranks == (6,)


def test_from_dense_with_gram_fills_output_error():
    torch.manual_seed(0)
    dense = nn.Linear(16, 12, dtype=torch.float64)
    x = torch.randn(200, 16, dtype=torch.float64)
    layer = LowRankLinear.from_dense(dense, LowRank(rank=3), gram=x.T @ x)
    assert layer.decomposition_info["out_rel_error"] is not None
    assert 0 < layer.decomposition_info["rel_error"] < 1


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float16, 5e-3), (torch.bfloat16, 3e-2)])
def test_half_precision_matches_float32(dtype, tol):
    u, v = random_cores([(20, 4), (4, 24)], 2, torch.float32, 0.5)
    bias = torch.randn(20)
    x = torch.randn(5, 24)
    for impl in ("factorized", "reconstructed"):
        ref = LowRankLinear([u, v], bias=bias)
        half = LowRankLinear([u.to(dtype), v.to(dtype)], bias=bias.to(dtype))
        ref.implementation = half.implementation = impl
        out = half(x.to(dtype))
        assert out.dtype == dtype
        assert rel_err(np64(out), np64(ref(x))) < tol


def test_bad_input_and_cores():
    layer = LowRankLinear(random_cores([(4, 2), (2, 5)], 1))
    with pytest.raises(ValueError, match=r"expects input of shape \(\.\.\., 5\), got \(3, 4\)"):
        layer(torch.randn(3, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"V.shape\[0\].*must be 2, got 3"):
        LowRankLinear(random_cores([(4, 2), (3, 5)], 1))
    with pytest.raises(ValueError, match="takes 2 cores, got 3"):
        LowRankLinear(random_cores([(4, 2), (2, 5), (5, 5)], 1))
    with pytest.raises(ValueError, match=r"in_features \(V.shape\[1\]\) must be 5, got 6"):
        LowRankLinear(random_cores([(4, 2), (2, 5)], 1), in_features=6)
    with pytest.raises(ValueError, match="implementation must be one of"):
        layer.implementation = "fast"
