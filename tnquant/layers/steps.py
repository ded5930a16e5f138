"""Compiling a contraction path into steps of one matmul each, and running one step.

The pieces :class:`~tnquant.layers.contract.Program` is made of: a step
(:class:`Step`) permutes/reshapes its two operands only where it must, then
calls one of ``F.linear``, ``mm``, ``bmm`` or a broadcast ``matmul`` from the
left; :class:`StepStats` holds the numbers the time model charges for it.
:func:`_compile_steps` compiles a whole path, in named stages: the letter
sizes, one step per path entry (a sum, or a pair), the final arrangement.

Examples
--------
>>> _shape("ab", {"a": 2, "b": 3})
(2, 3)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple, Union, cast

import torch
import torch.nn.functional as F
from torch import Tensor

MM, LINEAR, BMM, UNARY, LEFT = 0, 1, 2, 3, 4

#: a contracted block in the middle of the activation, with at least this many
#: elements after it, is multiplied from the left in place (a broadcast
#: matmul) instead of being permuted to the end first (measured on CPU: 2-7x
#: faster from 16 on, slower below)
LEFT_MIN_TRAILING = 16


Dims = Union[tuple[int, ...], None]


class PairStep(NamedTuple):
    """How one pairwise contraction runs: what is done to ``A`` and ``B``, then one matmul.

    Each operand is summed over ``sum_*`` (indices), permuted by ``perm_*``
    and reshaped to ``shape_*`` (each skipped when ``None``); the matmul of
    ``kind`` (``MM``, ``LINEAR``, ``BMM``, ``LEFT``) gives a result viewed as
    ``view`` (``None``: as it comes).
    """

    sum_a: Dims
    perm_a: Dims
    shape_a: Dims
    sum_b: Dims
    perm_b: Dims
    shape_b: Dims
    kind: int
    view: Dims


class Step(NamedTuple):
    """One step of a compiled program: the operands it pops, then how it runs.

    ``p0``/``p1``: the positions popped from the operand list (``p1`` is
    ``None`` for a ``UNARY`` step, which only sums ``sum_a``); ``swap``: the
    second popped operand is ``A``. The other fields are those of
    :class:`PairStep`.
    """

    p0: int
    p1: int | None
    swap: bool
    sum_a: Dims
    perm_a: Dims
    shape_a: Dims
    sum_b: Dims
    perm_b: Dims
    shape_b: Dims
    kind: int
    view: Dims


class StepStats(NamedTuple):
    """What the time model charges for one step (see ``Program.estimate``).

    ``variable``: the step involves the variable operand; ``flops``;
    ``moved``: elements read and written; ``copy_a``/``copy_b``: elements
    copied by permutes of ``A``/``B``; ``side``: the variable's side
    (0: ``A``, 1: ``B``).
    """

    variable: bool
    flops: int
    moved: int
    copy_a: int
    copy_b: int
    side: int


class RunStep(NamedTuple):
    """One step of ``Program.run`` (the variable against a prepared constant).

    ``index``: the step's index in ``Program.steps``; ``variable_is_a``;
    ``arrange``: ``(sum, perm, shape)`` applied to the running result first
    (``None``: nothing); ``kind`` and ``view`` of the matmul.
    """

    index: int  # type: ignore[assignment]  # a field, shadowing tuple.index on purpose
    variable_is_a: bool
    arrange: tuple[Dims, Dims, Dims] | None
    kind: int
    view: Dims


def _identity(perm: Sequence[int]) -> bool:
    return list(perm) == list(range(len(perm)))


def _shape(term: str, sizes: dict[str, int]) -> tuple[int, ...]:
    return tuple(sizes[c] for c in term)


def _prepare(term: str, order: list[str], target: tuple[int, ...], sizes: dict[str, int]):
    """(perm or None, reshape target or None) taking ``term`` to ``order`` then ``target``."""
    perm = [term.index(c) for c in order]
    reshape = None if _shape("".join(order), sizes) == target else target
    return (None if _identity(perm) else tuple(perm)), reshape


def _prod(letters: Any, sizes: dict[str, int]) -> int:
    return math.prod(sizes[c] for c in letters)


def _by_output(letters: Any, out: str) -> list[str]:
    """``letters`` sorted by their position in ``out`` (letters not in it last, stable)."""
    rank = {c: k for k, c in enumerate(out)}
    return sorted(letters, key=lambda c: rank.get(c, len(out)))


def _compile_pair(
    ta: str, tb: str, out: str, needed: set[str], sizes: dict[str, int]
) -> tuple[PairStep, str, str]:
    """One matmul step for ``ta, tb``: the :class:`PairStep`, the result's letters, its columns.

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
    big = ta2 if _prod(ta2, sizes) >= _prod(tb2, sizes) else tb2
    batch = _by_output((c for c in ta2 if c in tb2 and c in needed), out)
    contr = [c for c in big if c in ta2 and c in tb2 and c not in needed]
    b_free = _by_output((c for c in tb2 if c not in ta2 and c in needed), out)
    b_ones = [c for c in tb2 if c not in ta2 and c not in needed]
    sums = (sum_a or None, sum_b or None)
    where = sorted(ta2.index(c) for c in contr)
    if not batch and contr and where[-1] - where[0] + 1 == len(contr) and big == ta2:
        viewed = _view_a(ta2, tb2, where, needed, b_free, b_ones, sums, sizes)
        if viewed is not None:
            return viewed
    return _permute_a(ta2, tb2, contr, batch, needed, b_free, b_ones, sums, out, sizes)


