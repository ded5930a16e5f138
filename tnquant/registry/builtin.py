"""The entries of tnquant's own layer kinds (the registry starts with these).

Examples
--------
>>> [k.cls.__name__ for k in BUILTIN if k.role == "dense"]
['Linear', 'Conv2d', 'Conv1d', 'Embedding']
"""

from __future__ import annotations

from torch import nn

from tnquant.layers import (
    CPConv2d,
    LowRankLinear,
    QuantConv1d,
    QuantConv2d,
    QuantEmbedding,
    QuantLinear,
    TTEmbedding,
    TTLinear,
    TuckerConv1d,
    TuckerConv2d,
    TuckerLinear,
)
from tnquant.quant.frozen import FrozenTensor
from tnquant.quant.quantizer import Quantizer
from tnquant.registry import serialize as s
from tnquant.registry.conv1d import conv1d_handler, quant_conv1d_handler
from tnquant.registry.entry import LayerKind, LazyKinds
from tnquant.registry.hf import HF_CONV1D_KINDS
from tnquant.specs import CP, TT, LowRank, Tucker

__all__ = ["BUILTIN", "LAZY", "conv_groups"]

_EMBEDDING_SITES = ("output",)  # an embedding's inputs are indices


def conv_groups(module: nn.Module) -> str | None:
    """Why a convolution cannot be factorized: the cores hold one dense channel map.

    A grouped or depthwise convolution is still quantized (per channel, like
    any other); only ``factorize`` refuses it, with this reason.

    Examples
    --------
    >>> conv_groups(nn.Conv2d(4, 4, 3, groups=2))  # doctest: +ELLIPSIS
    'groups=2 is not supported: a grouped convolution is quantized, not factorized ...'
    >>> conv_groups(nn.Conv1d(4, 4, 3, groups=4)).split(":")[1]
    ' a depthwise convolution is quantized, not factorized (the cores hold one dense channel map)'
    >>> conv_groups(nn.Conv2d(4, 4, 3)) is None
    True
    """
    groups = getattr(module, "groups", 1)
    if groups == 1:
        return None
    depthwise = groups == getattr(module, "in_channels", None)
    what = "depthwise" if depthwise else "grouped"
    return (
        f"groups={groups} is not supported: a {what} convolution is quantized, not "
        f"factorized (the cores hold one dense channel map)"
    )


BUILTIN: tuple[LayerKind, ...] = (
    # dense layers: what factorizes them, their quantized class
    LayerKind(
        nn.Linear,
        "dense",
        nn.Linear,
        weight_kind="linear",
        factorize={TT: TTLinear, Tucker: TuckerLinear, LowRank: LowRankLinear},
        quantized=QuantLinear,
        export="float",
    ),
    LayerKind(
        nn.Conv2d,
        "dense",
        nn.Conv2d,
        weight_kind="conv2d",
        factorize={Tucker: TuckerConv2d, CP: CPConv2d},
        refuse=conv_groups,
        quantized=QuantConv2d,
    ),
    LayerKind(
        nn.Conv1d,
        "dense",
        nn.Conv1d,
        weight_kind="conv1d",
        factorize={Tucker: TuckerConv1d},
        refuse=conv_groups,
        quantized=QuantConv1d,
    ),
    LayerKind(
        nn.Embedding,
        "dense",
        nn.Embedding,
        weight_kind="embedding",
        factorize={TT: TTEmbedding},
        quantized=QuantEmbedding,
        sites=_EMBEDDING_SITES,
    ),
    # factorized layers
    LayerKind(
        LowRankLinear,
        "factorized",
        nn.Linear,
        handler=s.linear_handler(LowRankLinear),
        export="lowrank",
    ),
    LayerKind(TTLinear, "factorized", nn.Linear, handler=s.linear_handler(TTLinear), export="tt"),
    LayerKind(
        TuckerLinear,
        "factorized",
        nn.Linear,
        handler=s.linear_handler(TuckerLinear),
        export="tucker",
    ),
    LayerKind(
        TuckerConv2d,
        "factorized",
        nn.Conv2d,
        handler=s.conv_handler(TuckerConv2d),
        export="tucker_conv2d",
    ),
    LayerKind(
        CPConv2d, "factorized", nn.Conv2d, handler=s.conv_handler(CPConv2d), export="cp_conv2d"
    ),
    LayerKind(
        TuckerConv1d, "factorized", nn.Conv1d, handler=conv1d_handler(), export="tucker_conv1d"
    ),
    LayerKind(
        TTEmbedding,
        "factorized",
        nn.Embedding,
        sites=_EMBEDDING_SITES,
        handler=s.embedding_handler(TTEmbedding),
    ),
    # quantized dense layers
    LayerKind(
        QuantLinear, "quantized", nn.Linear, handler=s.quant_linear_handler(), export="dense"
    ),
    LayerKind(QuantConv2d, "quantized", nn.Conv2d, handler=s.quant_conv_handler(), export="conv2d"),
    LayerKind(QuantConv1d, "quantized", nn.Conv1d, handler=quant_conv1d_handler(), export="conv1d"),
    LayerKind(
        QuantEmbedding,
        "quantized",
        nn.Embedding,
        sites=_EMBEDDING_SITES,
        handler=s.quant_embedding_handler(),
    ),
    # what sits in a quantizer slot, and the other modules the export walks
    LayerKind(Quantizer, "part", handler=s.QUANTIZER_HANDLER),
    LayerKind(FrozenTensor, "part", handler=s.FROZEN_HANDLER),
    LayerKind(nn.Identity, "part", handler=s.IDENTITY_HANDLER, export="skip"),
    LayerKind(nn.Dropout, "other", export="skip"),
    LayerKind(nn.ReLU, "other", export="relu"),
    LayerKind(nn.ReLU6, "other", export="clip"),
    LayerKind(nn.Hardtanh, "other", export="clip"),
    LayerKind(nn.LeakyReLU, "other", export="leaky_relu"),
    LayerKind(nn.PReLU, "other", export="prelu"),
    LayerKind(nn.BatchNorm1d, "other", export="batchnorm"),
    LayerKind(nn.BatchNorm2d, "other", export="batchnorm"),
    LayerKind(nn.Flatten, "other", export="flatten"),
    LayerKind(nn.MaxPool2d, "other", export="maxpool2d"),
    LayerKind(nn.AvgPool2d, "other", export="avgpool2d"),
    LayerKind(nn.MaxPool1d, "other", export="maxpool1d"),
    LayerKind(nn.AvgPool1d, "other", export="avgpool1d"),
    LayerKind(nn.AdaptiveAvgPool2d, "other", export="global_avgpool2d"),
    LayerKind(nn.AdaptiveAvgPool1d, "other", export="global_avgpool1d"),
    LayerKind(nn.Sigmoid, "other", export="sigmoid"),
    LayerKind(nn.Tanh, "other", export="tanh"),
    LayerKind(nn.Softmax, "other", export="softmax"),
)

#: families registered once their dense class is loaded (see :class:`LazyKinds`)
LAZY: tuple[LazyKinds, ...] = (HF_CONV1D_KINDS,)
