"""Low rank: Eckart-Young against numpy, ratio, tol, caps, the conv layout."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tnquant.decompose import decompose_conv, decompose_embedding, decompose_linear
from tnquant.specs import LowRank

EXACT = 1e-10


def _w(out, inn, seed=0, decay=None):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((out, inn))
    if decay is not None:
        u, s, vt = np.linalg.svd(w, full_matrices=False)
        w = (u * decay ** np.arange(s.size)) @ vt
    return w


@pytest.mark.parametrize("svd", ["truncated", "randomized"])
def test_rank_r_is_eckart_young(svd):
    w = _w(60, 40, decay=0.8)
    dec = decompose_linear(torch.from_numpy(w), LowRank(rank=6, svd=svd))
    u, v = (c.numpy() for c in dec.cores)
    assert u.shape == (60, 6) and v.shape == (6, 40)
    s = np.linalg.svd(w, compute_uv=False)
    best = np.linalg.norm(s[6:]) / np.linalg.norm(s)
    err = np.linalg.norm(w - u @ v) / np.linalg.norm(w)
    assert err == pytest.approx(best, rel=1e-6)
    assert dec.rel_error == pytest.approx(err, rel=1e-9)
    # sqrt(S) split: column j of U and row j of V have norm sqrt(s_j)
    np.testing.assert_allclose(np.linalg.norm(u, axis=0), np.sqrt(s[:6]), rtol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), np.sqrt(s[:6]), rtol=1e-6)


def test_full_rank_is_exact():
    w = _w(7, 13)
    dec = decompose_linear(torch.from_numpy(w), LowRank(rank="full"))
    assert dec.ranks == (7,) and dec.capped is None and dec.rel_error < EXACT
    np.testing.assert_allclose(dec.cores[0].numpy() @ dec.cores[1].numpy(), w, atol=1e-12)


def test_oversize_rank_is_capped():
    dec = decompose_linear(torch.from_numpy(_w(5, 3)), LowRank(rank=10))
    assert dec.ranks == (3,) and "capped" in dec.capped and dec.rel_error < EXACT


@pytest.mark.parametrize("ratio", [0.05, 0.1, 0.25, 0.5])
def test_ratio(ratio):
    dec = decompose_linear(torch.randn(384, 1536), LowRank(ratio=ratio))
    assert abs(dec.n_params / (384 * 1536) - ratio) <= 0.1 * ratio


@pytest.mark.parametrize("svd", ["truncated", "randomized"])
@pytest.mark.parametrize("tol", [0.01, 0.1, 0.4])
def test_tol_is_met_by_the_smallest_rank(tol, svd):
    w = _w(200, 150, seed=1, decay=0.95)
    dec = decompose_linear(torch.from_numpy(w), LowRank(tol=tol, svd=svd))
    assert dec.rel_error <= tol
    s = np.linalg.svd(w, compute_uv=False)
    r = dec.ranks[0]
    assert np.linalg.norm(s[r - 1 :]) / np.linalg.norm(s) > tol  # r - 1 would fail


def test_conv_is_the_flattened_matrix():
    k = np.random.default_rng(2).standard_normal((8, 4, 3, 3))
    dec = decompose_conv(torch.from_numpy(k), LowRank(rank=5))
    u, v = (c.numpy() for c in dec.cores)
    assert u.shape == (8, 5) and v.shape == (5, 36)
    s = np.linalg.svd(k.reshape(8, 36), compute_uv=False)
    assert dec.rel_error == pytest.approx(np.linalg.norm(s[5:]) / np.linalg.norm(s), rel=1e-9)
    # as two convs: V as a (5, 4, 3, 3) kernel, then U as a 1x1 conv
    x = torch.randn(1, 4, 6, 6, dtype=torch.float64)
    first = torch.nn.functional.conv2d(x, dec.cores[1].reshape(5, 4, 3, 3))
    two = torch.nn.functional.conv2d(first, dec.cores[0][:, :, None, None])
    approx = torch.from_numpy((u @ v).reshape(8, 4, 3, 3))
    torch.testing.assert_close(two, torch.nn.functional.conv2d(x, approx))


def test_embedding_lowrank():
    w = _w(50, 8)
    dec = decompose_embedding(torch.from_numpy(w), LowRank(rank="full"))
    assert dec.rel_error < EXACT
