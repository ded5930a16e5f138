"""Contraction paths: opt_einsum's pairwise format, single assignment, hoisting.

An opt_einsum path names, at every step, the *positions* of the operands it
contracts in the current list (contracted operands are removed, the result
appended). :func:`path_to_ssa` and :func:`ssa_to_path` convert to and from a
form where every operand and intermediate keeps one id, which is easier to
build candidate orders in; :func:`hoist_constant_steps` moves the steps that
do not involve a given operand (a layer's input) first, so that their
results can be computed once.

Examples
--------
>>> ssa_to_path(4, [(2, 3), (0, 4)])
[(2, 3), (0, 2)]
"""

from __future__ import annotations

from collections.abc import Sequence

import opt_einsum as oe

__all__ = [
    "Path",
    "symbols",
    "default_optimizer",
    "chain_path",
    "path_to_ssa",
    "ssa_to_path",
    "hoist_constant_steps",
    "path_cost",
]

Path = list[tuple[int, ...]]


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


def path_to_ssa(n_operands: int, path: Sequence[Sequence[int]]) -> list[tuple[int, ...]]:
    """An opt_einsum path as static single assignment: every step names its inputs by id.

    Operands are ``0 .. n-1``; the result of step ``k`` is ``n + k``.

    Examples
    --------
    >>> path_to_ssa(3, [(1, 2), (0, 1)])
    [(1, 2), (0, 3)]
    """
    ids = list(range(n_operands))
    ssa: list[tuple[int, ...]] = []
    for pos in path:
        ssa.append(tuple(ids[p] for p in pos))
        for p in sorted(pos, reverse=True):
            ids.pop(p)
        ids.append(n_operands + len(ssa) - 1)
    return ssa


def ssa_to_path(n_operands: int, ssa: Sequence[Sequence[int]]) -> Path:
    """The opt_einsum path of a static-single-assignment contraction (see :func:`path_to_ssa`).

    Examples
    --------
    >>> ssa_to_path(3, [(1, 2), (0, 3)])
    [(1, 2), (0, 1)]
    """
    ids = list(range(n_operands))
    path: Path = []
    for k, nodes in enumerate(ssa):
        try:
            pos = tuple(sorted(ids.index(v) for v in nodes))
        except ValueError:
            raise ValueError(
                f"step {k} of {list(ssa)} uses an id that is not (or no longer) available"
            ) from None
        for p in sorted(pos, reverse=True):
            ids.pop(p)
        ids.append(n_operands + k)
        path.append(pos)
    return path


def hoist_constant_steps(n_operands: int, path: Sequence[Sequence[int]], variable: int) -> Path:
    """The same contraction tree with every step that does not involve ``variable`` first.

    Steps among the other operands alone (the cores of a layer, say) do not
    depend on the input; run first, they can be computed once and reused.
    Relative order within both groups is kept.

    Examples
    --------
    >>> hoist_constant_steps(4, [(0, 1), (0, 1), (0, 1)], variable=0)  # x.A, then B.C
    [(2, 3), (0, 1), (0, 1)]
    """
    ssa = path_to_ssa(n_operands, path)
    tainted = {variable}
    const: list[int] = []
    var: list[int] = []
    for k, nodes in enumerate(ssa):
        if tainted.intersection(nodes):
            tainted.add(n_operands + k)
            var.append(k)
        else:
            const.append(k)
    new_id = {n_operands + k: n_operands + j for j, k in enumerate(const + var)}
    return ssa_to_path(n_operands, [tuple(new_id.get(v, v) for v in ssa[k]) for k in const + var])


def path_cost(equation: str, shapes: Sequence[Sequence[int]], path: Path) -> int:
    """FLOPs of ``equation`` contracted along ``path`` (opt_einsum's count).

    Examples
    --------
    >>> path_cost("ij,jk,kl->il", [(2, 3), (3, 4), (4, 5)], [(0, 1), (0, 1)])
    128
    """
    _, info = oe.contract_path(equation, *shapes, shapes=True, optimize=list(path))
    return int(info.opt_cost)
