"""Recipe values: the checkers ``(value, key path) -> value`` a recipe's schema is built from.

:mod:`tnquant.cli.recipe` and :mod:`tnquant.cli.recipe_specs` build the
recipe schema from these: a :data:`Check` takes a TOML value and its key
path and returns the normalized value, or raises a ``ValueError`` that
starts with ``recipe key '<path>'``. :func:`_schema` pairs each key's check
with the default of its section dataclass; :func:`_fields` checks a table
against such a schema.

Examples
--------
>>> _int(1)(3, "data.batch_size")
3
>>> _choice("mse", "kl")("l1", "finetune.loss")
Traceback (most recent call last):
...
ValueError: recipe key 'finetune.loss' must be one of ['mse', 'kl'], got 'l1'
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

from tnquant.specs import FixedPoint

__all__ = ["Check"]

Check = Callable[[Any, str], Any]
_CLASS_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


def _fail(path: str, expected: str, value: Any) -> ValueError:
    return ValueError(f"recipe key '{path}' must be {expected}, got {value!r}")


def _int(lo: int = 1, hi: int | None = None) -> Check:
    def check(v: Any, path: str) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
            raise _fail(
                path, f"an integer >= {lo}" if hi is None else f"an integer in {lo}..{hi}", v
            )
        return v

    return check


def _float(lo: float = 0.0, hi: float = float("inf"), lo_open: bool = False) -> Check:
    def check(v: Any, path: str) -> float:
        ok = not isinstance(v, bool) and isinstance(v, (int, float))
        if not ok or v > hi or v < lo or (lo_open and v == lo):
            raise _fail(path, f"a number in {'(' if lo_open else '['}{lo}, {hi}]", v)
        return float(v)

    return check


def _warmup(v: Any, path: str) -> int | float:
    """An int: warm-up steps (>= 0); a float in [0, 1): a fraction of the steps."""
    ok = not isinstance(v, bool) and (
        (isinstance(v, int) and v >= 0) or (isinstance(v, float) and 0.0 <= v < 1.0)
    )
    if not ok:
        raise _fail(
            path, "an integer number of steps >= 0 or a float fraction of the steps in [0, 1)", v
        )
    return v


def _bool(v: Any, path: str) -> bool:
    if not isinstance(v, bool):
        raise _fail(path, "true or false", v)
    return v


def _choice(*choices: str) -> Check:
    def check(v: Any, path: str) -> str:
        if v not in choices:
            raise _fail(path, f"one of {list(choices)}", v)
        return str(v)

    return check


def _optional(check: Check, off: Any = False) -> Check:
    """``check``, or ``None`` when the value is ``off`` (TOML has no null)."""

    def inner(v: Any, path: str) -> Any:
        if type(v) is type(off) and v == off:
            return None
        return check(v, path)

    return inner


def _globs(v: Any, path: str) -> tuple[str, ...]:
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, list) or not items or not all(isinstance(s, str) for s in items):
        raise _fail(path, "a glob string or a non-empty list of them", v)
    return tuple(items)


def _fixed(v: Any, path: str) -> FixedPoint:
    if not isinstance(v, str):
        raise _fail(path, "an 'ap_fixed<W,I,...>' string", v)
    try:
        return FixedPoint.from_string(v)
    except (ValueError, TypeError) as e:
        raise ValueError(f"recipe key '{path}': {e}") from None


def _input_type(v: Any, path: str) -> str:
    if v != "auto":
        _fixed(v, path)
    return str(v)


def _class_path(v: Any, path: str) -> str:
    if not isinstance(v, str) or not _CLASS_RE.match(v):
        raise _fail(path, "a class path 'pkg.module:Class'", v)
    return v


def _table(v: Any, path: str) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise _fail(path, "a table", v)
    return v


def _unknown(path: str, expected: Any) -> ValueError:
    return ValueError(f"recipe key '{path}' is not known; expected one of {sorted(expected)}")


def _fields(
    table: dict[str, Any],
    path: str,
    schema: dict[str, tuple[Check, Any]],
    skip: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Check the scalar keys of ``table`` against ``schema``; defaults for the rest."""
    out = {}
    for key, value in table.items():
        if key in skip:
            continue
        if key not in schema:
            raise _unknown(f"{path}.{key}", list(schema) + list(skip))
        out[key] = schema[key][0](value, f"{path}.{key}")
    for key, (_, default) in schema.items():
        out.setdefault(key, default)
    return out


def _schema(
    cls: type, checks: dict[str, Check], keys: dict[str, str] | None = None
) -> dict[str, tuple[Check, Any]]:
    """``{recipe key: (check, default)}``: the defaults are those of the dataclass ``cls``.

    ``keys`` maps a recipe key to its field when they differ (``class`` -> ``cls``).
    """
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    keys = keys or {}
    return {key: (check, defaults[keys.get(key, key)]) for key, check in checks.items()}
