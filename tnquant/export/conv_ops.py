"""Convolutions and pooling on int64 mantissas, as hls4ml's kernels compute them.

The arithmetic of one output element of a 2-D convolution is hls4ml's
``conv_2d_latency_cl`` (``nnet_conv2d_latency.h``): the accumulator starts
from the bias cast to ``accum_t``; every product of the patch is cast to
``accum_t`` and added in the order of the channels-last im2col buffer,
``(kh, kw, c)`` (``accum_t`` overflow after every add); the sum is cast to
the result type. :func:`conv2d` is :func:`~tnquant.export.emulator.contract_step`
on those patches, so the dense and the convolution arithmetic are one code
path. Zero padding enters as zero products (no change to the accumulator,
whatever its overflow mode). hls4ml's ``io_stream`` kernels
(``nnet_conv2d_stream.h``) sum the same products in another order, which
only matters for an accumulator that saturates: with a lossless or wrapping
accumulator every order gives the same bits (see :mod:`tnquant.export.hls`).
A depthwise convolution (:func:`depthwise2d`, ``groups == C``) is the same
arithmetic per channel over its ``kh*kw`` products, in ``(kh, kw)`` order
(``depthwise_conv_2d_latency_cl``, ``nnet_sepconv2d_latency.h``).

Pooling follows ``nnet_pooling.h``: max pooling is exact (the result keeps
the input type); average pooling sums the window exactly and divides by its
area, which tnquant takes only for areas that are powers of two, so the
mean is exact in a type with ``log2(area)`` more fractional bits
(:func:`avg_pool_type`); no rounding happens until the next cast.

Examples
--------
>>> import numpy as np
>>> from tnquant.specs import FixedPoint
>>> t = FixedPoint(8, 4)
>>> x = np.arange(16, dtype=np.int64).reshape(1, 1, 4, 4)
>>> w = np.ones((1, 1, 2, 2), dtype=np.int64)
>>> conv2d(x, w, t, t, FixedPoint(16, 8), FixedPoint(16, 8), stride=(2, 2)).tolist()
[[[[10, 18], [42, 50]]]]
>>> max_pool2d(x, (2, 2), (2, 2)).tolist()
[[[[5, 7], [13, 15]]]]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from tnquant.export.contract import contract_step, count
from tnquant.quant.fixed_point import apply_overflow, cast_mantissa
from tnquant.specs import FixedPoint

__all__ = [
    "conv2d",
    "depthwise2d",
    "run_spatial",
    "im2col",
    "max_pool2d",
    "avg_pool2d",
    "avg_pool_type",
    "conv_out_size",
]


def conv_out_size(size: int, kernel: int, stride: int, pad: int, dilation: int) -> int:
    """Output length of one spatial axis (as ``nn.Conv2d``).

    Examples
    --------
    >>> conv_out_size(8, 3, 1, 1, 1), conv_out_size(8, 3, 2, 0, 1)
    (8, 3)
    """
    return (size + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1


def im2col(
    x: np.ndarray,
    kernel: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
) -> np.ndarray:
    """Patches ``(B, Ho*Wo, kh*kw*C)`` of ``x (B, C, H, W)``, each in ``(kh, kw, c)`` order.

    Examples
    --------
    >>> x = np.arange(8).reshape(1, 2, 2, 2)
    >>> im2col(x, (1, 2), (1, 1), (0, 0), (1, 1))[0, 0].tolist()   # (kw, c): x[c, 0, kw]
    [0, 4, 1, 5]
    """
    b, c, h, w = x.shape
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, stride, padding, dilation
    xp = np.zeros((b, c, h + 2 * ph, w + 2 * pw), dtype=x.dtype)
    xp[:, :, ph : ph + h, pw : pw + w] = x
    ho, wo = conv_out_size(h, kh, sh, ph, dh), conv_out_size(w, kw, sw, pw, dw)
    rows = np.arange(ho)[:, None] * sh + np.arange(kh)[None, :] * dh  # (ho, kh)
    cols = np.arange(wo)[:, None] * sw + np.arange(kw)[None, :] * dw  # (wo, kw)
    # (b, c, ho, kh, wo, kw) -> (b, ho, wo, kh, kw, c)
    patches = xp[:, :, rows[:, :, None, None], cols[None, None, :, :]]
    patches = patches.transpose(0, 2, 4, 3, 5, 1)
    return patches.reshape(b, ho * wo, kh * kw * c)


def conv2d(
    x: np.ndarray,
    w: np.ndarray,
    in_type: FixedPoint,
    w_type: FixedPoint,
    accum: FixedPoint,
    result: FixedPoint,
    bias: np.ndarray | None = None,
    bias_type: FixedPoint | None = None,
    *,
    stride: Sequence[int] = (1, 1),
    padding: Sequence[int] = (0, 0),
    dilation: Sequence[int] = (1, 1),
    stats: dict[str, int] | None = None,
) -> np.ndarray:
    """hls4ml's convolution of mantissas ``x (B, C, H, W)`` with ``w (O, C, kh, kw)``.

    Returns ``(B, O, Ho, Wo)`` mantissas of ``result`` (channels first, as torch).
    """
    b, _, h, wd = x.shape
    o, c, kh, kw = w.shape
    ho = conv_out_size(h, kh, stride[0], padding[0], dilation[0])
    wo = conv_out_size(wd, kw, stride[1], padding[1], dilation[1])
    patches = im2col(x, (kh, kw), stride, padding, dilation)  # (b, L, n)
    wm = w.transpose(0, 2, 3, 1).reshape(o, kh * kw * c)  # rows in (kh, kw, c) order
    flat = patches.reshape(b * ho * wo, kh * kw * c, 1)
    bias_col = None if bias is None else bias[:, None]
    y = contract_step(flat, wm, in_type, w_type, accum, result, bias_col, bias_type, stats)
    return y[..., 0].reshape(b, ho, wo, o).transpose(0, 3, 1, 2).copy()


def depthwise2d(
    x: np.ndarray,
    w: np.ndarray,
    in_type: FixedPoint,
    w_type: FixedPoint,
    accum: FixedPoint,
    result: FixedPoint,
    bias: np.ndarray | None = None,
    bias_type: FixedPoint | None = None,
    *,
    stride: Sequence[int] = (1, 1),
    padding: Sequence[int] = (0, 0),
    dilation: Sequence[int] = (1, 1),
    stats: dict[str, int] | None = None,
) -> np.ndarray:
    """hls4ml's depthwise convolution of ``x (B, C, H, W)`` with ``w (C, 1, kh, kw)``.

    Channel ``c`` of the output is channel ``c`` of the input convolved with
    ``w[c, 0]`` (``nn.Conv2d(C, C, k, groups=C)``), as hls4ml's
    ``depthwise_conv_2d_latency_cl`` (``nnet_sepconv2d_latency.h``): the
    accumulator starts from the bias cast to ``accum_t``, every product is
    cast to ``accum_t`` and added in ``(kh, kw)`` order, the sum is cast to
    the result type. Returns ``(B, C, Ho, Wo)`` mantissas of ``result``.

    Examples
    --------
    >>> t, acc = FixedPoint(8, 4), FixedPoint(16, 8)
    >>> x = np.arange(8, dtype=np.int64).reshape(1, 2, 2, 2)
    >>> w = np.array([[[[1, 1]]], [[[1, -1]]]])               # (2, 1, 1, 2)
    >>> depthwise2d(x, w, t, t, acc, acc)[0, :, :, 0].tolist()   # rows summed, differenced
    [[1, 5], [-1, -1]]
    """
    b, c, h, wd = x.shape
    _, _, kh, kw = w.shape
    ho = conv_out_size(h, kh, stride[0], padding[0], dilation[0])
    wo = conv_out_size(wd, kw, stride[1], padding[1], dilation[1])
    patches = im2col(x, (kh, kw), stride, padding, dilation).reshape(b * ho * wo, kh * kw, c)
    wm = w.reshape(c, kh * kw)
    frac = in_type.frac + w_type.frac
    shape = (b * ho * wo, c)
    if bias is None or bias_type is None:
        acc = np.zeros(shape, dtype=np.int64)
    else:
        count(stats, "accum", np.broadcast_to(bias, shape), bias_type.frac, accum)
        acc = np.broadcast_to(cast_mantissa(bias, bias_type.frac, accum), shape).copy()
    for j in range(kh * kw):
        prod = patches[:, j, :] * wm[:, j]
        count(stats, "accum", prod, frac, accum)
        total = acc + cast_mantissa(prod, frac, accum)
        count(stats, "accum", total, accum.frac, accum)
        acc = apply_overflow(total, accum)
    count(stats, "result", acc, accum.frac, result)
    y = np.asarray(cast_mantissa(acc, accum.frac, result), dtype=np.int64)
    return y.reshape(b, ho, wo, c).transpose(0, 3, 1, 2).copy()


def _windows(x: np.ndarray, kernel: Sequence[int], stride: Sequence[int]) -> np.ndarray:
    b, c, h, w = x.shape
    (kh, kw), (sh, sw) = kernel, stride
    ho, wo = (h - kh) // sh + 1, (w - kw) // sw + 1
    rows = np.arange(ho)[:, None] * sh + np.arange(kh)[None, :]
    cols = np.arange(wo)[:, None] * sw + np.arange(kw)[None, :]
    win = x[:, :, rows[:, :, None, None], cols[None, None, :, :]]  # (b, c, ho, kh, wo, kw)
    return win.transpose(0, 1, 2, 4, 3, 5).reshape(b, c, ho, wo, kh * kw)


def max_pool2d(x: np.ndarray, kernel: Sequence[int], stride: Sequence[int]) -> np.ndarray:
    """Max over every window (no padding): exact, the input's type kept."""
    return _windows(x, kernel, stride).max(axis=-1)


