"""Compiled contraction programs vs np.einsum (the independent reference)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tnquant.layers import steps
from tnquant.layers.contract import (
    Program,
    chain_path,
    default_optimizer,
    hoist_constant_steps,
    path_cost,
    path_to_ssa,
    plan_einsum,
    ssa_to_path,
    symbols,
)

RTOL = 1e-10


@st.composite
def equations(draw):
    """A random einsum over 1-4 operands: no letter twice in a term, sizes 1..4."""
    n_letters = draw(st.integers(1, 7))
    letters = symbols(n_letters)
    sizes = {c: draw(st.integers(1, 4)) for c in letters}
    n_ops = draw(st.integers(1, 4))
    terms = []
    for _ in range(n_ops):
        chosen = draw(st.lists(st.sampled_from(letters), unique=True, min_size=1, max_size=4))
        terms.append("".join(chosen))
    used = sorted(set("".join(terms)))
    out = draw(st.lists(st.sampled_from(used), unique=True, max_size=len(used)))
    out = draw(st.permutations(out)) if out else []
    eq = ",".join(terms) + "->" + "".join(out)
    shapes = [tuple(sizes[c] for c in t) for t in terms]
    seed = draw(st.integers(0, 2**31 - 1))
    return eq, shapes, seed


def _operands(shapes, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]


@pytest.mark.parametrize("left_min", [1, 4, 10**9])
@settings(max_examples=80, deadline=None)
@given(case=equations())
def test_program_matches_numpy_einsum(case, left_min):
    # left_min=1 runs every step with a trailing block as a left matmul, 10**9 none
    eq, shapes, seed = case
    ops = _operands(shapes, seed)
    ref = np.einsum(eq, *[o.numpy() for o in ops])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(steps, "LEFT_MIN_TRAILING", left_min)
        got = plan_einsum(eq, shapes)(ops)
    assert tuple(got.shape) == ref.shape
    np.testing.assert_allclose(got.numpy(), ref, rtol=RTOL, atol=1e-12)


@settings(max_examples=60, deadline=None)
@given(equations(), st.data())
def test_every_pairwise_order_gives_the_same_result(case, data):
    eq, shapes, seed = case
    n = len(shapes)
    if n < 2:
        return
    path, remaining = [], n
    while remaining > 1:  # a random pairwise path
        i = data.draw(st.integers(0, remaining - 2))
        j = data.draw(st.integers(i + 1, remaining - 1))
        path.append((i, j))
        remaining -= 1
    ops = _operands(shapes, seed)
    ref = np.einsum(eq, *[o.numpy() for o in ops])
    prog = plan_einsum(eq, shapes, candidates=[path], search=False)
    assert prog.path == path
    np.testing.assert_allclose(prog(ops).numpy(), ref, rtol=RTOL, atol=1e-12)


def test_fused_bias_and_hooks():
    x, v, u = _operands([(5, 6), (3, 6), (4, 3)], 0)
    bias = torch.randn(4, dtype=torch.float64)
    prog = plan_einsum(
        "Za,ra,or->Zo", [(5, 6), (3, 6), (4, 3)], candidates=[chain_path(3, [1, 2])], search=False
    )
    assert prog.fusable
    seen = []

    def hook(t):
        seen.append(tuple(t.shape))
        return 2 * t

    got = prog([x, v, u], hooks=[hook], bias=bias)
    ref = 2 * (x.numpy() @ v.numpy().T) @ u.numpy().T + bias.numpy()
    np.testing.assert_allclose(got.numpy(), ref, rtol=RTOL)
    assert seen == [(5, 3)]


def test_costs_follow_opt_einsum_convention():
    # (2x3)(3x4) then (2x4)(4x5): 2*2*3*4 + 2*2*4*5
    assert path_cost("ij,jk,kl->il", [(2, 3), (3, 4), (4, 5)], [(0, 1), (0, 1)]) == 128
    # the other order: (3x4)(4x5) then (2x3)(3x5)
    assert path_cost("ij,jk,kl->il", [(2, 3), (3, 4), (4, 5)], [(1, 2), (0, 1)]) == 180
    prog = plan_einsum("ij,jk,kl->il", [(2, 3), (3, 4), (4, 5)])
    assert prog.cost == 128
    # a worse explicit candidate loses to the optimizer, a forced one is kept
    assert (
        plan_einsum("ij,jk,kl->il", [(2, 3), (3, 4), (4, 5)], candidates=[[(1, 2), (0, 1)]]).cost
        == 128
    )
    assert (
        plan_einsum(
            "ij,jk,kl->il", [(2, 3), (3, 4), (4, 5)], candidates=[[(1, 2), (0, 1)]], search=False
        ).cost
        == 180
    )


def test_chain_path_positions():
    # operands [x, A, B, C]; contract x with C, then B, then A
    assert chain_path(4, [3, 2, 1]) == [(0, 3), (1, 2), (0, 1)]
    assert chain_path(4, [1, 2, 3]) == [(0, 1), (0, 2), (0, 1)]
    assert chain_path(2, [1]) == [(0, 1)]


def test_default_optimizer():
    assert default_optimizer(2) == "optimal"
    assert default_optimizer(6) == "dp"
    assert default_optimizer(11) == "greedy"


def test_steps_of_more_than_two_operands_are_refused():
    with pytest.raises(ValueError, match="contracts 1 or 2 operands"):
        Program("i,i,i->", [(2,), (2,), (2,)], [(0, 1, 2)], 0)


def test_empty_batch():
    prog = plan_einsum("Za,ra->Zr", [(0, 3), (2, 3)])
    out = prog([torch.zeros(0, 3), torch.randn(2, 3)])
    assert out.shape == (0, 2)


def test_inconsistent_letter_sizes_are_refused():
    with pytest.raises(ValueError, match="letter 'j' has size 3 and 4"):
        Program("ij,jk->ik", [(2, 3), (4, 5)], [(0, 1)], 0)


@st.composite
def random_paths(draw, n):
    """A random pairwise opt_einsum path over ``n`` operands."""
    path, remaining = [], n
    while remaining > 1:
        i = draw(st.integers(0, remaining - 2))
        j = draw(st.integers(i + 1, remaining - 1))
        path.append((i, j))
        remaining -= 1
    return path


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 7).flatmap(lambda n: st.tuples(st.just(n), random_paths(n))), st.data())
def test_ssa_round_trip_and_hoisting_keep_the_tree(case, data):
    n, path = case
    ssa = path_to_ssa(n, path)
    assert ssa_to_path(n, ssa) == path
    # every id is used exactly once, leaves and intermediates alike
    used = sorted(v for step in ssa for v in step)
    assert used == list(range(n + len(ssa) - 1))
    variable = data.draw(st.integers(0, n - 1))
    hoisted = hoist_constant_steps(n, path, variable)

    def tree(steps):  # each result as the frozenset of the leaves it covers
        cover = {k: frozenset([k]) for k in range(n)}
        for k, (a, b) in enumerate(steps):
            cover[n + k] = cover[a] | cover[b]
        return sorted(sorted(cover[n + k]) for k in range(len(steps)))

    assert tree(path_to_ssa(n, hoisted)) == tree(ssa)
    # steps without the variable come first
    flags = [variable in leaves for leaves in _covers(n, path_to_ssa(n, hoisted))]
    assert flags == sorted(flags)


def _covers(n, ssa):
    cover = {k: frozenset([k]) for k in range(n)}
    out = []
    for k, (a, b) in enumerate(ssa):
        cover[n + k] = cover[a] | cover[b]
        out.append(cover[n + k])
    return out


@pytest.mark.parametrize("objective", ["flops", "time"])
@settings(max_examples=60, deadline=None)
@given(case=equations(), data=st.data())
def test_prepare_then_run_matches_numpy_einsum(case, data, objective):
    eq, shapes, seed = case
    n = len(shapes)
    variable = data.draw(st.integers(0, n - 1))
    ops = _operands(shapes, seed)
    ref = np.einsum(eq, *[o.numpy() for o in ops])
    prog = plan_einsum(eq, shapes, variable=variable, objective=objective)
    np.testing.assert_allclose(prog(ops).numpy(), ref, rtol=RTOL, atol=1e-12)
    constants = [o for k, o in enumerate(ops) if k != variable]
    prepared = prog.prepare(constants)
    got = prog.run(ops[variable], prepared)
    assert tuple(got.shape) == ref.shape
    np.testing.assert_allclose(got.numpy(), ref, rtol=RTOL, atol=1e-12)
    # the prepared operands are reusable: a second input, same constants
    x2 = torch.randn(ops[variable].shape, dtype=torch.float64)
    ops2 = list(ops)
    ops2[variable] = x2
    np.testing.assert_allclose(
        prog.run(x2, prepared).numpy(),
        np.einsum(eq, *[o.numpy() for o in ops2]),
        rtol=RTOL,
        atol=1e-12,
    )
    assert prog.estimate(prepared=True) <= prog.estimate()


def test_prepared_operands_are_laid_out_for_their_matmul():
    # x (5, 6) . V (3, 6) . U (4, 3): V is an F.linear weight, prepared as V^T for mm
    shapes = [(5, 6), (3, 6), (4, 3)]
    x, v, u = _operands(shapes, 1)
    bias = torch.randn(4, dtype=torch.float64)
    prog = plan_einsum(
        "Za,ra,or->Zo", shapes, candidates=[chain_path(3, [1, 2])], search=False, variable=0
    )
    prepared = prog.prepare([v.requires_grad_(), u])
    assert all(p.is_contiguous() and not p.requires_grad for p in prepared)
    assert tuple(prepared[0].shape) == (6, 3)
    ref = x.numpy() @ v.detach().numpy().T @ u.numpy().T + bias.numpy()
    np.testing.assert_allclose(prog.run(x, prepared, bias=bias).numpy(), ref, rtol=RTOL)


def test_time_objective_prefers_fewer_passes_over_the_activation():
    # x (B, 16, 8, 8) with rank-5 factors on the last two modes: merging the
    # factors first (one (B*16, 64) x (64, 25) mm on a view) beats two thin
    # passes over x, one of them behind a permute copy, though it costs 3x the
    # FLOPs (measured on one core: 0.44 ms against 2.0-2.6 ms)
    eq = "abcd,ck,dl->abkl"
    shapes = [(1024, 16, 8, 8), (8, 5), (8, 5)]
    by_flops = plan_einsum(eq, shapes, variable=0)
    merged = ssa_to_path(3, [(1, 2), (0, 3)])
    by_time = plan_einsum(
        eq, shapes, candidates=[merged], variable=0, objective="time", prepared=True
    )
    assert by_time.path == merged != by_flops.path
    assert by_time.cost > by_flops.cost
    assert by_time.estimate(prepared=True) < by_flops.estimate(prepared=True)
    x, a, b = _operands(shapes, 3)
    np.testing.assert_allclose(
        by_time.run(x, by_time.prepare([a, b])).numpy(),
        np.einsum(eq, x.numpy(), a.numpy(), b.numpy()),
        rtol=RTOL,
    )


def test_bad_objective_and_variable_are_refused():
    with pytest.raises(ValueError, match="objective must be 'flops' or 'time', got 'fast'"):
        plan_einsum("ij,jk->ik", [(2, 3), (3, 4)], objective="fast")
    with pytest.raises(ValueError, match="variable must index one of the 2 operands, got 2"):
        plan_einsum("ij,jk->ik", [(2, 3), (3, 4)], variable=2)
    with pytest.raises(ValueError, match="prepare\\(\\) needs a program built with a variable"):
        plan_einsum("ij,jk->ik", [(2, 3), (3, 4)]).prepare([torch.ones(3, 4)])
    with pytest.raises(ValueError, match="prepare\\(\\) takes the 1 constant operands, got 2"):
        plan_einsum("ij,jk->ik", [(2, 3), (3, 4)], variable=0).prepare(
            [torch.ones(3, 4), torch.ones(3, 4)]
        )


def test_steps_have_named_fields():
    prog = plan_einsum("ba,ra,or->bo", [(4, 6), (2, 6), (5, 2)], variable=0)
    assert steps.Step._fields == (
        "p0",
        "p1",
        "swap",
        "sum_a",
        "perm_a",
        "shape_a",
        "sum_b",
        "perm_b",
        "shape_b",
        "kind",
        "view",
    )
    assert all(isinstance(st, steps.Step) for st in prog.steps)
    assert prog.kinds == tuple(st.kind for st in prog.steps)
    assert all(isinstance(st, steps.StepStats) for st in prog._stats)
    assert all(isinstance(st, steps.RunStep) for st in prog._run_steps)
