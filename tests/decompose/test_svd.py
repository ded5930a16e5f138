"""Truncated / randomized SVD and whitening against numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tnquant.decompose.svd import truncated_svd, whitening

RTOL = 1e-10


def _decaying(m, n, seed=0):
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((m, min(m, n))))
    v, _ = np.linalg.qr(rng.standard_normal((n, min(m, n))))
    s = 0.7 ** np.arange(min(m, n))
    return (u * s) @ v.T, s


@pytest.mark.parametrize("method", ["truncated", "randomized"])
def test_rank_truncation_matches_numpy(method):
    a, s = _decaying(120, 80)
    u, sv, vh = truncated_svd(torch.from_numpy(a), max_rank=10, method=method)
    assert sv.shape == (10,)
    np.testing.assert_allclose(sv.numpy(), s[:10], rtol=1e-6 if method == "randomized" else RTOL)
    best = np.linalg.norm(s[10:])  # Eckart-Young
    err = np.linalg.norm(a - (u * sv @ vh).numpy())
    assert err <= best * (1 + 1e-6)


@pytest.mark.parametrize("method", ["truncated", "randomized"])
@pytest.mark.parametrize("delta", [1e-3, 0.1, 0.5])
def test_delta_truncation_is_minimal_and_within_delta(method, delta):
    a, s = _decaying(150, 100, seed=1)
    u, sv, vh = truncated_svd(torch.from_numpy(a), delta=delta, method=method)
    err = np.linalg.norm(a - (u * sv @ vh).numpy())
    assert err <= delta * (1 + 1e-9)
    r = sv.numel()
    assert np.linalg.norm(s[r - 1 :]) > delta  # one fewer would not do


def test_randomized_is_deterministic_and_leaves_global_rng_alone():
    a = torch.from_numpy(_decaying(200, 150)[0])
    state = torch.random.get_rng_state()
    first = truncated_svd(a, max_rank=5, method="randomized")
    second = truncated_svd(a, max_rank=5, method="randomized")
    assert all(torch.equal(x, y) for x, y in zip(first, second, strict=True))
    assert torch.equal(state, torch.random.get_rng_state())


def test_whitening_is_the_cholesky_factor():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((50, 6)) * np.array([10, 1, 1, 0.1, 0.1, 0.01])
    g = x.T @ x
    chol, eps = whitening(torch.from_numpy(g))
    assert 0 < eps < 1e-6 * np.trace(g)
    np.testing.assert_allclose(chol.numpy(), np.linalg.cholesky(g + eps * np.eye(6)), rtol=1e-9)


def test_whitening_of_a_singular_gram_is_damped():
    x = np.random.default_rng(0).standard_normal((2, 5))  # rank 2 of 5
    chol, eps = whitening(torch.from_numpy(x.T @ x))
    assert torch.isfinite(chol).all() and eps > 0


def test_whitening_refuses_an_indefinite_matrix():
    with pytest.raises(ValueError, match="positive semi-definite"):
        whitening(torch.tensor([[1.0, 0.0], [0.0, -1.0]], dtype=torch.float64))
