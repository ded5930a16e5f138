"""Compiling one pairwise contraction into one matmul, and running it.

The pieces :class:`~tnquant.layers.contract.Program` is made of: a step
permutes/reshapes its two operands only where it must, then calls one of
``F.linear``, ``mm``, ``bmm`` or a broadcast ``matmul`` from the left; and the
numbers the time model charges for it.

Examples
--------
>>> _shape("ab", {"a": 2, "b": 3})
(2, 3)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

MM, LINEAR, BMM, UNARY, LEFT = 0, 1, 2, 3, 4

#: a contracted block in the middle of the activation, with at least this many
#: elements after it, is multiplied from the left in place (a broadcast
#: matmul) instead of being permuted to the end first (measured on CPU: 2-7x
#: faster from 16 on, slower below)
LEFT_MIN_TRAILING = 16


def _identity(perm: Sequence[int]) -> bool:
    return list(perm) == list(range(len(perm)))


def _shape(term: str, sizes: dict[str, int]) -> tuple[int, ...]:
    return tuple(sizes[c] for c in term)


def _prepare(term: str, order: list[str], target: tuple[int, ...], sizes: dict[str, int]):
    """(perm or None, reshape target or None) taking ``term`` to ``order`` then ``target``."""
    perm = [term.index(c) for c in order]
    reshape = None if _shape("".join(order), sizes) == target else target
    return (None if _identity(perm) else tuple(perm)), reshape


def _compile_pair(ta: str, tb: str, out: str, needed: set[str], sizes: dict[str, int]):
    """One matmul step for ``ta, tb``: a step tuple, the result's letters, its columns.

    ``A`` is the activation-like operand. When it is the bigger one and its
    contracted letters form one contiguous block (no batch letter), it is never
    copied: with nothing after the block it is a ``(M, K)`` view multiplied
    by ``B`` as ``(K, N)`` (``mm``) or ``(N, K)`` (``F.linear``); with a
    long enough tail ``Q`` it is a ``(P, K, Q)`` view multiplied from the
    left (``B (N, K) @ A``), giving ``(P, N, Q)``. Otherwise ``A`` is
    permuted to ``(A-free, K)``, with free letters ordered by their position
    in the final output ``out`` (so the last result needs at most a block
    permutation), and shared letters that stay become a bmm batch.
    """
    # letters summed within one operand only: pre-sum (size > 1) or fold (size 1)
    sum_a = tuple(k for k, c in enumerate(ta) if c not in tb and c not in needed and sizes[c] > 1)
    sum_b = tuple(k for k, c in enumerate(tb) if c not in ta and c not in needed and sizes[c] > 1)
    ta2 = "".join(c for k, c in enumerate(ta) if k not in sum_a)
    tb2 = "".join(c for k, c in enumerate(tb) if k not in sum_b)
    rank = {c: k for k, c in enumerate(out)}

    def key(c: str) -> int:
        return rank.get(c, len(out))

    def prod(letters: Any) -> int:
        return math.prod(sizes[c] for c in letters)

    big = ta2 if prod(ta2) >= prod(tb2) else tb2
    batch = sorted((c for c in ta2 if c in tb2 and c in needed), key=key)
    contr = [c for c in big if c in ta2 and c in tb2 and c not in needed]
    b_free = sorted((c for c in tb2 if c not in ta2 and c in needed), key=key)
    b_ones = [c for c in tb2 if c not in ta2 and c not in needed]
    k, n = prod(contr), prod(b_free)
    sums = (sum_a or None, sum_b or None)
    shape_a: tuple[int, ...] | None
    flat: tuple[int, ...]
    result: list[str]
    where = sorted(ta2.index(c) for c in contr)
    if not batch and contr and where[-1] - where[0] + 1 == len(contr) and big == ta2:
        # contracted letters contiguous in the bigger A: view A, never copy it
        contr = [ta2[i] for i in where]
        head = [c for c in ta2[: where[0]] if c in needed]
        tail = [c for c in ta2[where[-1] + 1:] if c in needed]
        m, q = prod(head), prod(tail)
        if not tail or q >= LEFT_MIN_TRAILING:
            if not tail:
                as_mm = _prepare(tb2, contr + b_free + b_ones, (k, n), sizes)
                as_linear = _prepare(tb2, b_free + contr + b_ones, (n, k), sizes)
                kind = MM if as_mm[0] is None and as_linear[0] is not None else LINEAR
                perm_b, shape_b = as_mm if kind == MM else as_linear
                shape_a, flat, result = (m, k), (m, n), head + b_free
            else:
                kind = LEFT
                perm_b, shape_b = _prepare(tb2, b_free + contr + b_ones, (n, k), sizes)
                shape_a = (k, q) if m == 1 else (m, k, q)
                flat = (n, q) if m == 1 else (m, n, q)
                result = head + b_free + tail
            if _shape(ta2, sizes) == shape_a:
                shape_a = None
            res = "".join(result)
            view = None if _shape(res, sizes) == flat else _shape(res, sizes)
            step: tuple[Any, ...] = (sums[0], None, shape_a, sums[1], perm_b, shape_b, kind,
                                     view)
            return step, res, "".join(b_free) if kind != LEFT else ""
    contr = [c for c in big if c in ta2 and c in tb2 and c not in needed]
    a_free = sorted((c for c in ta2 if c not in tb2 and c in needed), key=key)
    a_ones = [c for c in ta2 if c not in tb2 and c not in needed]
    nb, m = prod(batch), prod(a_free)
    if batch:
        kind = BMM
        perm_a, shape_a = _prepare(ta2, batch + a_free + contr + a_ones, (nb, m, k), sizes)
        perm_b, shape_b = _prepare(tb2, batch + contr + b_free + b_ones, (nb, k, n), sizes)
        flat = (nb, m, n)
    else:
        perm_a, shape_a = _prepare(ta2, a_free + contr + a_ones, (m, k), sizes)
        as_mm = _prepare(tb2, contr + b_free + b_ones, (k, n), sizes)
        as_linear = _prepare(tb2, b_free + contr + b_ones, (n, k), sizes)
        kind = MM if as_mm[0] is None and as_linear[0] is not None else LINEAR
        perm_b, shape_b = as_mm if kind == MM else as_linear
        flat = (m, n)
    res = "".join(batch + a_free + b_free)
    view = None if _shape(res, sizes) == flat else _shape(res, sizes)
    step = (sums[0], perm_a, shape_a, sums[1], perm_b, shape_b, kind, view)
    return step, res, "".join(b_free)


def _first_output_letter(term: str, other: str, rank: dict[str, int]) -> int:
    free = [rank[c] for c in term if c in rank and c not in other]
    return min(free) if free else len(rank)


def _matmul(kind: int, a: Tensor, b: Tensor, view: tuple[int, ...] | None,
            bias: Tensor | None = None) -> Tensor:
    """One matmul step of kind ``kind`` (``bias`` only for ``LINEAR``), viewed as ``view``."""
    if kind == LINEAR:
        r = F.linear(a, b, bias)
    elif kind == MM:
        r = torch.mm(a, b)
    elif kind == LEFT:
        r = torch.matmul(b, a)
    else:
        r = torch.bmm(a, b)
    return r.view(view) if view is not None else r


def _step_stats(ta: str, tb: str, result: str, step: tuple[Any, ...], sizes: dict[str, int],
                var_a: bool, var_b: bool) -> tuple[bool, int, int, int, int, int]:
    """Cost-model numbers of one pairwise step (see ``Program.estimate``)."""
    sum_a, perm_a, _, sum_b, perm_b = step[:5]
    n_a = math.prod(_shape(ta, sizes))
    n_b = math.prod(_shape(tb, sizes))
    n_r = math.prod(_shape(result, sizes))
    letters = set(ta) | set(tb)
    inner = any(c in tb and c not in result for c in ta)
    flops = math.prod(sizes[c] for c in letters) * (2 if inner else 1)
    kept_a = n_a // math.prod(sizes[ta[k]] for k in sum_a) if sum_a else n_a
    kept_b = n_b // math.prod(sizes[tb[k]] for k in sum_b) if sum_b else n_b
    copy_a = 2 * kept_a if perm_a is not None else 0
    copy_b = 2 * kept_b if perm_b is not None else 0
    return (var_a or var_b, flops, n_a + n_b + n_r, copy_a, copy_b, 1 if var_b else 0)


def _arrange(t: Tensor, summed: tuple[int, ...] | None, perm: tuple[int, ...] | None,
             shape: tuple[int, ...] | None) -> Tensor:
    """Sum, permute and reshape ``t`` (each skipped when ``None``)."""
    if summed:
        t = t.sum(summed)
    if perm is not None:
        t = t.permute(perm)
    if shape is not None:
        t = t.reshape(shape)
    return t
