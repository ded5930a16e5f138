"""Binary quantization ``alpha * sign(x)`` (BinaryConnect / XNOR-Net).

Codes are int8 in ``{-1, +1}`` with ``sign(0) = +1``; the scale ``alpha`` is
``mean|x|`` per tensor or per channel, the L2-optimal scale for fixed signs
(Rastegari et al. 2016, XNOR-Net, eq. 4). A block of zeros gets
``alpha = 0`` (its codes dequantize exactly to zeros). ``Binary(scale='pow2')``
rounds ``alpha`` to ``2^round(log2 alpha)`` (:func:`pow2_alpha`; 0 stays 0).

Gradients of :func:`binary_fake_quantize`
    * to ``x``: the clipped straight-through estimator of BinaryConnect
      (Courbariaux et al. 2015) and BNN (Hubara et al. 2016):
      ``grad * 1{|x| <= clip}`` with ``clip = 1`` by default — the hard-tanh
      STE of ``sign``, *not* multiplied by ``alpha``. Treating
      ``alpha * sign(x)`` as an approximation of ``x`` (as a uniform
      fake-quantizer's STE does) keeps gradient magnitudes independent of the
      weight scale; XNOR-Net's chain rule would multiply by ``alpha``
      (typically ~1e-2) and its reference code then rescales by ``n`` to undo
      that.
    * to ``alpha`` (when it requires grad, e.g. a learned scale):
      ``sum(grad * sign(x))`` over the elements sharing each ``alpha``.

Examples
--------
>>> import torch
>>> from tnquant.specs import Binary
>>> codes, qp = binary_quantize(torch.tensor([[0.5, -1.5], [0.0, -2.0]]), Binary())
>>> codes
tensor([[ 1, -1],
        [ 1, -1]], dtype=torch.int8)
>>> qp.scale
tensor([[1.]])
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from tnquant.quant.qparams import (
    QParams,
    all_finite,
    block_reduce_dims,
    block_size,
    qparam_shape,
    to_blocks,
)
from tnquant.quant.rounding import pow2_scale
from tnquant.specs import Binary

__all__ = [
    "binary_codes",
    "binary_scale",
    "binary_quantize",
    "binary_fake_quantize",
    "pow2_alpha",
    "wide_mean",
]

#: How ``scale='pow2'`` rounds a Binary/Ternary scale (see :func:`pow2_alpha`).
POW2_ROUNDING = "round"


def _check_float(x: Any, name: str, finite: bool = True) -> Tensor:
    """Type check; with ``finite`` also refuse NaN/Inf (a host sync: not in hot paths)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if not finite:
        return x
    if not all_finite(x):
        bad = ~torch.isfinite(x)
        raise ValueError(
            f"{name} must be finite, got {int(bad.sum())} NaN/Inf value(s) out of {x.numel()}"
        )
    return x


def _finite_flags(x: Tensor, name: str, *results: Tensor) -> list[bool]:
    """Refuse an empty or non-finite ``x``; say which of ``results`` are finite.

    One host sync for all of it: the (cheap) checks of the results ride along
    with the check of ``x``.
    """
    if x.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)}); nothing to quantize")
    lo, hi = torch.aminmax(x.detach())
    flags = torch.stack(
        [torch.isfinite(lo) & torch.isfinite(hi)] + [torch.isfinite(r).all() for r in results]
    ).tolist()
    if not flags[0]:
        _check_float(x, name)  # raises, with the count
    return flags[1:]


