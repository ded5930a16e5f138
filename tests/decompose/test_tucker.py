"""Tucker: matrix Tucker-2, tensorized Tucker, conv Tucker-2, against numpy and TensorLy."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import tensorly as tl
import torch
from tensorly.tenalg import multi_mode_dot
from tensorly.tucker_tensor import tucker_to_tensor

from tnquant.decompose import decompose_conv, decompose_linear
from tnquant.specs import Tucker

EXACT = 1e-10


def _rng(seed=0):
    return np.random.default_rng(seed)


def _hosvd_error(t, ranks, modes):
    """Relative error of a plain numpy HOSVD (leading singular vectors per mode)."""
    core = t
    factors = []
    for mode, r in zip(modes, ranks, strict=True):
        unf = np.moveaxis(t, mode, 0).reshape(t.shape[mode], -1)
        factors.append(np.linalg.svd(unf, full_matrices=False)[0][:, :r])
    for mode, u in zip(modes, factors, strict=True):
        core = np.moveaxis(np.tensordot(u.T, core, axes=([1], [mode])), 0, mode)
    full = core
    for mode, u in zip(modes, factors, strict=True):
        full = np.moveaxis(np.tensordot(u, full, axes=([1], [mode])), 0, mode)
    return np.linalg.norm(t - full) / np.linalg.norm(t)


# --- Linear, order=1 -------------------------------------------------------------


def test_matrix_layout_and_optimality():
    w = _rng().standard_normal((30, 20))
    dec = decompose_linear(torch.from_numpy(w), Tucker(rank=(5, 5)))
    u_out, g, u_in = (c.numpy() for c in dec.cores)
    assert u_out.shape == (30, 5) and g.shape == (5, 5) and u_in.shape == (20, 5)
    assert dec.out_shape is None and dec.in_shape is None
    np.testing.assert_allclose(u_out.T @ u_out, np.eye(5), atol=1e-12)
    np.testing.assert_allclose(u_in.T @ u_in, np.eye(5), atol=1e-12)
    s = np.linalg.svd(w, compute_uv=False)
    err = np.linalg.norm(w - u_out @ g @ u_in.T) / np.linalg.norm(w)
    assert err == pytest.approx(np.linalg.norm(s[5:]) / np.linalg.norm(s), rel=1e-9)


def test_matrix_asymmetric_ranks():
    w = _rng(1).standard_normal((12, 9))
    dec = decompose_linear(torch.from_numpy(w), Tucker(rank=(6, 3)))
    u_out, g, u_in = (c.numpy() for c in dec.cores)
    assert (u_out.shape, g.shape, u_in.shape) == ((12, 6), (6, 3), (9, 3))
    s = np.linalg.svd(w, compute_uv=False)  # rank min(6, 3) = 3 is what counts
    err = np.linalg.norm(w - u_out @ g @ u_in.T) / np.linalg.norm(w)
    assert err == pytest.approx(np.linalg.norm(s[3:]) / np.linalg.norm(s), rel=1e-9)


def test_matrix_full_capped_ratio_tol():
    w = torch.from_numpy(_rng(2).standard_normal((16, 10)))
    assert decompose_linear(w, Tucker(rank="full")).rel_error < EXACT
    capped = decompose_linear(w, Tucker(rank=50))
    assert capped.ranks == (10, 10) and capped.capped and capped.rel_error < EXACT
    dec = decompose_linear(torch.randn(384, 1536), Tucker(ratio=0.25))
    assert abs(dec.n_params / (384 * 1536) - 0.25) <= 0.025
    for tol in (0.05, 0.3):
        assert decompose_linear(w, Tucker(tol=tol)).rel_error <= tol


# --- Linear, tensorized ------------------------------------------------------------


@pytest.mark.parametrize(("shape", "order"), [((24, 18), 2), ((97, 61), 2), ((8, 27), 3)])
def test_tensorized_full_is_exact_and_matches_tensorly(shape, order):
    w = torch.from_numpy(_rng(3).standard_normal(shape))
    dec = decompose_linear(w, Tucker(rank="full", order=order))
    assert dec.rel_error < EXACT
    core, *factors = dec.cores
    assert len(factors) == 2 * order
    sizes = (*dec.out_shape, *dec.in_shape)
    assert [f.shape[0] for f in factors] == list(sizes)
    with tl.backend_context("pytorch"):
        full = tucker_to_tensor((core, factors))
    full = full.reshape(math.prod(dec.out_shape), math.prod(dec.in_shape))
    torch.testing.assert_close(full[: shape[0], : shape[1]], w, rtol=0, atol=1e-10)


def test_tensorized_rank_is_no_worse_than_hosvd_and_matches_einsum():
    w = _rng(4).standard_normal((16, 12))
    spec = Tucker(rank=(3, 2, 2, 3), out_shape=(4, 4), in_shape=(3, 4))
    dec = decompose_linear(torch.from_numpy(w), spec)
    g, a, b, c, d = (x.numpy() for x in dec.cores)
    what = np.einsum("pqrs,ip,jq,kr,ls->ijkl", g, a, b, c, d).reshape(16, 12)
    err = np.linalg.norm(w - what) / np.linalg.norm(w)
    assert err == pytest.approx(dec.rel_error, rel=1e-9)
    assert err <= _hosvd_error(w.reshape(4, 4, 3, 4), (3, 2, 2, 3), range(4)) + 1e-12


def test_tensorized_ratio_tol_caps():
    w = torch.randn(384, 384, dtype=torch.float64)
    dec = decompose_linear(w, Tucker(ratio=0.1, order=2))
    assert abs(dec.n_params / 384**2 - 0.1) <= 0.01
    small = torch.from_numpy(_rng(5).standard_normal((6, 6)))
    capped = decompose_linear(small, Tucker(rank=100, out_shape=(3, 2), in_shape=(2, 3)))
    assert capped.capped and capped.rel_error < EXACT
    assert capped.ranks == (3, 2, 2, 3)
    for tol in (0.1, 0.5):
        assert decompose_linear(small, Tucker(tol=tol, order=2)).rel_error <= tol


# --- Conv ---------------------------------------------------------------------------


def test_conv_rank_30_on_a_small_kernel_is_capped_not_garbage():
    # TensorLy-Torch 0.5 gives a relative error of 15 here
    k = _rng(6).standard_normal((5, 4, 3, 3))
    dec = decompose_conv(torch.from_numpy(k), Tucker(rank=30))
    assert dec.ranks == (5, 4)
    assert dec.capped is not None and "30" in dec.capped
    assert dec.rel_error < EXACT


def test_conv_layout_matches_tensorly_and_beats_hosvd():
    k = _rng(7).standard_normal((16, 8, 3, 3))
    dec = decompose_conv(torch.from_numpy(k), Tucker(rank=(6, 4)))
    u_out, g, u_in = dec.cores
    assert tuple(u_out.shape) == (16, 6) and tuple(g.shape) == (6, 4, 3, 3)
    assert tuple(u_in.shape) == (8, 4)
    with tl.backend_context("pytorch"):
        full = multi_mode_dot(g, [u_out, u_in], modes=[0, 1])
    err = float((full - torch.from_numpy(k)).norm()) / np.linalg.norm(k)
    assert err == pytest.approx(dec.rel_error, rel=1e-9)
    assert err <= _hosvd_error(k, (6, 4), (0, 1)) + 1e-12


def test_conv_ratio_is_proportional_and_close():
    dec = decompose_conv(torch.randn(64, 16, 3, 3), Tucker(ratio=0.2))
    r_out, r_in = dec.ranks
    assert r_out > r_in
    assert abs(dec.n_params / (64 * 16 * 9) - 0.2) <= 0.02


@pytest.mark.parametrize("tol", [0.05, 0.2, 0.6])
def test_conv_tol(tol):
    k = _rng(8).standard_normal((12, 10, 3, 3))
    dec = decompose_conv(torch.from_numpy(k), Tucker(tol=tol))
    assert dec.rel_error <= tol


def test_conv_refuses_tensorized_specs():
    with pytest.raises(ValueError, match="Tucker-2 on the channel modes"):
        decompose_conv(torch.randn(4, 4, 3, 3), Tucker(rank=2, order=2))


def test_pointwise_conv_ranks_are_consistent():
    # kernel (8, 3, 1, 1): r_out can use at most r_in * 1 * 1 directions
    k = _rng(9).standard_normal((8, 3, 1, 1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dec = decompose_conv(torch.from_numpy(k), Tucker(rank=(8, 2)))
        for spec in (Tucker(ratio=1.0), Tucker(ratio=0.5), Tucker(tol=0.4)):
            other = decompose_conv(torch.from_numpy(k), spec)
            assert other.ranks[0] <= other.ranks[1]
    assert dec.ranks == (2, 2) and dec.capped is not None
    s = np.linalg.svd(k.reshape(8, 3), compute_uv=False)
    assert dec.rel_error == pytest.approx(np.linalg.norm(s[2:]) / np.linalg.norm(s), rel=1e-9)
