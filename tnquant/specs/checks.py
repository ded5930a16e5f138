"""Field checkers shared by every spec's ``__post_init__`` (one set, not one per spec).

Each checker takes the field's name and value and returns the value
normalized (a numpy integer becomes an ``int``, an int in a float field a
``float``) or raises:

- ``TypeError`` when the value has the wrong type: a bool field takes only a
  ``bool``; an int field an integer but not a ``bool``; a float field an
  int or a float but not a ``bool``; a choice field a ``str``;
- ``ValueError`` when the type is right but the value is not (out of range,
  not finite, not one of the choices).

Every message starts with the field's name, then says what was expected and
what came (``"symmetric must be a bool, got 'false' (str)"``): the recipe
parser takes that first word to point at the culprit key.

Examples
--------
>>> check_int("bits", 4, lo=1, hi=16)
4
>>> check_bool("symmetric", "false")
Traceback (most recent call last):
...
TypeError: symmetric must be a bool, got 'false' (str)
"""

from __future__ import annotations

import math
import numbers
from typing import Any

__all__ = [
    "describe",
    "check_bool",
    "check_int",
    "check_float",
    "check_choice",
    "check_rank",
    "check_shape",
]


def describe(value: Any) -> str:
    """``repr(value)`` (shortened) followed by its type name, for messages.

    Examples
    --------
    >>> describe("false")
    "'false' (str)"
    >>> describe(None)
    'None'
    """
    if value is None:
        return "None"
    text = repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    return f"{text} ({type(value).__name__})"


def check_bool(name: str, value: Any) -> bool:
    """``value`` if it is a ``bool``, else ``TypeError`` naming ``name``.

    Examples
    --------
    >>> check_bool("learnable", True)
    True
    """
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {describe(value)}")
    return value


def _range_text(
    lo: float | None, hi: float | None, lo_open: bool, hi_open: bool, integer: bool
) -> str:
    if lo is not None and hi is not None:
        if integer:
            return f"in {lo}..{hi}"
        return f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{'>' if lo_open else '>='} {lo}"
    return f"{'<' if hi_open else '<='} {hi}"


def check_int(name: str, value: Any, lo: int | None = None, hi: int | None = None) -> int:
    """An integer (not a ``bool``) in ``lo..hi`` (either bound optional), as an ``int``.

    Examples
    --------
    >>> check_int("axis", -1)
    -1
    >>> check_int("order", 0, lo=1)
    Traceback (most recent call last):
    ...
    ValueError: order must be >= 1, got 0
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {describe(value)}")
    value = int(value)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ValueError(f"{name} must be {_range_text(lo, hi, False, False, True)}, got {value}")
    return value


def check_float(
    name: str,
    value: Any,
    lo: float | None = None,
    hi: float | None = None,
    *,
    lo_open: bool = False,
    hi_open: bool = False,
) -> float:
    """A finite real number (an int or a float, not a ``bool``) in the range, as a ``float``.

    ``lo``/``hi`` are inclusive unless ``lo_open``/``hi_open``.

    Examples
    --------
    >>> check_float("percentile", 99, 0, 100, lo_open=True)
    99.0
    >>> check_float("threshold", "0.7", 0, 2, lo_open=True, hi_open=True)
    Traceback (most recent call last):
    ...
    TypeError: threshold must be a number (int or float), got '0.7' (str)
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number (int or float), got {describe(value)}")
    try:
        value = float(value)
    except OverflowError:  # an int beyond float64
        value = math.copysign(math.inf, value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    below = lo is not None and (value <= lo if lo_open else value < lo)
    above = hi is not None and (value >= hi if hi_open else value > hi)
    if below or above:
        raise ValueError(
            f"{name} must be {_range_text(lo, hi, lo_open, hi_open, False)}, got {value}"
        )
    return value


def check_choice(name: str, value: Any, valid: tuple[str, ...]) -> str:
    """``value`` if it is one of the strings ``valid``.

    ``TypeError`` for a non-string, ``ValueError`` for another string.

    Examples
    --------
    >>> check_choice("svd", "randomized", ("truncated", "randomized"))
    'randomized'
    >>> check_choice("svd", 3, ("truncated", "randomized"))
    Traceback (most recent call last):
    ...
    TypeError: svd must be a str, one of ['truncated', 'randomized'], got 3 (int)
    """
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, one of {list(valid)}, got {describe(value)}")
    if value not in valid:
        raise ValueError(f"{name} must be one of {list(valid)}, got {value!r}")
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_rank(rank: Any) -> int | tuple[int, ...] | str:
    """``'full'``, a positive int, or a non-empty tuple (or list) of positive ints.

    Examples
    --------
    >>> check_rank([4, 2])
    (4, 2)
    >>> check_rank(2.0)
    Traceback (most recent call last):
    ...
    TypeError: rank must be an int, a tuple of ints or 'full', got 2.0 (float)
    """
    if isinstance(rank, str):
        if rank == "full":
            return rank
        raise ValueError(f"rank must be an int, a tuple of ints or 'full', got {rank!r}")
    if _is_int(rank):
        values: tuple[Any, ...] = (rank,)
    elif isinstance(rank, (tuple, list)):
        values = tuple(rank)
    else:
        raise TypeError(f"rank must be an int, a tuple of ints or 'full', got {describe(rank)}")
    if not all(_is_int(r) for r in values):
        raise TypeError(f"rank must be positive int(s), got {describe(rank)}")
    if not values or any(r <= 0 for r in values):
        raise ValueError(f"rank must be positive int(s), got {tuple(values)!r}")
    return int(rank) if _is_int(rank) else tuple(int(r) for r in values)


def check_shape(name: str, shape: Any) -> tuple[int, ...] | None:
    """``None``, or a non-empty tuple (or list) of positive ints, as a tuple.

    Examples
    --------
    >>> check_shape("in_shape", [4, 8])
    (4, 8)
    """
    if shape is None:
        return None
    if not isinstance(shape, (tuple, list)) or not all(_is_int(s) for s in shape):
        raise TypeError(f"{name} must be a tuple of positive ints, got {describe(shape)}")
    if not shape or any(s < 1 for s in shape):
        raise ValueError(f"{name} must be a tuple of positive ints, got {tuple(shape)!r}")
    return tuple(int(s) for s in shape)
