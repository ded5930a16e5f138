"""Op builders of 2-D convolutions and pooling (``conv2d``, ``depthwise2d``, pools).

==================  ====================  ===============================================
route               modules               op
==================  ====================  ===============================================
``'conv2d'``        ``QuantConv2d``       ``conv2d``: hls4ml's ``Conv2D`` (channels-last
                    (``groups=1``, zero   im2col order, every product cast to the
                    padding)              accumulator), weights ``(O, C, kh, kw)``;
                    (``groups == C ==     ``depthwise2d``: hls4ml's ``DepthwiseConv2D``
                    O``: depthwise)       (per channel, ``(kh, kw)`` order), weights
                                          ``(C, 1, kh, kw)``; other groups refused
``'tucker_conv2d'``  ``TuckerConv2d``      three ``conv2d``: ``1x1`` ``U_in^T``, the core
                                          ``G`` (stride, padding, dilation), ``1x1``
                                          ``U_out`` + bias (``'<layer>.0'``..``'.2'``)
``'cp_conv2d'``     ``CPConv2d``          ``conv2d`` ``1x1`` ``A_in^T``, ``depthwise2d``
                                          ``kh x 1`` ``A_h`` and ``1 x kw`` ``A_w`` (the
                                          stride, padding, dilation of each axis),
                                          ``conv2d`` ``1x1`` ``A_out`` + bias
                                          (``'<layer>.0'``..``'.3'``)
``'global_avgpool2d'`` ``nn.Adaptive-   ``avgpool2d`` over the whole ``H x W`` map
                    AvgPool2d(1)``        (``H*W`` a power of two)
``'maxpool2d'``     ``nn.MaxPool2d``      ``maxpool2d``: exact, the input type kept
                    (no padding)
``'avgpool2d'``     ``nn.AvgPool2d``      ``avgpool2d``: the exact window mean, in
                    (no padding, area     :func:`~tnquant.export.conv_ops.avg_pool_type`
                    a power of two)       (``log2(area)`` more fractional bits)
==================  ====================  ===============================================

A spatial op reads and writes ``(C, H, W)`` feature maps, which the chain
carries flat in torch's channels-first order (``in_features = C*H*W``), so
an ``nn.ReLU`` after a convolution is the elementwise ``relu`` op and
``nn.Flatten`` stays a no-op. The walk keeps the current map shape in
``state['shape']`` (``None`` once flat: after a ``Flatten``); the first
layer's comes from ``input_shape=``. A convolution's types follow the dense
rules (:mod:`tnquant.export.graph`): the lossless accumulator of
``C*kh*kw`` products plus the bias, the result equal to it unless
``result=``/``accum=``/``bias=`` or an ``'output'`` quantizer give one.

Examples
--------
>>> sorted(CONV_ROUTES)
['avgpool2d', 'conv2d', 'cp_conv2d', 'global_avgpool2d', 'maxpool2d', 'tucker_conv2d']
"""

from __future__ import annotations

import math
from typing import Any, cast

from torch import Tensor, nn

from tnquant.export.codes import fixed_codes
from tnquant.export.conv_ops import avg_pool_type, conv_out_size
from tnquant.export.ir import Op, TypeOverride, label
from tnquant.export.routes import Route, typed_op
from tnquant.specs import FixedPoint

__all__ = ["CONV_ROUTES", "pair", "spatial_shape", "conv_op", "pool_op", "ONE_BY_ONE"]


def pair(value: Any, what: str, name: str) -> tuple[int, int]:
    """An int or a pair of ints as ``(h, w)``.

    Examples
    --------
    >>> pair(2, "stride", "0"), pair((1, 3), "kernel_size", "0")
    ((2, 2), (1, 3))
    """
    v = (value, value) if isinstance(value, int) else tuple(value)
    if len(v) != 2 or not all(isinstance(a, int) and not isinstance(a, bool) for a in v):
        raise ValueError(f"{label(name)}: {what} must be an int or a pair of ints, got {value!r}")
    return int(v[0]), int(v[1])


def spatial_shape(name: str, state: dict[str, Any], what: str) -> tuple[int, int, int]:
    """The ``(C, H, W)`` reaching layer ``name``, or a ``ValueError`` saying what is missing."""
    shape = state.get("shape")
    if shape is None:
        if state.get("flat"):
            raise ValueError(
                f"{label(name)}: a {what} needs a (C, H, W) feature map, but the chain is "
                f"flat here (after a Flatten or a Linear layer)"
            )
        raise ValueError(
            f"{label(name)}: a {what} needs the input's (C, H, W): pass input_shape=(C, H, W) "
            f"(e.g. input_shape=(1, 8, 8))"
        )
    return cast("tuple[int, int, int]", tuple(shape))


