"""CP (canonical polyadic) decomposition of a conv kernel (Lebedev et al. 2015).

``kernel[o, i, h, w] ~ sum_r A_out[o, r] A_in[i, r] A_h[h, r] A_w[w, r]``,
by TensorLy's ``parafac`` (ALS, ``init='svd'``, ``random_state=0``,
``n_iter_max`` from the spec). The CP weights are absorbed and every
rank-one term is rescaled so its four columns have the same norm (which
helps per-core quantization).

A CP rank of ``R_full = prod(shape) / max(shape)`` is always exact: with
``m`` the largest mode, one rank-one term per index of the other modes
(unit vectors there, the matching fiber on mode ``m``). ``rank='full'`` and
any larger rank (capped, with a note) use that construction instead of ALS.

``ratio`` picks ``R`` from ``R * sum(shape) ~ ratio * numel``. ``tol`` runs
ALS at ``R = 1, 2, 4, ...`` until the relative error is ``<= tol`` (or ``R``
reaches ``R_full``, exact), then bisects between the last two: about
``2 log2(R)`` ALS runs, so ``tol`` costs far more than ``rank``/``ratio``.

Examples
--------
>>> from tnquant.specs import CP
>>> k = torch.randn(4, 3, 3, 3, dtype=torch.float64)
>>> part = cp_conv(k, CP(rank="full"))
>>> part.ranks
(27,)
>>> bool(torch.allclose(cp_to_full(part.cores), k))
True
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import tensorly as tl
import torch
from tensorly.decomposition import parafac
from torch import Tensor

from tnquant.decompose.ranks import cap_ranks, expand_rank, ratio_note, uniform_ranks_for_ratio
from tnquant.decompose.result import Part
from tnquant.specs import CP

__all__ = ["cp_conv", "cp_to_full", "exact_cp", "balance_columns"]


def cp_to_full(factors: Sequence[Tensor]) -> Tensor:
    """Dense tensor ``sum_r outer(factors[0][:, r], factors[1][:, r], ...)``.

    Examples
    --------
    >>> cp_to_full([torch.ones(2, 1), torch.ones(3, 1)]).shape
    torch.Size([2, 3])
    """
    letters = "abcdefghijklmnopqrstuvwxy"[: len(factors)]
    return torch.einsum(",".join(f"{c}z" for c in letters) + "->" + letters, *factors)


def balance_columns(factors: Sequence[Tensor]) -> list[Tensor]:
    """Rescale each rank-one term so its columns share the same norm (same tensor).

    Examples
    --------
    >>> a, b = balance_columns([torch.tensor([[4.0]]), torch.tensor([[1.0]])])
    >>> float(a), float(b)
    (2.0, 2.0)
    """
    norms = torch.stack([f.norm(dim=0) for f in factors])  # (N, R)
    total = norms.prod(dim=0)
    target = total ** (1.0 / len(factors))
    ok = total > 0
    return [
        torch.where(ok, f * (target / norms[k].clamp_min(1e-300)), torch.zeros_like(f))
        for k, f in enumerate(factors)
    ]


def exact_cp(t: Tensor) -> list[Tensor]:
    """An exact CP of rank ``prod(shape) / max(shape)`` (unit vectors and fibers).

    Examples
    --------
    >>> t = torch.randn(2, 5, 3, dtype=torch.float64)
    >>> bool(torch.allclose(cp_to_full(exact_cp(t)), t))
    True
    """
    shape = tuple(t.shape)
    m = max(range(len(shape)), key=lambda k: (shape[k], -k))
    others = [k for k in range(len(shape)) if k != m]
    rank = math.prod(shape[k] for k in others)
    fibers = torch.movedim(t, m, -1).reshape(rank, shape[m]).mT  # (n_m, R)
    index = torch.arange(rank, device=t.device)
    factors: list[Tensor] = [fibers] * len(shape)
    stride = rank
    for k in others:
        stride //= shape[k]
        digit = (index // stride) % shape[k]
        onehot = torch.zeros(shape[k], rank, dtype=t.dtype, device=t.device)
        onehot[digit, index] = 1
        factors[k] = onehot
    return factors


def _parafac(t: Tensor, rank: int, n_iter_max: int) -> list[Tensor]:
    if not bool(t.any()):  # ALS would solve singular systems
        return [t.new_zeros(n, rank) for n in t.shape]
    with tl.backend_context("pytorch"), warnings.catch_warnings():
        # init='svd' fills columns past a mode's size with random ones, and says so
        warnings.filterwarnings("ignore", message="Trying to compute SVD with n_eigenvecs")
        weights, factors = parafac(
            t, rank, n_iter_max=n_iter_max, init="svd", random_state=0, tol=1e-10
        )
    factors = list(factors)
    factors[0] = factors[0] * weights
    return factors


def _rel_error(t: Tensor, factors: Sequence[Tensor]) -> float:
    norm = float(t.norm())
    return float((t - cp_to_full(factors)).norm()) / norm if norm > 0 else 0.0


def _cp_for_tol(t: Tensor, tol: float, full: int, n_iter_max: int) -> list[Tensor]:
    """Doubling then bisection on the rank until the relative error is <= tol."""
    lo, rank = 0, 1
    while rank < full:
        factors = _parafac(t, rank, n_iter_max)
        if _rel_error(t, factors) <= tol:
            break
        lo, rank = rank, 2 * rank
    else:
        factors = exact_cp(t)
        rank = full
    while rank - lo > 1:  # invariant: lo fails, rank succeeds (with ``factors``)
        mid = (lo + rank) // 2
        trial = _parafac(t, mid, n_iter_max)
        if _rel_error(t, trial) <= tol:
            rank, factors = mid, trial
        else:
            lo = mid
    return factors


def cp_conv(kernel: Tensor, spec: CP) -> Part:
    """CP cores ``[A_out (O, R), A_in (I, R), A_h (kh, R), A_w (kw, R)]`` of a kernel.

    Parameters
    ----------
    kernel
        ``(O, I, kh, kw)``, in the working dtype.
    spec
        The :class:`~tnquant.specs.CP` spec.

    Returns
    -------
    Part
        The four factors, ``(R,)``, and a note if the rank was capped.

    Examples
    --------
    >>> k = torch.randn(6, 4, 3, 3, dtype=torch.float64)
    >>> [tuple(f.shape) for f in cp_conv(k, CP(rank=5, n_iter_max=20)).cores]
    [(6, 5), (4, 5), (3, 5), (3, 5)]
    """
    full = kernel.numel() // max(kernel.shape)
    note = None
    if spec.tol is not None:
        factors = _cp_for_tol(kernel, spec.tol, full, spec.n_iter_max)
        return Part("cp", balance_columns(factors), (factors[0].shape[1],))
    if spec.ratio is not None:
        count = lambda r: r[0] * sum(kernel.shape)  # noqa: E731
        (rank,) = uniform_ranks_for_ratio((full,), count, spec.ratio * kernel.numel())
        note = ratio_note(spec.ratio, count((rank,)), kernel.numel(), count((full,)))
    else:
        (rank,), note = cap_ranks(expand_rank(spec.rank, 1, "CP"), (full,), "CP", shown=spec.rank)
    factors = exact_cp(kernel) if rank >= full else _parafac(kernel, rank, spec.n_iter_max)
    return Part("cp", balance_columns(factors), (rank,), note)
