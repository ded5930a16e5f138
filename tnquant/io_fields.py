"""The fields of ``model.json``, each with its type check, and its tied groups.

:mod:`tnquant.io_modules` gives every class a schema (field name ->
:class:`Field`); :func:`check_config` applies one before anything is built,
and :func:`check_modules` / :func:`check_node` the structure of the
``modules`` entries (names, classes, child slots), raising
:class:`IntegrityError` (a ``ValueError``) naming the file, the entry and
the field. Sizes are bounded by :data:`MAX_DIM` (and lists by
:data:`MAX_NDIM`, :data:`MAX_CORES`) so that the arithmetic on them stays
small; what bounds memory is the comparison with the tensor file. The
``tied`` groups are checked against the header (:func:`check_tied`), the
rebuilt modules (:func:`check_tied_kinds`) and the data
(:func:`check_tied_values`).

Examples
--------
>>> check_config({"in_features": 4}, {"in_features": SIZE}, "modules[0]", "model.json")
>>> check_config({"in_features": -4}, {"in_features": SIZE}, "modules[0]",
...              "model.json")  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
tnquant.io_fields.IntegrityError: ...: field 'in_features' must be an int in 1..2**40, got -4
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from tnquant.specs import CP, TT, Binary, FixedPoint, LowRank, QuantSpec, Ternary, Tucker
from tnquant.specs import spec_from_dict as _spec_from_dict

__all__ = ["IntegrityError", "Field", "check_config", "parse_spec", "spec_field",
           "factorized_fields", "check_modules", "check_entry", "check_node", "check_tied",
           "check_tied_kinds", "check_tied_values",
           "MAX_DIM", "MAX_NDIM", "MAX_CORES", "SIZE", "BOOL"]

#: the largest size (of one dimension, a feature count) a description may give.
MAX_DIM = 1 << 40
#: the most dimensions of a shape.
MAX_NDIM = 16
#: the most cores of a layer, and items of a child list or dict.
MAX_CORES = 64
MAX_NAME = 1000
_ERRORS = (TypeError, ValueError, KeyError, AttributeError, IndexError, OverflowError,
           RecursionError)
_FLOAT_NAMES = ("float16", "bfloat16", "float32", "float64")


class IntegrityError(ValueError):
    """A saved file is truncated, altered or not a tnquant save (the message names it)."""


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
    return (isinstance(value, list) and len(value) <= MAX_NDIM
            and (n is None or len(value) == n) and all(is_int(v, lo, MAX_DIM) for v in value))


SIZE = _pred("an int in 1..2**40", lambda v: is_int(v, 1, MAX_DIM))
BOOL = _pred("true or false", lambda v: type(v) is bool)
NAME = _pred("a string", lambda v: isinstance(v, str) and len(v) <= MAX_NAME)
PAIR = _pred("a list of 2 ints in 1..2**40", lambda v: _ints(v, 1, 2))
PADDING = _pred("a list of 2 ints in 0..2**40, 'same' or 'valid'",
                lambda v: _ints(v, 0, 2) or v in ("same", "valid"))
SHAPE = _pred(f"a list of at most {MAX_NDIM} ints in 0..2**40", lambda v: _ints(v, 0))
CORE_SHAPES = _pred(f"a list of 1..{MAX_CORES} lists of ints in 1..2**40",
                    lambda v: isinstance(v, list) and 1 <= len(v) <= MAX_CORES
                    and all(_ints(s, 1) for s in v))
OPT_INDEX = _pred("an int or null", lambda v: v is None or is_int(v, -MAX_DIM, MAX_DIM))
OPT_NUMBER = _pred("a finite number or null", lambda v: v is None or _is_number(v))
FLOAT_DTYPE = _pred(f"one of {list(_FLOAT_NAMES)}", lambda v: v in _FLOAT_NAMES)
OBSERVER = _pred("{'n_grid': int in 1..10**6, 'low': number in (0, 1]}",
                 lambda v: isinstance(v, dict) and set(v) == {"n_grid", "low"}
                 and is_int(v["n_grid"], 1, 10**6) and _is_number(v["low"])
                 and 0 < v["low"] <= 1, required=False)
_INFO_SCALARS = {"rel_error": OPT_NUMBER, "out_rel_error": OPT_NUMBER,
                 "capped": _pred("a string or null", lambda v: v is None or isinstance(v, str))}


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


QUANT_SPECS = (QuantSpec, Binary, Ternary, FixedPoint)
FACTORIZATION_SPECS = {"LowRankLinear": (LowRank,), "TTLinear": (TT,), "TuckerLinear": (Tucker,),
                       "TuckerConv2d": (Tucker,), "CPConv2d": (CP,), "TTEmbedding": (TT,)}


LINEAR_FIELDS = {"in_features": SIZE, "out_features": SIZE}
CONV_FIELDS = {"in_channels": SIZE, "out_channels": SIZE, "kernel_size": PAIR, "stride": PAIR,
               "padding": PADDING, "dilation": PAIR, "padding_mode": NAME}
EMBEDDING_FIELDS = {"num_embeddings": SIZE, "embedding_dim": SIZE, "padding_idx": OPT_INDEX}
QCONV_FIELDS = {**CONV_FIELDS, "groups": SIZE, "bias": BOOL}
QEMBEDDING_FIELDS = {**EMBEDDING_FIELDS, "norm_type": OPT_NUMBER, "scale_grad_by_freq": BOOL,
                     "sparse": BOOL}
FROZEN_FIELDS = {"spec": spec_field(*QUANT_SPECS), "shape": SHAPE, "dtype": FLOAT_DTYPE}
QUANTIZER_FIELDS = {"spec": spec_field(*QUANT_SPECS), "observer": OBSERVER}


def factorized_fields(cls_name: str, sizes: Mapping[str, Field]) -> dict[str, Field]:
    """The config schema of the factorized layer ``cls_name``: common fields plus ``sizes``."""
    return {"spec": spec_field(*FACTORIZATION_SPECS[cls_name]), "core_shapes": CORE_SHAPES,
            "bias": BOOL, "implementation": NAME, "decomposition_info": DECOMPOSITION_INFO,
            **sizes}


def check_config(config: Any, schema: Mapping[str, Field], where: str, json_name: str) -> None:
    """Refuse a ``config`` with fields outside ``schema``, missing ones or bad values."""
    if not isinstance(config, dict):
        raise IntegrityError(f"{json_name}: {where}: config must be an object, got "
                             f"{show(config)}")
    for key in config:
        if key not in schema:
            raise IntegrityError(f"{json_name}: {where}: unknown config field {show(key)} "
                                 f"(expected {sorted(schema)})")
    for key, field in schema.items():
        if key not in config:
            if field.required:
                raise IntegrityError(f"{json_name}: {where}: config lacks field {key!r}")
            continue
        problem = field.check(config[key])
        if problem:
            raise IntegrityError(f"{json_name}: {where}: field {key!r} {problem}")


#: the classes a quantizer slot may hold, and each layer kind's slots: name -> (kind, classes)
LEAVES = frozenset({"Quantizer", "FrozenTensor", "Identity"})
ACTS = frozenset({"Quantizer", "Identity"})  # convert freezes weights, never activations
FACTORIZED_SLOTS = {"core_quantizers": ("list", LEAVES), "act_quantizers": ("dict", ACTS)}
DENSE_SLOTS = {"weight_quantizer": ("module", LEAVES), "act_quantizers": ("dict", ACTS)}


# --------------------------------------------------------------------------- #
# modules entries and their nodes
# --------------------------------------------------------------------------- #


def _fail(json_name: str, what: str) -> IntegrityError:
    return IntegrityError(f"{json_name}: {what}")


def _valid_name(name: Any) -> bool:
    if not isinstance(name, str) or len(name) > MAX_NAME:
        return False
    return name == "" or all(name.split("."))


def check_entry(entry: Any, index: int, json_name: str) -> None:
    """One ``modules`` entry: ``names`` (module paths), ``replaces``, ``node`` (objects)."""
    where = f"modules[{index}]"
    if not isinstance(entry, dict) or set(entry) != {"names", "replaces", "node"}:
        raise _fail(json_name, f"{where} must be an object with 'names', 'replaces' and 'node', "
                    f"got {show(entry)}")
    names = entry["names"]
    if not isinstance(names, list) or not names:
        raise _fail(json_name, f"{where}: 'names' must be a non-empty list, got {show(names)}")
    for name in names:
        if not _valid_name(name):
            raise _fail(json_name, f"{where}: {show(name)} is not a module name (dotted "
                        "attribute names, no empty part)")
    if not (entry["replaces"] is None or isinstance(entry["replaces"], str)):
        raise _fail(json_name, f"{where}: 'replaces' must be a string or null, got "
                    f"{show(entry['replaces'])}")
    if not isinstance(entry["node"], dict):
        raise _fail(json_name, f"{where}: 'node' must be an object, got {show(entry['node'])}")


def check_modules(modules: list[Any], json_name: str) -> None:
    """Every entry of ``modules`` (:func:`check_entry`); names unique and not nested."""
    for i, entry in enumerate(modules):
        check_entry(entry, i, json_name)
    names = [n for e in modules for n in e["names"]]
    if len(set(names)) != len(names):
        raise _fail(json_name, "a module name appears twice in 'modules'")
    if "" in names and names != [""]:
        raise _fail(json_name, "the root module ('') must be the only entry")
    taken = set(names)
    for name in names:
        parts = name.split(".")
        for k in range(1, len(parts)):
            if ".".join(parts[:k]) in taken:
                raise _fail(json_name, f"module {name!r} lies inside the saved module "
                            f"{'.'.join(parts[:k])!r}")


def check_node(node: Any, where: str, json_name: str, handlers: Mapping[str, Any],
               allowed: frozenset[str] | None = None) -> None:
    """A node ``{"class", "config", "children"}``, recursively, against ``handlers``.

    ``allowed`` limits the class (children slots); each handler's ``schema``
    checks the config and its ``slots`` name the children it may have.
    """
    if not isinstance(node, dict) or set(node) != {"class", "config", "children"}:
        raise _fail(json_name, f"{where}: a node must be an object with 'class', 'config' and "
                    f"'children', got {show(node)}")
    cls = node["class"]
    handler = handlers.get(cls) if isinstance(cls, str) else None
    if handler is None:
        raise _fail(json_name, f"{where}: unknown module class {show(cls)}; this tnquant knows "
                    f"{sorted(handlers)}")
    if allowed is not None and cls not in allowed:
        raise _fail(json_name, f"{where}: a {cls} cannot stand here (expected one of "
                    f"{sorted(allowed)})")
    check_config(node["config"], handler.schema, f"{where} ({cls})", json_name)
    children = node["children"]
    if not isinstance(children, list):
        raise _fail(json_name, f"{where}: 'children' must be a list, got {show(children)}")
    seen: set[str] = set()
    for pair in children:
        if not (isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], str)
                and isinstance(pair[1], dict) and len(pair[1]) == 1):
            raise _fail(json_name, f"{where}: a child must be [name, {{kind: ...}}], got "
                        f"{show(pair)}")
        name, desc = pair
        slot = handler.slots.get(name)
        kind = next(iter(desc))
        if slot is None or name in seen:
            raise _fail(json_name, f"{where}: a {cls} has no child slot {show(name)} (or it "
                        f"appears twice); its slots are {sorted(handler.slots)}")
        seen.add(name)
        if kind != slot[0]:
            raise _fail(json_name, f"{where}.{name} must be a {slot[0]!r}, got {show(kind)}")
        _check_children(desc[kind], kind, f"{where}.{name}", json_name, handlers, slot[1])


def _check_children(items: Any, kind: str, where: str, json_name: str,
                    handlers: Mapping[str, Any], allowed: frozenset[str]) -> None:
    if kind == "module":
        check_node(items, where, json_name, handlers, allowed)
        return
    if not isinstance(items, list) or len(items) > MAX_CORES:
        raise _fail(json_name, f"{where} must be a list of at most {MAX_CORES}, got "
                    f"{show(items)}")
    if kind == "list":
        for k, item in enumerate(items):
            check_node(item, f"{where}.{k}", json_name, handlers, allowed)
        return
    keys = set()
    for pair in items:
        if not (isinstance(pair, list) and len(pair) == 2 and _valid_name(pair[0])
                and pair[0] and "." not in pair[0] and pair[0] not in keys):
            raise _fail(json_name, f"{where}: an item must be [key, node] with a unique "
                        f"plain key, got {show(pair)}")
        keys.add(pair[0])
        check_node(pair[1], f"{where}.{pair[0]}", json_name, handlers, allowed)


def check_tied(tied: list[Any], header: Mapping[str, Any], json_name: str) -> None:
    """Each tied group: 2+ distinct keys of the header, one dtype and shape, in one group.

    ``header`` maps keys to anything with ``dtype`` and ``shape``.
    """
    seen: set[str] = set()
    for i, group in enumerate(tied):
        if not (isinstance(group, list) and len(group) >= 2
                and all(isinstance(k, str) for k in group) and len(set(group)) == len(group)):
            raise _fail(json_name, f"tied[{i}] must be a list of 2 or more distinct tensor "
                        f"names, got {show(group)}")
        for key in group:
            if key not in header:
                raise _fail(json_name, f"tied[{i}] names {show(key)}, which the tensor file "
                            "lacks")
            if key in seen:
                raise _fail(json_name, f"tied[{i}]: {show(key)} is in two tied groups")
            seen.add(key)
        first = header[group[0]]
        for key in group[1:]:
            if (header[key].dtype, header[key].shape) != (first.dtype, first.shape):
                raise _fail(json_name, f"tied[{i}] ties {group[0]!r} "
                            f"({first.dtype} {first.shape}) to {key!r} "
                            f"({header[key].dtype} {header[key].shape})")


def _tensor_of(root: nn.Module | None, planned: list[tuple[list[str], nn.Module]],
               key: str) -> Tensor | None:
    """The parameter or buffer ``key`` will name once the planned modules are in place."""
    for names, module in planned:
        for name in names:
            if name == "" or key.startswith(name + "."):
                root, key = module, key[len(name) + 1:] if name else key
                break
        else:
            continue
        break
    owner_name, _, attr = key.rpartition(".")
    owner = _lookup(root, owner_name) if root is not None else None
    return None if owner is None else getattr(owner, attr, None)


def check_tied_kinds(model: nn.Module | None, planned: list[tuple[list[str], nn.Module]],
                     tied: list[list[str]], json_name: str) -> None:
    """A tied group holds parameters only or buffers only, in the model as it will be."""
    for i, group in enumerate(tied):
        kinds = {isinstance(_tensor_of(model, planned, key), nn.Parameter) for key in group}
        if len(kinds) > 1:
            raise IntegrityError(f"{json_name}: tied[{i}] ties parameters to buffers")


def check_tied_values(tied: list[list[str]], tensors: Mapping[str, Tensor],
                      json_name: str) -> None:
    """Tied tensors were one tensor when saved: their saved values must be equal."""
    for i, group in enumerate(tied):
        first = tensors[group[0]]
        for key in group[1:]:
            if not torch.equal(tensors[key], first):
                raise IntegrityError(f"{json_name}: tied[{i}] ties {group[0]!r} to {key!r}, "
                                     "whose saved values differ")


def _lookup(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None
