"""Tucker decompositions: Tucker-2 of a matrix, tensorized Tucker of a Linear, Tucker-2 of a conv.

- Matrix (``order=1``): ``W ~ U_out @ G @ U_in.T`` from one truncated SVD
  (HOSVD of a matrix is optimal; data-aware: of ``W L``, see
  :mod:`.lowrank`).
- Tensorized (``order=d > 1``): the padded weight as a ``2d``-way tensor,
  HOSVD (our own, so ``tol`` can pick ranks from the per-mode spectra) then
  HOOI (TensorLy's ``partial_tucker`` started from it). Data-aware: ALS on
  the output error (:mod:`.als`), factors kept orthonormal.
- Conv2d: Tucker-2 on the channel modes (Kim et al. 2016), HOSVD then HOOI.

Ranks are always clamped to ``min(n_k, prod(n) / n_k)`` before TensorLy sees
them (TensorLy 0.10 silently returns a wrong decomposition for a rank above
a mode size). With ``tol``, mode ``k`` of ``N`` discards at most ``tol *
||W|| / sqrt(N)``: the HOSVD error is then at most ``tol`` and HOOI only
lowers it.

Examples
--------
>>> from tnquant.specs import Tucker
>>> k = torch.randn(6, 5, 3, 3, dtype=torch.float64)
>>> part = tucker_conv(k, Tucker(rank=30))
>>> part.ranks, part.note is not None
((6, 5), True)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import tensorly as tl
import torch
from tensorly.decomposition import partial_tucker
from torch import Tensor

from tnquant.decompose import als
from tnquant.decompose.lowrank import unwhiten, whitened_svd
from tnquant.decompose.ranks import (
    cap_ranks,
    expand_rank,
    proportional_ranks_for_ratio,
    ratio_note,
    tucker_consistent,
    tucker_n_params,
    tucker_rank_caps,
    uniform_ranks_for_ratio,
)
from tnquant.decompose.result import Part
from tnquant.decompose.svd import truncated_svd, whitening
from tnquant.specs import Tucker

__all__ = [
    "HOOI_ITERS",
    "hosvd",
    "hooi",
    "tucker_to_full",
    "tensorized_to_matrix",
    "tucker_matrix",
    "tucker_tensorized",
    "tucker_conv",
    "tucker_als",
    "data_aware_gram",
]

#: Most HOOI iterations after HOSVD (TensorLy stops earlier when the
#: relative error changes by less than 1e-4).
HOOI_ITERS = 10


def _mode_dot(t: Tensor, mat: Tensor, mode: int) -> Tensor:
    """``t x_mode mat``: contract mode ``mode`` of ``t`` with the columns of ``mat``."""
    return torch.movedim(torch.tensordot(mat, t, dims=([1], [mode])), 0, mode)


def tucker_to_full(core: Tensor, factors: Sequence[Tensor], modes: Sequence[int]) -> Tensor:
    """``core x_{m} factors[j]`` for the given modes: the dense tensor.

    Examples
    --------
    >>> tucker_to_full(torch.ones(2, 3), [torch.ones(4, 2)], (0,)).shape
    torch.Size([4, 3])
    """
    for mode, factor in zip(modes, factors, strict=True):
        core = _mode_dot(core, factor, mode)
    return core


def hosvd(
    t: Tensor,
    ranks: Sequence[int],
    modes: Sequence[int],
    delta: float | None = None,
    method: str = "truncated",
) -> tuple[Tensor, list[Tensor]]:
    """Truncated HOSVD on ``modes``: leading left singular vectors of each unfolding.

    With ``delta`` each mode keeps the smallest rank (``<= ranks[j]``)
    discarding at most ``delta`` of the unfolding's Frobenius norm.

    Examples
    --------
    >>> t = torch.randn(4, 5, 6, dtype=torch.float64)
    >>> core, factors = hosvd(t, (4, 5, 6), (0, 1, 2))
    >>> bool(torch.allclose(tucker_to_full(core, factors, (0, 1, 2)), t))
    True
    """
    factors = []
    for mode, rank in zip(modes, ranks, strict=True):
        unfolding = torch.movedim(t, mode, 0).reshape(t.shape[mode], -1)
        u, _, _ = truncated_svd(unfolding, max_rank=rank, delta=delta, method=method)
        factors.append(u)
    core = t
    for mode, factor in zip(modes, factors, strict=True):
        core = _mode_dot(core, factor.mT, mode)
    return core, factors


def hooi(
    t: Tensor, core: Tensor, factors: list[Tensor], modes: Sequence[int], method: str
) -> tuple[Tensor, list[Tensor]]:
    """HOOI refinement (TensorLy ``partial_tucker``) started from a HOSVD.

    Modes already at full size are exact and skipped (returned as given).

    Examples
    --------
    >>> t = torch.randn(5, 4, 3, dtype=torch.float64)
    >>> core, factors = hooi(t, *hosvd(t, (2, 2), (0, 1)), (0, 1), "truncated")
    >>> core.shape
    torch.Size([2, 2, 3])
    """
    if all(f.shape[1] == f.shape[0] for f in factors):
        return core, factors
    svd = "randomized_svd" if method == "randomized" else "truncated_svd"
    with tl.backend_context("pytorch"):
        (new_core, new_factors), _ = partial_tucker(
            t,
            rank=[f.shape[1] for f in factors],
            modes=list(modes),
            n_iter_max=HOOI_ITERS,
            init=(core, list(factors)),
            svd=svd,
            random_state=0,
        )
    if new_core.norm() < core.norm():  # HOOI maximizes ||core||: keep the HOSVD otherwise
        return core, factors
    return new_core, list(new_factors)


def _ranks_or_cap(spec: Tucker, caps: tuple[int, ...], what: str):
    return cap_ranks(expand_rank(spec.rank, len(caps), what), caps, what, shown=spec.rank)


def tucker_matrix(w: Tensor, spec: Tucker, gram: Tensor | None = None) -> Part:
    """Tucker-2 of a matrix: ``[U_out (out, r_out), G (r_out, r_in), U_in (in, r_in)]``.

    ``U_out`` and ``U_in`` have orthonormal columns. ``ratio`` uses
    ``r_out = r_in``; ``tol`` picks ``r_out = r_in = r`` by energy (of the
    output with ``gram``).

    Examples
    --------
    >>> w = torch.randn(7, 5, dtype=torch.float64)
    >>> u, g, v = tucker_matrix(w, Tucker(rank="full")).cores
    >>> bool(torch.allclose(u @ g @ v.T, w))
    True
    """
    out, inn = w.shape
    cap = min(out, inn)
    note = None
    if spec.rank is not None:
        ranks, note = _ranks_or_cap(spec, (cap, cap), "Tucker")
    elif spec.ratio is not None:
        count = lambda r: tucker_n_params((out, inn), r)  # noqa: E731
        ranks = uniform_ranks_for_ratio((cap, cap), count, spec.ratio * out * inn)
        note = ratio_note(spec.ratio, count(ranks), out * inn, count((cap, cap)))
    else:
        ranks = (cap, cap)
    u, s, vh, chol = whitened_svd(w, gram, max_rank=max(ranks), tol=spec.tol, method=spec.svd)
    if spec.tol is not None:
        ranks = (s.numel(), s.numel())
    r_out, r_in = ranks
    m = min(ranks)
    u_out = u[:, :r_out]
    if chol is None:
        u_in = vh[:r_in].mT
    else:
        u_in = torch.linalg.qr(unwhiten(vh[:r_in], chol).mT).Q
    core = ((u_out.mT @ u[:, :m]) * s[:m]) @ (unwhiten(vh[:m], chol) @ u_in)
    return Part("tucker", [u_out, core, u_in], (r_out, r_in), note)


def _tucker_ranks(
    spec: Tucker, sizes: tuple[int, ...], fixed: tuple[int, ...], dense: int, proportional: bool
) -> tuple[tuple[int, ...], str | None]:
    """Ranks of a tensor Tucker from rank= or ratio= (tol: the caps), consistent."""
    caps = tucker_rank_caps((*sizes, *fixed))[: len(sizes)]
    if spec.rank is not None:
        requested = expand_rank(spec.rank, len(sizes), "Tucker")
        capped = tucker_consistent(
            tuple(min(r, c) for r, c in zip(requested, caps, strict=True)), fixed
        )
        return capped, cap_ranks(requested, capped, "Tucker", shown=spec.rank)[1]
    if spec.ratio is None:
        return caps, None
    count = lambda r: tucker_n_params(sizes, tucker_consistent(r, fixed), fixed)  # noqa: E731
    if proportional:
        ranks = proportional_ranks_for_ratio(sizes, caps, count, spec.ratio * dense)
    else:
        ranks = uniform_ranks_for_ratio(caps, count, spec.ratio * dense)
    note = ratio_note(spec.ratio, count(ranks), dense, count(caps))
    return tucker_consistent(ranks, fixed), note


def _trim(core: Tensor, factors: list[Tensor], modes: Sequence[int]) -> tuple[Tensor, list[Tensor]]:
    """Drop factor columns the core cannot use (exact: a rank-deficient unfolding).

    Rank ``r_k`` above the product of the core's other dimensions leaves the
    core's mode-``k`` unfolding rank-deficient; rotating it by its SVD and
    dropping the zero directions changes nothing.
    """
    for j, mode in enumerate(modes):
        rest = core.numel() // core.shape[mode]
        if core.shape[mode] <= rest:
            continue
        unfolding = torch.movedim(core, mode, 0).reshape(core.shape[mode], -1)
        p = torch.linalg.svd(unfolding, full_matrices=False)[0]  # (r_k, rest)
        factors[j] = factors[j] @ p
        core = _mode_dot(core, p.mT, mode)
    return core, factors


def tucker_conv(kernel: Tensor, spec: Tucker) -> Part:
    """Tucker-2 of a conv kernel on its channel modes: ``[U_out, G, U_in]``.

    ``U_out (O, r_out)``, ``G (r_out, r_in, *k)``, ``U_in (I, r_in)``;
    ``kernel ~ G x_0 U_out x_1 U_in``, for a Conv2d kernel ``(O, I, kh, kw)``
    or a Conv1d one ``(O, I, k)``. ``rank`` is an int (both modes) or
    ``(r_out, r_in)``, capped at ``(O, I)``; ``ratio`` picks ranks
    proportional to ``(O, I)``.

    Examples
    --------
    >>> k = torch.randn(8, 4, 3, 3, dtype=torch.float64)
    >>> part = tucker_conv(k, Tucker(rank=(4, 2)))
    >>> [tuple(c.shape) for c in part.cores]
    [(8, 4), (4, 2, 3, 3), (4, 2)]
    >>> [tuple(c.shape) for c in tucker_conv(k[..., 0], Tucker(rank=(4, 2))).cores]
    [(8, 4), (4, 2, 3), (4, 2)]
    """
    o, i = kernel.shape[:2]
    spatial = tuple(kernel.shape[2:])
    ranks, note = _tucker_ranks(spec, (o, i), spatial, kernel.numel(), proportional=True)
    delta = None if spec.tol is None else spec.tol * float(kernel.norm()) / math.sqrt(2)
    core, factors = _trim(*hosvd(kernel, ranks, (0, 1), delta, spec.svd), (0, 1))
    core, factors = hooi(kernel, core, factors, (0, 1), spec.svd)
    return Part("tucker", [factors[0], core, factors[1]], tuple(core.shape[:2]), note)


def tucker_tensorized(
    w_pad: Tensor,
    out_shape: tuple[int, ...],
    in_shape: tuple[int, ...],
    spec: Tucker,
    tol: float | None,
    dense: int,
) -> Part:
    """Tucker of the padded weight reshaped to ``(o_1..o_d, i_1..i_d)``: ``[G, U_1..U_2d]``.

    ``tol`` (passed separately so data-aware callers can tighten it) bounds
    the relative error of the padded weight; ``ratio`` uses ranks
    proportional to the mode sizes and targets ``ratio * dense``.

    Examples
    --------
    >>> w = torch.randn(8, 9, dtype=torch.float64)
    >>> part = tucker_tensorized(w, (4, 2), (3, 3), Tucker(rank=2, order=2), None, 72)
    >>> [tuple(c.shape) for c in part.cores]
    [(2, 2, 2, 2), (4, 2), (2, 2), (3, 2), (3, 2)]
    """
    sizes = (*out_shape, *in_shape)
    t = w_pad.reshape(sizes)
    ranks, note = _tucker_ranks(spec, sizes, (), dense, proportional=True)
    delta = None if tol is None else tol * float(w_pad.norm()) / math.sqrt(len(sizes))
    modes = tuple(range(len(sizes)))
    core, factors = _trim(*hosvd(t, ranks, modes, delta, spec.svd), modes)
    core, factors = hooi(t, core, factors, modes, spec.svd)
    return Part("tucker", [core, *factors], tuple(core.shape), note, out_shape, in_shape)


def tensorized_to_matrix(blocks: Sequence[Tensor]) -> Tensor:
    """Dense ``(prod(out_shape), prod(in_shape))`` matrix of ``[G, U_1..U_2d]``.

    Examples
    --------
    >>> blocks = [torch.ones(1, 1, 1, 1), *(torch.ones(n, 1) for n in (4, 2, 3, 3))]
    >>> tensorized_to_matrix(blocks).shape
    torch.Size([8, 9])
    """
    core, factors = blocks[0], blocks[1:]
    full = tucker_to_full(core, factors, range(len(factors)))
    half = len(factors) // 2
    return full.reshape(math.prod(full.shape[:half]), -1)


def tucker_als(
    blocks: Sequence[Tensor],
    w_pad: Tensor,
    gram_pad: Tensor,
    w: Tensor,
    gram: Tensor,
    sweeps: int = als.SWEEPS,
) -> list[Tensor]:
    """Refine tensorized Tucker ``[G, U_1..U_2d]`` on the output error (keeps the best).

    Examples
    --------
    >>> w = torch.randn(4, 4, dtype=torch.float64)
    >>> g = torch.diag(torch.tensor([100.0, 1.0, 1.0, 0.01], dtype=torch.float64))
    >>> init = tucker_tensorized(w, (2, 2), (2, 2), Tucker(rank=1, order=2), None, 16).cores
    >>> err = lambda b: als.output_sq_error(w, tensorized_to_matrix(b), g)
    >>> err(tucker_als(init, w, g, w, g)) <= err(init)
    True
    """
    blocks = list(blocks)
    out, inn = w.shape

    def judge(bs: Sequence[Tensor]) -> float:
        return als.output_sq_error(w, tensorized_to_matrix(bs)[:out, :inn], gram)

    best, best_err = list(blocks), judge(blocks)
    previous = best_err
    target_g = w_pad @ gram_pad
    for _ in range(sweeps):
        for k in range(1, len(blocks)):
            blocks[k] = als.solve_block(blocks, k, tensorized_to_matrix, target_g, gram_pad)
            q, r = torch.linalg.qr(blocks[k])
            blocks[k] = q
            blocks[0] = _mode_dot(blocks[0], r, k - 1)
        blocks[0] = als.solve_block(blocks, 0, tensorized_to_matrix, target_g, gram_pad)
        err = judge(blocks)
        if err < best_err:
            best, best_err = list(blocks), err
        if err > (1 - als.STALL) * previous:  # stalled
            break
        previous = err
    return best


def data_aware_gram(gram: Tensor, size: int) -> Tensor:
    """The padded, damped Gram matrix the ALS refinements use.

    Examples
    --------
    >>> data_aware_gram(torch.eye(2, dtype=torch.float64), 3).shape
    torch.Size([3, 3])
    """
    _, eps = whitening(gram)
    return als.pad_gram(gram, size, eps)
