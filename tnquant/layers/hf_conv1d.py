"""Hugging Face's ``Conv1D`` (GPT-2): its factorized and quantized layers.

``transformers.pytorch_utils.Conv1D(nf, nx)`` is a Linear layer whose weight
is stored transposed: ``weight`` is ``(nx, nf) = (in, out)`` and the forward
is ``x @ weight + bias``. Its layers here compute exactly what the Linear
ones do (the cores factor the ``(out, in)`` matrix ``weight.T``, the
quantizer sees ``weight.T`` too, so per-channel and per-group specs mean
what they mean on an ``nn.Linear``), but read like a ``Conv1D``: ``nf``,
``nx``, ``dense_weight()`` and ``weight`` in the ``(in, out)`` layout, and
``to_dense()`` / ``to_float()`` give back a ``Conv1D``.

transformers stays optional: nothing here imports it until a ``Conv1D`` is
asked for (``to_dense``, ``to_float``); a ``Conv1D`` is recognised by its
qualified name (:data:`HF_CONV1D`).

================== ========== ===============================================
layer              spec       cores (of the ``(out, in)`` matrix)
================== ========== ===============================================
``LowRankHFConv1D`` ``LowRank`` as ``LowRankLinear``: ``[U (out, r), V (r, in)]``
``TTHFConv1D``      ``TT``      as ``TTLinear``
``TuckerHFConv1D``  ``Tucker``  as ``TuckerLinear``
``QuantHFConv1D``   (quantize) ``weight (in, out)``, ``weight_quantizer`` on ``weight.T``
================== ========== ===============================================

Examples
--------
>>> import torch
>>> layer = LowRankHFConv1D([torch.randn(6, 2), torch.randn(2, 4)], bias=torch.zeros(6))
>>> layer.nx, layer.nf, tuple(layer.dense_weight().shape)
(4, 6, (4, 6))
>>> x = torch.randn(3, 4)
>>> torch.allclose(layer(x), x @ layer.dense_weight(), atol=1e-5)
True
"""

from __future__ import annotations

import importlib
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tnquant.layers.dropin import _check_new_weight, quant_register_parameter
from tnquant.layers.linear import FactorizedLinearBase
from tnquant.layers.lowrank import LowRankLinear
from tnquant.layers.quantized import _act
from tnquant.layers.tt import TTLinear
from tnquant.layers.tucker import TuckerLinear
from tnquant.quant.frozen import FrozenTensor

__all__ = [
    "HF_CONV1D",
    "is_hf_conv1d",
    "hf_conv1d_class",
    "HFConv1DLayout",
    "LowRankHFConv1D",
    "TTHFConv1D",
    "TuckerHFConv1D",
    "QuantHFConv1D",
]

#: the qualified name of Hugging Face's Conv1D (``module.qualname``)
HF_CONV1D = "transformers.pytorch_utils.Conv1D"


def is_hf_conv1d(module: Any) -> bool:
    """Whether ``module`` is exactly a ``transformers.pytorch_utils.Conv1D`` (no import).

    Examples
    --------
    >>> from torch import nn
    >>> is_hf_conv1d(nn.Linear(2, 2))
    False
    """
    cls = type(module)
    return f"{cls.__module__}.{cls.__qualname__}" == HF_CONV1D


def hf_conv1d_class() -> type[nn.Module]:
    """``transformers.pytorch_utils.Conv1D`` (imported now: transformers is optional).

    Examples
    --------
    >>> hf_conv1d_class().__name__
    'Conv1D'
    """
    module, _, name = HF_CONV1D.rpartition(".")
    try:
        return cast("type[nn.Module]", getattr(importlib.import_module(module), name))
    except ImportError as err:
        raise ImportError(
            f"a Conv1D layer needs transformers ({HF_CONV1D}); pip install transformers"
        ) from err


def _check_conv1d(cls: type, module: Any, what: str) -> None:
    if not is_hf_conv1d(module):
        raise TypeError(
            f"{cls.__name__}.{what} expects a {HF_CONV1D} (exactly, not a subclass), "
            f"got {type(module).__name__}"
        )


def _new_conv1d(nf: int, nx: int, weight: Tensor, bias: Tensor | None) -> nn.Module:
    """A ``Conv1D(nf, nx)`` holding copies of ``weight`` ``(nx, nf)`` and ``bias``."""
    dense = hf_conv1d_class()(nf, nx).to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        cast(Tensor, dense.weight).copy_(weight)
        if bias is None:
            cast(Tensor, dense.bias).zero_()
        else:
            cast(Tensor, dense.bias).copy_(bias)
    return dense


