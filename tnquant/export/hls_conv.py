"""The hls4ml route of the spatial ops: ``Conv2D`` and ``Pooling2D`` layers, and the Flatten.

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

import numpy as np
import torch
from torch import nn

from tnquant.export.ir import ELEMENTWISE, SPATIAL, Op
from tnquant.specs import FixedPoint

__all__ = ["layer_ops", "spatial_module", "spatial_precision", "default_type", "input_shape"]

#: the widest default precision the chain gets (wider types are capped: a Transpose copies them)
MAX_DEFAULT_WIDTH = 64


def layer_ops(ops: list[Op]) -> list[Op | None]:
    """The ops in chain order, ``None`` where the chain has an ``nn.Flatten``."""
    out: list[Op | None] = []
    spatial = False
    for op in ops:
        if op.kind in SPATIAL:
            spatial = True
        elif spatial and op.kind not in ELEMENTWISE:
            out.append(None)
            spatial = False
        out.append(op)
    return out


def spatial_module(op: Op, value: Callable[[np.ndarray, FixedPoint], torch.Tensor]) -> nn.Module:
    """The float64 ``nn.Conv2d``/``nn.MaxPool2d``/``nn.AvgPool2d`` of a spatial op."""
    p = {k: (int(v[0]), int(v[1])) for k, v in op.params.items()}
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
    if op.kind == "conv2d":
        return {
            "weight": str(op.weight_types[0]),
            "bias": str(op.bias_type) if op.bias_type is not None else zero_bias,
            "accum": str(op.accum_types[0]),
            "result": str(op.result_type),
        }
    if op.kind == "maxpool2d":
        return {"accum": str(op.input_type), "result": str(op.result_type)}
    shift = op.result_type.frac - op.input_type.frac  # log2(area)
    r = op.result_type
    return {"accum": str(FixedPoint(r.width + shift, r.integer + shift)), "result": str(r)}


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
    """The input shape hls4ml takes: ``(C, H, W)`` for a spatial first op, else ``(n,)``."""
    return tuple(ops[0].in_shape) if ops[0].in_shape else (ops[0].in_features,)
