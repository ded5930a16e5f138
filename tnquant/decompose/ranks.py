"""Rank arithmetic: caps, parameter counts, ``rank=``/``ratio=``/``tol=`` to ranks.

Pure integer functions (plus :func:`energy_rank` on singular values): no SVD
is computed here, so a ``ratio=`` search costs nothing but arithmetic.

Caps. A TT bond ``k`` of a TT-matrix with merged modes ``n_j = out_j * in_j``
has ``r_k <= min(prod(n[:k]), prod(n[k:]))``. A Tucker mode ``k`` of a tensor
of shape ``n`` has ``r_k <= min(n_k, prod(n) / n_k)`` (the rank of the mode-k
unfolding). Requested ranks above a cap are lowered to it and a note says so
(:func:`cap_ranks`).

Ratio. :func:`uniform_ranks_for_ratio` gives every bond the same rank
(capped per bond) and :func:`proportional_ranks_for_ratio` gives each mode a
rank proportional to its size; both pick the candidate whose parameter count
is closest to the target.

Examples
--------
>>> tt_rank_caps((8, 8, 6), (16, 12, 8))
(128, 48)
>>> tt_n_params((8, 8, 6), (16, 12, 8), (38, 38))
145312
>>> cap_ranks((30, 30), (5, 4), "Tucker")[1]
'Tucker rank (30, 30) capped to (5, 4) by the shape (the largest ranks allowed are (5, 4))'
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "tt_rank_caps",
    "tt_n_params",
    "tucker_rank_caps",
    "tucker_n_params",
    "tucker_consistent",
    "expand_rank",
    "cap_ranks",
    "uniform_ranks_for_ratio",
    "proportional_ranks_for_ratio",
    "ratio_note",
    "energy_rank",
]


def tt_rank_caps(out_shape: Sequence[int], in_shape: Sequence[int]) -> tuple[int, ...]:
    """Largest useful inner TT-matrix ranks ``r_1..r_{d-1}``.

    Examples
    --------
    >>> tt_rank_caps((4, 4), (2, 2))
    (8,)
    """
    modes = [o * i for o, i in zip(out_shape, in_shape, strict=True)]
    return tuple(min(math.prod(modes[:k]), math.prod(modes[k:])) for k in range(1, len(modes)))


def tt_n_params(out_shape: Sequence[int], in_shape: Sequence[int], ranks: Sequence[int]) -> int:
    """Parameters of TT-matrix cores ``(r_{k-1}, out_k, in_k, r_k)``.

    ``ranks`` are the ``d - 1`` inner ranks.

    Examples
    --------
    >>> tt_n_params((4, 4), (2, 2), (3,))
    48
    """
    full = (1, *ranks, 1)
    pairs = enumerate(zip(out_shape, in_shape, strict=True))
    return sum(full[k] * o * i * full[k + 1] for k, (o, i) in pairs)


def tucker_rank_caps(shape: Sequence[int]) -> tuple[int, ...]:
    """Largest useful Tucker ranks: ``min(n_k, prod(n) / n_k)`` per mode.

    Examples
    --------
    >>> tucker_rank_caps((64, 3, 3, 3))
    (27, 3, 3, 3)
    """
    total = math.prod(shape)
    return tuple(min(n, total // n) for n in shape)


def tucker_n_params(shape: Sequence[int], ranks: Sequence[int], fixed: Sequence[int] = ()) -> int:
    """Parameters of a Tucker core of shape ``(*ranks, *fixed)`` and factors ``(n_k, r_k)``.

    ``fixed`` are modes kept whole in the core (the kernel modes of a
    Tucker-2 conv).

    Examples
    --------
    >>> tucker_n_params((16, 8), (4, 2), fixed=(3, 3))
    152
    """
    factors = sum(n * r for n, r in zip(shape, ranks, strict=True))
    return math.prod(ranks) * math.prod(fixed) + factors


def tucker_consistent(ranks: Sequence[int], fixed: Sequence[int] = ()) -> tuple[int, ...]:
    """Lower each Tucker rank to the product of the others (times the fixed modes).

    The core's mode-``k`` unfolding is ``r_k x prod(r_j, j != k) * prod(fixed)``,
    so a larger ``r_k`` only adds parameters. Non-decreasing in every rank.

    Examples
    --------
    >>> tucker_consistent((5, 1), fixed=(1, 1))
    (1, 1)
    >>> tucker_consistent((5, 2), fixed=(3, 3))
    (5, 2)
    """
    out = [int(r) for r in ranks]
    extra = math.prod(fixed)
    changed = True
    while changed:
        changed = False
        for k, r in enumerate(out):
            cap = math.prod(out[:k] + out[k + 1 :]) * extra
            if r > cap:
                out[k], changed = cap, True
    return tuple(out)


def expand_rank(rank: Any, n: int, what: str) -> tuple[int, ...]:
    """An int, tuple or ``'full'`` spec rank as ``n`` ints (``'full'`` -> a huge value).

    Raises
    ------
    ValueError
        If a tuple has the wrong length.

    Examples
    --------
    >>> expand_rank(4, 3, "Tucker")
    (4, 4, 4)
    """
    if rank == "full":
        return (2**62,) * n
    if isinstance(rank, int):
        return (rank,) * n
    rank = tuple(rank)
    if len(rank) != n:
        raise ValueError(f"{what} rank tuple must have {n} entries, got {len(rank)}: {rank}")
    return rank


def cap_ranks(
    requested: Sequence[int], caps: Sequence[int], what: str, shown: Any = None
) -> tuple[tuple[int, ...], str | None]:
    """Lower ranks to their caps; return them and a note when any was lowered.

    ``shown`` is the rank as the user wrote it, for the note (default
    ``requested``). Pass a ``'full'`` request as huge ints and ``shown=None``
    to get no note (full rank is capped by definition).

    Examples
    --------
    >>> cap_ranks((3, 3), (4, 2), "TT")[0]
    (3, 2)
    """
    ranks = tuple(max(1, min(int(r), int(c))) for r, c in zip(requested, caps, strict=True))
    if ranks == tuple(requested) or shown == "full":
        return ranks, None
    shown = tuple(requested) if shown is None else shown
    return ranks, (
        f"{what} rank {shown} capped to {ranks} by the shape "
        f"(the largest ranks allowed are {tuple(caps)})"
    )


def _closest(
    candidates: Sequence[tuple[int, ...]], n_params: Callable[[tuple[int, ...]], int], target: float
) -> tuple[int, ...]:
    return min(candidates, key=lambda r: (abs(n_params(r) - target), n_params(r)))


def uniform_ranks_for_ratio(
    caps: Sequence[int], n_params: Callable[[tuple[int, ...]], int], target: float
) -> tuple[int, ...]:
    """Ranks ``min(r, cap_k)`` with the uniform ``r`` whose count is closest to ``target``.

    ``n_params`` must be non-decreasing in every rank; ``r`` is found by
    bisection over ``1..max(caps)``.

    Examples
    --------
    >>> uniform_ranks_for_ratio((10,), lambda r: 20 * r[0], 100)
    (5,)
    """
    if not caps:
        return ()

    def at(r: int) -> tuple[int, ...]:
        return tuple(min(r, c) for c in caps)

    lo, hi = 1, max(caps)
    while lo < hi:  # smallest r with n_params >= target (or max(caps))
        mid = (lo + hi) // 2
        if n_params(at(mid)) >= target:
            hi = mid
        else:
            lo = mid + 1
    return _closest([at(max(1, lo - 1)), at(lo)], n_params, target)


def proportional_ranks_for_ratio(
    sizes: Sequence[int],
    caps: Sequence[int],
    n_params: Callable[[tuple[int, ...]], int],
    target: float,
) -> tuple[int, ...]:
    """Ranks ``clip(round(a * size_k), 1, cap_k)`` with the ``a`` closest to ``target``.

    Bisection over ``a`` in ``(0, 1]`` on the parameter count.

    Examples
    --------
    >>> proportional_ranks_for_ratio((8, 4), (8, 4), lambda r: 10 * sum(r), 60)
    (4, 2)
    """

    def at(a: float) -> tuple[int, ...]:
        return tuple(min(c, max(1, round(a * n))) for n, c in zip(sizes, caps, strict=True))

    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if n_params(at(mid)) >= target:
            hi = mid
        else:
            lo = mid
    return _closest([at(lo), at(hi)], n_params, target)


def ratio_note(ratio: float, achieved: int, dense: int, best: int) -> str | None:
    """A note when the target ratio is out of reach of every allowed rank.

    ``best`` is the parameter count at the largest allowed ranks.

    Examples
    --------
    >>> ratio_note(1.0, 80, 100, 80)
    'ratio 1.0 is out of reach: the largest ranks the shape allows give 0.8 of the dense parameters'
    """
    if achieved == best and best < ratio * dense:
        return (
            f"ratio {ratio} is out of reach: the largest ranks the shape allows give "
            f"{best / dense:.3g} of the dense parameters"
        )
    return None


def energy_rank(s: Tensor, delta: float, max_rank: int | None = None) -> int:
    """Smallest ``r >= 1`` with ``sqrt(sum(s[r:]**2)) <= delta`` (at most ``max_rank``).

    ``s`` are singular values in descending order.

    Examples
    --------
    >>> energy_rank(torch.tensor([3.0, 2.0, 1.0]), 1.0)
    2
    """
    n = s.numel() if max_rank is None else min(s.numel(), max_rank)
    if n == 0:
        return 1
    tail = torch.flip(torch.cumsum(torch.flip(s**2, (0,)), 0), (0,))  # tail[r]
    tail = torch.cat([tail, tail.new_zeros(1)])
    ok = (tail[1 : n + 1] <= delta**2).nonzero()
    return int(ok[0]) + 1 if ok.numel() else n
