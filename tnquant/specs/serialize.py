"""Specs to and from JSON-safe dicts: ``spec_to_dict`` / ``spec_from_dict`` (untrusted-safe).

Examples
--------
>>> from tnquant.specs import QuantSpec
>>> spec_from_dict(spec_to_dict(QuantSpec(bits=4))) == QuantSpec(bits=4)
True
"""

from __future__ import annotations

import dataclasses
from typing import Any, cast

from tnquant.specs.checks import describe
from tnquant.specs.codebook import Codebook
from tnquant.specs.factorization import CP, TT, LowRank, Tucker
from tnquant.specs.fixed_point import FixedPoint
from tnquant.specs.quantization import Binary, QuantSpec, Ternary

__all__ = ["spec_to_dict", "spec_from_dict"]

# the closed table of spec types spec_from_dict builds, by name
_SPEC_TYPES: dict[str, type] = {
    cls.__name__: cls
    for cls in (TT, Tucker, CP, LowRank, QuantSpec, Binary, Ternary, FixedPoint, Codebook)
}


def spec_to_dict(spec: Any) -> dict[str, Any]:
    """A JSON-safe dict of a spec, with its type under ``'type'``.

    Examples
    --------
    >>> spec_to_dict(QuantSpec(bits=4, granularity=("group", 32)))["granularity"]
    ['group', 32]
    """
    if _SPEC_TYPES.get(type(spec).__name__) is not type(spec):
        raise TypeError(f"expected a tnquant spec, got {type(spec).__name__}")
    out: dict[str, Any] = {"type": type(spec).__name__}
    for f in dataclasses.fields(cast(Any, spec)):
        value = getattr(spec, f.name)
        if isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return out


def spec_from_dict(data: dict[str, Any]) -> Any:
    """Inverse of :func:`spec_to_dict`.

    Safe on dicts from untrusted files: anything but a dict of a known
    ``'type'`` and that type's fields, each of the right type, raises
    ``TypeError`` or ``ValueError`` (never ``KeyError`` or ``AttributeError``);
    nothing is imported or called but the spec's own checks.

    Examples
    --------
    >>> spec_from_dict(spec_to_dict(TT(rank=(4, 4)))) == TT(rank=(4, 4))
    True
    >>> spec_from_dict({"type": "QuantSpec", "symmetric": "false"})
    Traceback (most recent call last):
    ...
    TypeError: symmetric must be a bool, got 'false' (str)
    """
    if not isinstance(data, dict):
        raise TypeError(f"a spec must be a dict with a 'type', got {describe(data)}")
    if "type" not in data:
        raise ValueError(
            f"a spec dict needs a 'type', one of {sorted(_SPEC_TYPES)}; got keys "
            f"{sorted(map(str, data))}"
        )
    data = dict(data)
    name = data.pop("type")
    if not isinstance(name, str):
        raise TypeError(
            f"spec type must be a str, one of {sorted(_SPEC_TYPES)}, got {describe(name)}"
        )
    if name not in _SPEC_TYPES:
        raise ValueError(f"unknown spec type {name!r}; valid types are {sorted(_SPEC_TYPES)}")
    cls = _SPEC_TYPES[name]
    fields = dataclasses.fields(cls)
    names = {f.name for f in fields}
    unknown = [k for k in data if k not in names]
    if unknown:
        raise ValueError(
            f"unknown field(s) {sorted(map(repr, unknown))} for {name}; expected "
            f"some of {sorted(names)}"
        )
    missing = [
        f.name
        for f in fields
        if f.name not in data
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ValueError(f"{name} needs field(s) {missing}")
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    return cls(**kwargs)
