"""TT-matrix decomposition: layout against TensorLy and einsum, ranks, tol, padding."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tensorly as tl
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tensorly.tt_matrix import tt_matrix_to_tensor

from tnquant.decompose import decompose_embedding, decompose_linear
from tnquant.specs import TT

EXACT = 1e-10  # relative error of a full-rank decomposition in float64


def _w(out, inn, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).standard_normal((out, inn)))


def _tt_compressible(out_shape, in_shape, rank, noise, seed=0):
    """A weight of TT rank ``rank`` plus noise, built with numpy."""
    rng = np.random.default_rng(seed)
    d = len(out_shape)
    full = (1, *(rank,) * (d - 1), 1)
    t = np.ones((1, 1, 1))
    for k in range(d):
        core = rng.standard_normal((full[k], out_shape[k], in_shape[k], full[k + 1]))
        t = np.einsum("OIa,aoib->OoIib", t, core).reshape(
            t.shape[0] * out_shape[k], t.shape[1] * in_shape[k], full[k + 1]
        )
    w = t[:, :, 0]
    w = w / np.linalg.norm(w) + noise * rng.standard_normal(w.shape) / math.sqrt(w.size)
    return torch.from_numpy(w)


def _tensorly_matrix(cores, out_shape, in_shape):
    """Dense padded matrix from TensorLy's own TT-matrix reconstruction."""
    with tl.backend_context("pytorch"):
        t = tt_matrix_to_tensor([c.to(torch.float64) for c in cores])
    assert tuple(t.shape) == (*out_shape, *in_shape)
    return t.reshape(math.prod(out_shape), math.prod(in_shape))


@pytest.mark.parametrize(
    ("shape", "order"), [((12, 10), 1), ((24, 18), 2), ((64, 48), 3), ((97, 61), 2), ((97, 61), 3)]
)
def test_full_rank_is_exact_and_matches_tensorly(shape, order):
    w = _w(*shape)
    dec = decompose_linear(w, TT(rank="full", order=order))
    assert dec.format == "tt" and dec.capped is None
    assert dec.rel_error < EXACT
    full = _tensorly_matrix(dec.cores, dec.out_shape, dec.in_shape)
    torch.testing.assert_close(full[: shape[0], : shape[1]], w, rtol=0, atol=1e-10)
    # the padding is reproduced as zeros
    padded = full.clone()
    padded[: shape[0], : shape[1]] = 0
    assert float(padded.abs().max()) < 1e-10
    assert [c.shape[0] for c in dec.cores][0] == 1 and dec.cores[-1].shape[-1] == 1


@settings(max_examples=25, deadline=None)
@given(
    pairs=st.lists(st.tuples(st.integers(1, 4), st.integers(1, 4)), min_size=1, max_size=3),
    cut=st.tuples(st.integers(0, 3), st.integers(0, 3)),
    seed=st.integers(0, 100),
)
def test_full_rank_is_exact_for_any_shapes(pairs, cut, seed):
    out_shape = tuple(p[0] for p in pairs)
    in_shape = tuple(p[1] for p in pairs)
    out = max(1, math.prod(out_shape) - cut[0])  # padding of up to 3 rows / columns
    inn = max(1, math.prod(in_shape) - cut[1])
    w = _w(out, inn, seed)
    dec = decompose_linear(w, TT(rank="full", out_shape=out_shape, in_shape=in_shape))
    full = _tensorly_matrix(dec.cores, out_shape, in_shape)
    torch.testing.assert_close(full[:out, :inn], w, rtol=0, atol=1e-10)


def test_layout_against_a_written_out_einsum():
    w = _w(8 * 3 * 2, 4 * 5 * 3, seed=3)
    dec = decompose_linear(w, TT(rank=5, out_shape=(8, 3, 2), in_shape=(4, 5, 3)))
    a, b, c = (x.numpy() for x in dec.cores)
    assert a.shape == (1, 8, 4, 5) and b.shape == (5, 3, 5, 5) and c.shape == (5, 2, 3, 1)
    t = np.einsum("xoia,apjb,bqky->opqijk", a, b, c)  # W[(o,p,q),(i,j,k)] row-major
    what = t.reshape(48, 60)
    err = np.linalg.norm(w.numpy() - what) / np.linalg.norm(w.numpy())
    assert abs(err - dec.rel_error) < 1e-12


def test_two_cores_are_the_optimal_svd_of_the_permuted_matrix():
    # d=2: TT-matrix rank r == best rank-r approximation of W reshaped (o1 i1, o2 i2)
    out_shape, in_shape, r = (6, 4), (5, 3), 3
    w = _w(24, 15, seed=4)
    dec = decompose_linear(w, TT(rank=r, out_shape=out_shape, in_shape=in_shape))
    m = w.numpy().reshape(6, 4, 5, 3).transpose(0, 2, 1, 3).reshape(30, 12)
    s = np.linalg.svd(m, compute_uv=False)
    best = np.linalg.norm(s[r:]) / np.linalg.norm(s)
    assert dec.rel_error == pytest.approx(best, rel=1e-9)