def avg_pool_type(in_type: FixedPoint, kernel: Sequence[int]) -> FixedPoint:
    """The exact type of a window mean: ``log2(area)`` more fractional bits, same range.

    Raises ``ValueError`` for an area that is not a power of two (its mean has
    no finite binary expansion: hls4ml would round it in ``accum_t``).

    Examples
    --------
    >>> str(avg_pool_type(FixedPoint(8, 3), (2, 2)))
    'ap_fixed<10,3>'
    """
    area = math.prod(kernel)
    shift = area.bit_length() - 1
    if area != 1 << shift:
        raise ValueError(
            f"average pooling over {area} values is exact only for a power-of-two area "
            f"(kernel {tuple(kernel)}); use a 2x2 / 4x4 window or max pooling"
        )
    return FixedPoint(in_type.width + shift, in_type.integer, signed=in_type.signed)


def avg_pool2d(x: np.ndarray, kernel: Sequence[int], stride: Sequence[int]) -> np.ndarray:
    """Window sums: the mean's mantissas in :func:`avg_pool_type` (exact)."""
    return _windows(x, kernel, stride).sum(axis=-1)


def _pool_cast(
    op: Any, y: np.ndarray, exact: FixedPoint, stats: dict[str, int] | None
) -> np.ndarray:
    """A pool's exact result (of type ``exact``) cast to its result type when that differs
    (the next layer's 'input' quantizer set it: hls4ml assigns the pooled value to res_T)."""
    if op.result_type == exact:
        return y
    if stats is not None:
        count(stats, "result", y, exact.frac, op.result_type)
    return np.asarray(cast_mantissa(y, exact.frac, op.result_type), dtype=np.int64)


