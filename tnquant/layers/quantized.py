"""Dense layers with fake-quantized weights and activations.

``tnquant.quantize`` swaps ``nn.Linear`` / ``nn.Conv2d`` / ``nn.Embedding``
for these subclasses (so ``isinstance(layer, nn.Linear)`` still holds). They
keep the very same ``weight`` and ``bias`` parameters (shared, not copied)
and add

- ``weight_quantizer``: a :class:`~tnquant.quant.Quantizer` (or ``None``;
  after :func:`tnquant.convert`, a :class:`~tnquant.quant.frozen.FrozenTensor`,
  the float weight dropped for an empty placeholder in ``_parameters``);
- ``act_quantizers``: an ``nn.ModuleDict`` with keys ``'input'`` and/or
  ``'output'`` (or ``None``). ``QuantEmbedding`` takes ``'output'`` only: its
  inputs are indices.

The forward pass is the plain functional op with
``weight_quantizer(weight)`` in place of ``weight``, the input and output
passed through their quantizers when present. Drop-in reading
(:mod:`tnquant.layers.dropin`): ``weight`` is the float parameter before
``convert``, the dequantized tensor after (read-only; the state dict keeps
the placeholder); a forward doing more than ``weight`` says carries the
pre-hook that turns torch's fused encoder path away.

Examples
--------
>>> import torch
>>> from torch import nn
>>> from tnquant import QuantSpec
>>> from tnquant.quant import Quantizer
>>> dense = nn.Linear(6, 4)
>>> layer = QuantLinear.from_float(dense)
>>> layer.weight is dense.weight
True
>>> layer.weight_quantizer = Quantizer(QuantSpec(bits=4, granularity="channel"))
>>> layer(torch.randn(2, 6)).shape
torch.Size([2, 4])
"""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tnquant.layers.dropin import (
    QUANT_WEIGHT_DOC,
    per_sequence,
    quant_register_parameter,
    quant_setattr,
    read_quant_weight,
)
from tnquant.quant.frozen import FrozenTensor

__all__ = ["QuantLinear", "QuantConv2d", "QuantEmbedding"]


def _act(module: nn.Module, name: str, x: Tensor) -> Tensor:
    quantizers = cast("nn.ModuleDict | None", module._modules.get("act_quantizers"))
    if quantizers is not None and name in quantizers:
        return cast(Tensor, quantizers[name](x))
    return x


def _effective_weight(module: nn.Module) -> Tensor:
    weight = cast(Tensor, module._parameters["weight"])
    quantizer = module._modules.get("weight_quantizer")
    return weight if quantizer is None else cast(Tensor, quantizer(weight))


def _is_converted(module: nn.Module) -> bool:
    return isinstance(module._modules.get("weight_quantizer"), FrozenTensor)


def conv_like(cls: type[nn.Module], src: Any, weight: Tensor) -> nn.Module:
    """A ``cls`` convolution with ``src``'s hyperparameters holding ``weight`` and
    ``src.bias`` (shared, not copied), in ``src``'s train/eval mode: the
    ``from_float`` / ``to_float`` of the quantized convs."""
    new = cls(
        src.in_channels,
        src.out_channels,
        src.kernel_size,
        stride=src.stride,
        padding=src.padding,
        dilation=src.dilation,
        groups=src.groups,
        bias=src.bias is not None,
        padding_mode=src.padding_mode,
        device="meta",
        dtype=weight.dtype,
    )
    new.weight = weight
    new.bias = src.bias
    return new.train(src.training)


def _check_source(cls: type, module: Any, base: type) -> None:
    if type(module) is not base:
        raise TypeError(
            f"{cls.__name__}.from_float expects a {base.__module__}.{base.__name__} "
            f"(exactly, not a subclass), got {type(module).__name__}"
        )


