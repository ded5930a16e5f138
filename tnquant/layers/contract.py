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
from torch import Tensor

from tnquant.layers.paths import (
    Path,
    chain_path,
    default_optimizer,
    hoist_constant_steps,
    path_cost,
    path_to_ssa,
    ssa_to_path,
    symbols,
)
from tnquant.layers.steps import (
    LEFT,
    LINEAR,
    MM,
    UNARY,
    RunStep,
    _arrange,
    _arrange_a,
    _arrange_b,
    _compile_steps,
    _final_arrangement,
    _letter_sizes,
    _matmul,
    _pop_pair,
    _shape,
)

__all__ = [
    "Program",
    "plan_einsum",
    "chain_path",
    "default_optimizer",
    "symbols",
    "path_cost",
    "path_to_ssa",
    "ssa_to_path",
    "hoist_constant_steps",
    "IMPLEMENTATIONS",
    "ELEMENT_COST",
    "CALL_COST",
]

IMPLEMENTATIONS = ("auto", "factorized", "reconstructed")

Hook = Callable[[Tensor], Tensor]


#: time model of a compiled program, in FLOP-equivalents: one element read or
#: written costs ``ELEMENT_COST`` FLOPs and one ATen call ``CALL_COST``. Measured
#: on one AVX-512 core (torch 2.13, float32): GEMMs run at ~150-180 GFLOP/s,
#: bandwidth-bound steps (thin GEMMs, permute copies) move ~4-6 G elements/s,
#: a call costs ~2-4 us; so an element is worth ~32 FLOPs and a call ~5e5.
ELEMENT_COST = 32
CALL_COST = 500_000


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

    __slots__ = (
        "equation",
        "path",
        "cost",
        "steps",
        "final",
        "fusable",
        "out_shape",
        "kinds",
        "variable",
        "n_const",
        "_stats",
        "_run_steps",
        "_final_moved",
    )

    def __init__(
        self,
        equation: str,
        shapes: Sequence[Sequence[int]],
        path: Path,
        cost: int,
        variable: int | None = None,
    ) -> None:
        inputs, output = equation.split("->")
        terms = inputs.split(",")
        sizes = _letter_sizes(equation, terms, shapes)
        self.equation = equation
        if variable is not None and not 0 <= variable < len(terms):
            raise ValueError(
                f"variable must index one of the {len(terms)} operands, got {variable}"
            )
        self.variable = variable
        path = [tuple(p) for p in path]
        if variable is not None:
            path = hoist_constant_steps(len(terms), path, variable)
        self.path = path
        self.cost = int(cost)
        self.out_shape = _shape(output, sizes)
        steps, stats, last, n_cols = _compile_steps(terms, output, path, sizes, variable)
        final_sum, final_perm, reshape = _final_arrangement(last, output, sizes, self.out_shape)
        self.final = (final_sum, final_perm, reshape)
        self._final_moved = 2 * math.prod(self.out_shape) if final_perm or final_sum else 0
        self.steps = steps
        self._stats = stats
        self.n_const = 0
        if variable is not None:
            self.n_const = sum(1 for st in stats if not st.variable)
        self._run_steps = self._compile_run()
        # the bias (of the last output letter) goes into the last matmul when its
        # columns are exactly that letter and nothing is permuted afterwards
        self.fusable = bool(
            steps
            and steps[-1].kind in (MM, LINEAR)
            and final_perm is None
            and not final_sum
            and output
            and n_cols == output[-1]
        )
        self.kinds = tuple(st.kind for st in steps)

    def __repr__(self) -> str:
        return f"Program({self.equation!r}, path={self.path}, cost={self.cost})"

    def estimate(self, prepared: bool = False) -> int:
        """Estimated run time, in FLOP-equivalents (see ``ELEMENT_COST``, ``CALL_COST``).

        Every step costs its FLOPs, plus ``ELEMENT_COST`` per element it reads
        or writes (twice more for each operand it must permute into place),
        plus ``CALL_COST`` per ATen call. With ``prepared`` (a program built
        with a ``variable``, run through :meth:`prepare` and :meth:`run` with
        the prepared operands reused), the steps among the constants and the
        permutes of the constant operands are free.

        Examples
        --------
        >>> prog = plan_einsum("ba,ra,or->bo", [(64, 512), (8, 512), (512, 8)], variable=0)
        >>> prog.estimate() >= prog.estimate(prepared=True) > prog.cost
        True
        """
        total = 0
        for var, flops, moved, copy_a, copy_b, side in self._stats:
            if prepared and not var:
                continue
            if prepared and self.variable is not None:
                # the constant operand's permute happened once, in prepare()
                copy_a, copy_b = (copy_a, 0) if side == 0 else (0, copy_b)
            calls = 1 + (copy_a > 0) + (copy_b > 0)
            total += flops + ELEMENT_COST * (moved + copy_a + copy_b) + CALL_COST * calls
        if self._final_moved:
            total += ELEMENT_COST * self._final_moved + CALL_COST
        return total

    def _compile_run(self) -> list[RunStep]:
        """Steps of :meth:`run`: the variable against one prepared constant each."""
        run: list[RunStep] = []
        if self.variable is None:
            return run
        for k, st, stats in zip(
            range(self.n_const, len(self.steps)),
            self.steps[self.n_const :],
            self._stats[self.n_const :],
            strict=True,
        ):
            if not stats.variable:
                raise ValueError("a step among the constants follows one with the variable")
            arrange: tuple[Any, Any, Any]
            if st.kind == UNARY:
                arrange = (st.sum_a, None, None)
                run.append(RunStep(k, True, arrange if st.sum_a else None, UNARY, None))
                continue
            # the variable is A: B is prepared, a (N, K) F.linear weight turned (K, N) for mm
            a_side = stats.side == 0
            arrange = (
                (st.sum_a, st.perm_a, st.shape_a) if a_side else (st.sum_b, st.perm_b, st.shape_b)
            )
            kind = MM if a_side and st.kind == LINEAR else st.kind
            run.append(
                RunStep(
                    k, a_side, None if arrange == (None, None, None) else arrange, kind, st.view
                )
            )
        return run

    def prepare(self, constants: Sequence[Tensor]) -> list[Tensor | None]:
        """Everything :meth:`run` needs that does not depend on the variable.

        Runs the steps among the constants and lays the constant operand of
        every later step out as its matmul wants it (contiguous; a
        ``F.linear`` weight transposed for ``mm``). Compute it once and pass
        it to :meth:`run` for as long as the constants do not change.

        Parameters
        ----------
        constants
            Every operand but the variable, in the equation's order.

        Returns
        -------
        list
            One entry per step of :meth:`run` (``None`` for a sum).

        Examples
        --------
        >>> import torch
        >>> prog = plan_einsum("ba,ra,or->bo", [(4, 6), (2, 6), (5, 2)], variable=0)
        >>> x, v, u = torch.randn(4, 6), torch.randn(2, 6), torch.randn(5, 2)
        >>> torch.allclose(prog.run(x, prog.prepare([v, u])), x @ v.T @ u.T, atol=1e-5)
        True
        """
        if self.variable is None:
            raise ValueError("prepare() needs a program built with a variable operand")
        n_terms = len(self.equation.split("->")[0].split(","))
        if len(constants) != n_terms - 1:
            raise ValueError(
                f"prepare() takes the {n_terms - 1} constant operands, got {len(constants)}"
            )
        ops: list[Any] = list(constants)
        ops.insert(self.variable, None)  # None marks what depends on the variable
        for st in self.steps[: self.n_const]:
            if st.kind == UNARY:
                a = ops.pop(st.p0)
                ops.append(a.sum(st.sum_a) if st.sum_a else a)
                continue
            a, b = _pop_pair(ops, st)
            ops.append(_matmul(st.kind, _arrange_a(a, st), _arrange_b(b, st), st.view))
        prepared: list[Tensor | None] = []
        for st, run_step in zip(self.steps[self.n_const :], self._run_steps, strict=True):
            if st.kind == UNARY:
                ops.pop(st.p0)
                prepared.append(None)
                ops.append(None)
                continue
            a, b = _pop_pair(ops, st)
            # detached: torch.matmul folds (copies) a 2-d operand that requires grad
            if run_step.variable_is_a:
                b = _arrange_b(b, st)
                b = b.t().contiguous() if st.kind == LINEAR else b.contiguous()
                prepared.append(b.detach())
            else:
                prepared.append(_arrange_a(a, st).contiguous().detach())
            ops.append(None)
        return prepared

    def run(
        self,
        x: Tensor,
        prepared: Sequence[Any],
        hooks: Sequence[Hook | None] | None = None,
        bias: Tensor | None = None,
    ) -> Tensor:
        """Run the contraction on the variable ``x`` with :meth:`prepare`'s operands.

        Same result as calling the program with every operand; ``hooks``
        (one per step but the last, steps among the constants included) and
        ``bias`` as in :meth:`__call__`.

        Examples
        --------
        >>> import torch
        >>> prog = plan_einsum("ij,jk->ik", [(2, 3), (3, 4)], variable=0)
        >>> prog.run(torch.ones(2, 3), prog.prepare([torch.ones(3, 4)]))[0, 0].item()
        3.0
        """
        last = len(self.steps) - 1
        fused = bias if self.fusable else None
        r = x
        for st, c in zip(self._run_steps, prepared, strict=True):
            if st.arrange is not None:
                r = _arrange(r, *st.arrange)
            if st.kind == UNARY:
                continue
            add = fused if st.index == last else None
            if not st.variable_is_a:
                r = _matmul(st.kind, c, r, None, add)
            elif st.kind == MM:
                r = torch.mm(r, c) if add is None else torch.addmm(add, r, c)
            elif st.kind == LEFT:
                r = torch.matmul(c, r)
            else:
                r = torch.bmm(r, c)
            if st.view is not None:
                r = r.view(st.view)
            if hooks is not None and st.index < last:
                hook = hooks[st.index]
                if hook is not None:
                    r = hook(r)
        r = _arrange(r, *self.final)
        if bias is not None and fused is None:
            r = r + bias
        return r

    def __call__(
        self,
        operands: Sequence[Tensor],
        hooks: Sequence[Hook | None] | None = None,
        bias: Tensor | None = None,
    ) -> Tensor:
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
        for k, st in enumerate(self.steps):
            if st.kind == UNARY:
                a = ops.pop(st.p0)
                ops.append(a.sum(st.sum_a) if st.sum_a else a)
                continue
            a, b = _pop_pair(ops, st)
            a, b = _arrange_a(a, st), _arrange_b(b, st)
            view = st.view
            if st.kind == MM and fused is not None and k == last:
                r = torch.addmm(fused, a, b)
            else:
                r = _matmul(st.kind, a, b, view, fused if k == last else None)
                view = None
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