def run_spatial(op: Any, x: np.ndarray, stats: dict[str, int] | None = None) -> np.ndarray:
    """Run a spatial op (:data:`~tnquant.export.ir.SPATIAL`) on flat ``(B, C*H*W)`` mantissas.

    The maps are ``(B, C, H, W)`` inside and flat (channels first, as torch's
    ``Flatten``) on both sides; the batch goes in blocks of bounded size.

    Examples
    --------
    >>> from tnquant.export.ir import Op
    >>> t = FixedPoint(8, 4)
    >>> op = Op("p", "maxpool2d", "p", 4, 1, t, t, in_shape=(1, 2, 2), out_shape=(1, 1, 1),
    ...         params={"kernel": (2, 2), "stride": (2, 2)})
    >>> run_spatial(op, np.array([[1, 5, -3, 2]])).tolist()
    [[5]]
    """
    p = op.params
    out_size = math.prod(op.out_shape)
    if op.kind in ("conv2d", "depthwise2d", "conv1d"):
        n = int(op.weights[0][0].size) * (op.in_shape[0] if op.kind == "depthwise2d" else 1)
        rows = max(1, (1 << 22) // max(1, n * out_size))
    else:
        rows = max(1, (1 << 22) // max(1, x.shape[1] * 4))
    outs = []
    for s in range(0, x.shape[0], rows):
        maps = x[s : s + rows].reshape(-1, *op.in_shape)
        if op.kind in ("conv2d", "conv1d"):  # a (C, L) map is (C, 1, L), its kernel (O, C, 1, k)
            y = conv2d(
                maps, op.weights[0], op.input_type, op.weight_types[0], op.accum_types[0],
                op.result_type, op.bias, op.bias_type, stride=p["stride"],
                padding=p["padding"], dilation=p["dilation"], stats=stats,
            )  # fmt: skip
        elif op.kind == "depthwise2d":
            y = depthwise2d(
                maps, op.weights[0], op.input_type, op.weight_types[0], op.accum_types[0],
                op.result_type, op.bias, op.bias_type, stride=p["stride"],
                padding=p["padding"], dilation=p["dilation"], stats=stats,
            )  # fmt: skip
        elif op.kind in ("maxpool2d", "maxpool1d"):
            y = _pool_cast(op, max_pool2d(maps, p["kernel"], p["stride"]), op.input_type, stats)
        elif op.kind in ("avgpool2d", "avgpool1d"):
            exact = avg_pool_type(op.input_type, p["kernel"])
            y = _pool_cast(op, avg_pool2d(maps, p["kernel"], p["stride"]), exact, stats)
        else:
            raise ValueError(f"op {op.name!r}: {op.kind!r} is not a spatial op kind")
        outs.append(y.reshape(len(maps), out_size))
    return np.concatenate(outs, axis=0) if outs else np.zeros((0, out_size), np.int64)
