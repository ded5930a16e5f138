"""Data-aware decompositions (gram = X^T X): closed form, never worse than plain, ALS."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tnquant.decompose import decompose_linear
from tnquant.decompose.als import output_sq_error
from tnquant.decompose.tt import tt_als, tt_svd, tt_to_matrix
from tnquant.specs import TT, LowRank, Tucker


def _problem(out=24, inn=16, n=400, seed=0, rotate=True):
    """A weight and inputs with a strongly anisotropic distribution (scales 0.1..10)."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((out, inn))
    x = rng.standard_normal((n, inn)) * np.logspace(-1, 1, inn)
    if rotate:
        q, _ = np.linalg.qr(rng.standard_normal((inn, inn)))
        x = x @ q.T
    return w, x


def _out_err(x, w, what):
    """||X (W - What)^T|| / ||X W^T||, straight from the inputs."""
    return np.linalg.norm(x @ (w - what).T) / np.linalg.norm(x @ w.T)


def _dense(dec):
    from tnquant.decompose import reconstruct

    return reconstruct(dec).numpy()


def _closed_form(w, x, r):
    """The optimal rank-r What for ||X (W - What)^T||: trunc_r(W L) L^{-1}, G = L L^T."""
    chol = np.linalg.cholesky(x.T @ x)
    u, s, vt = np.linalg.svd(w @ chol, full_matrices=False)
    return (u[:, :r] * s[:r]) @ vt[:r] @ np.linalg.inv(chol)


@pytest.mark.parametrize("r", [1, 4, 9])
def test_lowrank_is_the_closed_form_optimum(r):
    w, x = _problem()
    dec = decompose_linear(torch.from_numpy(w), LowRank(rank=r), gram=torch.from_numpy(x.T @ x))
    what = _dense(dec)
    best = _closed_form(w, x, r)
    np.testing.assert_allclose(what, best, rtol=0, atol=1e-5 * np.abs(best).max())
    assert _out_err(x, w, what) == pytest.approx(_out_err(x, w, best), rel=1e-7)
    assert dec.out_rel_error == pytest.approx(_out_err(x, w, what), rel=1e-9)
    assert dec.rel_error == pytest.approx(np.linalg.norm(w - what) / np.linalg.norm(w), rel=1e-9)


def test_tucker_matrix_is_the_closed_form_optimum():
    w, x = _problem(seed=1)
    dec = decompose_linear(torch.from_numpy(w), Tucker(rank=5), gram=torch.from_numpy(x.T @ x))
    u_out, g, u_in = (c.numpy() for c in dec.cores)
    np.testing.assert_allclose(u_in.T @ u_in, np.eye(5), atol=1e-10)
    what = u_out @ g @ u_in.T
    assert _out_err(x, w, what) == pytest.approx(_out_err(x, w, _closed_form(w, x, 5)), rel=1e-7)


SPECS = [
    LowRank(rank=3),
    Tucker(rank=4),
    Tucker(rank=(2, 2, 2, 2), out_shape=(6, 4), in_shape=(4, 4)),
    TT(rank=3, out_shape=(6, 4), in_shape=(4, 4)),
    TT(rank=2, out_shape=(3, 2, 4), in_shape=(2, 4, 2)),
    TT(ratio=0.3, order=2),
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: type(s).__name__)
@pytest.mark.parametrize("rotate", [False, True])
def test_data_aware_output_error_is_no_worse_than_plain(spec, rotate):
    w, x = _problem(seed=2, rotate=rotate)
    plain = decompose_linear(torch.from_numpy(w), spec)
    aware = decompose_linear(torch.from_numpy(w), spec, gram=torch.from_numpy(x.T @ x))
    assert aware.ranks == plain.ranks and aware.n_params == plain.n_params
    e_plain, e_aware = _out_err(x, w, _dense(plain)), _out_err(x, w, _dense(aware))
    assert e_aware <= e_plain * (1 + 1e-9)
    assert aware.out_rel_error == pytest.approx(e_aware, rel=1e-9)
    assert plain.out_rel_error is None


def test_tt_als_improves_on_tt_svd():
    w, x = _problem(out=32, inn=24, n=600, seed=3)
    wt, g = torch.from_numpy(w), torch.from_numpy(x.T @ x)
    init = tt_svd(wt, (4, 8), (4, 6), (4,))
    refined = tt_als(init, wt, g, wt, g)
    before = output_sq_error(wt, tt_to_matrix(init), g)
    after = output_sq_error(wt, tt_to_matrix(refined), g)
    assert after < 0.8 * before  # a clear gain on an anisotropic input distribution
    assert _out_err(x, w, tt_to_matrix(refined).numpy()) ** 2 == pytest.approx(
        after / output_sq_error(wt, 0 * wt, g), rel=1e-9
    )


@pytest.mark.parametrize(
    "spec",
    [LowRank(tol=0.2), Tucker(tol=0.2), TT(tol=0.2, order=2)],
    ids=lambda s: type(s).__name__,
)
def test_tol_with_gram_bounds_the_output_error(spec):
    w, x = _problem(seed=4)
    dec = decompose_linear(torch.from_numpy(w), spec, gram=torch.from_numpy(x.T @ x))
    assert _out_err(x, w, _dense(dec)) <= 0.2


def test_rank_deficient_gram_works():
    w, x = _problem(n=5, seed=5)  # 5 samples, 16 inputs
    dec = decompose_linear(torch.from_numpy(w), LowRank(rank=3), gram=torch.from_numpy(x.T @ x))
    assert np.isfinite(dec.rel_error) and dec.out_rel_error <= 1.0


def test_bad_gram():
    w = torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"gram must have shape \(in, in\) = \(3, 3\)"):
        decompose_linear(w, LowRank(rank=1), gram=torch.eye(4))
    bad = torch.eye(3)
    bad[0, 1] = float("nan")
    with pytest.raises(ValueError, match="gram has 1 non-finite"):
        decompose_linear(w, LowRank(rank=1), gram=bad)
    with pytest.raises(TypeError, match="gram must be a torch.Tensor"):
        decompose_linear(w, LowRank(rank=1), gram=np.eye(3))
