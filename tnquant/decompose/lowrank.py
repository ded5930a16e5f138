"""Low-rank factorization ``W ~ U @ V`` by truncated SVD, plain or data-aware.

Data-aware (a Gram matrix ``G = X^T X`` of the layer's inputs): with
``L = cholesky(G + eps I)``, the rank-``r`` ``What`` minimizing the output
error ``||X (W - What)^T||_F = ||(W - What) L||_F`` (up to the damping) is
``What = trunc_r(W L) L^{-1}`` (Eckart-Young in the whitened space). This is
the closed form; :func:`whitened_svd` computes it for low rank and for
Tucker on a matrix.

``tol`` bounds the weight error without a Gram matrix and the output error
(``out_rel_error``) with one.

Examples
--------
>>> from tnquant.specs import LowRank
>>> w = torch.randn(20, 10, dtype=torch.float64)
>>> part = lowrank_matrix(w, LowRank(rank=4))
>>> [tuple(c.shape) for c in part.cores], part.ranks
([(20, 4), (4, 10)], (4,))
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from tnquant.decompose.ranks import cap_ranks, expand_rank, ratio_note, uniform_ranks_for_ratio
from tnquant.decompose.result import Part
from tnquant.decompose.svd import truncated_svd, whitening
from tnquant.specs import LowRank

__all__ = ["whitened_svd", "unwhiten", "lowrank_matrix", "balance"]


def whitened_svd(
    w: Tensor,
    gram: Tensor | None,
    *,
    max_rank: int,
    tol: float | None = None,
    method: str = "truncated",
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Truncated SVD of ``W`` (or of ``W L``, ``L L^T = G + eps I``).

    Returns ``(U, S, Vh, L)``: ``What = U diag(S) Vh L^{-1}`` (``L = None``
    without a Gram matrix). With ``tol`` the rank is the smallest whose
    relative error (of the weight, or of the output when ``gram`` is given)
    is at most ``tol``.

    Examples
    --------
    >>> w = torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64))
    >>> u, s, vh, chol = whitened_svd(w, None, max_rank=3, tol=0.3)  # 1 / sqrt(14) <= 0.3
    >>> s
    tensor([3., 2.], dtype=torch.float64)
    """
    if gram is None:
        chol, target = None, w
        budget = float(w.norm()) ** 2
    else:
        chol, eps = whitening(gram)
        target = w @ chol
        # ||(W - What) L||^2 = out_err^2 + eps ||W - What||^2: bound the first term
        budget = max(float(target.norm()) ** 2 - eps * float(w.norm()) ** 2, 0.0)
    delta = None if tol is None else tol * math.sqrt(budget)
    u, s, vh = truncated_svd(target, max_rank=max_rank, delta=delta, method=method)
    return u, s, vh, chol


def unwhiten(vh: Tensor, chol: Tensor | None) -> Tensor:
    """``Vh L^{-1}`` (``Vh`` unchanged when ``chol`` is None).

    Examples
    --------
    >>> unwhiten(torch.ones(1, 2), 2 * torch.eye(2))
    tensor([[0.5000, 0.5000]])
    """
    if chol is None:
        return vh
    return torch.linalg.solve_triangular(chol, vh, upper=False, left=False)


def balance(u: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """Rescale column ``j`` of ``u`` and row ``j`` of ``v`` to equal norms (same product).

    Examples
    --------
    >>> u, v = balance(torch.tensor([[4.0]]), torch.tensor([[1.0]]))
    >>> float(u), float(v)
    (2.0, 2.0)
    """
    nu, nv = u.norm(dim=0), v.norm(dim=1)
    scale = torch.where((nu > 0) & (nv > 0), torch.sqrt(nv / nu.clamp_min(1e-300)), 1.0)
    return u * scale, v / scale[:, None]


def lowrank_matrix(w: Tensor, spec: LowRank, gram: Tensor | None = None) -> Part:
    """Low-rank cores ``[U (out, r), V (r, in)]`` of a matrix.

    Parameters
    ----------
    w
        ``(out, in)``, in the working dtype.
    spec
        The :class:`~tnquant.specs.LowRank` spec. ``ratio`` targets
        ``r * (out + in) / (out * in)``.
    gram
        Optional ``(in, in)`` Gram matrix of the inputs (data-aware).

    Returns
    -------
    Part
        Cores, ``(r,)``, and a note if the rank was capped at ``min(out, in)``.

    Examples
    --------
    >>> w = torch.randn(8, 6, dtype=torch.float64)
    >>> part = lowrank_matrix(w, LowRank(rank="full"))
    >>> bool(torch.allclose(part.cores[0] @ part.cores[1], w))
    True
    """
    out, inn = w.shape
    cap = min(out, inn)
    note = None
    if spec.rank is not None:
        requested = expand_rank(spec.rank, 1, "LowRank")
        (rank,), note = cap_ranks(requested, (cap,), "LowRank", shown=spec.rank)
    elif spec.ratio is not None:
        count = lambda r: r[0] * (out + inn)  # noqa: E731
        (rank,) = uniform_ranks_for_ratio((cap,), count, spec.ratio * out * inn)
        note = ratio_note(spec.ratio, count((rank,)), out * inn, count((cap,)))
    else:
        rank = cap
    u, s, vh, chol = whitened_svd(w, gram, max_rank=rank, tol=spec.tol, method=spec.svd)
    root = torch.sqrt(s)
    left, right = balance(u * root, unwhiten(root[:, None] * vh, chol))
    return Part("lowrank", [left, right], (s.numel(),), note)