def _linear_or_mm(
    tb: str,
    contr: list[str],
    b_free: list[str],
    b_ones: list[str],
    k: int,
    n: int,
    sizes: dict[str, int],
) -> tuple[int, Any, Any]:
    """``B`` as ``(K, N)`` for ``mm`` when that needs no permute (and ``(N, K)`` would), else
    as ``(N, K)`` for ``F.linear``: ``(kind, perm_b, shape_b)``."""
    as_mm = _prepare(tb, contr + b_free + b_ones, (k, n), sizes)
    as_linear = _prepare(tb, b_free + contr + b_ones, (n, k), sizes)
    kind = MM if as_mm[0] is None and as_linear[0] is not None else LINEAR
    perm_b, shape_b = as_mm if kind == MM else as_linear
    return kind, perm_b, shape_b


def _view_a(
    ta: str,
    tb: str,
    where: list[int],
    needed: set[str],
    b_free: list[str],
    b_ones: list[str],
    sums: tuple[Any, Any],
    sizes: dict[str, int],
) -> tuple[PairStep, str, str] | None:
    """The step that views ``A`` (contracted letters contiguous), or ``None`` when its tail
    is too short for a left matmul (see :data:`LEFT_MIN_TRAILING`)."""
    contr = [ta[i] for i in where]
    head = [c for c in ta[: where[0]] if c in needed]
    tail = [c for c in ta[where[-1] + 1 :] if c in needed]
    k, n = _prod(contr, sizes), _prod(b_free, sizes)
    m, q = _prod(head, sizes), _prod(tail, sizes)
    if tail and q < LEFT_MIN_TRAILING:
        return None
    shape_a: tuple[int, ...] | None
    flat: tuple[int, ...]
    if not tail:
        kind, perm_b, shape_b = _linear_or_mm(tb, contr, b_free, b_ones, k, n, sizes)
        shape_a, flat, result = (m, k), (m, n), head + b_free
    else:
        kind = LEFT
        perm_b, shape_b = _prepare(tb, b_free + contr + b_ones, (n, k), sizes)
        shape_a = (k, q) if m == 1 else (m, k, q)
        flat = (n, q) if m == 1 else (m, n, q)
        result = head + b_free + tail
    if _shape(ta, sizes) == shape_a:
        shape_a = None
    res = "".join(result)
    view = None if _shape(res, sizes) == flat else _shape(res, sizes)
    step = PairStep(sums[0], None, shape_a, sums[1], perm_b, shape_b, kind, view)
    return step, res, "".join(b_free) if kind != LEFT else ""


