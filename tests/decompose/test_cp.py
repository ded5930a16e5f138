"""CP of conv kernels: layout against TensorLy and einsum, full rank, ratio, tol."""

from __future__ import annotations

import numpy as np
import pytest
import tensorly as tl
import torch
from tensorly.cp_tensor import cp_to_tensor

from tnquant.decompose import decompose_conv, decompose_linear
from tnquant.specs import CP

EXACT = 1e-10


def _k(shape, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).standard_normal(shape))


def _cp_kernel(shape, rank, seed=0):
    """A kernel of exact CP rank ``rank``, built with numpy."""
    rng = np.random.default_rng(seed)
    factors = [rng.standard_normal((n, rank)) for n in shape]
    return torch.from_numpy(np.einsum("or,ir,hr,wr->oihw", *factors))


def test_layout_matches_tensorly_and_einsum():
    k = _k((6, 5, 3, 3))
    dec = decompose_conv(k, CP(rank=4, n_iter_max=50))
    a_out, a_in, a_h, a_w = dec.cores
    assert [tuple(f.shape) for f in dec.cores] == [(6, 4), (5, 4), (3, 4), (3, 4)]
    with tl.backend_context("pytorch"):
        full = cp_to_tensor((torch.ones(4, dtype=torch.float64), list(dec.cores)))
    manual = np.einsum("or,ir,hr,wr->oihw", *(f.numpy() for f in dec.cores))
    np.testing.assert_allclose(full.numpy(), manual, atol=1e-12)
    err = np.linalg.norm(k.numpy() - manual) / np.linalg.norm(k.numpy())
    assert err == pytest.approx(dec.rel_error, rel=1e-9)
    # the weights are absorbed and each rank-one term's columns have equal norms
    norms = np.stack([np.linalg.norm(f.numpy(), axis=0) for f in dec.cores])
    np.testing.assert_allclose(norms, np.broadcast_to(norms[:1], norms.shape), rtol=1e-9)


def test_recovers_an_exact_low_rank_kernel():
    k = _cp_kernel((8, 6, 3, 3), rank=3, seed=1)
    dec = decompose_conv(k, CP(rank=3, n_iter_max=500))
    assert dec.rel_error < 1e-6


@pytest.mark.parametrize("rank", ["full", 27, 500])
def test_full_rank_is_exact(rank):
    k = _k((4, 3, 3, 3), seed=2)  # R_full = 108 / 4 = 27
    dec = decompose_conv(k, CP(rank=rank))
    assert dec.ranks == (27,) and dec.rel_error < EXACT
    assert (dec.capped is not None) == (rank == 500)


def test_ratio():
    dec = decompose_conv(torch.randn(64, 32, 3, 3), CP(ratio=0.1, n_iter_max=5))
    assert abs(dec.n_params / (64 * 32 * 9) - 0.1) <= 0.01


@pytest.mark.parametrize("tol", [0.05, 0.3])
def test_tol(tol):
    k = _cp_kernel((6, 5, 3, 3), rank=4, seed=3) + 0.01 * _k((6, 5, 3, 3), seed=4)
    dec = decompose_conv(k, CP(tol=tol, n_iter_max=100))
    assert dec.rel_error <= tol
    assert dec.ranks[0] <= 8


def test_cp_on_a_linear_is_refused():
    with pytest.raises(TypeError, match="TT, Tucker, LowRank .* got CP"):
        decompose_linear(torch.randn(4, 4), CP(rank=2))