class QuantLinear(nn.Linear):
    """``nn.Linear`` with a weight quantizer and input/output quantizers.

    Parameters
    ----------
    in_features, out_features, bias, device, dtype
        As ``nn.Linear``.

    Attributes
    ----------
    weight_quantizer : Quantizer, FrozenTensor or None
    act_quantizers : nn.ModuleDict or None
        Keys ``'input'``, ``'output'``.

    Examples
    --------
    >>> import torch
    >>> layer = QuantLinear(3, 2)
    >>> torch.allclose(layer(torch.ones(1, 3)), layer.weight.sum(1) + layer.bias)
    True
    """

    weight_quantizer: nn.Module | None
    act_quantizers: nn.ModuleDict | None
    weight = property(read_quant_weight, doc=QUANT_WEIGHT_DOC)  # type: ignore[assignment]
    __setattr__ = quant_setattr
    register_parameter = quant_register_parameter  # type: ignore[assignment]

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        # plain None until quantize() assigns modules (nn.Module then registers them)
        self.weight_quantizer = None
        self.act_quantizers = None

    @classmethod
    def from_float(cls, module: nn.Linear) -> QuantLinear:
        """Wrap ``module``, sharing its ``weight`` and ``bias`` parameters (no quantizers yet).

        Examples
        --------
        >>> from torch import nn
        >>> QuantLinear.from_float(nn.Linear(4, 2, bias=False)).bias is None
        True
        """
        _check_source(cls, module, nn.Linear)
        new = cls(
            module.in_features,
            module.out_features,
            bias=module.bias is not None,
            device="meta",
            dtype=module.weight.dtype,
        )
        new.weight = module.weight
        new.bias = module.bias
        return new.train(module.training)

    @property
    def converted(self) -> bool:
        """Whether the weight lives in a ``FrozenTensor`` (integer storage)."""
        return _is_converted(self)

    def effective_weight(self) -> Tensor:
        """The weight the forward pass uses (quantized when a quantizer is attached)."""
        return _effective_weight(self)

    def forward(self, x: Tensor) -> Tensor:
        if x.is_nested and self._modules.get("act_quantizers") is not None:
            return per_sequence(self.forward, x)  # from nn.TransformerEncoder
        x = _act(self, "input", x)
        return _act(self, "output", F.linear(x, _effective_weight(self), self.bias))

    def to_float(self) -> nn.Linear:
        """A plain ``nn.Linear``: the same parameters, or the dequantized weight once converted.

        Examples
        --------
        >>> from torch import nn
        >>> dense = nn.Linear(4, 2)
        >>> QuantLinear.from_float(dense).to_float().weight is dense.weight
        True
        """
        new = nn.Linear(
            self.in_features,
            self.out_features,
            bias=self.bias is not None,
            device="meta",
            dtype=self._parameters["weight"].dtype,  # type: ignore[union-attr]
        )
        new.weight = _float_weight(self)
        new.bias = self.bias
        return new.train(self.training)


class QuantConvBody(nn.Module):
    """What ``QuantConv1d`` and ``QuantConv2d`` share (put before the ``nn.Conv*`` base):
    the quantizer slots, the read-only-once-converted ``weight`` and the forward,
    ``input`` quantizer -> convolution with the effective kernel -> ``output``
    quantizer."""

    weight_quantizer: nn.Module | None
    act_quantizers: nn.ModuleDict | None
    weight = property(read_quant_weight, doc=QUANT_WEIGHT_DOC)  # type: ignore[assignment]
    __setattr__ = quant_setattr
    register_parameter = quant_register_parameter  # type: ignore[assignment]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # plain None until quantize() assigns modules (nn.Module then registers them)
        self.weight_quantizer = None
        self.act_quantizers = None

    @property
    def converted(self) -> bool:
        """Whether the weight lives in a ``FrozenTensor`` (integer storage)."""
        return _is_converted(self)

    def effective_weight(self) -> Tensor:
        """The kernel the forward pass uses (quantized when a quantizer is attached)."""
        return _effective_weight(self)

    def forward(self, x: Tensor) -> Tensor:
        x = _act(self, "input", x)
        return _act(
            self,
            "output",
            cast(Any, self)._conv_forward(x, _effective_weight(self), cast(Any, self).bias),
        )


class QuantConv2d(QuantConvBody, nn.Conv2d):
    """``nn.Conv2d`` with a weight quantizer and input/output quantizers.

    Parameters
    ----------
    *args, **kwargs
        As ``nn.Conv2d`` (``in_channels``, ``out_channels``, ``kernel_size``, ...).

    Examples
    --------
    >>> import torch
    >>> QuantConv2d(3, 4, 3, padding=1)(torch.randn(1, 3, 5, 5)).shape
    torch.Size([1, 4, 5, 5])
    """

    @classmethod
    def from_float(cls, module: nn.Conv2d) -> QuantConv2d:
        """Wrap ``module``, sharing its ``weight`` and ``bias`` parameters (no quantizers yet).

        Examples
        --------
        >>> from torch import nn
        >>> QuantConv2d.from_float(nn.Conv2d(2, 4, 3, stride=2, groups=2)).groups
        2
        """
        _check_source(cls, module, nn.Conv2d)
        return cast(QuantConv2d, conv_like(cls, module, module.weight))

    def to_float(self) -> nn.Conv2d:
        """A plain ``nn.Conv2d``: the same parameters, or the dequantized kernel once converted.

        Examples
        --------
        >>> from torch import nn
        >>> QuantConv2d.from_float(nn.Conv2d(2, 4, 3)).to_float()
        Conv2d(2, 4, kernel_size=(3, 3), stride=(1, 1))
        """
        return cast(nn.Conv2d, conv_like(nn.Conv2d, self, _float_weight(self)))


