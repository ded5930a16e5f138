"""The layer registry: one entry per layer kind, asked by every verb.

An entry (:class:`LayerKind`) says, for one class (looked up by exact type):
its role (dense, factorized, quantized, a quantizer part, or another module),
the dense class it stands for, which spec types factorize it and into which
class, the weight kind :mod:`tnquant.decompose` reads, what it refuses and
why, its quantized class, its activation sites, its save/load handler
(:mod:`tnquant.registry.serialize`) and its export route. ``factorize``,
``quantize``, ``convert``, the size count, the int8 kernels, ``save``/``load``
and the fixed-point export read it; nothing else lists layer classes.

Adding a kind is one :func:`register` call (and its tests); nothing is
registered when user code is imported. Imports point down: the registry
imports layers, quant, specs and decompose, and is imported by the verbs,
``tnquant.io`` and ``tnquant.export``.

Examples
--------
>>> import torch
>>> from torch import nn
>>> from tnquant.specs import TT
>>> kind = lookup(nn.Linear(4, 4))
>>> kind.factorize[TT].__name__, kind.quantized.__name__, kind.weight_kind
('TTLinear', 'QuantLinear', 'linear')
>>> refusal(nn.Conv2d(4, 4, 3, groups=2)).split(":")[0]
'groups=2 is not supported'
>>> unsupported(nn.LSTM(4, 4)).split(":")[0]
'LSTM is not supported'
"""

from tnquant.registry.anatomy import (
    activation_sites,
    quant_state,
    store_frozen,
    weight_pairs,
    weight_spec,
)
from tnquant.registry.builtin import BUILTIN, LAZY
from tnquant.registry.entry import ROLES, WEIGHT_KINDS, LayerKind, LazyKinds
from tnquant.registry.serialize import BuildContext, Handler
from tnquant.registry.table import (
    FactorizeTable,
    HandlerTable,
    dense_classes,
    export_route,
    factorized_class,
    handlers,
    kind_of,
    kinds,
    lookup,
    refusal,
    register,
    unregister,
)
from tnquant.registry.unsupported import UNSUPPORTED, holds_weight, unsupported

__all__ = [
    "LayerKind",
    "LazyKinds",
    "LAZY",
    "ROLES",
    "WEIGHT_KINDS",
    "BUILTIN",
    "Handler",
    "BuildContext",
    "register",
    "unregister",
    "lookup",
    "kind_of",
    "kinds",
    "factorized_class",
    "refusal",
    "unsupported",
    "UNSUPPORTED",
    "holds_weight",
    "export_route",
    "handlers",
    "dense_classes",
    "FactorizeTable",
    "HandlerTable",
    "weight_pairs",
    "weight_spec",
    "activation_sites",
    "quant_state",
    "store_frozen",
]
