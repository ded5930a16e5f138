"""The entries of Hugging Face's ``Conv1D`` (GPT-2's projections), registered lazily.

``transformers.pytorch_utils.Conv1D`` is a Linear stored ``(in, out)``. Its
family (:data:`HF_CONV1D_KINDS`) is a
:class:`~tnquant.registry.entry.LazyKinds`: the registry builds the entries
with :func:`hf_conv1d_kinds` the first time it is asked while transformers
is loaded, so ``import tnquant`` never imports transformers and ``load``
never imports anything a file names. The entries:

- ``Conv1D``: dense, weight kind ``'linear'`` (data-aware with a Gram matrix,
  as ``nn.Linear``), ``transposed``: LowRank / TT / Tucker into
  ``LowRankHFConv1D`` / ``TTHFConv1D`` / ``TuckerHFConv1D``, quantized as
  ``QuantHFConv1D``;
- those four, standing for ``Conv1D`` (``load`` checks the base model holds
  a ``Conv1D`` of the saved ``nf``/``nx`` where one stood); no fixed-point
  export route (``export=None``).

Examples
--------
>>> from transformers.pytorch_utils import Conv1D
>>> from tnquant.registry import lookup
>>> kind = lookup(Conv1D(6, 4))
>>> kind.weight_kind, kind.transposed, kind.quantized.__name__
('linear', True, 'QuantHFConv1D')
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from torch import nn

from tnquant.layers.hf_conv1d import (
    HF_CONV1D,
    LowRankHFConv1D,
    QuantHFConv1D,
    TTHFConv1D,
    TuckerHFConv1D,
)
from tnquant.registry.entry import LayerKind, LazyKinds
from tnquant.registry.fields import BOOL, SIZE
from tnquant.registry.serialize import BuildContext, Handler, _dense, _dtype, linear_handler
from tnquant.specs import TT, LowRank, Tucker

__all__ = ["HF_CONV1D_KINDS", "hf_conv1d_kinds", "hf_linear_handler", "quant_hf_conv1d_handler"]

QHF_FIELDS = {"nf": SIZE, "nx": SIZE, "bias": BOOL}


def _expect_factorized(config: dict[str, Any]) -> dict[str, Any]:
    return {"nx": config["in_features"], "nf": config["out_features"]}


def hf_linear_handler(cls: Any, replaces: type[nn.Module]) -> Handler:
    """A factorized ``Conv1D`` class's handler: the Linear one, checking ``nf``/``nx`` on load.

    Examples
    --------
    >>> from transformers.pytorch_utils import Conv1D
    >>> hf_linear_handler(LowRankHFConv1D, Conv1D).expect({"in_features": 4, "out_features": 6})
    {'nx': 4, 'nf': 6}
    """
    return replace(linear_handler(cls, replaces), expect=_expect_factorized)


def quant_hf_conv1d_handler(replaces: type[nn.Module], cls: Any = QuantHFConv1D) -> Handler:
    """The handler of ``QuantHFConv1D`` (built as ``cls(nf, nx, bias=, device=, dtype=)``)."""

    def describe(layer: Any) -> dict[str, Any]:
        return {"nf": layer.nf, "nx": layer.nx, "bias": layer.bias is not None}

    def build(config: dict[str, Any], name: str, ctx: BuildContext) -> nn.Module:
        return cls(
            config["nf"],
            config["nx"],
            bias=config["bias"],
            device="meta",
            dtype=_dtype(cls, name, ctx),
        ).to_empty(device=ctx.device)

    def expect(config: dict[str, Any]) -> dict[str, Any]:
        return {"nf": config["nf"], "nx": config["nx"]}

    return _dense(cls, replaces, describe, build, expect, QHF_FIELDS)


def hf_conv1d_kinds(conv1d: type) -> tuple[LayerKind, ...]:
    """The entries of ``Conv1D`` (the class given) and of the four classes standing for it.

    Examples
    --------
    >>> from transformers.pytorch_utils import Conv1D
    >>> [(k.cls.__name__, k.role) for k in hf_conv1d_kinds(Conv1D)][:2]
    [('Conv1D', 'dense'), ('LowRankHFConv1D', 'factorized')]
    """
    if not (isinstance(conv1d, type) and issubclass(conv1d, nn.Module)):
        raise TypeError(f"conv1d must be the Conv1D class, got {conv1d!r}")
    factorized = {LowRank: LowRankHFConv1D, TT: TTHFConv1D, Tucker: TuckerHFConv1D}
    return (
        LayerKind(
            conv1d,
            "dense",
            conv1d,
            weight_kind="linear",
            factorize=factorized,
            quantized=QuantHFConv1D,
            transposed=True,
        ),
        *(
            LayerKind(cls, "factorized", conv1d, handler=hf_linear_handler(cls, conv1d))
            for cls in factorized.values()
        ),
        LayerKind(
            QuantHFConv1D,
            "quantized",
            conv1d,
            handler=quant_hf_conv1d_handler(conv1d),
            transposed=True,
        ),
    )


#: the pending family of ``transformers.pytorch_utils.Conv1D``
HF_CONV1D_KINDS = LazyKinds(
    HF_CONV1D, (LowRankHFConv1D, TTHFConv1D, TuckerHFConv1D, QuantHFConv1D), hf_conv1d_kinds
)