def _out_hw(
    name: str, shape: tuple[int, int, int], params: dict[str, tuple[int, ...]]
) -> tuple[int, int]:
    _, h, w = shape
    (kh, kw), (sh, sw) = params["kernel"], params["stride"]
    (ph, pw), (dh, dw) = params["padding"], params["dilation"]
    ho, wo = conv_out_size(h, kh, sh, ph, dh), conv_out_size(w, kw, sw, pw, dw)
    if ho < 1 or wo < 1:
        raise ValueError(
            f"{label(name)}: a {h}x{w} map is smaller than the {kh}x{kw} window "
            f"(dilation {dh}x{dw}, padding {ph}x{pw}); check input_shape"
        )
    return ho, wo


def _conv_kind(name: str, conv: nn.Conv2d) -> str:
    """``'conv2d'`` (``groups=1``) or ``'depthwise2d'`` (``groups == in == out channels``)."""
    groups = int(getattr(conv, "groups", 1))
    if groups == 1:
        return "conv2d"
    if groups == conv.in_channels == conv.out_channels:
        return "depthwise2d"
    raise ValueError(
        f"{label(name)}: a grouped convolution (groups={groups}, {conv.in_channels} -> "
        f"{conv.out_channels} channels) has no fixed-point export: only groups=1 and "
        f"depthwise (groups == in_channels == out_channels, hls4ml's DepthwiseConv2D "
        f"with depth multiplier 1)"
    )


def _conv_params(name: str, conv: nn.Conv2d) -> dict[str, tuple[int, ...]]:
    if conv.padding_mode != "zeros":
        raise ValueError(
            f"{label(name)}: padding_mode={conv.padding_mode!r} has no fixed-point export; "
            f"only zero padding (padding_mode='zeros')"
        )
    padding: Any = conv.padding
    if padding == "valid":
        padding = 0
    if isinstance(padding, str):
        raise ValueError(
            f"{label(name)}: padding={padding!r} has no fixed-point export; give the "
            f"padding as ints (e.g. padding=1 for a 3x3 'same')"
        )
    return {
        "kernel": pair(conv.kernel_size, "kernel_size", name),
        "stride": pair(conv.stride, "stride", name),
        "padding": pair(padding, "padding", name),
        "dilation": pair(conv.dilation, "dilation", name),
    }


def conv_op(
    name: str,
    op_name: str,
    module: nn.Module,
    site: str,
    codes: tuple[Any, FixedPoint, list[int]],
    notes: list[str],
    params: dict[str, tuple[int, ...]],
    out_channels: int,
    bias_param: Tensor | None,
    state: dict[str, Any],
    overrides: dict[str, TypeOverride],
    kind: str = "conv2d",
) -> Op:
    """One ``conv2d`` (types as a dense op over ``C*kh*kw`` products) or ``depthwise2d``
    (over ``kh*kw``, weights ``(C, 1, kh, kw)``) op; ``state`` moves on."""
    m = codes[0]
    shape = spatial_shape(name, state, "convolution")
    takes = m.shape[0] if kind == "depthwise2d" else m.shape[1]
    if shape[0] != takes:
        raise ValueError(
            f"{label(name)}: the convolution takes {takes} channels, but "
            f"{shape[0]} reach it (feature map {shape}); check input_shape"
        )
    ho, wo = _out_hw(name, shape, params)
    n = m.shape[1] * params["kernel"][0] * params["kernel"][1]
    out_shape = (out_channels, ho, wo)
    op = typed_op(
        kind,
        name,
        op_name,
        module,
        site,
        codes,
        notes,
        n,
        math.prod(shape),
        math.prod(out_shape),
        bias_param,
        state,
        overrides,
        in_shape=shape,
        out_shape=out_shape,
        params=params,
    )
    state["shape"] = out_shape
    return op


def conv2d_ops(
    name: str,
    module: nn.Module,
    state: dict[str, Any],
    overrides: dict[str, TypeOverride],
    done: list[Op],
) -> list[Op]:
    """The ``conv2d`` op of a ``QuantConv2d`` (types as a dense op, over ``C*kh*kw`` products)."""
    conv = cast(nn.Conv2d, module)
    kind = _conv_kind(name, conv)
    params = _conv_params(name, conv)
    q = module._modules.get("weight_quantizer")
    q = None if isinstance(q, nn.Identity) else q
    notes: list[str] = []
    codes = fixed_codes(q, cast(Tensor, conv.weight), f"{name}.weight", op=name, notes=notes)
    bias = cast("Tensor | None", module._parameters.get("bias"))
    args = (codes, notes, params, conv.out_channels, bias, state, overrides, kind)
    return [conv_op(name, name, module, "output", *args)]