class QuantEmbedding(nn.Embedding):
    """``nn.Embedding`` with a weight quantizer and an output quantizer.

    ``max_norm`` is not supported (it renormalises the weight in place).

    Parameters
    ----------
    num_embeddings, embedding_dim, padding_idx, device, dtype
        As ``nn.Embedding``.

    Examples
    --------
    >>> import torch
    >>> QuantEmbedding(10, 4)(torch.tensor([[1, 2]])).shape
    torch.Size([1, 2, 4])
    """

    weight_quantizer: nn.Module | None
    act_quantizers: nn.ModuleDict | None
    weight = property(read_quant_weight, doc=QUANT_WEIGHT_DOC)  # type: ignore[assignment]
    __setattr__ = quant_setattr
    register_parameter = quant_register_parameter  # type: ignore[assignment]

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        padding_idx: int | None = None,
        device: Any = None,
        dtype: Any = None,
        **kwargs: Any,
    ) -> None:
        if kwargs.get("max_norm") is not None:
            raise ValueError(
                f"QuantEmbedding does not support max_norm (it renormalises the "
                f"weight in place), got max_norm={kwargs['max_norm']!r}"
            )
        super().__init__(
            num_embeddings, embedding_dim, padding_idx, device=device, dtype=dtype, **kwargs
        )
        # plain None until quantize() assigns modules (nn.Module then registers them)
        self.weight_quantizer = None
        self.act_quantizers = None

    @classmethod
    def from_float(cls, module: nn.Embedding) -> QuantEmbedding:
        """Wrap ``module``, sharing its ``weight`` parameter (no quantizers yet).

        Examples
        --------
        >>> from torch import nn
        >>> QuantEmbedding.from_float(nn.Embedding(5, 3, padding_idx=0)).padding_idx
        0
        """
        _check_source(cls, module, nn.Embedding)
        new = cls(
            module.num_embeddings,
            module.embedding_dim,
            padding_idx=module.padding_idx,
            max_norm=module.max_norm,
            norm_type=module.norm_type,
            scale_grad_by_freq=module.scale_grad_by_freq,
            sparse=module.sparse,
            device="meta",
            dtype=module.weight.dtype,
        )
        new.weight = module.weight
        return new.train(module.training)

    @property
    def converted(self) -> bool:
        """Whether the weight lives in a ``FrozenTensor`` (integer storage)."""
        return _is_converted(self)

    def effective_weight(self) -> Tensor:
        """The table the forward pass uses (quantized when a quantizer is attached)."""
        return _effective_weight(self)

    def forward(self, indices: Tensor) -> Tensor:
        out = F.embedding(
            indices,
            _effective_weight(self),
            self.padding_idx,
            None,
            self.norm_type,
            self.scale_grad_by_freq,
            self.sparse,
        )
        return _act(self, "output", out)

    def to_float(self) -> nn.Embedding:
        """A plain ``nn.Embedding``: the same weight, or the dequantized table once converted.

        Examples
        --------
        >>> from torch import nn
        >>> QuantEmbedding.from_float(nn.Embedding(5, 3)).to_float()
        Embedding(5, 3)
        """
        new = nn.Embedding(
            self.num_embeddings,
            self.embedding_dim,
            self.padding_idx,
            norm_type=self.norm_type,
            scale_grad_by_freq=self.scale_grad_by_freq,
            sparse=self.sparse,
            device="meta",
            dtype=self._parameters["weight"].dtype,  # type: ignore[union-attr]
        )
        new.weight = _float_weight(self)
        return new.train(self.training)


def _float_weight(module: nn.Module) -> nn.Parameter:
    """The float weight parameter of a quantized dense layer (dequantized copy once converted)."""
    weight = cast(nn.Parameter, module._parameters["weight"])
    if not _is_converted(module):
        return weight
    with torch.no_grad():
        return nn.Parameter(_effective_weight(module).detach().clone())
