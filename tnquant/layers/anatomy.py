"""The anatomy of tnquant's own quantizable layers: their weights, sites and state.

Registry-independent answers for the built-in classes (the registry's
entries say which of these applies to a kind: :mod:`tnquant.registry.anatomy`,
whose :func:`~tnquant.registry.weight_pairs` answers for every registered
kind, added ones too).

Examples
--------
>>> from torch import nn
>>> from tnquant.layers.quantized import QuantLinear
>>> [n for n, _, _ in weight_pairs(QuantLinear(3, 2))], quant_state(nn.Linear(2, 2))
(['weight'], 'float')
"""

from __future__ import annotations

from typing import cast

from torch import Tensor, nn

from tnquant.layers.base import FactorizedLayer
from tnquant.layers.embedding import TTEmbedding
from tnquant.layers.quantized import QuantConv2d, QuantEmbedding, QuantLinear
from tnquant.quant.frozen import FrozenTensor
from tnquant.quant.quantizer import Quantizer

__all__ = [
    "weight_pairs",
    "dense_weight_pairs",
    "core_weight_pairs",
    "activation_sites",
    "quant_state",
    "state_of",
]

_DENSE = (nn.Linear, nn.Conv2d, nn.Embedding, QuantLinear, QuantConv2d, QuantEmbedding)


def dense_weight_pairs(module: nn.Module) -> list[tuple[str, Tensor, nn.Module | None]]:
    """``[('weight', weight, weight_quantizer or None)]`` of a dense or quantized dense layer."""
    weight = cast(Tensor, module._parameters["weight"])  # the placeholder once converted
    return [("weight", weight, module._modules.get("weight_quantizer"))]


def core_weight_pairs(module: nn.Module) -> list[tuple[str, Tensor, nn.Module | None]]:
    """``('cores.<k>', cores[k], core_quantizers[k] or None)`` per core of a factorized layer."""
    quantizers = cast("nn.ModuleList | None", module._modules.get("core_quantizers"))
    cores = list(cast(nn.ParameterList, module.cores))
    qs: list[nn.Module | None] = list(quantizers) if quantizers is not None else []
    qs += [None] * (len(cores) - len(qs))
    return [(f"cores.{k}", c, q) for k, (c, q) in enumerate(zip(cores, qs, strict=True))]


def weight_pairs(module: nn.Module) -> list[tuple[str, Tensor, nn.Module | None]]:
    """``(name, tensor, quantizer or None)`` for every weight tensor of a tnquant layer.

    Dense (``nn.Linear``/``Conv2d``/``Embedding`` and their ``Quant*``
    wrappers): ``[('weight', weight, weight_quantizer)]``; factorized layers:
    ``('cores.<k>', cores[k], core_quantizers[k])`` per core; anything else:
    ``[]``. After ``convert`` the tensor is the empty placeholder and the
    quantizer a ``FrozenTensor``. :func:`tnquant.registry.weight_pairs`
    answers for every registered kind, added ones too.

    Examples
    --------
    >>> import torch
    >>> from tnquant.layers import LowRankLinear
    >>> [(n, q) for n, _, q in weight_pairs(LowRankLinear([torch.ones(3, 1), torch.ones(1, 2)]))]
    [('cores.0', None), ('cores.1', None)]
    """
    if isinstance(module, FactorizedLayer):
        return core_weight_pairs(module)
    if type(module) in _DENSE:
        return dense_weight_pairs(module)
    return []


def activation_sites(module: nn.Module) -> tuple[str, ...]:
    """The ``act_quantizers`` keys a layer takes: ``'input'``, ``'output'``, ``'inter_<k>'``.

    Embeddings have no ``'input'`` (their inputs are indices); factorized
    layers add their ``intermediate_names()``.

    Examples
    --------
    >>> from torch import nn
    >>> activation_sites(nn.Linear(2, 2)), activation_sites(nn.Embedding(3, 2))
    (('input', 'output'), ('output',))
    """
    embedding = isinstance(module, (nn.Embedding, TTEmbedding))
    head: tuple[str, ...] = ("output",) if embedding else ("input", "output")
    if isinstance(module, FactorizedLayer):
        return head + tuple(module.intermediate_names())
    return head


def state_of(pairs: list[tuple[str, Tensor, nn.Module | None]], module: nn.Module) -> str:
    """:func:`quant_state` of ``module`` given its :func:`weight_pairs`."""
    qs = [q for _, _, q in pairs]
    if any(isinstance(q, FrozenTensor) for q in qs):
        return "converted"
    if any(isinstance(q, Quantizer) for q in qs) or module._modules.get("act_quantizers"):
        return "fake-quant"
    return "float"


def quant_state(module: nn.Module) -> str:
    """``'converted'`` (a weight in a ``FrozenTensor``), ``'fake-quant'`` or ``'float'``.

    Examples
    --------
    >>> from torch import nn
    >>> quant_state(nn.Linear(2, 2))
    'float'
    """
    return state_of(weight_pairs(module), module)