def pow2_alpha(alpha: Tensor) -> Tensor:
    """``alpha`` rounded to ``2^k``, ``k = round(log2 alpha)``, exactly, in ``alpha.dtype``.

    The rule of ``QuantSpec(scale='pow2', pow2_rounding='round')``
    (:func:`~tnquant.quant.rounding.pow2_scale`): nearest in the log domain,
    ``2^k`` for ``alpha`` in ``[2^(k-1/2), 2^(k+1/2))``. Not ``'ceil'``, the
    integer default, which exists so that a range is never clipped: binary and
    ternary codes have no range to clip. An ``alpha`` of 0 (an all-zero
    block) stays 0, so its weights stay exactly zero; a result past the
    dtype's range is capped at its largest power of two. Computed in at least
    float32 (a power of two in the dtype's range is exact in it).

    Examples
    --------
    >>> pow2_alpha(torch.tensor([0.3, 0.36, 0.25, 0.0, 3.0])).tolist()
    [0.25, 0.5, 0.25, 0.0, 4.0]
    >>> pow2_alpha(torch.tensor([0.7], dtype=torch.float16))
    tensor([0.5000], dtype=torch.float16)
    """
    wide = alpha.to(torch.promote_types(alpha.dtype, torch.float32))
    top = math.ldexp(1.0, math.frexp(torch.finfo(alpha.dtype).max)[1] - 1)
    p = pow2_scale(wide, POW2_ROUNDING).clamp(max=top)
    return torch.where(wide > 0, p, wide).to(alpha.dtype)


def binary_codes(x: Tensor) -> Tensor:
    """``sign(x)`` as int8 codes in ``{-1, +1}``, with ``sign(0) = +1``.

    Examples
    --------
    >>> binary_codes(torch.tensor([-0.2, 0.0, 3.0]))
    tensor([-1,  1,  1], dtype=torch.int8)
    """
    _check_float(x, "x")
    # arithmetic, not torch.where: where is ~10x slower than a compare on CPU
    return (x >= 0).to(torch.int8) * 2 - 1


def binary_scale(x: Tensor, spec: Binary) -> Tensor:
    """``alpha = mean|x|`` per block, in the qparam shape (keepdim-style).

    The block is the whole tensor (``'tensor'``) or every slice at one index
    of ``spec.axis`` (``'channel'``), as :func:`tnquant.quant.qparams.block_size`
    defines it. Accumulated in at least float32 (in float64 where that
    overflows: the mean of huge weights is finite even when their float32
    sum is not), returned in ``x.dtype``. With ``spec.scale == 'pow2'`` that
    ``alpha`` is then rounded by :func:`pow2_alpha`.

    Examples
    --------
    >>> w = torch.tensor([[1.0, -3.0], [0.5, 0.3]])
    >>> binary_scale(w, Binary(granularity="channel"))
    tensor([[2.0000],
            [0.4000]])
    >>> binary_scale(w, Binary(granularity="channel", scale="pow2"))
    tensor([[2.0000],
            [0.5000]])
    """
    if not isinstance(spec, Binary):
        raise TypeError(f"spec must be a Binary, got {type(spec).__name__}")
    _check_float(x, "x", finite=False)
    shape = tuple(x.shape)
    block = block_size(shape, spec.granularity, spec.axis)
    dims = block_reduce_dims(len(shape))

    blocks = to_blocks(x.to(torch.promote_types(x.dtype, torch.float32)).abs(), block)
    alpha = blocks.mean(dim=dims) if dims else blocks
    if not _finite_flags(x, "x", alpha)[0]:
        alpha = wide_mean(to_blocks(x.abs(), block), dims)
    alpha = alpha.reshape(qparam_shape(shape, block)).to(x.dtype)
    return pow2_alpha(alpha) if spec.scale == "pow2" else alpha


def wide_mean(blocks: Tensor, dims: tuple[int, ...]) -> Tensor:
    """Mean of non-negative ``blocks`` over ``dims`` that never overflows, in float64.

    Each block is divided by its maximum first, so even float64 values near
    their largest give a finite mean; the fallback where a plain sum overflows.

    Examples
    --------
    >>> big = torch.full((4,), 3e38)
    >>> float(wide_mean(big, (0,))) == float(torch.tensor(3e38))
    True
    """
    a = blocks.to(torch.float64)
    if not dims:
        return a
    top = a.amax(dim=dims, keepdim=True)
    top = torch.where(top > 0, top, torch.ones_like(top))
    return ((a / top).mean(dim=dims, keepdim=True) * top).reshape(
        [a.shape[d] for d in range(a.dim()) if d not in dims]
    )


