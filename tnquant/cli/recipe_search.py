"""The ``[search]`` and ``[ptq]`` tables of a recipe (schema: :mod:`tnquant.cli.recipe`).

Each key is checked by a :mod:`tnquant.cli.recipe_values` check (errors name
the key path, what was expected and what came) and builds a
:class:`~tnquant.pipeline.SearchSection` or :class:`~tnquant.pipeline.PtqSection`
with their defaults.

Examples
--------
>>> parse_search({"bits": 3}).bits
3.0
>>> parse_search({"bits": 3, "formats": ["dense", "cp"]})
Traceback (most recent call last):
...
ValueError: recipe key 'search.formats[1]' must be one of [...], got 'cp'
>>> parse_ptq({"gptq": "always"}, {})
Traceback (most recent call last):
...
ValueError: recipe key 'ptq.gptq' must be "auto", true or false, got 'always'
"""

from __future__ import annotations

from typing import Any

from tnquant.cli.recipe_values import (
    Check,
    _bool,
    _choice,
    _fail,
    _fields,
    _float,
    _globs,
    _int,
    _schema,
)
from tnquant.pipeline import PtqSection, SearchSection
from tnquant.pipeline_stages import FORMATS, METRICS, parse_target

__all__ = ["parse_search", "parse_ptq", "OBSERVERS"]

#: Observers of the integer candidates.
OBSERVERS = ("minmax", "mse", "percentile")


def _list_of(check: Check) -> Check:
    def inner(v: Any, path: str) -> tuple[Any, ...]:
        if not isinstance(v, list) or not v:
            raise _fail(path, "a non-empty list", v)
        return tuple(check(x, f"{path}[{i}]") for i, x in enumerate(v))

    return inner


def _quantizer(v: Any, path: str) -> Any:
    if v in ("ternary", "binary"):
        return v
    if isinstance(v, bool) or not isinstance(v, int) or not 2 <= v <= 8:
        raise _fail(path, "an integer width in 2..8, 'ternary' or 'binary'", v)
    return v


def _target(v: Any, path: str) -> str:
    try:
        parse_target(v, "target")
    except ValueError as e:
        raise ValueError(f"recipe key '{path}': {e}") from None
    return str(v)


def _gptq(v: Any, path: str) -> Any:
    if v == "auto" or isinstance(v, bool):
        return v
    raise _fail(path, '"auto", true or false', v)


_SEARCH = _schema(
    SearchSection,
    {
        "bits": _float(0, 32, lo_open=True),
        "target": _target,
        "formats": _list_of(_choice(*FORMATS)),
        "ratios": _list_of(_float(0, 1, lo_open=True)),
        "quantizers": _list_of(_quantizer),
        "metric": _choice(*METRICS),
        "num_batches": _int(1),
        "observer": _choice(*OBSERVERS),
        "include": _globs,
        "exclude": _globs,
        "learnable": _bool,
        "data_aware": _bool,
    },
)
_PTQ = _schema(
    PtqSection, {"rotate": _bool, "rotate_include": _globs, "gptq": _gptq, "gptq_batches": _int(1)}
)


def parse_search(table: dict[str, Any]) -> SearchSection:
    """The :class:`~tnquant.pipeline.SearchSection` of a ``[search]`` table."""
    fields = _fields(table, "search", _SEARCH)
    if (fields["bits"] is None) == (fields["target"] is None):
        got = {k: table[k] for k in ("bits", "target") if k in table}
        raise ValueError(
            "recipe table 'search' needs exactly one of 'bits' (bits per weight, e.g. 3.5) "
            f"and 'target' (a fidelity floor, e.g. \"cos=0.97\"), got {got or 'neither'}"
        )
    try:
        return SearchSection(**fields)
    except (TypeError, ValueError) as e:
        raise ValueError(f"recipe table 'search': {e}") from None


def parse_ptq(table: dict[str, Any], calibrate: dict[str, Any]) -> tuple[PtqSection, Any]:
    """The :class:`~tnquant.pipeline.PtqSection` of a ``[ptq]`` table, and its
    ``bias_correction`` (``None`` when not given; it goes to ``[calibrate]``,
    which must not set it too)."""
    bias = table.get("bias_correction")
    if bias is not None:
        _bool(bias, "ptq.bias_correction")
        if "bias_correction" in calibrate:
            raise ValueError(
                "recipe key 'ptq.bias_correction' and 'calibrate.bias_correction' are the "
                "same option; give one of them"
            )
    fields = _fields(table, "ptq", _PTQ, skip=("bias_correction",))
    return PtqSection(**fields), bias