def _permute_a(
    ta: str,
    tb: str,
    contr: list[str],
    batch: list[str],
    needed: set[str],
    b_free: list[str],
    b_ones: list[str],
    sums: tuple[Any, Any],
    out: str,
    sizes: dict[str, int],
) -> tuple[PairStep, str, str]:
    """The step that permutes ``A`` to ``(batch, A-free, K)`` (a bmm when batched)."""
    a_free = _by_output((c for c in ta if c not in tb and c in needed), out)
    a_ones = [c for c in ta if c not in tb and c not in needed]
    nb, m = _prod(batch, sizes), _prod(a_free, sizes)
    k, n = _prod(contr, sizes), _prod(b_free, sizes)
    if batch:
        kind = BMM
        perm_a, shape_a = _prepare(ta, batch + a_free + contr + a_ones, (nb, m, k), sizes)
        perm_b, shape_b = _prepare(tb, batch + contr + b_free + b_ones, (nb, k, n), sizes)
        flat: tuple[int, ...] = (nb, m, n)
    else:
        perm_a, shape_a = _prepare(ta, a_free + contr + a_ones, (m, k), sizes)
        kind, perm_b, shape_b = _linear_or_mm(tb, contr, b_free, b_ones, k, n, sizes)
        flat = (m, n)
    res = "".join(batch + a_free + b_free)
    view = None if _shape(res, sizes) == flat else _shape(res, sizes)
    step = PairStep(sums[0], perm_a, shape_a, sums[1], perm_b, shape_b, kind, view)
    return step, res, "".join(b_free)


def _first_output_letter(term: str, other: str, rank: dict[str, int]) -> int:
    free = [rank[c] for c in term if c in rank and c not in other]
    return min(free) if free else len(rank)


def _matmul(
    kind: int, a: Tensor, b: Tensor, view: tuple[int, ...] | None, bias: Tensor | None = None
) -> Tensor:
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


def _step_stats(
    ta: str, tb: str, result: str, step: PairStep, sizes: dict[str, int], var_a: bool, var_b: bool
) -> StepStats:
    """Cost-model numbers of one pairwise step (see ``Program.estimate``)."""
    sum_a, perm_a, sum_b, perm_b = step.sum_a, step.perm_a, step.sum_b, step.perm_b
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
    return StepStats(var_a or var_b, flops, n_a + n_b + n_r, copy_a, copy_b, 1 if var_b else 0)


def _arrange(
    t: Tensor,
    summed: tuple[int, ...] | None,
    perm: tuple[int, ...] | None,
    shape: tuple[int, ...] | None,
) -> Tensor:
    """Sum, permute and reshape ``t`` (each skipped when ``None``)."""
    if summed:
        t = t.sum(summed)
    if perm is not None:
        t = t.permute(perm)
    if shape is not None:
        t = t.reshape(shape)
    return t


def _pop_pair(ops: list[Any], st: Step) -> tuple[Any, Any]:
    """Pop the two operands of a pairwise step from ``ops``: ``(A, B)``."""
    a = ops.pop(st.p0)
    b = ops.pop(cast(int, st.p1))
    return (b, a) if st.swap else (a, b)


def _arrange_a(t: Tensor, st: Step) -> Tensor:
    return _arrange(t, st.sum_a, st.perm_a, st.shape_a)


def _arrange_b(t: Tensor, st: Step) -> Tensor:
    return _arrange(t, st.sum_b, st.perm_b, st.shape_b)


def _letter_sizes(
    equation: str, terms: list[str], shapes: Sequence[Sequence[int]]
) -> dict[str, int]:
    """The size of every letter of ``equation``, checked against ``shapes``."""
    sizes: dict[str, int] = {}
    for term, shape in zip(terms, shapes, strict=True):
        if len(term) != len(shape) or len(set(term)) != len(term):
            raise ValueError(
                f"term {term!r} does not fit shape {tuple(shape)} (or repeats a letter)"
            )
        for c, size in zip(term, shape, strict=True):
            if sizes.setdefault(c, int(size)) != int(size):
                raise ValueError(f"letter {c!r} has size {sizes[c]} and {size} in {equation!r}")
    return sizes


