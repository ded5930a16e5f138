"""Drop-in plumbing of tnquant's layers: version keys and torch's fused kernels.

- :func:`tensor_key` / :func:`quantizer_key`: cheap keys of what a cached
  value depends on (identities, autograd version counters, data pointers,
  dtypes, devices; a quantizer's mode, spec and qparam shape);
- :func:`declines_fused_kernels`, :func:`sync_fused_guard`: the no-op forward
  pre-hook that makes ``nn.TransformerEncoderLayer``'s fused path (eval, no
  grad; it reads ``linear1.weight`` and skips ``forward``) take the
  module-by-module road, attached while a layer's forward does more than its
  ``weight`` and ``bias`` say;
- :func:`read_quant_weight`, :func:`quant_setattr`: ``weight`` of the
  ``Quant*`` layers (read-only once converted);
- :func:`per_sequence`: a forward over the sequences of a nested tensor
  (what ``nn.TransformerEncoder`` passes its layers with a padding mask).

Examples
--------
>>> import torch
>>> t = torch.zeros(3)
>>> k = tensor_key(t)
>>> _ = t.add_(1)
>>> tensor_key(t) == k  # the in-place add bumped the version counter
False
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import torch
from torch import Tensor, nn

from tnquant.quant.frozen import FrozenTensor

__all__ = [
    "declines_fused_kernels",
    "sync_fused_guard",
    "per_sequence",
    "tensor_key",
    "quantizer_key",
    "read_quant_weight",
    "quant_setattr",
    "quant_register_parameter",
    "QUANT_WEIGHT_DOC",
]


def declines_fused_kernels(module: nn.Module, args: tuple[Any, ...]) -> None:
    """No-op forward pre-hook: its presence makes torch's fused paths call ``forward``.

    ``nn.TransformerEncoderLayer`` takes its fused kernel only when no module
    under it has forward hooks; the kernel reads ``linear1.weight`` and would
    skip activation quantizers (or a weight quantizer a ``weight`` does not
    show). tnquant layers carry this hook exactly while that is so
    (:func:`sync_fused_guard`).

    Examples
    --------
    >>> from torch import nn
    >>> declines_fused_kernels(nn.Linear(2, 2), ()) is None
    True
    """
    return None


def sync_fused_guard(module: nn.Module, needed: bool) -> None:
    """Attach (``needed``) or remove the :func:`declines_fused_kernels` pre-hook.

    The hook lives only in ``module._forward_pre_hooks`` (no handle kept), so
    ``deepcopy``, pickling and :func:`tnquant.load` (which rebuilds layers and
    assigns their quantizers) keep it consistent.

    Examples
    --------
    >>> from torch import nn
    >>> layer = nn.Linear(2, 2)
    >>> sync_fused_guard(layer, True); len(layer._forward_pre_hooks)
    1
    >>> sync_fused_guard(layer, False); len(layer._forward_pre_hooks)
    0
    """
    hooks = module.__dict__.get("_forward_pre_hooks")
    if hooks is None:
        return
    present = [k for k, h in hooks.items() if h is declines_fused_kernels]
    if needed and not present:
        module.register_forward_pre_hook(declines_fused_kernels)
    elif not needed:
        for k in present:
            del hooks[k]


def per_sequence(forward: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """Run ``forward`` on each sequence of the nested tensor ``x``; nest the results.

    ``nn.TransformerEncoder`` turns a padded batch into a nested tensor (eval,
    no grad, a ``src_key_padding_mask``) and feeds it to every layer; a layer
    that declined the fused kernel gets it in its ``forward``.

    Examples
    --------
    >>> import torch
    >>> x = torch.nested.as_nested_tensor([torch.ones(2, 3), torch.ones(1, 3)])
    >>> [t.shape for t in per_sequence(lambda t: t.sum(-1, keepdim=True), x).unbind()]
    [torch.Size([2, 1]), torch.Size([1, 1])]
    """
    return torch.nested.as_nested_tensor([forward(t) for t in x.unbind()], layout=x.layout)


def tensor_key(t: Tensor | None) -> tuple[Any, ...]:
    """``(id, version, data_ptr, dtype, device, shape)`` of ``t`` (``(None,)`` for ``None``).

    Examples
    --------
    >>> import torch
    >>> len(tensor_key(torch.zeros(2)))
    6
    """
    if t is None:
        return (None,)
    return (id(t), t._version, t.data_ptr(), t.dtype, t.device, t.shape)


def quantizer_key(q: nn.Module) -> tuple[Any, ...]:
    """What a core quantizer's output depends on: its own tensors, mode, spec, qparam shape.

    Its children (an observer) are left out: they change its output only
    through its own buffers, once frozen.

    Examples
    --------
    >>> from tnquant import QuantSpec
    >>> from tnquant.quant import Quantizer
    >>> q = Quantizer(QuantSpec(bits=4))
    >>> k = quantizer_key(q)
    >>> q.mode = "off"
    >>> quantizer_key(q) == k
    False
    """
    state = q.__dict__
    tensors = [*q._parameters.values(), *q._buffers.values()]
    return (
        id(q),
        state.get("_mode"),
        state.get("spec"),
        state.get("_shape"),
        tuple(tensor_key(t) for t in tensors),
    )


def read_quant_weight(module: nn.Module) -> Tensor:
    """``weight`` of a ``Quant*`` layer: the float parameter; dequantized once converted.

    Examples
    --------
    >>> import torch
    >>> from tnquant.layers import QuantLinear
    >>> layer = QuantLinear(3, 2)
    >>> read_quant_weight(layer) is layer._parameters["weight"]
    True
    """
    weight = module.__dict__["_parameters"].get("weight")
    if weight is None:  # not registered yet: nn.Module's hasattr() check in __init__
        raise AttributeError(f"{type(module).__name__} has no weight yet")
    quantizer = module.__dict__["_modules"].get("weight_quantizer")
    if isinstance(quantizer, FrozenTensor):
        try:
            return quantizer()
        except AttributeError as err:  # else nn.Module.__getattr__ would hide it
            raise RuntimeError(f"{type(module).__name__}.weight failed: {err}") from err
    return cast(Tensor, weight)


def _check_new_weight(module: nn.Module, name: str, value: Any) -> None:
    """Refuse a new ``weight`` for a converted layer (but the empty placeholder)."""
    if (
        name == "weight"
        and isinstance(module.__dict__["_modules"].get("weight_quantizer"), FrozenTensor)
        and not (isinstance(value, nn.Parameter) and value.numel() == 0)
    ):
        raise AttributeError(
            f"{type(module).__name__}.weight is read-only after convert: it is the "
            "dequantized weight_quantizer (a FrozenTensor); use layer.to_float() for a "
            "float layer, or quantize a float model again"
        )


def quant_register_parameter(module: nn.Module, name: str, param: Any) -> None:
    """``nn.Module.register_parameter`` of a ``Quant*`` layer: no new ``weight`` once converted.

    Examples
    --------
    >>> from tnquant.layers import QuantLinear
    >>> QuantLinear(3, 2).register_parameter("extra", None)
    """
    _check_new_weight(module, name, param)
    nn.Module.register_parameter(module, name, param)


def quant_setattr(module: nn.Module, name: str, value: Any) -> None:
    """``nn.Module.__setattr__`` of a ``Quant*`` layer: no new ``weight`` once converted.

    Also keeps the :func:`declines_fused_kernels` hook in step with the
    quantizers (see :mod:`tnquant.layers.quantized`).

    Examples
    --------
    >>> from torch import nn
    >>> from tnquant import QuantSpec
    >>> from tnquant.layers import QuantLinear
    >>> from tnquant.quant import Quantizer
    >>> layer = QuantLinear(3, 2)
    >>> layer.act_quantizers = nn.ModuleDict({"input": Quantizer(QuantSpec())})
    >>> len(layer._forward_pre_hooks)
    1
    """
    _check_new_weight(module, name, value)
    nn.Module.__setattr__(module, name, value)
    if name in ("weight_quantizer", "act_quantizers"):
        modules = module.__dict__["_modules"]
        weight_q = modules.get("weight_quantizer")
        sync_fused_guard(
            module,
            modules.get("act_quantizers") is not None
            or (weight_q is not None and not isinstance(weight_q, FrozenTensor)),
        )


QUANT_WEIGHT_DOC = """The weight, as the dense layer's (read-only once converted; module doc)."""