def plan_einsum(
    equation: str,
    shapes: Sequence[Sequence[int]],
    *,
    candidates: Sequence[Path] = (),
    optimize: str | None = None,
    search: bool = True,
    variable: int | None = None,
    objective: str = "flops",
    prepared: bool = False,
) -> Program:
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
    variable
        The operand that changes from call to call (a layer's input); the
        steps among the others are moved first (see :meth:`Program.prepare`).
    objective
        ``'flops'``: fewest FLOPs (opt_einsum's count); ``'time'``: lowest
        :meth:`Program.estimate`, which also charges memory traffic, permute
        copies and calls.
    prepared
        For ``'time'``: estimate as run through :meth:`Program.run` with
        reused prepared operands (the steps among constants are free).

    Returns
    -------
    Program
        The cheapest order, compiled; ties go to the candidate listed first,
        then the optimizer's path.

    Examples
    --------
    >>> prog = plan_einsum("ij,jk,kl->il", [(2, 3), (3, 4), (4, 5)])
    >>> prog.cost, prog.path
    (128, [(0, 1), (0, 1)])
    """
    if objective not in ("flops", "time"):
        raise ValueError(f"objective must be 'flops' or 'time', got {objective!r}")
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
    if objective == "flops":
        best = min(range(len(options)), key=lambda k: (options[k][0], k))
        cost, path = options[best]
        return Program(equation, shapes, path, cost, variable)
    programs = [Program(equation, shapes, p, c, variable) for c, p in options]
    best = min(range(len(programs)), key=lambda k: (programs[k].estimate(prepared), k))
    return programs[best]