def binary_quantize(x: Tensor, spec: Binary) -> tuple[Tensor, QParams]:
    """Binarize ``x``: int8 codes in ``{-1, +1}`` and ``QParams`` with ``scale = alpha``.

    Dequantize as ``codes * scale`` (the scale broadcasts: it has the qparam
    shape, ones except along the channel axis). ``zero_point`` is ``None``,
    ``qmin = -1``, ``qmax = 1``.

    Parameters
    ----------
    x
        A finite floating-point tensor.
    spec
        A :class:`~tnquant.specs.Binary` spec (granularity ``'tensor'`` or
        ``'channel'`` along ``spec.axis``).

    Returns
    -------
    codes, qparams

    Examples
    --------
    >>> w = torch.tensor([[1.0, -3.0], [0.5, -0.5]])
    >>> codes, qp = binary_quantize(w, Binary(granularity="channel"))
    >>> codes * qp.scale
    tensor([[ 2.0000, -2.0000],
            [ 0.5000, -0.5000]])
    """
    alpha = binary_scale(x, spec)
    shape = tuple(x.shape)
    qparams = QParams(
        scale=alpha,
        zero_point=None,
        qmin=-1,
        qmax=1,
        block_size=block_size(shape, spec.granularity, spec.axis),
        shape=shape,
        dtype=x.dtype,
    )
    return binary_codes(x), qparams


class _BinarySTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, alpha: Tensor, clip: float | None) -> Tensor:
        # x + 0 turns -0.0 into +0.0, so sign(0) = +1; ~10x faster than torch.where
        sign = torch.copysign(torch.ones((), dtype=x.dtype, device=x.device), x + 0)
        ctx.save_for_backward(x, sign)
        ctx.clip = clip
        ctx.alpha_shape = alpha.shape
        return alpha * sign

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        x, sign = ctx.saved_tensors
        grad_x = grad_alpha = None
        if ctx.needs_input_grad[0]:
            grad_x = grad if ctx.clip is None else grad * (x.abs() <= ctx.clip).to(grad.dtype)
        if ctx.needs_input_grad[1]:
            grad_alpha = (grad * sign).sum_to_size(ctx.alpha_shape)
        return grad_x, grad_alpha, None


def binary_fake_quantize(x: Tensor, alpha: Tensor, clip: float | None = 1.0) -> Tensor:
    """``alpha * sign(x)`` (``sign(0) = +1``) with straight-through gradients.

    Parameters
    ----------
    x
        A floating-point tensor (not checked for NaN: this runs every step).
    alpha
        Positive scale(s) broadcastable to ``x`` (e.g. the qparam-shaped
        ``qparams.scale``); may require grad (a learned scale).
    clip
        Gradient to ``x`` is passed where ``|x| <= clip`` and zeroed elsewhere
        (BinaryConnect's hard-tanh STE); ``None`` passes it everywhere.

    Returns
    -------
    A tensor of ``x``'s shape with values in ``{-alpha, alpha}``.

    Notes
    -----
    Backward: ``dL/dx = dL/dy * 1{|x| <= clip}`` (not scaled by ``alpha``,
    see the module docs); ``dL/dalpha = sum(dL/dy * sign(x))`` over the
    elements broadcast from each ``alpha``.

    Examples
    --------
    >>> x = torch.tensor([0.3, -2.0, 0.0], requires_grad=True)
    >>> a = torch.tensor(0.5, requires_grad=True)
    >>> y = binary_fake_quantize(x, a)
    >>> y.detach()
    tensor([ 0.5000, -0.5000,  0.5000])
    >>> (y * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    >>> x.grad, a.grad
    (tensor([1., 0., 3.]), tensor(2.))
    """
    _check_float(x, "x", finite=False)
    _check_float(alpha, "alpha", finite=False)
    try:
        out_shape = torch.broadcast_shapes(x.shape, alpha.shape)
    except RuntimeError:
        out_shape = None
    if out_shape != x.shape:
        raise ValueError(
            f"alpha must broadcast to x's shape {tuple(x.shape)}, got shape {tuple(alpha.shape)}"
        )
    if clip is not None and (isinstance(clip, bool) or not clip > 0):
        raise ValueError(f"clip must be a positive float or None, got {clip!r}")
    return _BinarySTE.apply(x, alpha, clip)