def _unary_step(
    pos: int, term: str, needed: set[str], sizes: dict[str, int], variable: bool
) -> tuple[Step, str, StepStats]:
    """A step on one operand: sum the letters no longer needed (size 1: left for the end)."""
    summed = tuple(k for k, c in enumerate(term) if c not in needed and sizes[c] > 1)
    result = "".join(c for k, c in enumerate(term) if k not in summed)
    step = Step(pos, None, False, summed, None, None, None, None, None, UNARY, None)
    n_in = math.prod(_shape(term, sizes))
    stats = StepStats(variable, n_in, n_in + math.prod(_shape(result, sizes)), 0, 0, 0)
    return step, result, stats


def _pair_step(
    order: list[int],
    popped: list[str],
    flags: list[bool],
    output: str,
    needed: set[str],
    sizes: dict[str, int],
) -> tuple[Step, str, StepStats, str, bool]:
    """A pairwise step; also the result's columns and whether it involves the variable.

    "A" (the rows of the matmul) holds the free letter that comes first in
    the output (the batch, for an activation): results stay batch-major.
    """
    rank = {c: k for k, c in enumerate(output)}
    firsts = [_first_output_letter(t, u, rank) for t, u in (popped, popped[::-1])]
    if firsts[0] != firsts[1]:
        swap = firsts[1] < firsts[0]
    else:
        swap = math.prod(_shape(popped[1], sizes)) > math.prod(_shape(popped[0], sizes))
    ta, tb = (popped[1], popped[0]) if swap else (popped[0], popped[1])
    fa, fb = (flags[1], flags[0]) if swap else (flags[0], flags[1])
    pair, result, n_cols = _compile_pair(ta, tb, output, needed, sizes)
    step = Step(order[0], order[1], swap, *pair)
    return step, result, _step_stats(ta, tb, result, pair, sizes, fa, fb), n_cols, fa or fb


def _compile_steps(
    terms: list[str],
    output: str,
    path: Sequence[tuple[int, ...]],
    sizes: dict[str, int],
    variable: int | None,
) -> tuple[list[Step], list[StepStats], str, str]:
    """Compile every step of ``path``: the steps, their stats, the last term, its columns."""
    terms = list(terms)
    steps: list[Step] = []
    stats: list[StepStats] = []
    tainted = [k == variable for k in range(len(terms))]
    n_cols = ""
    for pos in path:
        if not 1 <= len(pos) <= 2:
            raise ValueError(f"a path step contracts 1 or 2 operands, got {pos}")
        later = [t for k, t in enumerate(terms) if k not in pos]
        needed = set(output).union(*later)
        order = sorted(pos, reverse=True)
        popped = [terms.pop(k) for k in order]
        flags = [tainted.pop(k) for k in order]
        if len(popped) == 1:
            step, result, stat = _unary_step(order[0], popped[0], needed, sizes, flags[0])
            var, n_cols = flags[0], ""
        else:
            step, result, stat, n_cols, var = _pair_step(
                order, popped, flags, output, needed, sizes
            )
        steps.append(step)
        stats.append(stat)
        terms.append(result)
        tainted.append(var)
    (last,) = terms
    return steps, stats, last, n_cols


def _final_arrangement(
    last: str, output: str, sizes: dict[str, int], out_shape: tuple[int, ...]
) -> tuple[Dims, Dims, Dims]:
    """``(sum, perm, reshape)`` taking the last result to the output (``None``: nothing)."""
    rank = {c: k for k, c in enumerate(output)}
    final_sum = tuple(k for k, c in enumerate(last) if c not in rank and sizes[c] > 1)
    last = "".join(c for k, c in enumerate(last) if k not in final_sum)
    perm = [last.index(c) for c in output] + [last.index(c) for c in last if c not in rank]
    final_perm = None if _identity(perm) else tuple(perm)
    reshape = None if _shape(last, sizes) == out_shape else out_shape
    return final_sum or None, final_perm, reshape