class HFConv1DLayout(FactorizedLinearBase):
    """The ``Conv1D`` reading of a factorized Linear class (a base, not used directly).

    A subclass lists it before the Linear class whose cores it keeps
    (``class LowRankHFConv1D(HFConv1DLayout, LowRankLinear)``); the forward,
    the cores and their quantizers are the Linear class's.
    """

    @property
    def nf(self) -> int:
        """The output features (``Conv1D.nf``)."""
        return self.out_features

    @property
    def nx(self) -> int:
        """The input features (``Conv1D.nx``)."""
        return self.in_features

    @classmethod
    def from_dense(
        cls, module: Any, spec: Any, *, gram: Tensor | None = None, name: str = "weight"
    ) -> FactorizedLinearBase:
        """Factorize a pretrained ``Conv1D``: its ``(out, in)`` matrix ``weight.T``, as a Linear.

        ``gram`` (``(in, in)``, the layer's inputs) gives a data-aware fit,
        as for ``nn.Linear``; the bias is copied.

        Examples
        --------
        >>> from transformers.pytorch_utils import Conv1D
        >>> from tnquant import LowRank
        >>> layer = LowRankHFConv1D.from_dense(Conv1D(6, 4), LowRank(rank=2))
        >>> layer.nf, layer.nx, layer.ranks
        (6, 4, (2,))
        """
        _check_conv1d(cls, module, "from_dense")
        weight = module.weight.detach()
        view = nn.Linear(
            module.nx, module.nf, bias=False, device="meta", dtype=weight.dtype
        )  # the Linear this Conv1D is, on its transposed weight (no copy)
        view.weight = nn.Parameter(weight.mT, requires_grad=False)
        bias = None if module.bias is None else nn.Parameter(module.bias.detach())
        view.register_parameter("bias", bias)
        return super().from_dense(view, spec, gram=gram, name=name)

    def dense_weight(self) -> Tensor:
        """The ``(in, out)`` weight (``Conv1D``'s layout), from the effective cores.

        Examples
        --------
        >>> import torch
        >>> u, v = torch.randn(3, 1), torch.randn(1, 2)
        >>> torch.allclose(LowRankHFConv1D([u, v]).dense_weight(), (u @ v).T)
        True
        """
        return super().dense_weight().mT

    def to_dense(self) -> nn.Module:  # type: ignore[override]
        """A ``transformers`` ``Conv1D`` with the reconstructed weight and the bias.

        Examples
        --------
        >>> import torch
        >>> LowRankHFConv1D([torch.randn(3, 1), torch.randn(1, 2)]).to_dense()
        Conv1D(nf=3, nx=2)
        """
        with torch.no_grad():
            return _new_conv1d(self.nf, self.nx, self.dense_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"nf={self.nf}, nx={self.nx}, {super().extra_repr()}"


class LowRankHFConv1D(HFConv1DLayout, LowRankLinear):
    """A low-rank ``Conv1D``: ``weight.T = U @ V`` (cores as :class:`LowRankLinear`).

    Examples
    --------
    >>> import torch
    >>> u, v = torch.randn(6, 2), torch.randn(2, 5)
    >>> x = torch.randn(3, 5)
    >>> torch.allclose(LowRankHFConv1D([u, v])(x), x @ (u @ v).T, atol=1e-5)
    True
    """


class TTHFConv1D(HFConv1DLayout, TTLinear):
    """A TT-matrix ``Conv1D`` (cores as :class:`TTLinear`, of ``weight.T``).

    Examples
    --------
    >>> import torch
    >>> layer = TTHFConv1D([torch.randn(1, 2, 3, 2), torch.randn(2, 4, 5, 1)])
    >>> layer.nx, layer.nf, tuple(layer.weight.shape)
    (15, 8, (15, 8))
    """


class TuckerHFConv1D(HFConv1DLayout, TuckerLinear):
    """A Tucker ``Conv1D`` (cores as :class:`TuckerLinear`, of ``weight.T``).

    Examples
    --------
    >>> import torch
    >>> layer = TuckerHFConv1D([torch.randn(6, 3), torch.randn(3, 2), torch.randn(5, 2)])
    >>> tuple(layer.dense_weight().shape)
    (5, 6)
    """


def _read_weight(module: nn.Module) -> Tensor:
    """``QuantHFConv1D.weight``: the ``(in, out)`` parameter; dequantized once converted."""
    weight = module.__dict__["_parameters"].get("weight")
    if weight is None:
        raise AttributeError(f"{type(module).__name__} has no weight yet")
    quantizer = module.__dict__["_modules"].get("weight_quantizer")
    if isinstance(quantizer, FrozenTensor):
        return cast(Tensor, quantizer()).mT
    return cast(Tensor, weight)


class QuantHFConv1D(nn.Module):
    """``Conv1D`` with a weight quantizer (on ``weight.T``, the ``(out, in)`` matrix) and
    input/output quantizers.

    Parameters
    ----------
    nf, nx
        Output and input features, as ``Conv1D(nf, nx)``.
    bias, device, dtype
        As ``nn.Linear``'s.

    Attributes
    ----------
    weight : Tensor
        ``(nx, nf)``, shared with the ``Conv1D`` it wraps; read-only and
        dequantized once converted.
    weight_quantizer : Quantizer, FrozenTensor or None
    act_quantizers : nn.ModuleDict or None
        Keys ``'input'``, ``'output'``.

    Examples
    --------
    >>> import torch
    >>> layer = QuantHFConv1D(3, 2)
    >>> x = torch.randn(4, 2)
    >>> torch.allclose(layer(x), x @ layer.weight + layer.bias)
    True
    """

    weight_quantizer: nn.Module | None
    act_quantizers: nn.ModuleDict | None
    bias: nn.Parameter | None
    weight = property(_read_weight)  # type: ignore[assignment]

    def __init__(
        self, nf: int, nx: int, bias: bool = True, device: Any = None, dtype: Any = None
    ) -> None:
        super().__init__()
        for name, value in (("nf", nf), ("nx", nx)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.nf, self.nx = nf, nx
        self.register_parameter(
            "weight", nn.Parameter(torch.empty(nx, nf, device=device, dtype=dtype))
        )
        nn.init.normal_(self._parameters["weight"], std=0.02)  # type: ignore[arg-type]
        zeros = torch.zeros(nf, device=device, dtype=dtype)
        self.register_parameter("bias", nn.Parameter(zeros) if bias else None)
        self.weight_quantizer = None
        self.act_quantizers = None

    register_parameter = quant_register_parameter  # type: ignore[assignment]

    def __setattr__(self, name: str, value: Any) -> None:
        _check_new_weight(self, name, value)  # read-only once converted
        if name == "weight" and isinstance(value, nn.Parameter):
            # nn.Module would refuse: the class's `weight` property already exists
            self.register_parameter("weight", value)
            return
        super().__setattr__(name, value)

    @property
    def in_features(self) -> int:
        """``nx``, as an ``nn.Linear`` would say."""
        return self.nx

    @property
    def out_features(self) -> int:
        """``nf``, as an ``nn.Linear`` would say."""
        return self.nf

    @classmethod
    def from_float(cls, module: Any) -> QuantHFConv1D:
        """Wrap a ``Conv1D``, sharing its ``weight`` and ``bias`` parameters (no quantizers yet).

        Examples
        --------
        >>> from transformers.pytorch_utils import Conv1D
        >>> dense = Conv1D(6, 4)
        >>> QuantHFConv1D.from_float(dense).weight is dense.weight
        True
        """
        _check_conv1d(cls, module, "from_float")
        weight = module.weight
        new = cls(
            module.nf, module.nx, bias=module.bias is not None, device="meta", dtype=weight.dtype
        )
        new.weight = weight
        new.bias = module.bias
        return new.train(module.training)

    @property
    def converted(self) -> bool:
        """Whether the weight lives in a ``FrozenTensor`` (integer storage)."""
        return isinstance(self._modules.get("weight_quantizer"), FrozenTensor)

    def effective_weight(self) -> Tensor:
        """The ``(out, in)`` matrix the forward multiplies by (quantized when a quantizer is on).

        Examples
        --------
        >>> QuantHFConv1D(3, 2).effective_weight().shape
        torch.Size([3, 2])
        """
        weight = cast(Tensor, self._parameters["weight"])
        matrix = weight.mT if weight.ndim == 2 else weight  # an empty placeholder once converted
        quantizer = self._modules.get("weight_quantizer")
        return matrix if quantizer is None else cast(Tensor, quantizer(matrix))

    def forward(self, x: Tensor) -> Tensor:
        x = _act(self, "input", x)
        return _act(self, "output", F.linear(x, self.effective_weight(), self.bias))

    def to_float(self) -> nn.Module:
        """A ``transformers`` ``Conv1D``: the same parameters, or the dequantized weight.

        Examples
        --------
        >>> from transformers.pytorch_utils import Conv1D
        >>> dense = Conv1D(6, 4)
        >>> QuantHFConv1D.from_float(dense).to_float().weight is dense.weight
        True
        """
        if not self.converted:
            new = hf_conv1d_class()(self.nf, self.nx)
            new.weight = cast(nn.Parameter, self._parameters["weight"])
            if self.bias is not None:
                new.bias = self.bias
            return new.train(self.training)
        with torch.no_grad():
            return _new_conv1d(self.nf, self.nx, self.weight, self.bias).train(self.training)

    def extra_repr(self) -> str:
        return f"nf={self.nf}, nx={self.nx}, bias={self.bias is not None}"
