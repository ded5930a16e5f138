"""The typed fields of a saved module's configuration, one schema per layer kind.

Every :class:`~tnquant.registry.serialize.Handler` has a schema (field name
-> :class:`Field`); :mod:`tnquant.io` applies it to ``model.json`` before
anything is built. Sizes are bounded by :data:`MAX_DIM` (and lists by
:data:`MAX_NDIM`, :data:`MAX_CORES`) so that the arithmetic on them stays
small; what bounds memory is the comparison with the tensor file.

Examples
--------
>>> SIZE.check(4) is None, SIZE.check(-4)
(True, 'must be an int in 1..2**40, got -4')
>>> sorted(factorized_fields(TT, LINEAR_FIELDS))[:3]
['bias', 'core_shapes', 'decomposition_info']
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from tnquant.specs import CP, TT, Binary, Codebook, FixedPoint, LowRank, QuantSpec, Ternary, Tucker
from tnquant.specs import spec_from_dict as _spec_from_dict

__all__ = [
    "Field",
    "parse_spec",
    "spec_field",
    "factorized_fields",
    "show",
    "is_int",
    "MAX_DIM",
    "MAX_NDIM",
    "MAX_CORES",
    "MAX_NAME",
    "SIZE",
    "BOOL",
    "NAME",
    "PAIR",
    "PADDING",
    "SHAPE",
    "CORE_SHAPES",
    "OPT_INDEX",
    "OPT_NUMBER",
    "FLOAT_DTYPE",
    "OBSERVER",
    "DECOMPOSITION_INFO",
    "QUANT_SPECS",
    "FACTORIZATION_SPECS",
    "LINEAR_FIELDS",
    "CONV_FIELDS",
    "EMBEDDING_FIELDS",
    "QLINEAR_FIELDS",
    "QCONV_FIELDS",
    "QEMBEDDING_FIELDS",
    "FROZEN_FIELDS",
    "QUANTIZER_FIELDS",
    "LEAVES",
    "ACTS",
    "FACTORIZED_SLOTS",
    "DENSE_SLOTS",
]

#: the largest size (of one dimension, a feature count) a description may give.
MAX_DIM = 1 << 40
#: the most dimensions of a shape.
MAX_NDIM = 16
#: the most cores of a layer, and items of a child list or dict.
MAX_CORES = 64
MAX_NAME = 1000
_ERRORS = (
    TypeError,
    ValueError,
    KeyError,
    AttributeError,
    IndexError,
    OverflowError,
    RecursionError,
)
_FLOAT_NAMES = ("float16", "bfloat16", "float32", "float64")


def show(value: Any) -> str:
    """A ``repr`` cut to 60 characters, for messages."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def is_int(value: Any, lo: int, hi: int) -> bool:
    """``value`` is an ``int`` (not a ``bool``) in ``lo..hi``."""
    return type(value) is int and lo <= value <= hi


@dataclass(frozen=True)
class Field:
    """A config field: ``check(value)`` returns ``None`` or what is wrong with it."""

    check: Callable[[Any], str | None]
    required: bool = True


def _pred(expected: str, ok: Callable[[Any], bool], required: bool = True) -> Field:
    return Field(lambda v: None if ok(v) else f"must be {expected}, got {show(v)}", required)


def _is_number(value: Any) -> bool:
    return type(value) in (int, float) and math.isfinite(value)


def _ints(value: Any, lo: int, n: int | None = None) -> bool:
    return (
        isinstance(value, list)
        and len(value) <= MAX_NDIM
        and (n is None or len(value) == n)
        and all(is_int(v, lo, MAX_DIM) for v in value)
    )


SIZE = _pred("an int in 1..2**40", lambda v: is_int(v, 1, MAX_DIM))
BOOL = _pred("true or false", lambda v: type(v) is bool)
NAME = _pred("a string", lambda v: isinstance(v, str) and len(v) <= MAX_NAME)
PAIR = _pred("a list of 2 ints in 1..2**40", lambda v: _ints(v, 1, 2))
PADDING = _pred(
    "a list of 2 ints in 0..2**40, 'same' or 'valid'",
    lambda v: _ints(v, 0, 2) or v in ("same", "valid"),
)
SHAPE = _pred(f"a list of at most {MAX_NDIM} ints in 0..2**40", lambda v: _ints(v, 0))
CORE_SHAPES = _pred(
    f"a list of 1..{MAX_CORES} lists of ints in 1..2**40",
    lambda v: isinstance(v, list) and 1 <= len(v) <= MAX_CORES and all(_ints(s, 1) for s in v),
)
OPT_INDEX = _pred("an int or null", lambda v: v is None or is_int(v, -MAX_DIM, MAX_DIM))
OPT_NUMBER = _pred("a finite number or null", lambda v: v is None or _is_number(v))
FLOAT_DTYPE = _pred(f"one of {list(_FLOAT_NAMES)}", lambda v: v in _FLOAT_NAMES)
OBSERVER = _pred(
    "{'n_grid': int in 1..10**6, 'low': number in (0, 1]}",
    lambda v: (
        isinstance(v, dict)
        and set(v) == {"n_grid", "low"}
        and is_int(v["n_grid"], 1, 10**6)
        and _is_number(v["low"])
        and 0 < v["low"] <= 1
    ),
    required=False,
)
_INFO_SCALARS = {
    "rel_error": OPT_NUMBER,
    "out_rel_error": OPT_NUMBER,
    "capped": _pred("a string or null", lambda v: v is None or isinstance(v, str)),
}


