"""choose_shape / validate_shape: balanced factors, least padding, clear errors."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tnquant.decompose.shapes import MAX_PADDING, choose_shape, validate_shape


@pytest.mark.parametrize(
    ("n", "order", "expected"),
    [
        (384, 3, (8, 8, 6)),
        (1536, 3, (16, 12, 8)),
        (384, 2, (24, 16)),
        (1000, 3, (10, 10, 10)),
        (97, 2, (10, 10)),  # prime: padded to 100
        (30522, 2, (175, 175)),  # 2 * 3 * 5087: padded by 0.34 %
        (1, 3, (1, 1, 1)),
    ],
)
def test_known_shapes(n, order, expected):
    assert choose_shape(n, order) == expected


def test_prime_vocab_is_padded_to_balanced_factors():
    shape = choose_shape(30522, 3)
    assert math.prod(shape) >= 30522
    assert math.prod(shape) <= 30522 * (1 + MAX_PADDING)
    assert shape[0] / shape[-1] <= 1.1  # (32, 31, 31)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 5000), order=st.integers(1, 4))
def test_invariants(n, order):
    shape = choose_shape(n, order)
    assert len(shape) == order
    assert list(shape) == sorted(shape, reverse=True)
    assert n <= math.prod(shape) <= max(n, int(n * (1 + MAX_PADDING)))


@settings(max_examples=40, deadline=None)
@given(a=st.integers(2, 40), b=st.integers(2, 40))
def test_products_of_close_factors_are_not_padded(a, b):
    # n = a * b with max/min <= 2 factors well: no padding
    if max(a, b) <= 2 * min(a, b):
        assert math.prod(choose_shape(a * b, 2)) == a * b


@pytest.mark.parametrize(("n", "order"), [(0, 2), (5, 0), (2.5, 2), (True, 2)])
def test_bad_arguments(n, order):
    with pytest.raises(ValueError, match="positive int"):
        choose_shape(n, order)


def test_validate_shape():
    assert validate_shape([4, 4], 16) == (4, 4)
    with pytest.raises(ValueError, match=r"in_shape \(4, 4\) has product 16, below the dim.* 17"):
        validate_shape((4, 4), 17, "in_shape")
    with pytest.raises(ValueError, match="positive ints"):
        validate_shape((4, 0), 1)
