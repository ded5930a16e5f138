"""TTEmbedding lookups against rows of the table rebuilt in the test."""

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
from tnquant.layers import TTEmbedding


@st.composite
def embedding_setups(draw):
    d = draw(st.integers(1, 3))
    nums = draw(st.lists(st.integers(1, 5), min_size=d, max_size=d))
    dims = draw(st.lists(st.integers(1, 4), min_size=d, max_size=d))
    ranks = [1, *draw(st.lists(st.integers(1, 3), min_size=d - 1, max_size=d - 1)), 1]
    shapes = [(ranks[k], nums[k], dims[k], ranks[k + 1]) for k in range(d)]
    num = draw(st.integers(1, math.prod(nums)))
    dim = draw(st.integers(1, math.prod(dims)))
    idx_shape = tuple(draw(st.lists(st.integers(0, 4), max_size=3)))
    return shapes, num, dim, idx_shape, draw(st.integers(0, 2**31 - 1))


@settings(max_examples=150, deadline=None)
@given(embedding_setups())
def test_lookup_matches_table_rows(setup):
    shapes, num, dim, idx_shape, seed = setup
    cores = random_cores(shapes, seed)
    layer = TTEmbedding(cores, num_embeddings=num, embedding_dim=dim)
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, num, idx_shape, generator=gen)
    table = tt_weight_np(cores, num, dim)
    got = layer(idx)
    assert got.shape == (*idx_shape, dim)
    np.testing.assert_allclose(np64(got), table[idx.numpy()], rtol=F64_RTOL, atol=1e-12)
    np.testing.assert_allclose(
        np64(layer.to_dense().weight),
        np64(tt_weight_tl(cores, num, dim)),
        rtol=F64_RTOL,
        atol=1e-12,
    )


def test_awkward_sizes_and_both_chain_directions():
    # 97 rows in 5*5*4 = 100, 13 columns in 2*2*4 = 16; padding must stay invisible
    for shapes in (
        [(1, 5, 2, 3), (3, 5, 2, 2), (2, 4, 4, 1)],
        [(1, 5, 4, 2), (2, 5, 2, 3), (3, 4, 2, 1)],
    ):
        cores = random_cores(shapes, 4)
        layer = TTEmbedding(cores, num_embeddings=97, embedding_dim=13)
        idx = torch.tensor([[0, 96, 50], [7, 7, 13]])
        table = tt_weight_np(cores, 97, 13)
        np.testing.assert_allclose(np64(layer(idx)), table[idx.numpy()], rtol=F64_RTOL)
    # left to right costs m1 r1 m2 r2 + m1 m2 m3 r2, right to left m3 r2 m2 r1 + m1 m2 m3 r1
    small_r1 = [(1, 2, 2, 1), (1, 2, 2, 4), (4, 2, 2, 1)]
    small_r2 = [(1, 2, 2, 4), (4, 2, 2, 1), (1, 2, 2, 1)]
    assert TTEmbedding(random_cores(small_r1, 0)).chain_order == (2, 1, 0)
    assert TTEmbedding(random_cores(small_r2, 0)).chain_order == (0, 1, 2)


def test_scalar_index_and_dtypes_of_indices():
    cores = random_cores([(1, 3, 2, 2), (2, 3, 2, 1)], 0)
    layer = TTEmbedding(cores)
    table = tt_weight_np(cores, 9, 4)
    np.testing.assert_allclose(np64(layer(torch.tensor(4))), table[4], rtol=F64_RTOL)
    np.testing.assert_allclose(
        np64(layer(torch.tensor([4], dtype=torch.int32))), table[[4]], rtol=F64_RTOL
    )
    with pytest.raises(TypeError, match="integer indices, got dtype torch.float32"):
        layer(torch.tensor([1.0]))
    with pytest.raises(IndexError, match=r"indices must be in \[0, 8\], got values in \[0, 9\]"):
        layer(torch.tensor([0, 9]))
    with pytest.raises(IndexError, match=r"got values in \[-1, 2\]"):
        layer(torch.tensor([-1, 2]))


def test_gradcheck_and_padding_idx_gets_no_gradient():
    cores = random_cores([(1, 3, 2, 2), (2, 3, 2, 1)], 1)
    idx = torch.tensor([[1, 2], [2, 7]])
    plain = TTEmbedding(cores, num_embeddings=8)
    assert torch.autograd.gradcheck(lambda *ps: plain(idx), tuple(plain.parameters()))
    layer = TTEmbedding([c.clone() for c in cores], num_embeddings=8, padding_idx=2)
    # the gradient equals that of the lookups without the padding positions
    weights = torch.randn(2, 2, 4, dtype=torch.float64)
    (layer(idx) * weights).sum().backward()
    with_pad = [c.grad.clone() for c in layer.cores]
    layer.zero_grad()
    keep = idx != 2
    (layer(idx[keep]) * weights[keep]).sum().backward()
    for a, b in zip(with_pad, layer.cores, strict=True):
        np.testing.assert_allclose(np64(a), np64(b.grad), rtol=F64_RTOL, atol=1e-12)
    # the padding row's value is what the factorized table gives
    np.testing.assert_allclose(
        np64(layer(torch.tensor(2))), tt_weight_np(cores, 8, 4)[2], rtol=F64_RTOL
    )


def test_full_rank_from_dense_and_padding_idx():
    torch.manual_seed(0)
    dense = nn.Embedding(30, 10, padding_idx=0, dtype=torch.float64)
    layer = TTEmbedding.from_dense(dense, TT(rank="full", order=2))
    idx = torch.arange(30).reshape(5, 6)
    assert rel_err(np64(layer(idx)), np64(dense(idx))) < EXACT_RTOL
    assert layer.padding_idx == 0
    assert np.abs(np64(layer(torch.tensor(0)))).max() < 1e-10  # the zero row survives
    back = layer.to_dense()
    assert isinstance(back, nn.Embedding) and back.padding_idx == 0
    assert layer.dense_params == 300
    assert layer.n_params == sum(c.numel() for c in layer.cores)


def test_from_dense_refusals():
    with pytest.raises(ValueError, match="does not support max_norm"):
        TTEmbedding.from_dense(nn.Embedding(10, 4, max_norm=1.0), TT(rank=2))
    with pytest.raises(ValueError, match="does not support sparse"):
        TTEmbedding.from_dense(nn.Embedding(10, 4, sparse=True), TT(rank=2))
    with pytest.raises(TypeError, match="expects an nn.Embedding, got Linear"):
        TTEmbedding.from_dense(nn.Linear(10, 4), TT(rank=2))
    with pytest.raises(ValueError, match="implementation must be one of"):
        TTEmbedding(random_cores([(1, 2, 2, 1)], 0)).implementation = "reconstructed"
    with pytest.raises(ValueError, match=r"num_embeddings must be <= 4"):
        TTEmbedding(random_cores([(1, 2, 2, 1), (1, 2, 2, 1)], 0), num_embeddings=5)


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float16, 5e-3), (torch.bfloat16, 3e-2)])
def test_half_precision(dtype, tol):
    cores = random_cores([(1, 8, 4, 4), (4, 8, 4, 4), (4, 4, 2, 1)], 5, torch.float32, 0.5)
    idx = torch.randint(0, 250, (3, 7))
    ref = TTEmbedding(cores, num_embeddings=250, embedding_dim=30)(idx)
    half = TTEmbedding([c.to(dtype) for c in cores], num_embeddings=250, embedding_dim=30)
    out = half(idx)
    assert out.dtype == dtype
    assert rel_err(np64(out), np64(ref)) < tol