ONE_BY_ONE: dict[str, tuple[int, ...]] = {
    "kernel": (1, 1), "stride": (1, 1), "padding": (0, 0), "dilation": (1, 1),
}  # fmt: skip


def tucker_conv2d_ops(
    name: str,
    module: nn.Module,
    state: dict[str, Any],
    overrides: dict[str, TypeOverride],
    done: list[Op],
) -> list[Op]:
    """A ``TuckerConv2d`` as three ``conv2d`` ops, as its forward: the ``1x1`` ``U_in^T``,
    the ``kh x kw`` core ``G`` (the layer's stride, padding, dilation), the ``1x1``
    ``U_out`` with the bias; ``'<layer>.0'``..``'.2'``, typed by ``inter_0``/``inter_1``
    quantizers like a Tucker Linear's steps."""
    layer = cast(Any, module)
    params = _conv_params(name, layer)
    u_out, g, u_in = layer.cores
    qs = module._modules.get("core_quantizers")
    quantizers = list(cast(nn.ModuleList, qs)) if qs is not None else [None] * 3
    ops = []
    plan = (
        (u_in, quantizers[2], 2, True, ONE_BY_ONE, "inter_0"),
        (g, quantizers[1], 1, False, params, "inter_1"),
        (u_out, quantizers[0], 0, False, ONE_BY_ONE, "output"),
    )
    for step, (core, q, k, transposed, p, site) in enumerate(plan):
        q = None if isinstance(q, nn.Identity) else q
        notes: list[str] = []
        m, wtype, exps = fixed_codes(q, core, f"{name}.cores.{k}", op=f"{name}.{step}", notes=notes)
        m = m.T.copy() if transposed else m
        m = m.reshape(*m.shape, 1, 1) if m.ndim == 2 else m
        bias = cast("Tensor | None", module._parameters.get("bias")) if step == 2 else None
        args = ((m, wtype, exps), notes, p, m.shape[0], bias, state, overrides)
        ops.append(conv_op(name, f"{name}.{step}", module, site, *args))
    return ops


def cp_conv2d_ops(
    name: str,
    module: nn.Module,
    state: dict[str, Any],
    overrides: dict[str, TypeOverride],
    done: list[Op],
) -> list[Op]:
    """A ``CPConv2d`` as its forward: ``conv2d`` ``1x1`` ``A_in^T``, ``depthwise2d``
    ``kh x 1`` ``A_h`` (stride, padding, dilation along H), ``depthwise2d`` ``1 x kw``
    ``A_w`` (along W), ``conv2d`` ``1x1`` ``A_out`` with the bias; ``'<layer>.0'``..``'.3'``,
    typed by the ``inter_0``..``inter_2`` quantizers."""
    layer = cast(Any, module)
    params = _conv_params(name, layer)
    a_out, a_in, a_h, a_w = layer.cores
    rank = int(a_out.shape[1])
    qs = module._modules.get("core_quantizers")
    quantizers = list(cast(nn.ModuleList, qs)) if qs is not None else [None] * 4
    (kh, kw), (sh, sw) = params["kernel"], params["stride"]
    (ph, pw), (dh, dw) = params["padding"], params["dilation"]
    along_h: dict[str, tuple[int, ...]] = {
        "kernel": (kh, 1),
        "stride": (sh, 1),
        "padding": (ph, 0),
        "dilation": (dh, 1),
    }
    along_w: dict[str, tuple[int, ...]] = {
        "kernel": (1, kw),
        "stride": (1, sw),
        "padding": (0, pw),
        "dilation": (1, dw),
    }
    plan: tuple[tuple[Any, int, tuple[int, ...], dict[str, tuple[int, ...]], str, str], ...] = (
        # (core, its quantizer index, the (O, C, kh, kw) shape of its mantissas, ...)
        (a_in, 1, (rank, -1, 1, 1), ONE_BY_ONE, "conv2d", "inter_0"),
        (a_h, 2, (rank, 1, kh, 1), along_h, "depthwise2d", "inter_1"),
        (a_w, 3, (rank, 1, 1, kw), along_w, "depthwise2d", "inter_2"),
        (a_out, 0, (-1, rank, 1, 1), ONE_BY_ONE, "conv2d", "output"),
    )
    ops = []
    for step, (core, k, shape, p, kind, site) in enumerate(plan):
        q = quantizers[k]
        q = None if isinstance(q, nn.Identity) else q
        notes: list[str] = []
        m, wtype, exps = fixed_codes(q, core, f"{name}.cores.{k}", op=f"{name}.{step}", notes=notes)
        m = (m if k == 0 else m.T).reshape(shape).copy()
        bias = cast("Tensor | None", module._parameters.get("bias")) if step == 3 else None
        codes = (m, wtype, exps)
        op_name = f"{name}.{step}"
        out = m.shape[0]
        ops.append(
            conv_op(name, op_name, module, site, codes, notes, p, out, bias, state, overrides, kind)
        )
    return ops


