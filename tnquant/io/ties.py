"""Tied tensors in a save directory: stored once, checked, and named again on load.

``model.json``'s ``tied`` lists groups of state-dict keys that name one and
the same tensor (an LM head tied to its embedding, the frozen tensor they
share once converted). :func:`tnquant.save` stores each group once, under
its first key; the other keys are aliases, absent from the tensor file and
its listing. On load, :func:`expand_tied` checks the groups against the
header and gives every alias its first key's dtype and shape, so that every
later check (the architecture, the rebuilt modules, the base model's own
tensors) sees the full state dict; :func:`with_aliases` does the same for
the tensors read, and the loader ties the keys again.

A group whose later keys are also in the file (as older saves wrote them)
is accepted when their dtype and shape agree, and the values must be equal.

Examples
--------
>>> from tnquant.io.checks import TensorInfo
>>> import torch
>>> header = {"emb.weight": TensorInfo(torch.float32, (4, 2), 0, 32)}
>>> full = expand_tied([["emb.weight", "head.weight"]], header, "model.json")
>>> sorted(full), full.aliases
(['emb.weight', 'head.weight'], {'head.weight': 'emb.weight'})
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

from torch import nn

from tnquant.io.fields import IntegrityError, _tensor_of

__all__ = ["TiedHeader", "expand_tied", "with_aliases", "alias_keys", "check_alias_places"]

T = TypeVar("T")


class TiedHeader(dict[str, Any]):
    """The tensor file's header plus every alias of a tied group (``aliases``: alias -> key)."""

    aliases: dict[str, str]
    groups: dict[str, int]  # alias -> index of its group in ``tied``


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _fail(json_name: str, what: str) -> IntegrityError:
    return IntegrityError(f"{json_name} is corrupt: {what}")


def expand_tied(tied: list[Any], header: Mapping[str, Any], json_name: str) -> TiedHeader:
    """Check the ``tied`` groups against ``header``; return it with the aliases added.

    Each group: a list of 2 or more distinct key strings, no key in two
    groups, the first key in the file; every later key either absent from
    the file (an alias, stored once under the first key) or present with
    the first key's dtype and shape.

    Raises
    ------
    IntegrityError
        For a malformed group, a first key the file lacks, a key in two
        groups, or a present key of another dtype or shape.
    """
    seen: set[str] = set()
    aliases: dict[str, str] = {}
    groups: dict[str, int] = {}
    for i, group in enumerate(tied):
        if not (
            isinstance(group, list)
            and len(group) >= 2
            and all(isinstance(k, str) and k for k in group)
            and len(set(group)) == len(group)
        ):
            raise _fail(
                json_name,
                f"tied[{i}] must be a list of 2 or more distinct tensor names, got {_show(group)}",
            )
        for key in group:
            if key in seen:
                raise _fail(json_name, f"tied[{i}]: {_show(key)} is in two tied groups")
            seen.add(key)
        first = group[0]
        if first not in header:
            raise _fail(json_name, f"tied[{i}] names {_show(first)}, which the tensor file lacks")
        info = header[first]
        for key in group[1:]:
            if key not in header:
                aliases[key], groups[key] = first, i
            elif (header[key].dtype, header[key].shape) != (info.dtype, info.shape):
                raise _fail(
                    json_name,
                    f"tied[{i}] ties {first!r} ({info.dtype} {info.shape}) to {key!r} "
                    f"({header[key].dtype} {header[key].shape})",
                )
    out = TiedHeader(header)
    out.update({alias: header[first] for alias, first in aliases.items()})
    out.aliases, out.groups = aliases, groups
    return out


def check_alias_places(
    model: nn.Module | None,
    planned: list[tuple[list[str], nn.Module]],
    header: Mapping[str, Any],
    json_name: str,
) -> None:
    """Every alias names a tensor the model will hold (the base's own or a rebuilt module's).

    Raises
    ------
    IntegrityError
        For an alias the model has no tensor for.
    """
    for alias, i in getattr(header, "groups", {}).items():
        if _tensor_of(model, planned, alias) is None:
            raise _fail(
                json_name,
                f"tied[{i}] names {_show(alias)}, "
                "which neither the tensor file nor the model holds",
            )


def with_aliases(tensors: dict[str, T], header: Mapping[str, Any]) -> dict[str, T]:
    """``tensors`` (as read from the file) with every alias of ``header`` pointing at its key.

    An alias whose key was not read is left out (the caller's comparison
    with the header then refuses the file).
    """
    for alias, first in getattr(header, "aliases", {}).items():
        if first in tensors:
            tensors[alias] = tensors[first]
    return tensors


def alias_keys(tied: list[list[str]]) -> set[str]:
    """The keys ``save`` leaves out of the tensor file: every key of a group but its first.

    Examples
    --------
    >>> sorted(alias_keys([["a", "b", "c"]]))
    ['b', 'c']
    """
    return {key for group in tied for key in group[1:]}
