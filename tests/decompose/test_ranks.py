"""Rank arithmetic against brute force and hand counts."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tnquant.decompose.ranks import (
    cap_ranks,
    energy_rank,
    expand_rank,
    proportional_ranks_for_ratio,
    tt_n_params,
    tt_rank_caps,
    tucker_consistent,
    tucker_n_params,
    tucker_rank_caps,
    uniform_ranks_for_ratio,
)


def test_tt_counts_by_hand():
    # cores (1,8,16,r) (r,8,12,r) (r,6,8,1)
    r = 10
    assert tt_n_params((8, 8, 6), (16, 12, 8), (r, r)) == 8 * 16 * r + r * 8 * 12 * r + r * 6 * 8
    assert tt_rank_caps((8, 8, 6), (16, 12, 8)) == (128, 6 * 8)
    assert tt_rank_caps((2, 3, 4, 5), (1, 1, 1, 1)) == (2, 6, 5)


def test_tucker_counts_by_hand():
    assert tucker_n_params((64, 32), (8, 4), fixed=(3, 3)) == 8 * 4 * 9 + 64 * 8 + 32 * 4
    assert tucker_rank_caps((5, 4, 3, 3)) == (5, 4, 3, 3)
    assert tucker_rank_caps((64, 3, 1, 1)) == (3, 3, 1, 1)


def test_expand_rank():
    assert expand_rank(3, 2, "TT") == (3, 3)
    assert expand_rank((1, 2), 2, "TT") == (1, 2)
    with pytest.raises(ValueError, match="must have 3 entries, got 2"):
        expand_rank((1, 2), 3, "Tucker")


def test_cap_ranks_note():
    ranks, note = cap_ranks((30, 30), (5, 4), "Tucker", shown=30)
    assert ranks == (5, 4)
    assert "capped" in note and "30" in note
    assert cap_ranks((3, 3), (5, 4), "Tucker") == ((3, 3), None)
    assert cap_ranks((2**62, 2**62), (5, 4), "Tucker", shown="full") == ((5, 4), None)


@settings(max_examples=50, deadline=None)
@given(
    caps=st.lists(st.integers(1, 40), min_size=1, max_size=3),
    sizes=st.lists(st.integers(1, 9), min_size=4, max_size=4),
    frac=st.floats(0.01, 1.5),
)
def test_uniform_ratio_is_the_closest_uniform_rank(caps, sizes, frac):
    caps = tuple(caps)

    def count(r):
        full = (1, *r, 1)
        return sum(full[k] * sizes[k % 4] * full[k + 1] for k in range(len(r) + 1))

    target = frac * count(caps)
    ranks = uniform_ranks_for_ratio(caps, count, target)
    brute = min(
        (tuple(min(u, c) for c in caps) for u in range(1, max(caps) + 1)),
        key=lambda r: abs(count(r) - target),
    )
    assert abs(count(ranks) - target) == abs(count(brute) - target)


def test_proportional_ranks():
    sizes, caps = (64, 16), (64, 16)
    count = lambda r: tucker_n_params(sizes, r, fixed=(3, 3))  # noqa: E731
    target = 0.25 * 64 * 16 * 9
    ranks = proportional_ranks_for_ratio(sizes, caps, count, target)
    assert abs(count(ranks) - target) / target < 0.1
    assert ranks[0] > ranks[1]  # proportional to the mode sizes

    # brute force over the scale: nothing is closer
    def at(a):
        return tuple(min(c, max(1, round(a * n))) for n, c in zip(sizes, caps, strict=True))

    best = min(abs(count(at(a)) - target) for a in np.linspace(1e-3, 1, 4000))
    assert abs(count(ranks) - target) <= best


@settings(max_examples=50, deadline=None)
@given(s=st.lists(st.floats(0, 10), min_size=1, max_size=12), delta=st.floats(0, 20))
def test_energy_rank_matches_brute_force(s, delta):
    s = sorted(s, reverse=True)
    r = energy_rank(torch.tensor(s, dtype=torch.float64), delta)
    ok = [k for k in range(1, len(s) + 1) if math.sqrt(sum(x * x for x in s[k:])) <= delta]
    assert r == (ok[0] if ok else len(s))


def test_tt_caps_are_the_unfolding_ranks():
    # a random TT-matrix unfolding has exactly the capped rank
    out_shape, in_shape = (2, 3, 2), (3, 1, 2)
    modes = [o * i for o, i in zip(out_shape, in_shape, strict=True)]
    t = np.random.default_rng(0).standard_normal(modes)
    for k, cap in enumerate(tt_rank_caps(out_shape, in_shape), start=1):
        unfolding = t.reshape(math.prod(modes[:k]), -1)
        assert np.linalg.matrix_rank(unfolding) == cap


def test_tucker_consistent():
    assert tucker_consistent((8, 2), fixed=(1, 1)) == (2, 2)
    assert tucker_consistent((8, 2), fixed=(3, 3)) == (8, 2)
    assert tucker_consistent((10, 1, 1)) == (1, 1, 1)
    assert tucker_consistent((4, 3, 2)) == (4, 3, 2)
    assert tucker_consistent((9, 3, 2)) == (6, 3, 2)
