"""Write a :class:`~tnquant.cli.recipe.Recipe` back as TOML (the inverse of ``parse_recipe``).

``tnquant compress`` writes the recipe it ran to ``DIR/recipe.toml`` with
:func:`recipe_toml`: after a search, the plan itself (one ``[factorize]``
and one ``[quantize.weights]`` entry per layer, GPTQ's ``"auto"`` resolved),
so that ``tnquant compress MODEL --recipe DIR/recipe.toml`` reruns the same
road without searching. ``parse_recipe(recipe_toml(r))`` gives ``r`` back
(apart from ``text`` and ``path``). Only the values a recipe can hold are
written; a spec key is written when it differs from the spec's default.

Examples
--------
>>> from tnquant.cli.recipe import parse_recipe
>>> r = parse_recipe('[quantize.weights]\\n"fc" = {bits = 4, granularity = "channel"}')
>>> print(recipe_toml(r).split("[quantize.weights]")[1].split()[0:3])
['"fc"', '=', '{bits']
>>> print(recipe_toml(r).split("[quantize.weights]")[1].strip().splitlines()[0])
"fc" = {bits = 4, granularity = "channel"}
>>> parse_recipe(recipe_toml(r)).quantize == r.quantize
True
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

from tnquant.cli.recipe_specs import FORMATS, QUANT_KINDS
from tnquant.specs import FixedPoint

__all__ = ["recipe_toml", "toml_value"]

_FORMAT_NAMES = {cls: name for name, cls in FORMATS.items()}
_KIND_NAMES = {cls: name for name, cls in QUANT_KINDS.items()}


def toml_value(v: Any) -> str:
    """One TOML value: strings, numbers, booleans, lists and tables (inline).

    Examples
    --------
    >>> toml_value({"a": [1, "b"], "c": 0.5, "d": True})
    '{a = [1, "b"], c = 0.5, d = true}'
    """
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, FixedPoint):
        return json.dumps(v.to_string())
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_key(k)} = {toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"cannot write {type(v).__name__} {v!r} to a recipe")


def _key(k: Any) -> str:
    k = str(k)
    bare = k and all(c.isalnum() or c in "_-" for c in k)
    return k if bare else json.dumps(k)


def _changed(spec: Any) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(spec):
        value = getattr(spec, f.name)
        if f.default is dataclasses.MISSING or value != f.default:
            out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def _factor_table(spec: Any) -> dict[str, Any]:
    if spec is None:
        return {"format": "none"}
    return {"format": _FORMAT_NAMES[type(spec)], **_changed(spec)}


def _quant_table(spec: Any) -> dict[str, Any]:
    if spec is None:
        return {"kind": "none"}
    if isinstance(spec, FixedPoint):
        return {"kind": "fixed", "type": spec.to_string()}
    kind = _KIND_NAMES[type(spec)]
    if kind == "int":  # the width is always written, default or not
        return {"bits": spec.bits, **_changed(spec)}
    return {"kind": kind, **_changed(spec)}


def _plain(section: Any, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """The fields of a section that TOML can hold (``None``: left out, the default)."""
    out = {}
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if f.name in skip or value is None or value == ():  # () : the default (no globs)
            continue
        out[f.name] = value
    return out


def _table(lines: list[str], name: str, values: dict[str, Any], globs: Any = ()) -> None:
    """``[name]`` and its keys; a key in ``globs`` (a layer glob) is always quoted."""
    lines.append(f"[{name}]")
    lines.extend(
        f"{json.dumps(k) if k in globs else _key(k)} = {toml_value(v)}" for k, v in values.items()
    )
    lines.append("")


_FINETUNE_OFF = {"task_loss": "none", "amp": "none", "clip_grad_norm": False, "dropout": "auto"}


def _finetune_values(ft: Any) -> dict[str, Any]:
    from tnquant.cli.recipe import _FINETUNE

    out = {}
    for key in _FINETUNE:
        value = getattr(ft, key)
        if value is None:
            if key in _FINETUNE_OFF:
                out[key] = _FINETUNE_OFF[key]
            continue
        out[key] = list(value) if key == "hidden" else value
    return out


def recipe_toml(recipe: Any, header: str = "") -> str:
    """The TOML text of ``recipe`` (a :class:`tnquant.cli.recipe.Recipe`); ``header`` as comments.

    Examples
    --------
    >>> from tnquant.cli.recipe import parse_recipe
    >>> r = parse_recipe('[search]\\nbits = 3.5\\n[ptq]\\nrotate = true')
    >>> parse_recipe(recipe_toml(r, "made by hand")).search == r.search
    True
    """
    lines = [f"# {line}" for line in header.splitlines()] + ([""] if header else [])
    m = recipe.model
    model = {"class": m.cls} if m.cls else {}
    if m.kwargs:
        model["kwargs"] = dict(m.kwargs)
    _table(lines, "model", {**model, "train_epochs": m.train_epochs})
    _table(lines, "data", _plain(recipe.data))
    _table(lines, "ptq", _plain(recipe.ptq))
    if recipe.search is not None:
        _table(lines, "search", _plain(recipe.search))
    if recipe.factorize is not None:
        fz = recipe.factorize
        values = _plain(fz, skip=("specs",))
        specs = {glob: _factor_table(spec) for glob, spec in fz.specs}
        _table(lines, "factorize", {**values, **specs}, globs=specs)
    if recipe.quantize is not None:
        q = recipe.quantize
        _table(lines, "quantize", _plain(q, skip=("weights", "cores", "activations")))
        for kind in ("weights", "cores", "activations"):
            pairs = getattr(q, kind)
            if pairs is not None:
                specs = {str(g): _quant_table(s) for g, s in pairs}
                _table(lines, f"quantize.{kind}", specs, globs=specs)
    _table(lines, "calibrate", _plain(recipe.calibrate))
    if recipe.finetune is not None:
        _table(lines, "finetune", _finetune_values(recipe.finetune))
    if recipe.export is not None:
        _table(lines, "export", _plain(recipe.export))
    return "\n".join(lines)
