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

import dataclasses
from typing import Any, cast

from torch import Tensor, nn

from tnquant.layers.anatomy import core_weight_pairs, dense_weight_pairs, state_of
from tnquant.layers.lowrank import LowRankLinear
from tnquant.quant.layout import spec_summary
from tnquant.quant.qparams import block_size
from tnquant.registry.table import lookup
from tnquant.specs import Codebook, FixedPoint, QuantSpec

__all__ = ["weight_pairs", "activation_sites", "quant_state", "store_frozen", "weight_spec"]


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


def weight_spec(
    module: nn.Module, spec: Any, shape: tuple[int, ...] | None = None, where: str = "the weight"
) -> Any:
    """``spec`` as a weight quantizer of ``module`` holds it: the axis a layer decides, pinned.

    A ``QuantSpec`` with ``axis=None`` means "the layer decides"
    (:func:`tnquant.quant.qparams.default_axis`: per channel along axis 0,
    per group along axis 1, the input axis of the ``(out, in, ...)`` weight
    every dense and quantized kind shows through :func:`weight_pairs`), and
    is kept as it is there and on ``LowRankLinear`` cores (``U (out, r)``
    and ``V (r, in)``, each a Linear weight grouped along its reduction
    axis 1). The cores of the other factorized kinds (TT, Tucker, CP) have
    no one reduction axis: a group spec with ``axis=None`` is pinned to
    ``axis=0`` for them (their layout as before). Given a ``shape``, the
    result is checked against it (``ValueError`` naming ``where``: an axis
    out of range, a group size that does not divide the axis).

    Examples
    --------
    >>> import torch
    >>> from tnquant.layers import TTLinear
    >>> layer = TTLinear([torch.randn(1, 4, 4, 3), torch.randn(3, 4, 4, 1)])
    >>> weight_spec(layer, QuantSpec(granularity=("group", 2))).axis
    0
    >>> weight_spec(torch.nn.Linear(4, 2), QuantSpec(granularity=("group", 2))).axis is None
    True
    >>> weight_spec(torch.nn.Linear(6, 2), QuantSpec(granularity=("group", 4)), (2, 6), "'fc'")
    Traceback (most recent call last):
    ...
    ValueError: int8/group4 cannot quantize 'fc' of shape (2, 6): group size 4 does not \
divide axis 1 of size 6 (shape (2, 6)) (axis=None groups the input axis 1; give axis= to \
group along another one)
    """
    if (
        isinstance(spec, (QuantSpec, Codebook))
        and spec.axis is None
        and isinstance(spec.granularity, tuple)
        and not isinstance(module, LowRankLinear)
    ):
        kind = lookup(module)
        if kind is not None and kind.role == "factorized":
            spec = dataclasses.replace(spec, axis=0)
    if shape is not None:
        _check_shape(spec, shape, where)
    return spec


def _check_shape(spec: Any, shape: tuple[int, ...], where: str) -> None:
    if isinstance(spec, FixedPoint) or (isinstance(spec, QuantSpec) and spec.dtype is not None):
        return
    try:
        block_size(shape, spec.granularity, spec.axis)
    except ValueError as err:
        hint = ""
        if getattr(spec, "axis", 0) is None and isinstance(spec.granularity, tuple):
            hint = " (axis=None groups the input axis 1; give axis= to group along another one)"
        raise ValueError(
            f"{spec_summary(spec)} cannot quantize {where} of shape {shape}: {err}{hint}"
        ) from None