@pytest.mark.parametrize("tol", [0.02, 0.1, 0.3])
@pytest.mark.parametrize("svd", ["truncated", "randomized"])
def test_tol_bounds_the_error(tol, svd):
    w = _tt_compressible((4, 4, 4), (6, 4, 4), rank=4, noise=0.01, seed=1)
    dec = decompose_linear(w, TT(tol=tol, out_shape=(4, 4, 4), in_shape=(6, 4, 4), svd=svd))
    assert dec.rel_error <= tol
    full = decompose_linear(w, TT(rank="full", out_shape=(4, 4, 4), in_shape=(6, 4, 4)))
    assert dec.n_params < full.n_params / 2  # it did truncate


@pytest.mark.parametrize(("shape", "order"), [((384, 384), 3), ((1536, 384), 3), ((384, 1536), 2)])
@pytest.mark.parametrize("ratio", [0.05, 0.25])
def test_ratio_within_ten_percent(shape, order, ratio):
    dec = decompose_linear(torch.randn(*shape), TT(ratio=ratio, order=order))
    achieved = dec.n_params / (shape[0] * shape[1])
    assert abs(achieved - ratio) <= 0.1 * ratio


def test_ratio_on_a_small_layer_is_the_closest_uniform_rank():
    out_shape, in_shape = (3, 3), (2, 2)
    dec = decompose_linear(torch.randn(9, 4), TT(ratio=0.5, out_shape=out_shape, in_shape=in_shape))

    def count(r):  # written out: cores (1,3,2,r), (r,3,2,1)
        return 6 * r + r * 6

    closest = min(range(1, 7), key=lambda r: abs(count(r) - 18))
    assert dec.n_params == count(closest)


def test_oversize_ranks_are_capped_and_exact():
    w = _w(12, 10, seed=2)
    dec = decompose_linear(w, TT(rank=1000, order=2))
    assert dec.capped is not None and "1000" in dec.capped
    assert dec.rel_error < EXACT
    caps_dec = decompose_linear(w, TT(rank=(1000,), order=2))
    assert caps_dec.ranks == dec.ranks


def test_rank_tuple():
    dec = decompose_linear(torch.randn(64, 64, dtype=torch.float64), TT(rank=(2, 5), order=3))
    assert dec.ranks == (2, 5)
    assert [tuple(c.shape)[::3] for c in dec.cores] == [(1, 2), (2, 5), (5, 1)]
    with pytest.raises(ValueError, match="2 entries"):
        decompose_linear(torch.randn(64, 64), TT(rank=(2, 5, 3), order=3))


def test_embedding_rows_are_the_out_side():
    w = _w(1000, 24, seed=5)
    dec = decompose_embedding(w, TT(rank="full", order=3))
    assert dec.out_shape == (10, 10, 10) and math.prod(dec.in_shape) >= 24
    full = _tensorly_matrix(dec.cores, dec.out_shape, dec.in_shape)
    torch.testing.assert_close(full[:1000, :24], w, rtol=0, atol=1e-9)
    row = 437  # a lookup: row o = (o1, o2, o3) of the TT-matrix
    o = np.unravel_index(row, dec.out_shape)
    picked = [c[:, k] for c, k in zip(dec.cores, o, strict=True)]  # (r, in_k, r')
    vec = np.einsum("xia,ajb,bky->ijk", *(p.numpy() for p in picked)).reshape(-1)[:24]
    np.testing.assert_allclose(vec, w[row].numpy(), atol=1e-9)


def test_tensorize_equals_the_padded_permuted_reshape() -> None:
    from tnquant.decompose.tt import tensorize

    w = torch.randn(29, 10)
    out_shape, in_shape = (2, 4, 4), (3, 2, 2)
    pad = torch.zeros(32, 12, dtype=torch.float64)
    pad[:29, :10] = w.double()
    want = pad.reshape(*out_shape, *in_shape).permute(0, 3, 1, 4, 2, 5)
    assert torch.equal(tensorize(w, out_shape, in_shape, torch.float64), want)


@pytest.mark.parametrize("shape", [(32, 70000), (70000, 32)])
def test_the_gram_path_of_truncated_svd_matches_lapack(shape: tuple[int, int]) -> None:
    from tnquant.decompose.svd import GRAM_ELEMENTS, thin_svd, truncated_svd

    gen = torch.Generator().manual_seed(0)
    a = torch.randn(shape[0], 8, generator=gen, dtype=torch.float64) @ torch.randn(
        8, shape[1], generator=gen, dtype=torch.float64
    ) + 1e-3 * torch.randn(*shape, generator=gen, dtype=torch.float64)
    assert a.numel() >= GRAM_ELEMENTS
    u, s, vh = truncated_svd(a, max_rank=8)
    u0, s0, vh0 = thin_svd(a)
    torch.testing.assert_close(s, s0[:8], rtol=1e-9, atol=0)
    torch.testing.assert_close(u * s @ vh, (u0[:, :8] * s0[:8]) @ vh0[:8], rtol=0, atol=1e-9)
    u, s, vh = truncated_svd(a, delta=float(s0[8:].norm()) * 1.01)  # the tail fits: rank 8
    assert s.numel() == 8


def test_a_tt_embedding_fit_reports_the_dense_error() -> None:
    from tnquant.decompose import decompose_embedding, reconstruct

    w = torch.randn(1000, 48)
    dec = decompose_embedding(w, TT(rank=6, order=3))
    dense = reconstruct(dec).double()
    want = float((w.double() - dense).norm() / w.double().norm())
    assert abs(dec.rel_error - want) < 1e-6
