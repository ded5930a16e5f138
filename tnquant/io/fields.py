"""The structure of ``model.json``: its entries, nodes and tied groups, checked.

Each registry entry's handler has a schema (field name ->
:class:`~tnquant.registry.fields.Field`); :func:`check_config` applies one
before anything is built, and :func:`check_modules` / :func:`check_node`
the structure of the ``modules`` entries (names, classes, child slots),
raising :class:`IntegrityError` (a ``ValueError``) naming the file, the
entry and the field. The ``tied`` groups are checked against the header
(:func:`check_tied`), the rebuilt modules (:func:`check_tied_kinds`) and
the data (:func:`check_tied_values`).

Examples
--------
>>> from tnquant.registry.fields import SIZE
>>> check_config({"in_features": 4}, {"in_features": SIZE}, "modules[0]", "model.json")
>>> check_config({"in_features": -4}, {"in_features": SIZE}, "modules[0]",
...              "model.json")  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
tnquant.io.fields.IntegrityError: ...: field 'in_features' must be an int in 1..2**40, got -4
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from tnquant.core.modules import find_module
from tnquant.registry.fields import MAX_CORES, MAX_NAME, Field, show

__all__ = [
    "IntegrityError",
    "check_config",
    "check_modules",
    "check_entry",
    "check_node",
    "check_tied",
    "check_tied_kinds",
    "check_tied_values",
]


class IntegrityError(ValueError):
    """A saved file is truncated, altered or not a tnquant save (the message names it)."""


def check_config(config: Any, schema: Mapping[str, Field], where: str, json_name: str) -> None:
    """Refuse a ``config`` with fields outside ``schema``, missing ones or bad values."""
    if not isinstance(config, dict):
        raise IntegrityError(f"{json_name}: {where}: config must be an object, got {show(config)}")
    for key in config:
        if key not in schema:
            raise IntegrityError(
                f"{json_name}: {where}: unknown config field {show(key)} "
                f"(expected {sorted(schema)})"
            )
    for key, field in schema.items():
        if key not in config:
            if field.required:
                raise IntegrityError(f"{json_name}: {where}: config lacks field {key!r}")
            continue
        problem = field.check(config[key])
        if problem:
            raise IntegrityError(f"{json_name}: {where}: field {key!r} {problem}")


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
        raise _fail(
            json_name,
            f"{where} must be an object with 'names', 'replaces' and 'node', got {show(entry)}",
        )
    names = entry["names"]
    if not isinstance(names, list) or not names:
        raise _fail(json_name, f"{where}: 'names' must be a non-empty list, got {show(names)}")
    for name in names:
        if not _valid_name(name):
            raise _fail(
                json_name,
                f"{where}: {show(name)} is not a module name (dotted "
                "attribute names, no empty part)",
            )
    if not (entry["replaces"] is None or isinstance(entry["replaces"], str)):
        raise _fail(
            json_name,
            f"{where}: 'replaces' must be a string or null, got {show(entry['replaces'])}",
        )
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
                raise _fail(
                    json_name,
                    f"module {name!r} lies inside the saved module {'.'.join(parts[:k])!r}",
                )


def check_node(
    node: Any,
    where: str,
    json_name: str,
    handlers: Mapping[str, Any],
    allowed: frozenset[str] | None = None,
) -> None:
    """A node ``{"class", "config", "children"}``, recursively, against ``handlers``.

    ``allowed`` limits the class (children slots); each handler's ``schema``
    checks the config and its ``slots`` name the children it may have.
    """
    if not isinstance(node, dict) or set(node) != {"class", "config", "children"}:
        raise _fail(
            json_name,
            f"{where}: a node must be an object with 'class', 'config' and "
            f"'children', got {show(node)}",
        )
    cls = node["class"]
    handler = handlers.get(cls) if isinstance(cls, str) else None
    if handler is None:
        raise _fail(
            json_name,
            f"{where}: unknown module class {show(cls)}; this tnquant knows {sorted(handlers)}",
        )
    if allowed is not None and cls not in allowed:
        raise _fail(
            json_name, f"{where}: a {cls} cannot stand here (expected one of {sorted(allowed)})"
        )
    check_config(node["config"], handler.schema, f"{where} ({cls})", json_name)
    children = node["children"]
    if not isinstance(children, list):
        raise _fail(json_name, f"{where}: 'children' must be a list, got {show(children)}")
    seen: set[str] = set()
    for pair in children:
        if not (
            isinstance(pair, list)
            and len(pair) == 2
            and isinstance(pair[0], str)
            and isinstance(pair[1], dict)
            and len(pair[1]) == 1
        ):
            raise _fail(
                json_name, f"{where}: a child must be [name, {{kind: ...}}], got {show(pair)}"
            )
        name, desc = pair
        slot = handler.slots.get(name)
        kind = next(iter(desc))
        if slot is None or name in seen:
            raise _fail(
                json_name,
                f"{where}: a {cls} has no child slot {show(name)} (or it "
                f"appears twice); its slots are {sorted(handler.slots)}",
            )
        seen.add(name)
        if kind != slot[0]:
            raise _fail(json_name, f"{where}.{name} must be a {slot[0]!r}, got {show(kind)}")
        _check_children(desc[kind], kind, f"{where}.{name}", json_name, handlers, slot[1])


def _check_children(
    items: Any,
    kind: str,
    where: str,
    json_name: str,
    handlers: Mapping[str, Any],
    allowed: frozenset[str],
) -> None:
    if kind == "module":
        check_node(items, where, json_name, handlers, allowed)
        return
    if not isinstance(items, list) or len(items) > MAX_CORES:
        raise _fail(json_name, f"{where} must be a list of at most {MAX_CORES}, got {show(items)}")
    if kind == "list":
        for k, item in enumerate(items):
            check_node(item, f"{where}.{k}", json_name, handlers, allowed)
        return
    keys = set()
    for pair in items:
        if not (
            isinstance(pair, list)
            and len(pair) == 2
            and _valid_name(pair[0])
            and pair[0]
            and "." not in pair[0]
            and pair[0] not in keys
        ):
            raise _fail(
                json_name,
                f"{where}: an item must be [key, node] with a unique plain key, got {show(pair)}",
            )
        keys.add(pair[0])
        check_node(pair[1], f"{where}.{pair[0]}", json_name, handlers, allowed)


def check_tied(tied: list[Any], header: Mapping[str, Any], json_name: str) -> None:
    """Each tied group: 2+ distinct keys of the header, one dtype and shape, in one group.

    ``header`` maps keys to anything with ``dtype`` and ``shape``.
    """
    seen: set[str] = set()
    for i, group in enumerate(tied):
        if not (
            isinstance(group, list)
            and len(group) >= 2
            and all(isinstance(k, str) for k in group)
            and len(set(group)) == len(group)
        ):
            raise _fail(
                json_name,
                f"tied[{i}] must be a list of 2 or more distinct tensor names, got {show(group)}",
            )
        for key in group:
            if key not in header:
                raise _fail(json_name, f"tied[{i}] names {show(key)}, which the tensor file lacks")
            if key in seen:
                raise _fail(json_name, f"tied[{i}]: {show(key)} is in two tied groups")
            seen.add(key)
        first = header[group[0]]
        for key in group[1:]:
            if (header[key].dtype, header[key].shape) != (first.dtype, first.shape):
                raise _fail(
                    json_name,
                    f"tied[{i}] ties {group[0]!r} "
                    f"({first.dtype} {first.shape}) to {key!r} "
                    f"({header[key].dtype} {header[key].shape})",
                )


def _tensor_of(
    root: nn.Module | None, planned: list[tuple[list[str], nn.Module]], key: str
) -> Tensor | None:
    """The parameter or buffer ``key`` will name once the planned modules are in place."""
    for names, module in planned:
        for name in names:
            if name == "" or key.startswith(name + "."):
                root, key = module, key[len(name) + 1 :] if name else key
                break
        else:
            continue
        break
    owner_name, _, attr = key.rpartition(".")
    owner = find_module(root, owner_name) if root is not None else None
    if owner is None:
        return None
    # the registered tensor: a converted layer's weight attribute reads dequantized
    for table in (owner._parameters, owner._buffers):
        if attr in table:
            return table[attr]
    return getattr(owner, attr, None)


def check_tied_kinds(
    model: nn.Module | None,
    planned: list[tuple[list[str], nn.Module]],
    tied: list[list[str]],
    json_name: str,
) -> None:
    """A tied group holds parameters only or buffers only, in the model as it will be."""
    for i, group in enumerate(tied):
        kinds = {isinstance(_tensor_of(model, planned, key), nn.Parameter) for key in group}
        if len(kinds) > 1:
            raise IntegrityError(f"{json_name}: tied[{i}] ties parameters to buffers")


def check_tied_values(tied: list[list[str]], tensors: Mapping[str, Tensor], json_name: str) -> None:
    """Tied tensors were one tensor when saved: their saved values must be equal."""
    for i, group in enumerate(tied):
        first = tensors[group[0]]
        for key in group[1:]:
            if not torch.equal(tensors[key], first):
                raise IntegrityError(
                    f"{json_name}: tied[{i}] ties {group[0]!r} to {key!r}, "
                    "whose saved values differ"
                )
