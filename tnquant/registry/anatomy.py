"""Which tensors of a layer carry quantizers, its activation sites, and where convert stores.

The answers come from the layer's registry entry (:func:`~tnquant.registry.lookup`):
a dense or quantized kind keeps its weight in ``weight`` and its quantizer in
``weight_quantizer``; a factorized kind keeps ``cores`` and
``core_quantizers`` (one per core). ``quantize``, ``convert``, the size
count and ``load`` all ask here.

Examples
--------
>>> import torch
>>> from torch import nn
>>> from tnquant.layers import LowRankLinear
>>> [(n, q) for n, _, q in weight_pairs(LowRankLinear([torch.ones(3, 1), torch.ones(1, 2)]))]
[('cores.0', None), ('cores.1', None)]
>>> activation_sites(nn.Linear(2, 2)), activation_sites(nn.Embedding(3, 2)), weight_pairs(nn.ReLU())
(('input', 'output'), ('output',), [])
"""

from __future__ import annotations

from typing import Any, cast

from torch import Tensor, nn

from tnquant.layers.anatomy import core_weight_pairs, dense_weight_pairs, state_of
from tnquant.registry.table import lookup

__all__ = ["weight_pairs", "activation_sites", "quant_state", "store_frozen"]


def weight_pairs(module: nn.Module) -> list[tuple[str, Tensor, nn.Module | None]]:
    """``(name, tensor, quantizer or None)`` for every weight tensor of a registered layer.

    ``[('weight', weight, weight_quantizer)]`` for a dense or quantized kind,
    ``('cores.<k>', cores[k], core_quantizers[k])`` per core for a factorized
    one, ``[]`` for anything else. A ``transposed`` kind (weight stored
    ``(in, out)``) gives the ``(out, in)`` view ``weight.mT``. After
    ``convert`` the tensor is the empty
    placeholder and the quantizer a ``FrozenTensor``.
    """
    kind = lookup(module)
    if kind is None or not kind.quantizable:
        return []
    if kind.role == "factorized":
        return core_weight_pairs(module)
    pairs = dense_weight_pairs(module)
    if kind.transposed:  # stored (in, out): the quantizer sees the (out, in) view
        return [(n, t.mT if t.ndim == 2 else t, q) for n, t, q in pairs]
    return pairs


def activation_sites(module: nn.Module) -> tuple[str, ...]:
    """The ``act_quantizers`` keys a layer takes: its entry's sites, then ``'inter_<k>'``.

    Embeddings have no ``'input'`` (their inputs are indices); factorized
    layers add their ``intermediate_names()``.
    """
    kind = lookup(module)
    head = ("input", "output") if kind is None else kind.sites
    if kind is not None and kind.role == "factorized":
        return head + tuple(cast(Any, module).intermediate_names())
    return head


def quant_state(module: nn.Module) -> str:
    """``'converted'`` (a weight in a ``FrozenTensor``), ``'fake-quant'`` or ``'float'``."""
    return state_of(weight_pairs(module), module)


def store_frozen(module: nn.Module, k: int, frozen: nn.Module, placeholder: nn.Parameter) -> None:
    """Put ``frozen`` in weight slot ``k`` of ``module`` and ``placeholder`` for its tensor."""
    kind = lookup(module)
    if kind is not None and kind.role == "factorized":
        cast(nn.ModuleList, module.core_quantizers)[k] = frozen
        cast(nn.ParameterList, module.cores)[k] = placeholder
    else:
        module.weight_quantizer = frozen
        module.weight = placeholder
