"""One entry of the layer registry: everything tnquant knows about one layer kind.

Examples
--------
>>> from torch import nn
>>> kind = LayerKind(nn.ReLU, "other", export="relu")
>>> kind.role, kind.export, kind.quantizable
('other', 'relu', False)
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from tnquant.decompose.api import DECOMPOSERS
from tnquant.registry.serialize import Handler

__all__ = ["LayerKind", "LazyKinds", "ROLES", "WEIGHT_KINDS"]

#: what a kind is: a dense layer, a factorized one, a quantized dense one, a quantizer
#: part (``Quantizer``, ``FrozenTensor``, ``Identity`` in a quantizer slot), or another module
ROLES = ("dense", "factorized", "quantized", "part", "other")
#: the weight kinds of :data:`tnquant.decompose.api.DECOMPOSERS`
WEIGHT_KINDS = tuple(DECOMPOSERS)

Refusal = Callable[[nn.Module], "str | None"]


@dataclass(frozen=True)
class LayerKind:
    """What tnquant knows about one layer class (looked up by exact type).

    Parameters
    ----------
    cls
        The class.
    role
        One of :data:`ROLES`. Dense and quantized kinds keep their weight in
        ``weight`` (a quantizer in ``weight_quantizer``); factorized kinds
        keep ``cores`` (quantizers in ``core_quantizers``).
    dense
        The dense class it stands for (a dense kind: itself); ``save``/``load``
        checks the base model holds one where it stood.
    weight_kind
        Dense kinds: how :mod:`tnquant.decompose` reads the weight
        (:data:`WEIGHT_KINDS`); ``'linear'`` weights take a Gram matrix for a
        data-aware fit.
    factorize
        Dense kinds: spec type -> factorized class (``cls.from_dense(module,
        spec, name=, gram=)``).
    refuse
        Dense kinds: ``refuse(module)`` says why this module cannot be
        factorized (``None`` when it can).
    quantized
        Dense kinds: the quantized class (``cls.from_float(module)`` shares
        the parameters).
    sites
        The activation sites before any intermediates (``act_quantizers``
        keys); factorized kinds add their ``intermediate_names()``.
    handler
        How ``save``/``load`` describe and rebuild it (``None``: kept from the
        base model).
    export
        The fixed-point export route, a name :mod:`tnquant.export.graph` maps
        to its functions (``None``: no export).
    transposed
        Dense and quantized kinds: the weight is stored ``(in, out)``
        (Hugging Face's ``Conv1D``); its quantizer sees the ``(out, in)``
        transpose, so specs mean what they mean on an ``nn.Linear``.
    """

    cls: type[nn.Module]
    role: str
    dense: type[nn.Module] | None = None
    weight_kind: str | None = None
    factorize: Mapping[type, type] = field(default_factory=dict)
    refuse: Refusal | None = None
    quantized: type[nn.Module] | None = None
    sites: tuple[str, ...] = ("input", "output")
    handler: Handler | None = None
    export: str | None = None
    transposed: bool = False

    def __post_init__(self) -> None:
        name = getattr(self.cls, "__name__", repr(self.cls))
        if not (isinstance(self.cls, type) and issubclass(self.cls, nn.Module)):
            raise TypeError(f"LayerKind.cls must be an nn.Module class, got {self.cls!r}")
        if self.role not in ROLES:
            raise ValueError(f"{name}: role must be one of {ROLES}, got {self.role!r}")
        if self.role == "dense" and self.dense is not self.cls:
            raise ValueError(f"{name}: a dense kind is its own dense class (dense={name})")
        if self.role in ("factorized", "quantized") and self.dense is None:
            raise ValueError(f"{name}: a {self.role} kind names the dense class it stands for")
        if self.role != "dense" and (
            self.factorize or self.quantized or self.weight_kind or self.refuse
        ):
            raise ValueError(
                f"{name}: only a dense kind takes factorize=, quantized=, weight_kind= and refuse="
            )
        if self.transposed and self.role not in ("dense", "quantized"):
            raise ValueError(f"{name}: only a dense or quantized kind takes transposed=True")
        if self.factorize:
            self._check_factorize(name)
        self._check_handler(name)

    def _check_factorize(self, name: str) -> None:
        if self.weight_kind not in WEIGHT_KINDS:
            raise ValueError(
                f"{name}: weight_kind must be one of {WEIGHT_KINDS} when it "
                f"factorizes, got {self.weight_kind!r}"
            )
        for spec_type, target in self.factorize.items():
            if spec_type not in DECOMPOSERS[self.weight_kind]:
                raise ValueError(
                    f"{name}: tnquant.decompose has no {spec_type.__name__} "
                    f"decomposition of a {self.weight_kind} weight"
                )
            if not (isinstance(target, type) and issubclass(target, nn.Module)):
                raise TypeError(
                    f"{name}: factorize[{spec_type.__name__}] must be a layer class, got {target!r}"
                )

    def _check_handler(self, name: str) -> None:
        h = self.handler
        if h is None:
            return
        if not isinstance(h, Handler):
            raise TypeError(
                f"{name}: handler must be a registry.serialize.Handler, got {type(h).__name__}"
            )
        replaces = self.dense if self.role in ("factorized", "quantized") else None
        if h.cls is not self.cls or h.replaces is not replaces:
            raise ValueError(
                f"{name}: its handler is for a {h.cls.__name__} replacing "
                f"{getattr(h.replaces, '__name__', None)}, expected {name} "
                f"replacing {getattr(replaces, '__name__', None)}"
            )

    @property
    def quantizable(self) -> bool:
        """Whether its tensors take quantizers: a dense kind with a quantized class, or a layer."""
        return self.role in ("factorized", "quantized") or (
            self.role == "dense" and self.quantized is not None
        )

    @property
    def holds_quantizers(self) -> bool:
        """Whether its instances hold weight quantizers (factorized and quantized kinds)."""
        return self.role in ("factorized", "quantized")

    def spec_types(self) -> tuple[Any, ...]:
        """The factorization spec types this dense kind takes, in table order."""
        return tuple(self.factorize)


@dataclass(frozen=True)
class LazyKinds:
    """Entries for a dense class tnquant must not import (transformers' ``Conv1D``, say).

    The registry keeps the family pending and registers ``build(dense_cls)``
    the first time it is asked while the dense class's module is loaded
    (``sys.modules``: the user built a model holding one); nothing is
    imported, neither by ``import tnquant`` nor because a file names a class.

    Parameters
    ----------
    qualname
        ``'<module>.<class>'`` of the dense class.
    members
        tnquant's own classes standing for it (registered by ``build``).
    build
        ``build(dense_cls) -> tuple[LayerKind, ...]``.

    Examples
    --------
    >>> from torch import nn
    >>> lazy = LazyKinds("torch.nn.modules.linear.Identity", (), lambda c: ())
    >>> lazy.find() is nn.Identity
    True
    """

    qualname: str
    members: tuple[type, ...]
    build: Callable[[type], tuple[LayerKind, ...]]

    def find(self) -> type | None:
        """The dense class if its module is already imported (``sys.modules``), else ``None``."""
        module_name, _, name = self.qualname.rpartition(".")
        module = sys.modules.get(module_name)
        found = getattr(module, name, None) if module is not None else None
        return found if isinstance(found, type) else None
