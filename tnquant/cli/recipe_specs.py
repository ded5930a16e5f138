"""The ``[factorize]`` and ``[quantize]`` tables of a recipe: layer globs mapped to spec tables.

A spec table (``{format = "tt", ratio = 0.25}``, ``{bits = 4, granularity =
"channel"}``) builds through its spec class (:class:`~tnquant.specs.TT`,
:class:`~tnquant.specs.QuantSpec`, ...): the class's fields are the keys, and
its own checks name the key that fails. :mod:`tnquant.cli.recipe` (which
documents the schema) parses the other tables and the whole file.

Examples
--------
>>> _parse_factorize({"fc*": {"format": "lowrank", "rank": 4}}).mapping()
{'fc*': LowRank(rank=4, ratio=None, tol=None, svd='truncated')}
>>> _quant_spec({"bitz": 4}, "quantize.cores.*")
Traceback (most recent call last):
...
ValueError: recipe key 'quantize.cores.*.bitz' is not known; expected one of [...]
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from tnquant.cli.recipe_values import _bool, _fail, _fixed, _globs, _int, _schema, _table, _unknown
from tnquant.pipeline import FactorizeSection, QuantizeSection
from tnquant.specs import CP, TT, Binary, FixedPoint, LowRank, QuantSpec, Ternary, Tucker

__all__ = ["FORMATS", "QUANT_KINDS"]

FORMATS: dict[str, type] = {"tt": TT, "tucker": Tucker, "cp": CP, "lowrank": LowRank}
QUANT_KINDS: dict[str, type] = {
    "int": QuantSpec,
    "binary": Binary,
    "ternary": Ternary,
    "fixed": FixedPoint,
}
_INT_KEY = re.compile(r"^-?\d+$")
_FACTORIZE_OPTIONS = _schema(FactorizeSection, {"data_aware": _bool, "num_batches": _int(1)})
_QUANTIZE_OPTIONS = _schema(
    QuantizeSection, {"include": _globs, "exclude": _globs, "convert": _bool}
)


def _build_spec(cls: type, fields: dict[str, Any], path: str) -> Any:
    names = [f.name for f in dataclasses.fields(cls)]
    for key in fields:
        if key not in names:
            raise _unknown(f"{path}.{key}", names)
    try:
        return cls(**fields)
    except (ValueError, TypeError) as e:
        culprit = str(e).split(" ", 1)[0]
        where = f"{path}.{culprit}" if culprit in fields else path
        raise ValueError(f"recipe key '{where}': {e}") from None


def _dotted_hint(value: dict[str, Any], path: str, tag: str) -> None:
    if tag not in value and value and all(isinstance(v, dict) for v in value.values()):
        raise ValueError(
            f"recipe key '{path}' is not a spec table (no '{tag}'); quote layer "
            f'globs that hold dots: "a.b.*" = {{...}}'
        )


def _factor_spec(value: Any, path: str) -> Any:
    table = dict(_table(value, path))
    _dotted_hint(table, path, "format")
    fmt = table.pop("format", None)
    if fmt is None:
        raise ValueError(
            f"recipe key '{path}.format' is missing; expected one of {sorted(FORMATS) + ['none']}"
        )
    if fmt == "none":
        if table:
            raise _unknown(f"{path}.{next(iter(table))}", ["format"])
        return None
    if fmt not in FORMATS:
        raise _fail(f"{path}.format", f"one of {sorted(FORMATS) + ['none']}", fmt)
    return _build_spec(FORMATS[fmt], table, path)


def _quant_spec(value: Any, path: str) -> Any:
    table = dict(_table(value, path))
    _dotted_hint(table, path, "bits")
    kind = table.pop("kind", "int")
    if kind == "none":
        if table:
            raise _unknown(f"{path}.{next(iter(table))}", ["kind"])
        return None
    if kind not in QUANT_KINDS:
        raise _fail(f"{path}.kind", f"one of {sorted(QUANT_KINDS) + ['none']}", kind)
    if kind == "fixed" and "type" in table:
        spec = _fixed(table.pop("type"), f"{path}.type")
        if table:
            raise _unknown(f"{path}.{next(iter(table))}", ["kind", "type"])
        return spec
    return _build_spec(QUANT_KINDS[kind], table, path)


def _parse_factorize(table: dict[str, Any]) -> FactorizeSection:
    specs, options = [], {}
    for key, value in table.items():
        path = f"factorize.{key}"
        if isinstance(value, dict):
            specs.append((key, _factor_spec(value, path)))
        elif key in _FACTORIZE_OPTIONS:
            options[key] = _FACTORIZE_OPTIONS[key][0](value, path)
        else:
            raise ValueError(
                f"recipe key '{path}' is not known; expected one of "
                f"{sorted(_FACTORIZE_OPTIONS)} or a layer glob mapped to a table "
                'like {format = "tt", ratio = 0.25}'
            )
    if not specs:
        raise ValueError("recipe table 'factorize' maps no layer glob to a spec")
    return FactorizeSection(specs=tuple(specs), **options)


def _parse_quantize(table: dict[str, Any]) -> QuantizeSection:
    kinds = ("weights", "cores", "activations")
    parts: dict[str, Any] = {}
    for key, value in table.items():
        path = f"quantize.{key}"
        if key in kinds:
            pairs = []
            for glob, spec in _table(value, path).items():
                index = key == "cores" and _INT_KEY.match(glob)
                pairs.append((int(glob) if index else glob, _quant_spec(spec, f"{path}.{glob}")))
            if not pairs:
                raise ValueError(f"recipe table '{path}' maps no glob to a spec")
            parts[key] = tuple(pairs)
        elif key in _QUANTIZE_OPTIONS:
            parts[key] = _QUANTIZE_OPTIONS[key][0](value, path)
        else:
            raise _unknown(path, list(kinds) + list(_QUANTIZE_OPTIONS))
    if not any(k in parts for k in kinds):
        raise ValueError(
            "recipe table 'quantize' needs one of [quantize.weights], "
            "[quantize.cores], [quantize.activations]"
        )
    return QuantizeSection(**parts)
