"""The DP allocator against brute force (itertools.product) on small random instances."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from tnquant.planning.allocate import Allocation, Table, allocate, fill, lagrangian

REL = 1e-12  # float sums in the same order agree to rounding


def random_instance(seed: int, layers: int = 4, cands: int = 4, unit: int = 8):
    rng = np.random.default_rng(seed)
    errors = [list(rng.random(cands)) for _ in range(layers)]
    sizes = [[int(unit * rng.integers(1, 40)) for _ in range(cands)] for _ in range(layers)]
    return errors, sizes


def brute_budget(errors, sizes, budget):
    best = None
    for idx in itertools.product(*(range(len(e)) for e in errors)):
        size = sum(s[c] for s, c in zip(sizes, idx, strict=False))
        if size > budget:
            continue
        err = sum(e[c] for e, c in zip(errors, idx, strict=False))
        if best is None or (err, size) < best[:2]:
            best = (err, size, list(idx))
    return best


def brute_target(errors, sizes, target):
    best = None
    for idx in itertools.product(*(range(len(e)) for e in errors)):
        err = sum(e[c] for e, c in zip(errors, idx, strict=False))
        if err > target:
            continue
        size = sum(s[c] for s, c in zip(sizes, idx, strict=False))
        if best is None or (size, err) < best[:2]:
            best = (size, err, list(idx))
    return best


@pytest.mark.parametrize("seed", range(12))
def test_dp_budget_matches_brute_force(seed):
    errors, sizes = random_instance(seed)
    table = Table(errors, sizes)
    assert table.exact
    lo, hi = sum(min(s) for s in sizes), sum(max(s) for s in sizes)
    for budget in np.linspace(lo, hi, 9).astype(int):
        ref = brute_budget(errors, sizes, int(budget))
        got = table.best(int(budget))
        assert got is not None
        assert got.size <= budget
        assert got.error == pytest.approx(ref[0], rel=REL, abs=1e-15)
        assert got.size == ref[1]
        chosen = zip(errors, got.indices, strict=True)
        assert got.error == pytest.approx(sum(e[c] for e, c in chosen))
        assert got.size == sum(s[c] for s, c in zip(sizes, got.indices, strict=False))


@pytest.mark.parametrize("seed", range(12))
def test_dp_target_matches_brute_force(seed):
    errors, sizes = random_instance(seed, layers=3, cands=5)
    table = Table(errors, sizes)
    lo, hi = sum(min(e) for e in errors), sum(max(e) for e in errors)
    for target in np.linspace(lo, hi, 7):
        ref = brute_target(errors, sizes, float(target))
        got = table.smallest(float(target))
        assert got is not None and ref is not None
        assert got.size == ref[0]
        assert got.error <= target
        assert got.error == pytest.approx(ref[1], rel=REL, abs=1e-15)


@pytest.mark.parametrize("seed", range(6))
def test_coarse_grid_is_feasible_and_no_better_than_exact(seed):
    errors, sizes = random_instance(seed, layers=5, cands=4, unit=1)
    sizes = [[s * 1000 + 7 * k for k, s in enumerate(layer)] for layer in sizes]
    coarse = Table(errors, sizes, grid=50)
    assert not coarse.exact
    lo, hi = sum(min(s) for s in sizes), sum(max(s) for s in sizes)
    for budget in np.linspace(lo + coarse.unit * 5, hi, 6).astype(int):
        ref = brute_budget(errors, sizes, int(budget))
        got = coarse.best(int(budget))
        assert got is not None
        assert got.size <= budget
        assert got.error >= ref[0] - 1e-12


@pytest.mark.parametrize("seed", range(6))
def test_tighter_budget_never_gives_a_larger_solution(seed):
    errors, sizes = random_instance(seed, layers=5)
    table = Table(errors, sizes)
    lo, hi = sum(min(s) for s in sizes), sum(max(s) for s in sizes)
    last_size, last_err = None, None
    for budget in range(hi, lo - 1, -8):
        got = table.best(budget)
        if last_size is not None:
            assert got.size <= last_size
            assert got.error >= last_err
        last_size, last_err = got.size, got.error


def test_ties_go_to_the_smaller_size():
    errors = [[0.0, 0.0], [0.5, 0.5]]
    sizes = [[16, 8], [24, 32]]
    got = allocate(errors, sizes, budget=100)
    assert got.indices == [1, 0] and got.size == 32


@pytest.mark.parametrize("seed", range(6))
def test_lagrangian_is_feasible_and_no_better_than_dp(seed):
    errors, sizes = random_instance(seed)
    lo, hi = sum(min(s) for s in sizes), sum(max(s) for s in sizes)
    for budget in np.linspace(lo, hi, 5).astype(int):
        lag = lagrangian(errors, sizes, int(budget))
        ref = brute_budget(errors, sizes, int(budget))
        assert lag.size <= budget
        assert lag.error >= ref[0] - 1e-12


def test_lagrangian_reaches_hull_points():
    # convex trade-off; budgets on hull points (both layers at the same slope)
    errors = [[1.0, 0.5, 0.25, 0.0]] * 2
    sizes = [[8, 16, 32, 64]] * 2
    for budget in (16, 32, 64, 128):
        assert lagrangian(errors, sizes, budget).indices == brute_budget(errors, sizes, budget)[2]


def test_infeasible_and_bad_input():
    errors, sizes = [[0.0, 1.0]], [[16, 8]]
    with pytest.raises(ValueError, match="smallest takes 8 bits"):
        allocate(errors, sizes, budget=7)
    with pytest.raises(ValueError, match="least is 0.0"):
        allocate(errors, sizes, target=-1.0)
    with pytest.raises(ValueError, match="exactly one"):
        allocate(errors, sizes)
    with pytest.raises(ValueError, match="non-negative ints"):
        allocate(errors, [[16, 8.5]], budget=10)
    with pytest.raises(ValueError, match="same length"):
        allocate([[0.0]], [[16, 8]], budget=10)
    with pytest.raises(ValueError, match="finite"):
        allocate([[float("nan"), 0.0]], [[16, 8]], budget=10)
    with pytest.raises(ValueError, match="method"):
        allocate(errors, sizes, budget=10, method="greedy")
    assert lagrangian(errors, sizes, 7) is None


def test_frontier_is_monotone():
    errors, sizes = random_instance(3)
    front = Table(errors, sizes).frontier()
    pairs = zip(front, front[1:], strict=False)
    assert all(a.size < b.size and a.error > b.error for a, b in pairs)


def test_fill_spends_what_the_coarse_grid_leaves():
    errors, sizes = [[0.0, 1.0], [0.0, 1.0]], [[10, 1], [10, 1]]
    coarse = allocate(errors, sizes, budget=20, grid=3)  # units of 7 bits: 10 -> 2 units
    assert coarse.indices == [1, 1]
    filled = fill(errors, sizes, 20, coarse)
    assert filled == Allocation([0, 0], 20, 0.0)  # the exact optimum, found by hand
    with pytest.raises(ValueError, match="over the budget"):
        fill(errors, sizes, 5, Allocation([0, 0], 20, 0.0))


@pytest.mark.parametrize("seed", range(20))
def test_fill_never_worse_and_within_budget(seed):
    rng = np.random.default_rng(seed)
    errors = [sorted(rng.random(4).tolist(), reverse=True) for _ in range(5)]
    sizes = [sorted(rng.integers(1, 50, 4).tolist()) for _ in range(5)]
    budget = int(rng.integers(5 * 10, 5 * 40))
    try:
        start = allocate(errors, sizes, budget=budget, grid=16)
    except ValueError:
        return
    filled = fill(errors, sizes, budget, start)
    assert filled.size <= budget and filled.error <= start.error + 1e-12
    assert filled.error >= brute_budget(errors, sizes, budget)[0] - 1e-12  # never beats exact
