"""Model -> a small IR of fixed-point ops (:class:`Op`), with every type derived.

The IR is a list of ops run in order, each reading the previous op's result
(or, in a graph traced with ``torch.fx``, the ops its ``inputs`` name: see
:mod:`tnquant.export.fx_graph`, with ``'add'``/``'concat'`` in
:mod:`tnquant.export.merge_ops`):

``'dense'``
    ``y = cast_result(bias + sum_i cast_accum(x_i * W[o, i]))``, as hls4ml's
    ``dense_latency`` kernel (see :mod:`tnquant.export.emulator`).
``'relu'``
    ``y = x if x > 0 else 0``, same type in and out (``nn.ReLU``).
``'clip'``
    ``y = cast_result(min(max(x, lo), hi))`` with ``lo``/``hi`` mantissas
    of the input type; same type in and out unless cast (``nn.ReLU6``,
    ``nn.Hardtanh``).
``'leaky_relu'``
    ``y = cast_result(x) if x > 0 else cast_result(alpha * x)``, the product
    exact, as hls4ml's ``leaky_relu`` (``nn.LeakyReLU``); the result type is
    derived lossless (``ap_fixed<Wx+Wa, Ix+Ia>``) or given.
``'tt'``
    A TT-matrix layer contracted core by core, right to left (core ``d-1``
    first); every step is a dot product per output element, as ``'dense'``.

``nn.Flatten(1, -1)``, ``nn.Identity`` and ``nn.Dropout`` add no op (the
chain is ``(batch, features)`` and the export is an inference graph). The
elementwise ops (their bounds, alpha's type and the slope snapping) are
described in :mod:`tnquant.export.elementwise`.

Types
-----
Weights and cores: the integer codes of their quantizer (a ``FixedPoint``
spec, or any symmetric spec whose scales are powers of two: the binary point
absorbs ``2^k``; per-channel exponents are aligned to the largest number of
fractional bits by exact left shifts, and the type is as wide as the aligned
mantissas reach, at least the codes' own width; see :mod:`tnquant.export.codes`).
Accumulators ("auto", lossless, as hls4ml's ``infer_precision``): a
``W1.F1 x W2.F2`` product is
``ap_fixed<W1+W2, (W1+W2)-(F1+F2)>``; a sum of ``n`` of them adds
``ceil(log2 n)`` integer bits; a bias (aligned to the product's fractional
bits) adds one more bit above the larger of the two. Results default to the
accumulator type, so lossless widths add up along a chain; past 62 bits (the
int64 emulator's limit) the export stops with a ``ValueError`` naming the op,
the width and a ``result=`` for the op before it.
``accum=``/``result=``/``bias=`` override any of them
(their rounding and overflow modes are honoured). An activation quantizer
fixes a type (see :mod:`tnquant.export.acts`: ``FixedPoint`` or a frozen
power-of-two ``QuantSpec``): ``'output'``/``'inter_k'`` set that step's
result type; ``'input'`` sets the model input type (first layer, no
``input_spec``) or the result type of the op before the layer (a ReLU, clip
or LeakyReLU then casts after its arithmetic), where the torch model casts.
``result=`` names dense and TT steps and ``leaky_relu`` ops; ``relu`` and
``clip`` keep the type they read.

Biases are stored on their type's grid (the products' binary point, rounded
to nearest even, unless ``bias=`` gives another type), and a LeakyReLU's
slope as its ``alpha`` (at most 16 fractional bits); :func:`snap_biases`
sets the model's biases and slopes to those stored values, so that the torch
fake-quant model computes what the emulator does (``fixed_point`` does it by
default).

The IR (:class:`Op`, :func:`check_widths`) lives in
:mod:`tnquant.export.ir` and the per-route op builders (:data:`ROUTES`) in
:mod:`tnquant.export.routes`; this module walks the model and re-exports
them.

Examples
--------
>>> import torch
>>> from torch import nn
>>> from tnquant import FixedPoint, quantize
>>> model = nn.Sequential(nn.Linear(4, 3))
>>> _ = quantize(model, weights=FixedPoint(6, 2), progress=False)
>>> ops = build_graph(model, FixedPoint(8, 3))
>>> [(op.name, op.kind, str(op.accum_types[0])) for op in ops]
[('0', 'dense', 'ap_fixed<17,8>')]
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, cast

import numpy as np
import torch
from torch import Tensor, nn

from tnquant.export.batchnorm_ops import set_batchnorm
from tnquant.export.codes import MAX_WIDTH, fixed_codes, lossless_accum
from tnquant.export.conv1d_routes import CONV1D_ROUTES
from tnquant.export.conv_routes import CONV_ROUTES
from tnquant.export.elementwise import leaky_modules, set_slopes
from tnquant.export.fx_graph import needs_trace, trace_ops
from tnquant.export.ir import (
    AFFINE,
    ELEMENTWISE,
    KEEPS_MAP,
    SPATIAL,
    Op,
    TypeOverride,
    check_graph,
    check_widths,
    label,
    sources,
)
from tnquant.export.routes import ROUTES, Route, act_spec
from tnquant.registry import export_route
from tnquant.specs import FixedPoint

__all__ = [
    "Op",
    "TypeOverride",
    "ROUTES",
    "Route",
    "build_graph",
    "snap_biases",
    "set_biases",
    "set_slopes",
    "bias_params",
    "leaky_modules",
    "check_widths",
    "lossless_accum",
    "fixed_codes",
    "MAX_WIDTH",
]


# --------------------------------------------------------------------------- #
# walking the model
# --------------------------------------------------------------------------- #


def _leaves(model: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module]]:
    if isinstance(model, nn.Sequential):
        out = []
        for name, child in model.named_children():
            out += _leaves(child, f"{prefix}.{name}" if prefix else name)
        return out
    return [(prefix, model)]


def _take_input_type(name: str, given: FixedPoint, state: dict[str, Any], done: list[Op]) -> None:
    """Make ``given`` (a layer's ``'input'`` quantizer type) the type reaching that layer.

    The torch model casts there, so the op before takes ``given`` as its
    result type: a ReLU, clip or LeakyReLU (whose result was not given with
    ``result=``) then casts after its arithmetic (as hls4ml's activations
    assign to their ``res_T``); a dense/TT op casts its accumulator once.
    """
    if state["type"] is None:
        state["type"] = given
        state["explicit"] = True
        return
    if state["type"] == given:
        return
    prev = done[-1] if done else None
    casts_after = prev is not None and prev.kind in ELEMENTWISE and prev.result_derived[-1]
    if prev is None or (not casts_after and state["explicit"]):
        what = "input_spec" if prev is None else f"the result type of op {prev.name!r}"
        raise ValueError(
            f"{name}.input quantizer {given} differs from {what} ({state['type']}), which is "
            f"set too; the export casts once per op: drop one of them, or make them equal"
        )
    prev.result_type = given
    prev.step_types[-1:] = [given]
    prev.result_derived[-1:] = [False]
    state["type"] = given
    state["explicit"] = True


def _check_input_shape(input_shape: Any) -> tuple[int, ...] | None:
    if input_shape is None:
        return None
    shape = tuple(input_shape) if isinstance(input_shape, (tuple, list)) else None
    if (
        shape is None
        or len(shape) not in (1, 2, 3)
        or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in shape)
    ):
        raise ValueError(
            f"input_shape must be (C, H, W), (C, L) or (features,) of positive ints, got "
            f"{input_shape!r}"
        )
    return shape


def _check_flat(name: str, route: str | None, state: dict[str, Any], done: list[Op]) -> None:
    """A dense layer reads a flat chain: refuse one right after a feature map."""
    if state["shape"] is not None and route in ("dense", "lowrank", "tucker", "tt"):
        raise ValueError(
            f"{label(name)}: a Linear layer reads flat features, but a (C, H, W) = "
            f"{tuple(state['shape'])} feature map reaches it; put an nn.Flatten() before it"
        )


def _check_size(name: str, new: list[Op], done: list[Op], shape: tuple[int, ...] | None) -> None:
    """With spatial ops (or an input_shape), every op must read what the one before writes."""
    if not new or new[0].kind in ELEMENTWISE:
        return
    if not done:
        if shape is not None and new[0].in_features != math.prod(shape):
            raise ValueError(
                f"{label(name)}: the layer takes {new[0].in_features} features, but "
                f"input_shape={shape} gives {math.prod(shape)}"
            )
        return
    if any(op.kind in SPATIAL for op in done) and new[0].in_features != done[-1].out_features:
        raise ValueError(
            f"{label(name)}: the layer takes {new[0].in_features} features, but "
            f"{done[-1].out_features} reach it (the output of op {done[-1].name!r}"
            f"{', a feature map ' + str(done[-1].out_shape) if done[-1].out_shape else ''})"
        )


def _module_ops(
    name: str,
    module: nn.Module,
    state: dict[str, Any],
    overrides: dict[str, TypeOverride],
    done: list[Op],
) -> list[Op]:
    """The ops of one leaf module, by its registry entry's export route (updates ``state``)."""
    key = export_route(module) or ""
    route = ROUTES.get(key) or CONV_ROUTES.get(key) or CONV1D_ROUTES.get(key)
    if route is not None and route[0]:
        first_in = act_spec(module, "input", name)
        if first_in is not None:
            _take_input_type(name, first_in, state, done)
    if state["type"] is None:
        raise ValueError(
            "input_spec is needed (a FixedPoint for the model input), e.g. "
            "input_spec=FixedPoint(16, 6)"
        )
    if route is None:
        raise ValueError(
            f"{label(name)}: {type(module).__name__} has no fixed-point export; "
            f"supported: QuantLinear, LowRankLinear, TuckerLinear (order 1), "
            f"TTLinear, QuantConv2d (groups 1 or depthwise), TuckerConv2d, CPConv2d, "
            f"QuantConv1d, TuckerConv1d, nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.LeakyReLU, "
            f"nn.MaxPool1d/2d, nn.AvgPool1d/2d, nn.Flatten, nn.Identity, nn.Dropout"
        )
    return route[1](name, module, state, overrides, done)


def _leaf_ops(
    name: str,
    module: nn.Module,
    state: dict[str, Any],
    overrides: dict[str, TypeOverride],
    done: list[Op],
    *,
    shape: tuple[int, ...] | None,
) -> list[Op]:
    """The ops of one leaf reading the result of ``done[-1]``, checked against it."""
    route = export_route(module)
    if route == "skip":
        return []
    _check_flat(name, route, state, done)
    new = _module_ops(name, module, state, overrides, done)
    _check_size(name, new, done, shape)
    return new


def build_graph(
    model: nn.Module,
    input_spec: FixedPoint | None = None,
    *,
    accum: TypeOverride = None,
    result: TypeOverride = None,
    bias: TypeOverride = None,
    input_shape: tuple[int, ...] | None = None,
) -> list[Op]:
    """Turn a quantized model into a list of fixed-point :class:`Op` s.

    Parameters
    ----------
    model
        An ``nn.Sequential`` (nested ones are flattened), any other module
        ``torch.fx`` traces (residual adds, concatenations: see
        :mod:`tnquant.export.fx_graph`), or a single layer of
        ``QuantLinear``, ``LowRankLinear``, ``TuckerLinear`` (order 1),
        ``TTLinear``, ``nn.ReLU``, ``nn.ReLU6``, ``nn.Hardtanh`` and
        ``nn.LeakyReLU`` (``nn.Flatten(1, -1)``, ``nn.Identity`` and
        ``nn.Dropout`` add no op). Every weight/core needs a ``FixedPoint``
        or power-of-two quantizer (fake-quant or converted).
    input_spec
        The input type; may be left out when the first layer has a
        ``FixedPoint`` ``'input'`` activation quantizer.
    accum, result, bias
        A ``FixedPoint`` for every op, or a mapping from globs on op names
        (``'<layer>'`` for one-step layers, ``'<layer>.<k>'`` for step ``k``
        of a chain) to ``FixedPoint``; first match wins.
    input_shape
        ``(C, H, W)`` of one input sample, needed when the model starts with
        a convolution or pooling (``QuantConv2d``, ``nn.MaxPool2d``,
        ``nn.AvgPool2d``: see :mod:`tnquant.export.conv_routes`); the input
        is then ``(batch, C*H*W)``, flat in torch's channels-first order.
        ``(n,)`` or ``None``: a flat input.

    Returns
    -------
    list of Op

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from tnquant import FixedPoint, quantize
    >>> from tnquant.layers import LowRankLinear
    >>> model = nn.Sequential(LowRankLinear([torch.randn(4, 2), torch.randn(2, 5)]))
    >>> _ = quantize(model, cores=FixedPoint(8, 3), progress=False)
    >>> [op.name for op in build_graph(model, FixedPoint(8, 2))]
    ['0.0', '0.1']
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if input_spec is not None and not isinstance(input_spec, FixedPoint):
        raise TypeError(f"input_spec must be a FixedPoint, got {type(input_spec).__name__}")
    overrides = {"accum": accum, "result": result, "bias": bias}
    shape = _check_input_shape(input_shape)
    state: dict[str, Any] = {"type": input_spec, "explicit": input_spec is not None, "prev": None}
    maps = {3: shape, 2: shape and (shape[0], 1, shape[-1])}  # (C, L): a (C, 1, L) map
    state.update(shape=maps.get(len(shape) if shape else 0), flat=bool(shape))
    ops: list[Op] = []
    leaves = _leaves(model)
    if needs_trace(model, leaves):  # a graph: torch.fx (tnquant.export.fx_graph)
        size = math.prod(shape) if shape else None
        ops = trace_ops(model, dict(state), overrides, partial(_leaf_ops, shape=shape), size)
        leaves = []
    for name, module in leaves:
        route = export_route(module)
        new = _leaf_ops(name, module, state, overrides, ops, shape=shape)
        ops += new
        if route == "flatten" or any(op.kind not in KEEPS_MAP for op in new):
            state.update(shape=None, flat=True)  # a Flatten or a dense layer
    if not ops:
        raise ValueError("the model has no layer to export")
    src = sources(ops)
    for k, op in enumerate(ops):
        if op.kind in ELEMENTWISE:
            size = ops[src[k][0]].out_features if src[k][0] >= 0 else 0
            if size == 0:
                raise ValueError(
                    f"{label(op.name)}: a {op.kind} op needs a layer before it (its size "
                    f"comes from that layer's out_features)"
                )
            op.in_features = op.out_features = size
    check_graph(ops)
    check_widths(ops)
    return ops


def bias_params(model: nn.Module, ops: list[Op]) -> list[tuple[Op, Tensor]]:
    """``(op, the bias parameter of its layer)`` for every op of ``ops`` with a bias.

    Examples
    --------
    >>> from tnquant import FixedPoint, quantize
    >>> model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1, bias=False))
    >>> _ = quantize(model, weights=FixedPoint(6, 2), progress=False)
    >>> ops = build_graph(model, FixedPoint(8, 3))
    >>> [(op.name, tuple(p.shape)) for op, p in bias_params(model, ops)]
    [('0', (3,))]
    """
    out = []
    for op in ops:
        if op.bias is None or op.bias_type is None or op.kind in AFFINE:
            continue  # a BatchNorm's shift: set_batchnorm
        param = cast("Tensor | None", model.get_submodule(op.layer)._parameters.get("bias"))
        if param is not None:
            out.append((op, param))
    return out


def set_biases(model: nn.Module, ops: list[Op]) -> dict[str, float]:
    """Copy the stored biases and slopes of ``ops`` (built from ``model``) into ``model``.

    :func:`snap_biases` with the graph already built (``fixed_point`` uses
    it): every bias of :func:`bias_params`, then every LeakyReLU's
    ``negative_slope`` (:func:`set_slopes`). Returns the largest change per
    layer.

    Examples
    --------
    >>> from tnquant import FixedPoint, quantize
    >>> model = nn.Sequential(nn.Linear(2, 1))
    >>> with torch.no_grad():
    ...     _ = model[0].bias.fill_(0.5)
    >>> _ = quantize(model, weights=FixedPoint(6, 2), progress=False)
    >>> set_biases(model, build_graph(model, FixedPoint(8, 3)))    # 0.5 is on the grid
    {'0': 0.0}
    """
    moved: dict[str, float] = {}
    for op, param in bias_params(model, ops):
        mant, btype = cast(np.ndarray, op.bias), cast(FixedPoint, op.bias_type)  # both set
        value = torch.from_numpy(np.ldexp(mant.astype(np.float64), -btype.frac))
        with torch.no_grad():
            before = param.detach().to(torch.float64).clone()
            param.copy_(value.reshape(param.shape).to(param.device))
            after = param.detach().to(torch.float64)
            moved[op.layer] = float((after - before).abs().max()) if param.numel() else 0.0
    moved.update(set_slopes(model, ops))
    for op in ops:
        if op.kind in AFFINE:
            moved[op.layer] = set_batchnorm(model.get_submodule(op.layer), op)
    return moved


def snap_biases(
    model: nn.Module,
    input_spec: FixedPoint | None = None,
    *,
    accum: TypeOverride = None,
    result: TypeOverride = None,
    bias: TypeOverride = None,
    input_shape: tuple[int, ...] | None = None,
) -> dict[str, float]:
    """Set every bias and LeakyReLU slope of the exported layers to what the export stores.

    ``input_spec``, ``accum``, ``result``, ``bias`` and ``input_shape`` are
    :func:`build_graph`'s (a model that starts with a convolution needs
    ``input_shape``).

    The export keeps a bias as a mantissa of its type (``bias=``, else the
    products' fractional bits, rounded to nearest even and saturated):
    ``value = mantissa * 2^-frac``, and a LeakyReLU's ``negative_slope`` as
    its ``alpha`` (exact on at most 16 fractional bits, else the nearest
    such value: see :mod:`tnquant.export.elementwise`). A bias or slope off
    its grid is the one number the emulator rounds and the torch fake-quant
    model does not; once snapped (in place), the model (run in float64, on
    inputs it quantizes to the input type itself or that are already on it)
    equals :meth:`IntegerModel.predict` bit for bit. Snapping again changes nothing.

    Parameters
    ----------
    model
        The quantized model, as for :func:`build_graph`; its bias parameters
        are overwritten (``torch.no_grad``; device and dtype kept: a float32
        bias whose mantissa has more than 24 significant bits becomes the
        nearest float32, so exactness needs float64); the ``negative_slope``
        of its LeakyReLUs is set too (a Python float).
    input_spec, accum, result, bias
        As for :func:`build_graph` and :func:`tnquant.export.fixed_point`:
        the types decide the grid, so give the same ones as to the export.

    Returns
    -------
    dict of str to float
        Per layer with a bias or a slope, the largest change made (``0.0``:
        already on the grid).

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from tnquant import FixedPoint, quantize
    >>> model = nn.Sequential(nn.Linear(2, 1))
    >>> with torch.no_grad():
    ...     _ = model[0].bias.fill_(0.3)
    >>> _ = quantize(model, weights=FixedPoint(4, 1), progress=False)
    >>> moved = snap_biases(model, FixedPoint(6, 3))    # 3 + 3 fractional bits: 0.3 -> 19/64
    >>> {k: round(v, 6) for k, v in moved.items()}
    {'0': 0.003125}
    >>> model[0].bias.item() * 64
    19.0
    >>> snap_biases(model, FixedPoint(6, 3))
    {'0': 0.0}
    """
    ops = build_graph(
        model, input_spec, accum=accum, result=result, bias=bias, input_shape=input_shape
    )
    return set_biases(model, ops)
