"""The hls4ml route of the spatial ops: ``Conv2D``, ``DepthwiseConv2D``, ``Pooling2D``, Flatten.

:func:`layer_ops` lines the ops up with the modules of
:func:`~tnquant.export.hls.torch_chain`: a ``Flatten`` (``None``, no op: the
chain is flat, channels first, in the emulator) goes before the first
non-spatial, non-elementwise op after a feature map, because hls4ml names
it as a layer (a ``Reshape``). :func:`spatial_precision` gives the
precisions of a ``conv2d`` (as a dense layer) or a pool (max: the input
type; average: the window sum in ``log2(area)`` more integer bits, then the
exact mean, as ``tests/export/test_conv_ops.py`` checks against hls4ml's
C simulation). hls4ml adds ``Transpose`` layers (channels last) that take
the model's default precision, so :func:`default_type` is a type holding
every value of the network.

Examples
--------
>>> from tnquant.specs import FixedPoint
>>> t = FixedPoint(8, 3)
>>> pool = Op("1", "maxpool2d", "1", 16, 4, t, t, in_shape=(1, 4, 4), out_shape=(1, 2, 2))
>>> [None if op is None else op.name for op in layer_ops([pool, Op("2", "dense", "2", 4, 2, t, t)])]
['1', None, '2']
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tnquant.export.conv_ops import avg_pool_type
from tnquant.export.ir import CONVS, KEEPS_MAP, ONE_D, SPATIAL, Op
from tnquant.specs import FixedPoint

__all__ = [
    "layer_ops",
    "spatial_module",
    "spatial_precision",
    "default_type",
    "input_shape",
    "depthwise_class",
    "DEPTHWISE_CLASS",
]

#: the widest default precision the chain gets (wider types are capped: a Transpose copies them)
MAX_DEFAULT_WIDTH = 64


def layer_ops(ops: list[Op]) -> list[Op | None]:
    """The ops in chain order, ``None`` where the chain has an ``nn.Flatten``."""
    out: list[Op | None] = []
    spatial = False
    for op in ops:
        if op.kind in SPATIAL:
            spatial = True
        elif spatial and op.kind not in KEEPS_MAP:
            out.append(None)
            spatial = False
        out.append(op)
    return out


#: the class name hls4ml's PyTorch front end dispatches the depthwise module on
DEPTHWISE_CLASS = "TnqDepthwise2d"
_DEPTHWISE: dict[str, type[nn.Module]] = {}


def _depthwise_handler(
    operation: str,
    layer_name: str,
    input_names: list[str],
    input_shapes: list[list[Any]],
    node: Any,
    m: Any,
    reader: Any,
    config: Any,
) -> tuple[dict[str, Any], list[Any]]:
    """hls4ml's ``DepthwiseConv2D`` layer (channels first, depth multiplier 1) of the module."""
    _, c, h, w = input_shapes[0]
    (kh, kw), (sh, sw), (ph, pw) = m.kernel_size, m.stride, m.padding
    ho, wo = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    layer = {
        "name": layer_name, "inputs": input_names, "class_name": "DepthwiseConv2D",
        "data_format": "channels_first", "depthwise_data": m.weight.detach().numpy(),
        "bias_data": m.bias.detach().numpy() if m.bias is not None else np.zeros(c),
        "in_height": h, "in_width": w, "n_chan": c, "n_filt": c, "depth_multiplier": 1,
        "filt_height": kh, "filt_width": kw, "stride_height": sh, "stride_width": sw,
        "pad_top": ph, "pad_bottom": ph, "pad_left": pw, "pad_right": pw,
        "out_height": ho, "out_width": wo,
    }  # fmt: skip
    return layer, [input_shapes[0][0], c, ho, wo]


def depthwise_class() -> type[nn.Module]:
    """The leaf module hls4ml converts to its ``DepthwiseConv2D`` (registered on first use).

    hls4ml 1.3.0's PyTorch front end refuses ``nn.Conv2d(groups > 1)``, so a
    ``depthwise2d`` op goes through this ``HLS4MLModule`` (a leaf of hls4ml's
    tracer) and a handler that fills the layer as hls4ml's Keras front end does.
    """
    if DEPTHWISE_CLASS in _DEPTHWISE:
        return _DEPTHWISE[DEPTHWISE_CLASS]
    from hls4ml.converters.pytorch_to_hls import (
        get_supported_pytorch_layers,
        register_pytorch_layer_handler,
    )
    from hls4ml.utils.torch import HLS4MLModule

    class TnqDepthwise2d(HLS4MLModule):  # type: ignore[misc]
        """``nn.Conv2d(C, C, k, groups=C)`` in float64, as a leaf hls4ml converts."""

        def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, p: Any) -> None:
            super().__init__()
            self.weight = nn.Parameter(weight, requires_grad=False)
            self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
            self.kernel_size, self.stride, self.padding = p["kernel"], p["stride"], p["padding"]

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            groups = self.weight.shape[0]
            return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, groups=groups)

    if DEPTHWISE_CLASS not in get_supported_pytorch_layers():
        register_pytorch_layer_handler(DEPTHWISE_CLASS, _depthwise_handler)
    _DEPTHWISE[DEPTHWISE_CLASS] = TnqDepthwise2d
    return TnqDepthwise2d