def _check_info(value: Any) -> str | None:
    if not isinstance(value, dict):
        return f"must be an object, got {show(value)}"
    for key, item in value.items():
        if key == "ranks":
            if not _ints(item, 1):
                return f"'ranks' must be a list of ints in 1..2**40, got {show(item)}"
        elif key in _INFO_SCALARS:
            problem = _INFO_SCALARS[key].check(item)
            if problem:
                return f"{key!r} {problem}"
        elif not (item is None or type(item) in (bool, int, str) or _is_number(item)):
            return f"{key!r} must be a JSON scalar, got {show(item)}"
    return None


DECOMPOSITION_INFO = Field(_check_info)


def parse_spec(data: Any, types: tuple[type, ...]) -> Any:
    """``spec_from_dict(data)``, refused with ``ValueError`` unless one of ``types``.

    Examples
    --------
    >>> parse_spec({"type": "Binary"}, (Binary,)) == Binary()
    True
    >>> parse_spec({"type": "Binary"}, (TT,))
    Traceback (most recent call last):
    ...
    ValueError: must be a TT spec, got a Binary
    """
    if not isinstance(data, dict):
        raise ValueError(f"must be a spec object, got {show(data)}")
    try:
        spec = _spec_from_dict(data)
    except _ERRORS as err:
        raise ValueError(f"is not a valid spec: {err}") from None
    if not isinstance(spec, types):
        names = " or ".join(t.__name__ for t in types)
        raise ValueError(f"must be a {names} spec, got a {type(spec).__name__}")
    return spec


def spec_field(*types: type) -> Field:
    """A field holding a spec of one of ``types`` (checked through ``spec_from_dict``)."""

    def check(value: Any) -> str | None:
        try:
            parse_spec(value, types)
        except ValueError as err:
            return str(err)
        return None

    return Field(check)


QUANT_SPECS = (QuantSpec, Binary, Ternary, FixedPoint, Codebook)
#: the factorization specs (a factorized class takes its own ``spec_type``)
FACTORIZATION_SPECS = (TT, Tucker, CP, LowRank)

LINEAR_FIELDS = {"in_features": SIZE, "out_features": SIZE}
CONV_FIELDS = {
    "in_channels": SIZE,
    "out_channels": SIZE,
    "kernel_size": PAIR,
    "stride": PAIR,
    "padding": PADDING,
    "dilation": PAIR,
    "padding_mode": NAME,
}
EMBEDDING_FIELDS = {"num_embeddings": SIZE, "embedding_dim": SIZE, "padding_idx": OPT_INDEX}
QLINEAR_FIELDS = {**LINEAR_FIELDS, "bias": BOOL}
QCONV_FIELDS = {**CONV_FIELDS, "groups": SIZE, "bias": BOOL}
QEMBEDDING_FIELDS = {
    **EMBEDDING_FIELDS,
    "norm_type": OPT_NUMBER,
    "scale_grad_by_freq": BOOL,
    "sparse": BOOL,
}
FROZEN_FIELDS = {"spec": spec_field(*QUANT_SPECS), "shape": SHAPE, "dtype": FLOAT_DTYPE}
QUANTIZER_FIELDS = {"spec": spec_field(*QUANT_SPECS), "observer": OBSERVER}


def factorized_fields(spec_type: type, sizes: Mapping[str, Field]) -> dict[str, Field]:
    """The config schema of a factorized layer taking ``spec_type``, plus ``sizes``."""
    return {
        "spec": spec_field(spec_type),
        "core_shapes": CORE_SHAPES,
        "bias": BOOL,
        "implementation": NAME,
        "decomposition_info": DECOMPOSITION_INFO,
        **sizes,
    }


#: the classes a quantizer slot may hold, and each layer kind's slots: name -> (kind, classes)
LEAVES = frozenset({"Quantizer", "FrozenTensor", "Identity"})
ACTS = frozenset({"Quantizer", "Identity"})  # convert freezes weights, never activations
FACTORIZED_SLOTS = {"core_quantizers": ("list", LEAVES), "act_quantizers": ("dict", ACTS)}
DENSE_SLOTS = {"weight_quantizer": ("module", LEAVES), "act_quantizers": ("dict", ACTS)}
