"""Contraction plans: opt_einsum picks the order, the plan runs it as matmuls.

A factorized layer's forward pass is an einsum of the input with its cores.
:func:`plan_einsum` asks opt_einsum for the cheapest pairwise order (and
compares it with explicit candidate orders, such as the core-by-core chain),
then *compiles* that order once into a :class:`Program`: a list of steps,
each a ``permute -> reshape -> mm/bmm``. Running a program is then a handful
of calls into ATen per step, with no equation parsing (``torch.einsum`` and
``opt_einsum.ContractExpression`` spend 8-15 us per call doing that, which
dominates a batch-1 forward).

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


class _Step:
    """One compiled pairwise (or unary) contraction."""

    __slots__ = ("pops", "swap", "sum_a", "perm_a", "shape_a", "sum_b", "perm_b", "shape_b",
                 "batched", "out_shape", "unary", "n_letters")

    def __init__(self, **kw: Any) -> None:
        for name in self.__slots__:
            setattr(self, name, kw.get(name))


def _identity(perm: Sequence[int]) -> bool:
    return list(perm) == list(range(len(perm)))


def _compile_unary(term: str, needed: set[str], sizes: dict[str, int]):
    """Sum the letters no longer needed (size-1 ones are left for the end)."""
    summed = tuple(k for k, c in enumerate(term) if c not in needed and sizes[c] > 1)
    kept = "".join(c for k, c in enumerate(term) if k not in summed)
    return summed, kept


def _compile_pair(ta: str, tb: str, out: str, needed: set[str], sizes: dict[str, int]):
    """Permutations and shapes that turn ``ta, tb -> (batch, M, N)`` into one (b)mm.

    Free letters of each side are ordered by their position in the final
    output ``out`` (letters contracted later go last), so the last step's
    result needs at most a block permutation with long contiguous runs.
    Contracted letters follow the bigger operand's layout (its reshape
    stays a view).
    """
    # letters summed within one operand only: pre-sum (size > 1) or fold (size 1)
    sum_a = tuple(k for k, c in enumerate(ta) if c not in tb and c not in needed and sizes[c] > 1)
    sum_b = tuple(k for k, c in enumerate(tb) if c not in ta and c not in needed and sizes[c] > 1)
    ta2 = "".join(c for k, c in enumerate(ta) if k not in sum_a)
    tb2 = "".join(c for k, c in enumerate(tb) if k not in sum_b)
    rank = {c: k for k, c in enumerate(out)}

    def key(c: str) -> int:
        return rank.get(c, len(out))

    big = ta2 if math.prod(sizes[c] for c in ta2) >= math.prod(sizes[c] for c in tb2) else tb2
    batch = sorted((c for c in ta2 if c in tb2 and c in needed), key=key)
    contr = [c for c in big if c in ta2 and c in tb2 and c not in needed]
    a_free = sorted((c for c in ta2 if c not in tb2 and c in needed), key=key)
    b_free = sorted((c for c in tb2 if c not in ta2 and c in needed), key=key)
    a_ones = [c for c in ta2 if c not in tb2 and c not in needed]
    b_ones = [c for c in tb2 if c not in ta2 and c not in needed]
    order_a = batch + a_free + contr + a_ones
    order_b = batch + contr + b_free + b_ones
    perm_a = [ta2.index(c) for c in order_a]
    perm_b = [tb2.index(c) for c in order_b]

    def prod(letters: list[str]) -> int:
        return math.prod(sizes[c] for c in letters)

    nb, m, k, n = prod(batch), prod(a_free), prod(contr), prod(b_free)
    batched = bool(batch)
    shape_a = (nb, m, k) if batched else (m, k)
    shape_b = (nb, k, n) if batched else (k, n)
    result = "".join(batch + a_free + b_free)
    out_shape = tuple(sizes[c] for c in result)
    step = dict(sum_a=sum_a or None, perm_a=None if _identity(perm_a) else tuple(perm_a),
                shape_a=shape_a, sum_b=sum_b or None,
                perm_b=None if _identity(perm_b) else tuple(perm_b), shape_b=shape_b,
                batched=batched, out_shape=out_shape, n_letters="".join(b_free))
    return step, result


def _first_output_letter(term: str, other: str, rank: dict[str, int]) -> int:
    free = [rank[c] for c in term if c in rank and c not in other]
    return min(free) if free else len(rank)


class Program:
    """A compiled contraction: run it with ``program(operands)``.

    Built by :func:`plan_einsum`; holds the path, its FLOP count (``cost``)
    and one precomputed step per pairwise contraction.

    Parameters of ``__call__``
    --------------------------
    operands
        The tensors, in the order of the equation's input terms.
    hooks
        Optional callables, one per step but the last, applied to each
        intermediate result (the activation quantizers of a chain).
    bias
        Added to the result; fused into the last matmul when the layout
        allows (``torch.addmm``). Needs a 2-D output whose last dim matches.

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

    __slots__ = ("equation", "path", "cost", "steps", "final_perm", "final_shape", "final_sum",
                 "fusable")

    def __init__(self, equation: str, shapes: Sequence[Sequence[int]], path: Path,
                 cost: int) -> None:
        inputs, output = equation.split("->")
        terms = inputs.split(",")
        sizes: dict[str, int] = {}
        for term, shape in zip(terms, shapes, strict=True):
            for c, s in zip(term, shape, strict=True):
                sizes[c] = int(s)
        self.equation = equation
        self.path = [tuple(p) for p in path]
        self.cost = int(cost)
        steps: list[_Step] = []
        rank = {c: k for k, c in enumerate(output)}
        for pos in self.path:
            if len(pos) > 2:
                raise ValueError(f"a path step contracts at most 2 operands, got {pos}")
            later = [t for k, t in enumerate(terms) if k not in pos]
            needed = set(output).union(*later) if later else set(output)
            order = sorted(pos, reverse=True)
            popped = [terms.pop(k) for k in order]
            if len(popped) == 1:
                summed, kept = _compile_unary(popped[0], needed, sizes)
                steps.append(_Step(pops=tuple(order), unary=summed, swap=False))
                terms.append(kept)
                continue
            # "A" (the rows of the matmul) is the operand holding the free
            # letter that comes first in the output (the batch, for an
            # activation), so results stay in output-major order
            firsts = [_first_output_letter(t, u, rank) for t, u in (popped, popped[::-1])]
            if firsts[0] != firsts[1]:
                swap = firsts[1] < firsts[0]
            else:
                big = [math.prod(sizes[c] for c in t) for t in popped]
                swap = big[1] > big[0]
            ta, tb = (popped[1], popped[0]) if swap else (popped[0], popped[1])
            kw, result = _compile_pair(ta, tb, output, needed, sizes)
            steps.append(_Step(pops=tuple(order), swap=swap, unary=None, **kw))
            terms.append(result)
        (last,) = terms
        extra = [c for c in last if c not in output]
        self.final_sum = tuple(k for k, c in enumerate(last) if c in extra and sizes[c] > 1)
        last = "".join(c for k, c in enumerate(last) if k not in self.final_sum)
        perm = [last.index(c) for c in output] + [last.index(c) for c in last if c not in output]
        self.final_perm = None if _identity(perm) else tuple(perm)
        self.final_shape = tuple(sizes[c] for c in output)
        self.steps = steps
        lastp = steps[-1] if steps else None
        # bias (of the last output letter) goes into addmm when the last matmul's
        # columns are exactly that letter and nothing is permuted afterwards
        self.fusable = bool(lastp is not None and lastp.unary is None and not lastp.batched
                            and self.final_perm is None and not self.final_sum
                            and len(output) >= 1 and lastp.n_letters == output[-1]
                            and len(last) == len(output))

    def __repr__(self) -> str:
        return f"Program({self.equation!r}, path={self.path}, cost={self.cost})"

    def __call__(self, operands: Sequence[Tensor], hooks: Sequence[Hook | None] | None = None,
                 bias: Tensor | None = None) -> Tensor:
        ops = list(operands)
        last = len(self.steps) - 1
        for k, st in enumerate(self.steps):
            first = ops.pop(st.pops[0])
            if st.unary is not None:
                ops.append(first.sum(st.unary) if st.unary else first)
                continue
            second = ops.pop(st.pops[1])
            a, b = (second, first) if st.swap else (first, second)
            if st.sum_a:
                a = a.sum(st.sum_a)
            if st.perm_a is not None:
                a = a.permute(st.perm_a)
            a = a.reshape(st.shape_a)
            if st.sum_b:
                b = b.sum(st.sum_b)
            if st.perm_b is not None:
                b = b.permute(st.perm_b)
            b = b.reshape(st.shape_b)
            if st.batched:
                r = torch.bmm(a, b)
            elif k == last and bias is not None and self.fusable:
                r = torch.addmm(bias, a, b)
                bias = None
            else:
                r = torch.mm(a, b)
            r = r.view(st.out_shape)
            if hooks is not None and k < last and hooks[k] is not None:
                r = hooks[k](r)
            ops.append(r)
        (r,) = ops
        if self.final_sum:
            r = r.sum(self.final_sum)
        if self.final_perm is not None:
            r = r.permute(self.final_perm)
        r = r.reshape(self.final_shape)
        if bias is not None:
            r = r + bias
        return r


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
