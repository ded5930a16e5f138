"""SVDs in float64, truncated by rank and/or discarded energy; whitening by a Gram matrix.

Every decomposition computes in :func:`work_dtype` (float64, except on a
device without float64 such as Apple MPS) and casts back at the end.

``method='randomized'`` is Halko-Martinsson-Tropp (range finder with power
iterations) driven by a ``torch.Generator`` seeded with :data:`SEED` on the
tensor's device: the same input gives the same factors, and the global RNG
is untouched. When the sketch would be at least half the matrix, the exact
SVD is used instead (it is cheaper then).

Examples
--------
>>> a = torch.randn(30, 20, dtype=torch.float64)
>>> u, s, vh = truncated_svd(a, max_rank=5)
>>> u.shape, s.shape, vh.shape
(torch.Size([30, 5]), torch.Size([5]), torch.Size([5, 20]))
"""

from __future__ import annotations

import torch
from torch import Tensor

from tnquant.decompose.ranks import energy_rank

__all__ = ["SEED", "work_dtype", "thin_svd", "truncated_svd", "randomized_svd", "whitening"]

#: Seed of the generator behind ``svd='randomized'``.
SEED = 0
#: Extra columns of the randomized range finder.
OVERSAMPLES = 10
#: Power iterations of the randomized range finder.
POWER_ITERS = 2
#: Relative Tikhonov damping of a Gram matrix before its Cholesky factor.
GRAM_DAMP = 1e-8


def work_dtype(device: torch.device) -> torch.dtype:
    """float64, or float32 on devices without float64 (MPS).

    Examples
    --------
    >>> work_dtype(torch.device("cpu"))
    torch.float64
    """
    return torch.float32 if device.type == "mps" else torch.float64


