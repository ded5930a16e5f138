"""The registry's table: ``register``, ``unregister``, ``lookup`` and the questions verbs ask.

Entries are looked up by exact type (a subclass is another kind: it may use
its weight outside ``forward``, as ``nn.MultiheadAttention``'s
``out_proj`` does). The table starts with :data:`~tnquant.registry.builtin.BUILTIN`;
:func:`register` adds an entry explicitly. The families of
:data:`~tnquant.registry.builtin.LAZY` (Hugging Face's ``Conv1D``) stay
pending until a question meets them while their dense class's module is
loaded (:class:`~tnquant.registry.entry.LazyKinds`): ``lookup`` of a
``Conv1D`` instance, or ``load`` asking for a ``LowRankHFConv1D`` handler
with the base model (hence transformers) in memory. Nothing is imported.

Examples
--------
>>> from torch import nn
>>> from tnquant.specs import LowRank
>>> lookup(nn.Linear(2, 2)).role, factorized_class(nn.Linear(2, 2), LowRank(rank=1)).__name__
('dense', 'LowRankLinear')
>>> kind_of(nn.GRU) is None
True
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from torch import nn

from tnquant.registry.builtin import BUILTIN, LAZY
from tnquant.registry.entry import LayerKind, LazyKinds
from tnquant.registry.serialize import Handler

__all__ = [
    "register",
    "unregister",
    "lookup",
    "kind_of",
    "kinds",
    "factorized_class",
    "refusal",
    "export_route",
    "handlers",
    "FactorizeTable",
    "HandlerTable",
    "dense_classes",
]

_TABLE: dict[type, LayerKind] = {kind.cls: kind for kind in BUILTIN}
#: lazy families not registered yet (each leaves once its dense class is seen loaded)
_PENDING: list[LazyKinds] = list(LAZY)


def _resolve() -> bool:
    """Register every pending family whose dense class is loaded; whether any was."""
    done = False
    for family in list(_PENDING):
        dense = family.find()
        if dense is None:
            continue
        _PENDING.remove(family)
        for kind in family.build(dense):
            register(kind)
        done = True
    return done


def register(kind: LayerKind) -> LayerKind:
    """Add ``kind`` to the registry; return it (remove it with :func:`unregister`).

    Raises
    ------
    TypeError
        For something that is not a :class:`LayerKind`.
    ValueError
        If its class, or a class of the same name (``save`` names classes),
        is already registered.

    Examples
    --------
    >>> from torch import nn
    >>> class Swish(nn.Module):
    ...     def forward(self, x):
    ...         return x * x.sigmoid()
    >>> _ = register(LayerKind(Swish, "other"))
    >>> lookup(Swish()).role
    'other'
    >>> unregister(Swish).cls is Swish
    True
    """
    if not isinstance(kind, LayerKind):
        raise TypeError(f"register() takes a LayerKind, got {type(kind).__name__}")
    for cls in _TABLE:
        if cls is kind.cls or cls.__name__ == kind.cls.__name__:
            raise ValueError(
                f"a layer kind named {kind.cls.__name__} is already registered "
                f"({cls.__module__}.{cls.__qualname__}); unregister it first"
            )
    _TABLE[kind.cls] = kind
    return kind


def unregister(cls: type) -> LayerKind:
    """Remove the entry of ``cls`` and return it (``KeyError`` when it has none)."""
    if cls not in _TABLE:
        raise KeyError(f"{getattr(cls, '__name__', cls)!r} has no registry entry")
    return _TABLE.pop(cls)


def kind_of(cls: type) -> LayerKind | None:
    """The entry of exactly ``cls``, or ``None``."""
    kind = _TABLE.get(cls)
    if kind is None and _PENDING and _resolve():
        kind = _TABLE.get(cls)
    return kind


def lookup(module: Any) -> LayerKind | None:
    """The entry of ``type(module)`` (exact type), or ``None``."""
    return kind_of(type(module))


def kinds() -> tuple[LayerKind, ...]:
    """Every entry, in registration order (lazy families once their dense class is loaded)."""
    if _PENDING:
        _resolve()
    return tuple(_TABLE.values())


def dense_classes() -> tuple[type, ...]:
    """The dense classes that have a quantized class (for ``isinstance`` on subclasses)."""
    return tuple(k.cls for k in kinds() if k.role == "dense" and k.quantized)


def factorized_class(module: Any, spec: Any) -> type | None:
    """The class that factorizes ``module`` (a module or a class) under ``spec``, or ``None``.

    ``spec`` may be a spec or a spec type.
    """
    kind = kind_of(module if isinstance(module, type) else type(module))
    if kind is None:
        return None
    return kind.factorize.get(spec if isinstance(spec, type) else type(spec))


def refusal(module: nn.Module) -> str | None:
    """Why ``module`` (a dense kind) cannot be factorized, or ``None``."""
    kind = lookup(module)
    return None if kind is None or kind.refuse is None else kind.refuse(module)


def export_route(module: nn.Module) -> str | None:
    """The name of ``module``'s fixed-point export route, or ``None``."""
    kind = lookup(module)
    return None if kind is None else kind.export


def handlers() -> dict[str, Handler]:
    """Class name -> save/load handler, for every entry that has one."""
    return {k.cls.__name__: k.handler for k in kinds() if k.handler is not None}


class FactorizeTable(Mapping[tuple[type, type], type]):
    """``(dense type, spec type) -> factorized class``, a live view of the registry.

    Examples
    --------
    >>> from torch import nn
    >>> from tnquant.specs import CP
    >>> FactorizeTable()[(nn.Conv2d, CP)].__name__, (nn.Linear, CP) in FactorizeTable()
    ('CPConv2d', False)
    """

    def __getitem__(self, key: tuple[type, type]) -> type:
        cls = factorized_class(key[0], key[1]) if isinstance(key, tuple) and len(key) == 2 else None
        if cls is None:
            raise KeyError(key)
        return cls

    def __iter__(self) -> Iterator[tuple[type, type]]:
        return iter([(k.cls, s) for k in kinds() for s in k.factorize])

    def __len__(self) -> int:
        return sum(len(k.factorize) for k in kinds())


class HandlerTable(Mapping[str, Handler]):
    """Class name -> save/load :class:`Handler`, a live view of the registry."""

    def __getitem__(self, name: str) -> Handler:
        return handlers()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(handlers())

    def __len__(self) -> int:
        return len(handlers())
