"""Compiled contraction programs vs np.einsum (the independent reference)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tnquant.layers import contract
from tnquant.layers.contract import (
    Program,
    chain_path,
    default_optimizer,
    path_cost,
    plan_einsum,
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
        mp.setattr(contract, "LEFT_MIN_TRAILING", left_min)
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
    prog = plan_einsum("Za,ra,or->Zo", [(5, 6), (3, 6), (4, 3)],
                       candidates=[chain_path(3, [1, 2])], search=False)
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
    assert plan_einsum("ij,jk,kl->il", [(2, 3), (3, 4), (4, 5)],
                       candidates=[[(1, 2), (0, 1)]]).cost == 128
    assert plan_einsum("ij,jk,kl->il", [(2, 3), (3, 4), (4, 5)],
                       candidates=[[(1, 2), (0, 1)]], search=False).cost == 180


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
