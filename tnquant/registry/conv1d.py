"""The save/load handlers of the ``nn.Conv1d`` kinds: ``TuckerConv1d`` and ``QuantConv1d``.

Built as the Conv2d ones are (:mod:`tnquant.registry.serialize`), with the
1-D geometry: ``kernel_size``, ``stride``, ``dilation`` lists of one int,
``padding`` one int or ``'same'``/``'valid'``.

Examples
--------
>>> import torch
>>> from tnquant.layers.conv1d import TuckerConv1d
>>> layer = TuckerConv1d([torch.randn(4, 2), torch.randn(2, 2, 3), torch.randn(5, 2)], padding=1)
>>> config = conv1d_handler().describe(layer)
>>> config["kernel_size"], config["padding"], config["core_shapes"][1]
([3], [1], [2, 2, 3])
"""

from __future__ import annotations

from typing import Any

from torch import nn

from tnquant.layers.conv1d import QuantConv1d, TuckerConv1d
from tnquant.registry.fields import BOOL, MAX_DIM, NAME, SIZE, Field, is_int, show
from tnquant.registry.serialize import (
    BuildContext,
    Handler,
    _conv_build,
    _conv_geometry,
    _dense,
    _dtype,
    _factorized,
    _factorized_common,
    _padding,
)

__all__ = ["conv1d_handler", "quant_conv1d_handler", "CONV1D_FIELDS", "QCONV1D_FIELDS"]


def _one(value: Any, lo: int) -> bool:
    return isinstance(value, list) and len(value) == 1 and is_int(value[0], lo, MAX_DIM)


def _field(expected: str, ok: Any) -> Field:
    return Field(lambda v: None if ok(v) else f"must be {expected}, got {show(v)}")


ONE = _field("a list of 1 int in 1..2**40", lambda v: _one(v, 1))
PADDING1 = _field(
    "a list of 1 int in 0..2**40, 'same' or 'valid'", lambda v: _one(v, 0) or v in ("same", "valid")
)
CONV1D_FIELDS = {
    "in_channels": SIZE,
    "out_channels": SIZE,
    "kernel_size": ONE,
    "stride": ONE,
    "padding": PADDING1,
    "dilation": ONE,
    "padding_mode": NAME,
}
QCONV1D_FIELDS = {**CONV1D_FIELDS, "groups": SIZE, "bias": BOOL}


def _expect(config: dict[str, Any]) -> dict[str, Any]:
    return {
        "in_channels": config["in_channels"],
        "out_channels": config["out_channels"],
        "kernel_size": tuple(config["kernel_size"]),
        "stride": tuple(config["stride"]),
        "padding": _padding(config),
        "dilation": tuple(config["dilation"]),
        "padding_mode": config["padding_mode"],
        "groups": 1,
    }


def conv1d_handler(cls: Any = TuckerConv1d, replaces: type[nn.Module] = nn.Conv1d) -> Handler:
    """The handler of a factorized Conv1d class built as ``cls(cores, stride=, ...)``."""

    def describe(layer: Any) -> dict[str, Any]:
        return {**_factorized_common(layer), **_conv_geometry(layer)}

    return _factorized(cls, replaces, describe, _conv_build(cls), _expect, CONV1D_FIELDS)


def quant_conv1d_handler(cls: Any = QuantConv1d, replaces: type[nn.Module] = nn.Conv1d) -> Handler:
    """The handler of a quantized Conv1d class (``nn.Conv1d``'s constructor)."""

    def describe(layer: Any) -> dict[str, Any]:
        return {**_conv_geometry(layer), "groups": layer.groups, "bias": layer.bias is not None}

    def build(config: dict[str, Any], name: str, ctx: BuildContext) -> nn.Module:
        in_channels, out_channels, groups = (
            config["in_channels"],
            config["out_channels"],
            config["groups"],
        )
        if in_channels % groups or out_channels % groups:  # nn.Conv1d would raise
            raise ValueError(
                f"groups={groups} must divide in_channels={in_channels} and "
                f"out_channels={out_channels}"
            )
        return cls(
            in_channels,
            out_channels,
            tuple(config["kernel_size"]),
            stride=tuple(config["stride"]),
            padding=_padding(config),
            dilation=tuple(config["dilation"]),
            groups=groups,
            bias=config["bias"],
            padding_mode=config["padding_mode"],
            device="meta",
            dtype=_dtype(cls, name, ctx),
        ).to_empty(device=ctx.device)

    def expect(config: dict[str, Any]) -> dict[str, Any]:
        return {**_expect(config), "groups": config["groups"]}

    return _dense(cls, replaces, describe, build, expect, QCONV1D_FIELDS)