def spatial_module(op: Op, value: Callable[[np.ndarray, FixedPoint], torch.Tensor]) -> nn.Module:
    """The float64 ``nn.Conv2d``/``nn.Conv1d`` or pooling module of a spatial op.

    A ``depthwise2d`` op is the :func:`depthwise_class` module (hls4ml's
    ``DepthwiseConv2D``), refused with the op's name for a dilation above 1,
    which that layer does not take.
    """
    p = {k: (int(v[0]), int(v[1])) for k, v in op.params.items()}
    if op.kind == "depthwise2d":
        if p["dilation"] != (1, 1):
            raise ValueError(
                f"op {op.name!r} (depthwise2d): dilation {p['dilation']} has no hls4ml route "
                f"(hls4ml's DepthwiseConv2D takes no dilation); the emulator runs it"
            )
        bias = None
        if op.bias is not None and op.bias_type is not None:
            bias = value(op.bias, op.bias_type)
        return depthwise_class()(value(op.weights[0], op.weight_types[0]), bias, p)
    if op.kind == "conv1d":  # the (C, 1, L) map's (O, C, 1, k) kernel as nn.Conv1d's (O, C, k)
        o, c, _, k = op.weights[0].shape
        conv1 = nn.Conv1d(
            c, o, k, stride=p["stride"][1], padding=p["padding"][1], dilation=p["dilation"][1],
            bias=op.bias is not None, dtype=torch.float64,
        )  # fmt: skip
        with torch.no_grad():
            conv1.weight.copy_(value(op.weights[0][:, :, 0, :], op.weight_types[0]))
            if conv1.bias is not None and op.bias is not None and op.bias_type is not None:
                conv1.bias.copy_(value(op.bias, op.bias_type))
        return conv1
    if op.kind == "maxpool1d":
        return nn.MaxPool1d(p["kernel"][1], p["stride"][1])
    if op.kind == "avgpool1d":
        return nn.AvgPool1d(p["kernel"][1], p["stride"][1])
    if op.kind == "maxpool2d":
        return nn.MaxPool2d(p["kernel"], p["stride"])
    if op.kind == "avgpool2d":
        return nn.AvgPool2d(p["kernel"], p["stride"])
    o, c, kh, kw = op.weights[0].shape
    conv = nn.Conv2d(
        c, o, (kh, kw), stride=p["stride"], padding=p["padding"], dilation=p["dilation"],
        bias=op.bias is not None, dtype=torch.float64,
    )  # fmt: skip
    with torch.no_grad():
        conv.weight.copy_(value(op.weights[0], op.weight_types[0]))
        if conv.bias is not None and op.bias is not None and op.bias_type is not None:
            conv.bias.copy_(value(op.bias, op.bias_type))
    return conv


def spatial_precision(op: Op, zero_bias: str) -> dict[str, str]:
    """hls4ml's ``Precision`` of a spatial op's layer."""
    if op.kind in CONVS:
        return {
            "weight": str(op.weight_types[0]),
            "bias": str(op.bias_type) if op.bias_type is not None else zero_bias,
            "accum": str(op.accum_types[0]),
            "result": str(op.result_type),
        }
    if op.kind in ("maxpool2d", "maxpool1d"):
        return {"accum": str(op.input_type), "result": str(op.result_type)}
    r = avg_pool_type(op.input_type, op.params["kernel"])  # the exact mean, then res_T
    shift = r.frac - op.input_type.frac  # log2(area)
    accum = FixedPoint(r.width + shift, r.integer + shift)
    return {"accum": str(accum), "result": str(op.result_type)}


def default_type(ops: list[Op]) -> FixedPoint:
    """A type holding every input and result of ``ops`` (integer and fractional bits' union).

    Examples
    --------
    >>> t, u = FixedPoint(8, 3), FixedPoint(8, 6)
    >>> str(default_type([Op("r", "relu", "r", 2, 2, t, u)]))   # 6 integer, 5 fractional bits
    'ap_fixed<11,6>'
    """
    types = [ops[0].input_type, *(t for op in ops for t in (*op.step_types, op.result_type))]
    integer = max(t.integer + (0 if t.signed else 1) for t in types)
    frac = max(t.frac for t in types)
    width = min(integer + frac, MAX_DEFAULT_WIDTH)
    return FixedPoint(width, integer)


def input_shape(ops: list[Op]) -> tuple[int, ...]:
    """The input shape hls4ml takes: ``(C, H, W)`` (``(C, L)`` for a 1-D op) for a spatial
    first op, else ``(n,)``."""
    if ops[0].kind in ONE_D:
        return (ops[0].in_shape[0], ops[0].in_shape[2])
    return tuple(ops[0].in_shape) if ops[0].in_shape else (ops[0].in_features,)
