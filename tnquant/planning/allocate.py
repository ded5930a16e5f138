"""Pick one candidate per layer: a multiple-choice knapsack, by DP or Lagrangian relaxation.

Given per layer ``l`` the candidates' errors ``e[l][c]`` and sizes
``s[l][c]`` (bits, non-negative ints):

- under a budget ``B``: minimise ``sum e`` subject to ``sum s <= B``;
- under a target ``T``: minimise ``sum s`` subject to ``sum e <= T``.

Ties are broken towards the smaller size (then the smaller error), so a
tighter budget never gives a larger solution.

Dynamic programming (:class:`Table`, exact on the discretised sizes)
    Sizes are measured in units of ``u`` bits: ``u = g``, the greatest
    common divisor of all sizes, when ``sum_l max_c s[l][c] / g <= grid``,
    and otherwise ``u = ceil(sum_l max_c s[l][c] / grid)``. Each size is
    rounded **up** to whole units, ``w = ceil(s / u)``, and the table
    ``E_l[b]`` (the least error of layers ``0..l`` in at most ``b`` units)
    is filled for every ``b`` up to ``sum max w``: ``O(layers x candidates x
    grid)``. The optimum over the rounded sizes is exact; since rounding is
    upward a solution within ``floor(B / u)`` units is within ``B`` bits. With
    ``u = g`` (every real case with sizes in bytes and a small enough
    model) it is the exact optimum of the original problem, for budgets and
    targets alike. Dominated candidates (another is no larger and no worse)
    are dropped first; they never change the optimum.

Lagrangian relaxation (:func:`lagrangian`)
    Each layer picks ``argmin e + lam * s`` on its own; ``lam`` is bisected
    to the smallest value whose solution fits. Fast and grid-free, but it
    only reaches points on the lower convex hull of the trade-off, so it may
    leave budget unused.

Examples
--------
>>> errors = [[0.0, 0.125, 0.5], [0.0, 0.25, 0.375]]
>>> sizes = [[32, 16, 8], [32, 16, 8]]
>>> a = allocate(errors, sizes, budget=40)  # [0, 2] ties on error but takes 40 bits
>>> a.indices, a.size, a.error
([1, 1], 32, 0.375)
>>> allocate(errors, sizes, target=0.4).indices  # least bits with error <= 0.4
[1, 1]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import reduce
from typing import cast

import numpy as np

__all__ = ["Allocation", "Table", "allocate", "lagrangian", "fill", "DEFAULT_GRID"]

#: default number of size units of the DP table
DEFAULT_GRID = 20000


@dataclass(frozen=True)
class Allocation:
    """One candidate index per layer, with the summed size (bits) and error.

    Examples
    --------
    >>> Allocation([0, 1], 48, 0.25).size
    48
    """

    indices: list[int]
    size: int
    error: float


def _check(
    errors: Sequence[Sequence[float]], sizes: Sequence[Sequence[int]]
) -> tuple[list[np.ndarray], list[list[int]]]:
    if len(errors) != len(sizes):
        raise ValueError(
            f"errors and sizes must have one entry per layer, got {len(errors)} and {len(sizes)}"
        )
    if not errors:
        raise ValueError("need at least one layer, got none")
    es, ss = [], []
    for layer, (e, s) in enumerate(zip(errors, sizes, strict=True)):
        if len(e) != len(s) or not len(e):
            raise ValueError(
                f"layer {layer}: errors and sizes must be non-empty and of the same "
                f"length, got {len(e)} and {len(s)}"
            )
        e_arr = np.asarray(e, dtype=np.float64)
        if not np.all(np.isfinite(e_arr)):
            raise ValueError(f"layer {layer}: errors must be finite, got {list(e)}")
        s_list = [int(v) for v in s]
        if any(v < 0 or v != s_v for v, s_v in zip(s_list, s, strict=True)):
            raise ValueError(f"layer {layer}: sizes must be non-negative ints, got {list(s)}")
        es.append(e_arr)
        ss.append(s_list)
    return es, ss


def _undominated(e: np.ndarray, s: list[int]) -> list[int]:
    """Indices of the candidates no other beats in (size, error), one per duplicate."""
    order = sorted(range(len(s)), key=lambda c: (s[c], e[c], c))
    keep, best = [], math.inf
    for c in order:
        if e[c] < best:
            keep.append(c)
            best = e[c]
    return keep


class Table:
    """The DP table over discretised sizes, for every budget at once (see the module docs).

    Parameters
    ----------
    errors, sizes
        Per layer, per candidate.
    grid
        Size units the table may span (its width); the unit is the gcd of
        the sizes when that fits, else coarser.

    Attributes
    ----------
    unit
        Bits per size unit.
    exact
        Whether ``unit`` is the gcd of the sizes (then the DP is exact on the
        real sizes).

    Examples
    --------
    >>> t = Table([[0.0, 1.0], [0.0, 2.0]], [[16, 8], [16, 8]])
    >>> t.unit, t.exact, t.best(24).indices, t.smallest(1.5).indices
    (8, True, [1, 0], [1, 0])
    """

    def __init__(
        self,
        errors: Sequence[Sequence[float]],
        sizes: Sequence[Sequence[int]],
        grid: int = DEFAULT_GRID,
    ) -> None:
        if isinstance(grid, bool) or not isinstance(grid, int) or grid < 1:
            raise ValueError(f"grid must be a positive int, got {grid!r}")
        es, ss = _check(errors, sizes)
        self.errors, self.sizes = es, ss
        self.keep = [_undominated(e, s) for e, s in zip(es, ss, strict=True)]
        total = sum(max(s[c] for c in k) for s, k in zip(ss, self.keep, strict=True))
        g = reduce(math.gcd, (v for s in ss for v in s), 0) or 1
        self.exact = total // g <= grid
        self.unit = g if self.exact else -(-total // grid)
        self.weights = [
            [-(-s[c] // self.unit) for c in k] for s, k in zip(ss, self.keep, strict=True)
        ]
        width = sum(max(w) for w in self.weights) + 1
        E = np.zeros(width)
        S = np.zeros(width, dtype=np.int64)
        self.choice = np.full((len(es), width), -1, dtype=np.int32)
        for layer, (e, s, k, w) in enumerate(zip(es, ss, self.keep, self.weights, strict=True)):
            newE = np.full(width, np.inf)
            newS = np.full(width, np.iinfo(np.int64).max)
            for j, c in enumerate(k):
                cand_e = np.full(width, np.inf)
                cand_s = np.full(width, np.iinfo(np.int64).max)
                cand_e[w[j] :] = E[: width - w[j]] + e[c]
                cand_s[w[j] :] = S[: width - w[j]] + s[c]
                better = (cand_e < newE) | ((cand_e == newE) & (cand_s < newS))
                newE[better] = cand_e[better]
                newS[better] = cand_s[better]
                self.choice[layer, better] = j
            E, S = newE, newS
        self.E, self.S = E, S

    def _trace(self, b: int) -> Allocation:
        indices = []
        for layer in range(len(self.errors) - 1, -1, -1):
            j = int(self.choice[layer, b])
            indices.append(self.keep[layer][j])
            b -= self.weights[layer][j]
        indices.reverse()
        size = sum(s[c] for s, c in zip(self.sizes, indices, strict=True))
        error = 0.0
        for e, c in zip(self.errors, indices, strict=True):
            error += float(e[c])
        return Allocation(indices, size, error)

    def best(self, budget: int) -> Allocation | None:
        """Least summed error with summed size ``<= budget`` bits (``None``: nothing fits)."""
        if budget < 0:
            return None
        b = min(budget // self.unit, len(self.E) - 1)
        return None if not np.isfinite(self.E[b]) else self._trace(int(b))

    def smallest(self, target: float) -> Allocation | None:
        """Least summed size with summed error ``<= target`` (``None``: no solution reaches it)."""
        ok = np.flatnonzero(self.E <= target)
        if not len(ok):
            return None
        b = ok[np.lexsort((self.E[ok], self.S[ok]))[0]]
        return self._trace(int(b))

    def frontier(self) -> list[Allocation]:
        """Every distinct optimum as the budget grows: the discretised error-size trade-off."""
        out: list[Allocation] = []
        last = math.inf
        for b in range(len(self.E)):
            if np.isfinite(self.E[b]) and self.E[b] < last:
                out.append(self._trace(b))
                last = self.E[b]
        return out


def lagrangian(
    errors: Sequence[Sequence[float]], sizes: Sequence[Sequence[int]], budget: int, iters: int = 100
) -> Allocation | None:
    """Budgeted allocation by Lagrangian relaxation (see the module docs).

    Examples
    --------
    >>> lagrangian([[0.0, 1.0], [0.0, 2.0]], [[16, 8], [16, 8]], budget=24).indices
    [1, 0]
    """
    es, ss = _check(errors, sizes)
    scale = float(max(sum(max(s) for s in ss), 1))
    s_norm = [np.asarray(s, dtype=np.float64) / scale for s in ss]

    def pick(lam: float) -> Allocation:
        idx = []
        for e, s, sn in zip(es, ss, s_norm, strict=True):
            cost = e + lam * sn if math.isfinite(lam) else sn
            idx.append(int(np.lexsort((e, np.asarray(s), cost))[0]))
        size = sum(s[c] for s, c in zip(ss, idx, strict=True))
        error = 0.0
        for e, c in zip(es, idx, strict=True):
            error += float(e[c])
        return Allocation(idx, size, error)

    first = pick(0.0)
    if first.size <= budget:
        return first
    if pick(math.inf).size > budget:
        return None
    hi = 1.0
    while pick(hi).size > budget:
        hi *= 2.0
    lo = 0.0
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if pick(mid).size <= budget:
            hi = mid
        else:
            lo = mid
    return pick(hi)


def fill(
    errors: Sequence[Sequence[float]],
    sizes: Sequence[Sequence[int]],
    budget: int,
    start: Allocation,
) -> Allocation:
    """Spend the bits a discretised solution leaves: greedy single-layer upgrades, exact sizes.

    The DP rounds sizes up to its units, so its solution may leave up to one
    unit per layer unused (and miss a combination that fits exactly). From
    ``start``, repeatedly take the one-layer change of largest error
    decrease that still fits ``budget`` in exact bits, until none does. The
    error never goes up and the budget is always kept.

    Examples
    --------
    >>> errors, sizes = [[0.0, 0.5], [0.0, 0.5]], [[10, 4], [10, 4]]
    >>> fill(errors, sizes, budget=14, start=Allocation([1, 1], 8, 1.0)).indices
    [0, 1]
    """
    es, ss = _check(errors, sizes)
    idx = list(start.indices)
    size = sum(ss[k][c] for k, c in enumerate(idx))
    if size > budget:
        raise ValueError(f"the start takes {size} bits, over the budget of {budget}")
    while True:
        best: tuple[float, int, int, int] | None = None  # (gain, -size change, layer, choice)
        for k, c0 in enumerate(idx):
            for c in range(len(ss[k])):
                gain = float(es[k][c0] - es[k][c])
                grow = ss[k][c] - ss[k][c0]
                if (
                    gain > 0
                    and size + grow <= budget
                    and (best is None or (gain, -grow) > best[:2])
                ):
                    best = (gain, -grow, k, c)
        if best is None:
            break
        _, _, k, c = best
        size += ss[k][c] - ss[k][idx[k]]
        idx[k] = c
    return Allocation(idx, size, float(sum(es[k][c] for k, c in enumerate(idx))))


def allocate(
    errors: Sequence[Sequence[float]],
    sizes: Sequence[Sequence[int]],
    budget: int | None = None,
    target: float | None = None,
    *,
    method: str = "dp",
    grid: int = DEFAULT_GRID,
) -> Allocation:
    """One candidate per layer under a size ``budget`` (bits) or an error ``target``.

    Parameters
    ----------
    errors, sizes
        Per layer, per candidate: the error it causes and its size in bits.
    budget, target
        Exactly one: the most bits the chosen candidates may take together,
        or the most summed error they may cause.
    method
        ``'dp'`` (exact on the discretised sizes) or ``'lagrangian'`` (budget
        only).
    grid
        Width of the DP table in size units.

    Raises
    ------
    ValueError
        When no combination meets the budget or the target (the message gives
        the reachable extreme), or for malformed input.

    Examples
    --------
    >>> allocate([[0.0, 0.4], [0.0, 0.1]], [[16, 8], [16, 8]], budget=24).indices
    [0, 1]
    """
    if (budget is None) == (target is None):
        raise ValueError("give exactly one of budget= (bits) and target= (summed error)")
    if method not in ("dp", "lagrangian"):
        raise ValueError(f"method must be 'dp' or 'lagrangian', got {method!r}")
    if method == "lagrangian":
        if budget is None:
            raise ValueError("method='lagrangian' takes a budget, not a target")
        result = lagrangian(errors, sizes, budget)
    else:
        table = Table(errors, sizes, grid)
        result = (
            table.best(budget) if budget is not None else table.smallest(float(cast(float, target)))
        )
    if result is None:
        es, ss = _check(errors, sizes)
        if budget is not None:
            raise ValueError(
                f"no combination fits in {budget} bits; the smallest takes "
                f"{sum(min(s) for s in ss)} bits"
            )
        raise ValueError(
            f"no combination reaches an error of {target}; the least is "
            f"{sum(float(e.min()) for e in es)}"
        )
    return result
