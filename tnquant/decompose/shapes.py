"""Tensorized shapes: split a dimension ``n`` into ``order`` balanced factors.

A Linear weight ``(out, in)`` is tensorized to ``(out_1..out_d) x
(in_1..in_d)`` with ``prod(out_k) >= out`` and ``prod(in_k) >= in``; the
weight is padded with zeros up to the products. Shapes here are always in
**descending** order (``(16, 12, 8)`` for 1536), so the largest modes sit on
the first cores; TensorLy-Torch's ``get_tensorized_shape`` returns them
ascending. Any order given by the user in a spec is kept as given.

When ``n`` factors badly (a prime, or a product with a large prime factor
such as 30522 = 2 * 3 * 5087), :func:`choose_shape` pads ``n`` a little (at
most :data:`MAX_PADDING`, 5 %) to a size with balanced factors.

Examples
--------
>>> choose_shape(384, 3)
(8, 8, 6)
>>> choose_shape(1536, 3)
(16, 12, 8)
>>> validate_shape((8, 8, 6), 384)
(8, 8, 6)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

__all__ = ["choose_shape", "validate_shape", "MAX_PADDING", "MAX_IMBALANCE"]

#: Largest relative padding :func:`choose_shape` adds to reach balanced factors.
MAX_PADDING = 0.05
#: A factorization is "balanced" when its largest factor is at most this many
#: times its smallest one; otherwise :func:`choose_shape` looks for padding.
MAX_IMBALANCE = 2.0


def _divisors(n: int) -> list[int]:
    small, large = [], []
    for i in range(1, math.isqrt(n) + 1):
        if n % i == 0:
            small.append(i)
            if i != n // i:
                large.append(n // i)
    return small + large[::-1]


@lru_cache(maxsize=4096)
def _balanced(n: int, order: int, cap: int) -> tuple[int, ...] | None:
    """Factors of ``n`` (exactly ``order``, descending, each <= cap) with the
    smallest maximum, ties broken by the smaller ``max/min``; None if none."""
    if order == 1:
        return (n,) if n <= cap else None
    best: tuple[int, ...] | None = None
    best_key: tuple[int, float] | None = None
    for first in reversed(_divisors(n)):
        if first > cap:
            continue
        if first**order < n:  # the largest factor must reach the order-th root
            break
        rest = _balanced(n // first, order - 1, first)
        if rest is None:
            continue
        cand = (first, *rest)
        key = (cand[0], cand[0] / cand[-1])
        if best_key is None or key < best_key:
            best, best_key = cand, key
    return best


def _imbalance(shape: tuple[int, ...]) -> float:
    return shape[0] / shape[-1]


def choose_shape(n: int, order: int) -> tuple[int, ...]:
    """Balanced factors of ``n`` (or of a slightly larger size), descending.

    The most balanced factorization of a size is the one with the smallest
    largest factor (ties: the smallest ratio of the largest to the smallest
    factor). That of ``n`` itself is used when its ratio is at most
    :data:`MAX_IMBALANCE`: ``n`` factors well and is not padded. Otherwise
    ``n`` factors badly (a large prime factor) and the sizes
    ``n .. floor(n * (1 + MAX_PADDING))`` are searched for the most balanced
    factorization (smallest largest factor, then smallest ratio, then least
    padding). Factors of 1 appear only when ``n`` is too small.

    Parameters
    ----------
    n
        The dimension to tensorize, ``>= 1``.
    order
        Number of factors, ``>= 1``.

    Returns
    -------
    tuple of int
        ``order`` factors in descending order with ``prod >= n``.

    Raises
    ------
    ValueError
        If ``n`` or ``order`` is not a positive int.

    Examples
    --------
    >>> choose_shape(768, 2)
    (32, 24)
    >>> choose_shape(97, 2)  # 97 is prime: pad to 100
    (10, 10)
    >>> math.prod(choose_shape(30522, 3)) >= 30522
    True
    """
    for name, value in (("n", n), ("order", order)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    own = _balanced(n, order, n)
    if own is None:  # cannot happen: (n, 1, ..., 1) always exists
        raise RuntimeError(f"no factorization of {n} into {order} factors")
    if _imbalance(own) <= MAX_IMBALANCE:
        return own
    hi = int(n * (1 + MAX_PADDING))
    for cap in range(_root_ceil(n, order), own[0] + 1):
        found = list(_tuples(n, hi, order, cap))
        if found:  # the smallest largest factor: now the smallest ratio, then padding
            return min(found, key=lambda t: (_imbalance(t), math.prod(t)))
    return own


def _root_ceil(m: int, order: int) -> int:
    """Smallest int ``r`` with ``r**order >= m``."""
    r = max(1, round(m ** (1.0 / order)))
    while r**order < m:
        r += 1
    while r > 1 and (r - 1) ** order >= m:
        r -= 1
    return r


def _tuples(lo: int, hi: int, order: int, cap: int):
    """Descending tuples of ``order`` factors, each <= cap, product in [lo, hi]."""
    if order == 1:
        yield from ((f,) for f in range(max(lo, 1), min(cap, hi) + 1))
        return
    for first in range(cap, 0, -1):
        if first**order < lo:
            break
        for rest in _tuples(-(-lo // first), hi // first, order - 1, first):
            yield (first, *rest)


def validate_shape(shape: Sequence[int], n: int, name: str = "shape") -> tuple[int, ...]:
    """Check that a tensorized ``shape`` covers the dimension ``n``.

    Parameters
    ----------
    shape
        Positive ints; their product must be ``>= n`` (zero padding fills
        the rest).
    n
        The dimension the shape tensorizes.
    name
        Used in the error message (``'in_shape'``, ``'out_shape'``).

    Returns
    -------
    tuple of int
        ``shape`` as a tuple.

    Raises
    ------
    ValueError
        If an entry is not a positive int or the product is below ``n``.

    Examples
    --------
    >>> validate_shape([4, 4], 15, "in_shape")
    (4, 4)
    >>> validate_shape((4, 4), 17, "in_shape")
    Traceback (most recent call last):
    ...
    ValueError: in_shape (4, 4) has product 16, below the dimension 17 it must cover
    """
    shape = tuple(shape)
    if not shape or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in shape):
        raise ValueError(f"{name} must be a non-empty tuple of positive ints, got {shape!r}")
    if math.prod(shape) < n:
        raise ValueError(
            f"{name} {shape} has product {math.prod(shape)}, below the dimension {n} it must cover"
        )
    return shape