def _pool_params(name: str, module: nn.Module, cls: str) -> dict[str, tuple[int, ...]]:
    pool = cast(Any, module)
    kernel = pair(pool.kernel_size, "kernel_size", name)
    stride = kernel if pool.stride is None else pair(pool.stride, "stride", name)
    if pair(pool.padding, "padding", name) != (0, 0):
        raise ValueError(
            f"{label(name)}: {cls} with padding={pool.padding!r} has no fixed-point export "
            f"yet; only padding=0"
        )
    if pool.ceil_mode:
        raise ValueError(f"{label(name)}: {cls} with ceil_mode=True has no fixed-point export")
    if cls == "MaxPool2d" and (
        pair(pool.dilation, "dilation", name) != (1, 1) or pool.return_indices
    ):
        raise ValueError(
            f"{label(name)}: MaxPool2d with dilation or return_indices has no fixed-point export"
        )
    if cls == "AvgPool2d" and pool.divisor_override is not None:
        raise ValueError(
            f"{label(name)}: AvgPool2d with divisor_override has no fixed-point export"
        )
    return {"kernel": kernel, "stride": stride, "padding": (0, 0), "dilation": (1, 1)}


def _pool_ops(kind: str, cls: str) -> Route:
    def ops(
        name: str,
        module: nn.Module,
        state: dict[str, Any],
        overrides: dict[str, TypeOverride],
        done: list[Op],
    ) -> list[Op]:
        return pool_op(kind, name, _pool_params(name, module, cls), state)

    return ops


def _global_ops(
    name: str,
    module: nn.Module,
    state: dict[str, Any],
    overrides: dict[str, TypeOverride],
    done: list[Op],
) -> list[Op]:
    """``nn.AdaptiveAvgPool2d(1)``: the ``avgpool2d`` op of one ``H x W`` window (exact
    when ``H*W`` is a power of two)."""
    size = cast(Any, module).output_size
    if size not in (1, (1, 1)):
        raise ValueError(
            f"{label(name)}: AdaptiveAvgPool2d(output_size={size!r}) has no fixed-point "
            f"export; only output_size=1 (global average pooling)"
        )
    _, h, w = spatial_shape(name, state, "AdaptiveAvgPool2d")
    params: dict[str, tuple[int, ...]] = {
        "kernel": (h, w),
        "stride": (h, w),
        "padding": (0, 0),
        "dilation": (1, 1),
    }
    return pool_op("avgpool2d", name, params, state)


def pool_op(
    kind: str, name: str, params: dict[str, tuple[int, ...]], state: dict[str, Any]
) -> list[Op]:
    """The pooling op of layer ``name`` (max: the input type; average: the exact mean)."""
    shape = spatial_shape(name, state, kind)
    ho, wo = _out_hw(name, shape, params)
    in_type = state["type"]
    result = in_type
    if kind in ("avgpool2d", "avgpool1d"):
        try:
            result = avg_pool_type(in_type, params["kernel"])
        except ValueError as err:
            raise ValueError(f"{label(name)}: {err}") from None
    out_shape = (shape[0], ho, wo)
    op = Op(
        name, kind, name, math.prod(shape), math.prod(out_shape), in_type, result,
        step_types=[result], result_derived=[True], in_shape=shape, out_shape=out_shape,
        params=params,
    )  # fmt: skip
    state["explicit"] = False
    state["type"], state["prev"], state["shape"] = result, name, out_shape
    return [op]


#: export route name -> (takes an 'input' type, its ops), as :data:`~tnquant.export.routes.ROUTES`
CONV_ROUTES: dict[str, tuple[bool, Route]] = {
    "conv2d": (True, conv2d_ops),
    "tucker_conv2d": (True, tucker_conv2d_ops),
    "cp_conv2d": (True, cp_conv2d_ops),
    "maxpool2d": (False, _pool_ops("maxpool2d", "MaxPool2d")),
    "avgpool2d": (False, _pool_ops("avgpool2d", "AvgPool2d")),
    "global_avgpool2d": (False, _global_ops),
}
