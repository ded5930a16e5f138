"""Contraction plans: opt_einsum picks the order, the plan runs it as matmuls.

A factorized layer's forward pass is an einsum of the input with its cores.
:func:`plan_einsum` asks opt_einsum for the cheapest pairwise order (and
compares it with explicit candidate orders, such as the core-by-core chain),
then *compiles* that order once into a :class:`Program`: a list of steps,
each one matrix product (``F.linear``, ``mm``, ``bmm``, or a broadcast
``matmul`` from the left) with only the permutes and reshapes it really
needs. Running a program is a few calls into ATen per step, with no
equation parsing: ``torch.einsum`` spends about 8 us per call on that and
an ``opt_einsum.ContractExpression`` about 15 us on a two-step chain, which
would dominate a batch-1 forward (the compiled low-rank chain runs within
1 us of two bare ``F.linear`` calls).

Plans are pure shape data: no tensors, dtypes or devices; they work on any
device and dtype torch supports.

FLOPs follow opt_einsum's convention: a pairwise contraction costs ``2 * M *
K * N`` (a multiply and an add per term); a plain product costs ``M * N``.

Examples
--------
>>> import torch
>>> prog = plan_einsum("ba,ra,or->bo", [(4, 6), (2, 6), (5, 2)])
>>> x, v, u = torch.randn(4, 6), torch.randn(2, 6), torch.randn(5, 2)
>>> torch.allclose(prog([x, v, u]), x @ v.T @ u.T, atol=1e-5)
True
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import opt_einsum as oe
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "Program",
    "plan_einsum",
    "chain_path",
    "default_optimizer",
    "symbols",
    "path_cost",
    "IMPLEMENTATIONS",
]

IMPLEMENTATIONS = ("auto", "factorized", "reconstructed")

Path = list[tuple[int, ...]]
Hook = Callable[[Tensor], Tensor]


def symbols(n: int, start: int = 0) -> list[str]:
    """``n`` distinct einsum letters (opt_einsum's symbol table).

    Examples
    --------
    >>> symbols(3)
    ['a', 'b', 'c']
    """
    return [oe.get_symbol(start + k) for k in range(n)]


def default_optimizer(n_operands: int) -> str:
    """opt_einsum's path optimizer for ``n_operands`` operands.

    ``'optimal'`` (exhaustive) up to 5 operands, ``'dp'`` up to 10,
    ``'greedy'`` beyond.

    Examples
    --------
    >>> default_optimizer(4), default_optimizer(8), default_optimizer(20)
    ('optimal', 'dp', 'greedy')
    """
    if n_operands <= 5:
        return "optimal"
    if n_operands <= 10:
        return "dp"
    return "greedy"


def chain_path(n_operands: int, order: Sequence[int], start: int = 0) -> Path:
    """The opt_einsum path contracting operand ``start`` with ``order`` in turn.

    opt_einsum paths name operands by their position in the *current* list
    (contracted operands are removed and the result appended), so the
    positions shift after every step; this turns "contract the running
    result with original operands ``order[0]``, ``order[1]``, ..." into that
    form.

    Examples
    --------
    >>> chain_path(4, [3, 2, 1])
    [(0, 3), (1, 2), (0, 1)]
    """
    ids = list(range(n_operands))
    current = start
    path: Path = []
    for original in order:
        i, j = ids.index(current), ids.index(original)
        path.append((min(i, j), max(i, j)))
        ids = [k for k in ids if k not in (current, original)] + [-1 - len(path)]
        current = ids[-1]
    return path


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


class Program:
    """A compiled contraction: run it with ``program(operands)``.

    Built by :func:`plan_einsum`; holds the path, its FLOP count (``cost``)
    and one precomputed step per pairwise contraction (permutations and
    reshapes that are no-ops are left out, so a chain of matrix products
    runs as bare ``F.linear`` calls). Call it as described in
    :meth:`__call__`.

    Examples
    --------
    >>> import torch
    >>> prog = plan_einsum("ij,jk->ik", [(2, 3), (3, 4)])
    >>> prog.cost
    48
    >>> a, b = torch.ones(2, 3), torch.ones(3, 4)
    >>> prog([a, b]).sum().item()
    24.0
    """

    __slots__ = ("equation", "path", "cost", "steps", "final", "fusable", "out_shape", "kinds")

    def __init__(self, equation: str, shapes: Sequence[Sequence[int]], path: Path,
                 cost: int) -> None:
        inputs, output = equation.split("->")
        terms = inputs.split(",")
        sizes: dict[str, int] = {}
        for term, shape in zip(terms, shapes, strict=True):
            if len(term) != len(shape) or len(set(term)) != len(term):
                raise ValueError(f"term {term!r} does not fit shape {tuple(shape)} (or repeats "
                                 "a letter)")
            for c, size in zip(term, shape, strict=True):
                if sizes.setdefault(c, int(size)) != int(size):
                    raise ValueError(f"letter {c!r} has size {sizes[c]} and {size} in "
                                     f"{equation!r}")
        self.equation = equation
        self.path = [tuple(p) for p in path]
        self.cost = int(cost)
        self.out_shape = _shape(output, sizes)
        rank = {c: k for k, c in enumerate(output)}
        steps: list[tuple[Any, ...]] = []
        n_cols = ""
        for pos in self.path:
            if not 1 <= len(pos) <= 2:
                raise ValueError(f"a path step contracts 1 or 2 operands, got {pos}")
            later = [t for k, t in enumerate(terms) if k not in pos]
            needed = set(output).union(*later)
            order = sorted(pos, reverse=True)
            popped = [terms.pop(k) for k in order]
            if len(popped) == 1:  # sum the letters no longer needed (size 1: left for the end)
                summed = tuple(k for k, c in enumerate(popped[0])
                               if c not in needed and sizes[c] > 1)
                steps.append((order[0], None, False, summed, None, None, None, None, None,
                              UNARY, None))
                terms.append("".join(c for k, c in enumerate(popped[0]) if k not in summed))
                n_cols = ""
                continue
            # "A" (the rows of the matmul) holds the free letter that comes first
            # in the output (the batch, for an activation): results stay batch-major
            firsts = [_first_output_letter(t, u, rank) for t, u in (popped, popped[::-1])]
            if firsts[0] != firsts[1]:
                swap = firsts[1] < firsts[0]
            else:
                swap = math.prod(_shape(popped[1], sizes)) > math.prod(_shape(popped[0], sizes))
            ta, tb = (popped[1], popped[0]) if swap else (popped[0], popped[1])
            step, result, n_cols = _compile_pair(ta, tb, output, needed, sizes)
            steps.append((order[0], order[1], swap, *step))
            terms.append(result)
        (last,) = terms
        final_sum = tuple(k for k, c in enumerate(last) if c not in rank and sizes[c] > 1)
        last = "".join(c for k, c in enumerate(last) if k not in final_sum)
        perm = [last.index(c) for c in output] + [last.index(c) for c in last if c not in rank]
        final_perm = None if _identity(perm) else tuple(perm)
        reshape = None if _shape(last, sizes) == self.out_shape else self.out_shape
        self.final = (final_sum or None, final_perm, reshape)
        self.steps = steps
        # the bias (of the last output letter) goes into the last matmul when its
        # columns are exactly that letter and nothing is permuted afterwards
        self.fusable = bool(steps and steps[-1][9] in (MM, LINEAR) and final_perm is None
                            and not final_sum and output and n_cols == output[-1])
        self.kinds = tuple(st[9] for st in steps)

    def __repr__(self) -> str:
        return f"Program({self.equation!r}, path={self.path}, cost={self.cost})"

    def __call__(self, operands: Sequence[Tensor], hooks: Sequence[Hook | None] | None = None,
                 bias: Tensor | None = None) -> Tensor:
        """Run the contraction.

        Parameters
        ----------
        operands
            The tensors, in the order of the equation's input terms, with the
            shapes the program was compiled for.
        hooks
            Optional callables, one per step but the last, applied to each
            intermediate result (the activation quantizers of a chain).
        bias
            Added to the result (broadcast over its last dim); fused into the
            last matmul when ``fusable``.

        Returns
        -------
        Tensor
            The result, in the equation's output order.

        Examples
        --------
        >>> import torch
        >>> prog = plan_einsum("ij,jk->ik", [(2, 3), (3, 4)])
        >>> prog([torch.ones(2, 3), torch.ones(3, 4)], bias=torch.ones(4))[0, 0].item()
        4.0
        """
        ops = list(operands)
        last = len(self.steps) - 1
        fused = bias if self.fusable else None
        for k, (p0, p1, swap, sa, pa, ra, sb, pb, rb, kind, view) in enumerate(self.steps):
            a = ops.pop(p0)
            if kind == UNARY:
                ops.append(a.sum(sa) if sa else a)
                continue
            b = ops.pop(p1)
            if swap:
                a, b = b, a
            a, b = _arrange(a, sa, pa, ra), _arrange(b, sb, pb, rb)
            if kind == LINEAR:
                r = F.linear(a, b, fused if k == last else None)
            elif kind == MM:
                r = torch.addmm(fused, a, b) if fused is not None and k == last else torch.mm(a, b)
            elif kind == LEFT:
                r = torch.matmul(b, a)
            else:
                r = torch.bmm(a, b)
            if view is not None:
                r = r.view(view)
            if hooks is not None and k < last:
                hook = hooks[k]
                if hook is not None:
                    r = hook(r)
            ops.append(r)
        (r,) = ops
        r = _arrange(r, *self.final)
        if bias is not None and fused is None:
            r = r + bias
        return r


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


def path_cost(equation: str, shapes: Sequence[Sequence[int]], path: Path) -> int:
    """FLOPs of ``equation`` contracted along ``path`` (opt_einsum's count).

    Examples
    --------
    >>> path_cost("ij,jk,kl->il", [(2, 3), (3, 4), (4, 5)], [(0, 1), (0, 1)])
    128
    """
    _, info = oe.contract_path(equation, *shapes, shapes=True, optimize=list(path))
    return int(info.opt_cost)


def plan_einsum(equation: str, shapes: Sequence[Sequence[int]], *,
                candidates: Sequence[Path] = (), optimize: str | None = None,
                search: bool = True) -> Program:
    """Compile the cheapest contraction order of ``equation`` for ``shapes``.

    Parameters
    ----------
    equation
        An explicit einsum equation (``'...->...'``), no repeated letters
        within a term.
    shapes
        One shape per input term.
    candidates
        Explicit paths (opt_einsum format) to compare with the optimizer's.
    optimize
        opt_einsum optimizer name; :func:`default_optimizer` when ``None``.
    search
        When ``False`` only ``candidates`` are considered (the first one
        wins ties), e.g. to force a sequential chain.

    Returns
    -------
    Program
        The cheapest order by FLOP count, compiled; ties go to the candidate
        listed first, then the optimizer's path.

    Examples
    --------
    >>> prog = plan_einsum("ij,jk,kl->il", [(2, 3), (3, 4), (4, 5)])
    >>> prog.cost, prog.path
    (128, [(0, 1), (0, 1)])
    """
    shapes = [tuple(int(s) for s in shape) for shape in shapes]
    n = len(shapes)
    options: list[tuple[int, Path]] = []
    for path in candidates:
        options.append((path_cost(equation, shapes, path), list(path)))
    if search or not options:
        if n == 1:
            path = [(0,)]
            cost = 0
        else:
            opt = optimize or default_optimizer(n)
            found, info = oe.contract_path(equation, *shapes, shapes=True, optimize=opt)
            path, cost = [tuple(p) for p in found], int(info.opt_cost)
        options.append((cost, path))
    best = min(range(len(options)), key=lambda k: (options[k][0], k))
    cost, path = options[best]
    return Program(equation, shapes, path, cost)