def _generator(device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(SEED)


def thin_svd(a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``torch.linalg.svd(a, full_matrices=False)``, computed on the tall side.

    LAPACK is 2-5x faster on a tall matrix than on its wide transpose.

    Examples
    --------
    >>> a = torch.randn(3, 50, dtype=torch.float64)
    >>> u, s, vh = thin_svd(a)
    >>> bool(torch.allclose(u * s @ vh, a))
    True
    """
    if a.shape[0] < a.shape[1]:
        u, s, vh = torch.linalg.svd(a.mT, full_matrices=False)
        return vh.mT, s, u.mT
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    return u, s, vh


def randomized_svd(a: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Rank-``rank`` randomized SVD and the squared norm of what the sketch missed.

    Returns ``(U, S, Vh, residual_sq)`` with ``residual_sq = ||A - Q Q^T A||^2``
    (``Q`` the sketched basis, ``rank + OVERSAMPLES`` columns); the full
    squared error of the rank-``rank`` result is ``residual_sq +
    sum(S_dropped^2)``, and ``S`` holds all ``rank + OVERSAMPLES`` values so
    callers can compute it.

    Examples
    --------
    >>> a = torch.randn(50, 8, dtype=torch.float64) @ torch.randn(8, 40, dtype=torch.float64)
    >>> u, s, vh, res = randomized_svd(a, 8)
    >>> bool(torch.allclose(u[:, :8] * s[:8] @ vh[:8], a))
    True
    >>> float(res) < 1e-12 * float(a.norm() ** 2)
    True
    """
    m, n = a.shape
    q = min(rank + OVERSAMPLES, m, n)
    omega = torch.randn(n, q, generator=_generator(a.device), dtype=a.dtype, device=a.device)
    basis = torch.linalg.qr(a @ omega).Q
    for _ in range(POWER_ITERS):
        basis = torch.linalg.qr(a.mT @ basis).Q
        basis = torch.linalg.qr(a @ basis).Q
    b = basis.mT @ a
    ub, s, vh = thin_svd(b)
    residual = (a.norm() ** 2 - b.norm() ** 2).clamp_min(0)
    return basis @ ub, s, vh, residual


def truncated_svd(
    a: Tensor, *, max_rank: int | None = None, delta: float | None = None, method: str = "truncated"
) -> tuple[Tensor, Tensor, Tensor]:
    """Truncated SVD ``a ~ U diag(S) Vh`` of a 2-D tensor.

    The rank is the smallest ``r <= max_rank`` whose discarded Frobenius
    norm is ``<= delta``; without ``delta`` it is ``max_rank`` (capped by
    the shape); without either, the full thin SVD.

    Parameters
    ----------
    a
        The matrix, in the working dtype.
    max_rank
        Largest rank to keep.
    delta
        Absolute Frobenius error allowed for the truncation.
    method
        ``'truncated'`` (exact) or ``'randomized'``. With ``delta`` the
        randomized sketch doubles until the (exactly known) error fits.

    Returns
    -------
    U, S, Vh
        ``(m, r)``, ``(r,)``, ``(r, n)``.

    Examples
    --------
    >>> a = torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64))
    >>> truncated_svd(a, delta=1.5)[1]
    tensor([3., 2.], dtype=torch.float64)
    """
    full = min(a.shape)
    cap = full if max_rank is None else max(1, min(max_rank, full))
    if method == "randomized" and (delta is not None or cap < full):
        q = cap if delta is None else min(cap, 16)
        while 2 * (q + OVERSAMPLES) < full:
            u, s, vh, residual = randomized_svd(a, q)
            if delta is None:
                return u[:, :q], s[:q], vh[:q]
            r = _fit(s, residual, delta, min(q, cap))
            if r is not None:
                return u[:, :r], s[:r], vh[:r]
            if q >= cap:
                return u[:, :cap], s[:cap], vh[:cap]
            q = min(2 * q, cap)
    if min(a.shape) * GRAM_RATIO <= max(a.shape) and a.numel() >= GRAM_ELEMENTS:
        return _gram_svd(a, cap, delta)
    u, s, vh = thin_svd(a)
    r = cap if delta is None else energy_rank(s, delta, cap)
    return u[:, :r], s[:r], vh[:r]


#: a matrix this many times longer than wide (and this large) is decomposed through its
#: small Gram matrix: no copy of it and no full-size factor (see :func:`_gram_svd`)
GRAM_RATIO = 16
GRAM_ELEMENTS = 1 << 21


def _gram_svd(a: Tensor, cap: int, delta: float | None) -> tuple[Tensor, Tensor, Tensor]:
    """Truncated SVD of a very wide (or tall) ``a`` from the eigenvectors of its small Gram.

    LAPACK's SVD copies ``a`` and returns a factor as large as it; this path
    allocates the ``k x k`` Gram (``k = min(m, n)``) and the kept ``r`` rows of
    the large factor only. The large factor is ``U^T a / s`` (``a V / s``), so
    ``U diag(S) Vh`` is the orthogonal projection of ``a`` onto the kept
    vectors: as accurate as the exact SVD's truncation even where the small
    singular values (square roots of eigenvalues) lose relative precision.

    Examples
    --------
    >>> a = torch.randn(4, 400, dtype=torch.float64)
    >>> u, s, vh = _gram_svd(a, 4, None)
    >>> bool(torch.allclose(u * s @ vh, a)), bool(torch.allclose(s, torch.linalg.svdvals(a)))
    (True, True)
    """
    wide = a.shape[0] <= a.shape[1]
    gram = a @ a.mT if wide else a.mT @ a
    evals, vecs = torch.linalg.eigh(gram)
    s = evals.flip(0).clamp_min(0).sqrt()
    vecs = vecs.flip(1)
    r = cap if delta is None else energy_rank(s, delta, cap)
    s, vecs = s[:r], vecs[:, :r]
    inv = torch.where(s > 0, 1 / s.clamp_min(torch.finfo(s.dtype).tiny), torch.zeros_like(s))
    if wide:
        return vecs, s, (vecs.mT @ a) * inv[:, None]
    return (a @ vecs) * inv, s, vecs.mT


def _fit(s: Tensor, residual: Tensor, delta: float, cap: int) -> int | None:
    """Smallest r <= cap with residual + sum(s[r:]^2) <= delta^2, else None."""
    tail = torch.flip(torch.cumsum(torch.flip(s**2, (0,)), 0), (0,))
    tail = torch.cat([tail, tail.new_zeros(1)]) + residual
    ok = (tail[1 : cap + 1] <= delta**2).nonzero()
    return int(ok[0]) + 1 if ok.numel() else None


def whitening(gram: Tensor) -> tuple[Tensor, float]:
    """Lower Cholesky factor ``L`` of ``gram + eps I`` (``L L^T``) and ``eps``.

    ``eps = GRAM_DAMP * trace(gram) / n``, raised 100x at a time (up to
    ``1e-2 * trace / n``) while the factorization fails; a zero gram gives
    ``(I, 1.0)``. ``gram`` is symmetrized first.

    Raises
    ------
    ValueError
        If ``gram`` is clearly not positive semi-definite.

    Examples
    --------
    >>> g = torch.tensor([[4.0, 2.0], [2.0, 3.0]], dtype=torch.float64)
    >>> l, eps = whitening(g)
    >>> bool(torch.allclose(l @ l.T, g + eps * torch.eye(2, dtype=torch.float64)))
    True
    """
    gram = (gram + gram.mT) / 2
    n = gram.shape[0]
    eye = torch.eye(n, dtype=gram.dtype, device=gram.device)
    trace = float(torch.diagonal(gram).sum())
    if trace <= 0 and not bool(gram.any()):
        return eye, 1.0  # no input energy at all: every approximation is as good
    eps = GRAM_DAMP * trace / n
    for _ in range(4):  # damping up to 1e-2 of the mean eigenvalue
        chol, info = torch.linalg.cholesky_ex(gram + eps * eye)
        if trace > 0 and int(info) == 0:
            return chol, eps
        eps *= 100
    raise ValueError(
        "gram must be symmetric positive semi-definite (X^T X); its Cholesky factor "
        f"failed even with damping {eps / 100:.3g}"
    )
