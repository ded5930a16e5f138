"""TT-matrix (MPO) decomposition: TT-SVD with rank caps and delta truncation, and TT-ALS.

A weight ``W`` of shape ``(out, in)`` is zero-padded to ``(prod(out_shape),
prod(in_shape))``, viewed as ``(o_1..o_d, i_1..i_d)`` (row-major over both
multi-indices), permuted to ``(o_1, i_1, ..., o_d, i_d)`` and merged to the
``d``-way tensor of modes ``o_k * i_k``. TT-SVD (Oseledets 2011) sweeps left
to right, truncating each unfolding's SVD; core ``k`` is then reshaped to
``(r_{k-1}, o_k, i_k, r_k)``, ``r_0 = r_d = 1``.

With ``tol``, every one of the ``d - 1`` truncations discards at most
``delta = tol * ||W|| / sqrt(d - 1)``, so the total relative error is at most
``tol`` (the errors of the steps are orthogonal).

With a Gram matrix (data-aware), :func:`tt_als` refines the cores by
alternating least squares on the output error (see :mod:`.als`): left and
right sweeps, one block at a time, with the other cores kept orthogonal
(QR) so each block's problem is well conditioned. The best cores seen
(by the output error) are kept, so the result is never worse than TT-SVD.

Examples
--------
>>> w = torch.randn(12, 6, dtype=torch.float64)
>>> cores = tt_svd(w, (4, 3), (3, 2), (12,))
>>> [tuple(c.shape) for c in cores]
[(1, 4, 3, 6), (6, 3, 2, 1)]
>>> bool(torch.allclose(tt_to_matrix(cores), w))
True
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from tnquant.decompose import als
from tnquant.decompose.svd import truncated_svd

__all__ = ["tt_svd", "tt_sweep", "tensorize", "tt_to_matrix", "tt_als"]


def tt_to_matrix(cores: Sequence[Tensor]) -> Tensor:
    """Dense ``(prod(out_shape), prod(in_shape))`` matrix of TT-matrix cores.

    Examples
    --------
    >>> c = [torch.ones(1, 2, 3, 1)]
    >>> tt_to_matrix(c).shape
    torch.Size([2, 3])
    """
    out = cores[0]  # (1, O, I, r)
    for core in cores[1:]:
        r0, o, i, r1 = core.shape
        big_o, big_i = out.shape[1], out.shape[2]
        out = torch.tensordot(out, core, dims=([3], [0]))  # (1, O, I, o, i, r1)
        out = out.permute(0, 1, 3, 2, 4, 5).reshape(1, big_o * o, big_i * i, r1)
    return out[0, :, :, 0]


def tt_svd(
    w_pad: Tensor,
    out_shape: Sequence[int],
    in_shape: Sequence[int],
    max_ranks: Sequence[int],
    delta: float | None = None,
    method: str = "truncated",
) -> list[Tensor]:
    """TT-SVD of a padded matrix into TT-matrix cores ``(r_{k-1}, o_k, i_k, r_k)``.

    Parameters
    ----------
    w_pad
        ``(prod(out_shape), prod(in_shape))``, in the working dtype.
    out_shape, in_shape
        The tensorized shapes, of the same length ``d``.
    max_ranks
        The ``d - 1`` largest inner ranks.
    delta
        Absolute Frobenius error allowed at each of the ``d - 1``
        truncations (``tol * ||W|| / sqrt(d - 1)`` for a total relative
        error ``tol``); ``None`` keeps ``max_ranks``.
    method
        ``'truncated'`` or ``'randomized'`` SVD.

    Returns
    -------
    list of Tensor
        The ``d`` cores.

    Examples
    --------
    >>> w = torch.randn(8, 8, dtype=torch.float64)
    >>> cores = tt_svd(w, (2, 2, 2), (2, 2, 2), (2, 2))
    >>> [c.shape[-1] for c in cores]
    [2, 2, 1]
    """
    t = tensorize(w_pad, out_shape, in_shape, w_pad.dtype)
    return tt_sweep(t, out_shape, in_shape, max_ranks, delta, method)


def tensorize(
    w: Tensor, out_shape: Sequence[int], in_shape: Sequence[int], dtype: torch.dtype
) -> Tensor:
    """``w`` zero-padded, viewed as ``(o_1..o_d, i_1..i_d)`` and permuted to ``(o_1, i_1, ...)``.

    One allocation of the result (in ``dtype``), filled one block of rows at
    a time from ``w`` (any float dtype): no padded or converted copy of ``w``.

    Examples
    --------
    >>> w = torch.arange(6.0).reshape(3, 2)
    >>> t = tensorize(w, (2, 2), (2, 1), torch.float64)
    >>> t.shape, bool(torch.equal(t.permute(0, 2, 1, 3).reshape(4, 2)[:3], w.double()))
    (torch.Size([2, 2, 2, 1]), True)
    """
    d = len(out_shape)
    order = [x for k in range(d) for x in (k, d + k)]
    t = torch.zeros([n for k in range(d) for n in (out_shape[k], in_shape[k])], dtype=dtype)
    view = t.permute([order.index(k) for k in range(2 * d)])  # (o_1..o_d, i_1..i_d), strided
    per = 1
    for o in out_shape[1:]:
        per *= o
    rows, cols = w.shape
    for a in range(out_shape[0]):
        r0, r1 = a * per, min((a + 1) * per, rows)
        if r0 >= rows:
            break
        block = torch.zeros(per, view.shape[d:].numel(), dtype=dtype)
        block[: r1 - r0, :cols] = w[r0:r1]
        view[a].copy_(block.reshape(view.shape[1:]))
    return t


def tt_sweep(
    t: Tensor,
    out_shape: Sequence[int],
    in_shape: Sequence[int],
    max_ranks: Sequence[int],
    delta: float | None = None,
    method: str = "truncated",
) -> list[Tensor]:
    """The left-to-right TT-SVD sweep of a :func:`tensorize` d tensor (see :func:`tt_svd`).

    Examples
    --------
    >>> w = torch.randn(8, 8, dtype=torch.float64)
    >>> t = tensorize(w, (2, 4), (4, 2), torch.float64)
    >>> bool(torch.allclose(tt_to_matrix(tt_sweep(t, (2, 4), (4, 2), (8,))), w))
    True
    """
    d = len(out_shape)
    modes = [o * i for o, i in zip(out_shape, in_shape, strict=True)]
    rest = t.reshape(modes[0], -1)
    cores = []
    r_prev = 1
    for k in range(d - 1):
        rest = rest.reshape(r_prev * modes[k], -1)
        u, s, vh = truncated_svd(rest, max_rank=max_ranks[k], delta=delta, method=method)
        r = s.numel()
        cores.append(u.reshape(r_prev, out_shape[k], in_shape[k], r))
        rest = s[:, None] * vh
        r_prev = r
    cores.append(rest.reshape(r_prev, out_shape[-1], in_shape[-1], 1))
    return cores


def _left_orth(cores: list[Tensor], k: int) -> None:
    """QR core k (left-orthogonal), push R into core k+1, in place."""
    r0, o, i, r1 = cores[k].shape
    q, r = torch.linalg.qr(cores[k].reshape(r0 * o * i, r1))
    cores[k] = q.reshape(r0, o, i, q.shape[1])
    cores[k + 1] = torch.tensordot(r, cores[k + 1], dims=([1], [0]))


def _right_orth(cores: list[Tensor], k: int) -> None:
    """LQ core k (right-orthogonal), push L into core k-1, in place."""
    r0, o, i, r1 = cores[k].shape
    q, r = torch.linalg.qr(cores[k].reshape(r0, o * i * r1).mT)
    cores[k] = q.mT.reshape(q.shape[1], o, i, r1)
    cores[k - 1] = torch.tensordot(cores[k - 1], r.mT, dims=([3], [0]))


def tt_als(
    cores: Sequence[Tensor],
    w_pad: Tensor,
    gram_pad: Tensor,
    w: Tensor,
    gram: Tensor,
    sweeps: int = als.SWEEPS,
) -> list[Tensor]:
    """Refine TT cores on the output error ``tr((W - What) G (W - What)^T)``.

    Parameters
    ----------
    cores
        Initial cores (from :func:`tt_svd`).
    w_pad, gram_pad
        The padded weight and the padded, damped Gram matrix the least
        squares use.
    w, gram
        The unpadded weight and Gram matrix that judge the result; the best
        cores seen are returned.
    sweeps
        Number of left-right-left sweeps.

    Returns
    -------
    list of Tensor
        Cores with an output error no larger than the initial ones'.

    Examples
    --------
    >>> w = torch.randn(4, 4, dtype=torch.float64)
    >>> g = torch.diag(torch.tensor([100.0, 1.0, 1.0, 0.01], dtype=torch.float64))
    >>> init = tt_svd(w, (2, 2), (2, 2), (1,))
    >>> err = lambda c: als.output_sq_error(w, tt_to_matrix(c), g)
    >>> err(tt_als(init, w, g, w, g)) <= err(init)
    True
    """
    cores = list(cores)
    d = len(cores)
    out, inn = w.shape

    def judge(cs: Sequence[Tensor]) -> float:
        return als.output_sq_error(w, tt_to_matrix(cs)[:out, :inn], gram)

    best, best_err = list(cores), judge(cores)
    if d == 1:
        return best
    target_g = w_pad @ gram_pad
    for k in range(d - 1, 0, -1):
        _right_orth(cores, k)
    previous = best_err
    for _ in range(sweeps):
        for k in range(d - 1):
            cores[k] = als.solve_block(cores, k, tt_to_matrix, target_g, gram_pad)
            _left_orth(cores, k)
        for k in range(d - 1, 0, -1):
            cores[k] = als.solve_block(cores, k, tt_to_matrix, target_g, gram_pad)
            _right_orth(cores, k)
        err = judge(cores)
        if err < best_err:
            best, best_err = list(cores), err
        if err > (1 - als.STALL) * previous:  # stalled
            break
        previous = err
    return best
