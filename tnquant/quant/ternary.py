"""Ternary quantization to ``{-alpha_n, 0, alpha_p}`` (TWN and TTQ).

TWN (Li et al. 2016, "Ternary Weight Networks"), per block (tensor or
channel): ``delta = threshold * mean|x|`` and
``alpha = mean(|x| where |x| > delta)``; codes are ``+1`` where
``x > delta``, ``-1`` where ``x < -delta``, ``0`` elsewhere. When no element
of a block exceeds ``delta`` (only possible for ``threshold >= 1`` or an
all-zero block) ``alpha`` falls back to ``max|x|`` of the block (0 for zeros);
nothing divides by zero.

TTQ (Zhu et al. 2017, "Trained Ternary Quantization"): the same threshold,
a positive scale ``alpha_p`` and a negative-side scale ``alpha_n`` (a
positive number: negative codes dequantize to ``-alpha_n``), both learned and
initialised from TWN's ``alpha``.

``Ternary(scale='pow2')`` rounds ``alpha`` (TTQ: each learned scale) to
``2^round(log2 alpha)`` (:func:`~tnquant.quant.binary.pow2_alpha`; 0 stays 0);
``delta`` is TWN's either way.

Gradients of :func:`ternary_fake_quantize` (TTQ, eqs. 7-8)
    * to ``x``: ``alpha_p * grad`` where ``x > delta``, ``grad`` where
      ``|x| <= delta``, ``alpha_n * grad`` where ``x < -delta``;
    * to ``alpha_p``: ``sum(grad)`` over ``x > delta``;
    * to ``alpha_n``: ``-sum(grad)`` over ``x < -delta`` (the output there is
      ``-alpha_n``; the paper writes the sum without the sign);
    * none to ``delta`` (a threshold).

Examples
--------
>>> import torch
>>> from tnquant.specs import Ternary
>>> codes, qp = ternary_quantize(torch.tensor([1.0, -0.1, -2.0, 0.2]), Ternary())
>>> codes, qp.scale
(tensor([ 1,  0, -1,  0], dtype=torch.int8), tensor([1.5000]))
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from tnquant.quant.binary import _check_float, _finite_flags, pow2_alpha
from tnquant.quant.qparams import QParams, block_reduce_dims, block_size, qparam_shape, to_blocks
from tnquant.specs import Ternary

__all__ = ["twn_params", "ternary_codes", "ternary_quantize", "ternary_fake_quantize"]


def _check_spec(spec: Any) -> Ternary:
    if not isinstance(spec, Ternary):
        raise TypeError(f"spec must be a Ternary, got {type(spec).__name__}")
    return spec


def twn_params(x: Tensor, spec: Ternary) -> tuple[Tensor, Tensor]:
    """TWN threshold and scale per block: ``(delta, alpha)`` in the qparam shape.

    ``delta = spec.threshold * mean|x|``, ``alpha = mean(|x| where |x| > delta)``
    (``max|x|`` of the block when no element exceeds ``delta``). Both have
    the qparam shape (ones except along the channel axis), so they broadcast
    against ``x``; accumulated in at least float32 (in float64, overflow-free,
    where that overflows: huge weights keep their codes) and returned in
    ``x.dtype``, ``delta`` capped at the dtype's largest value (no element
    exceeds it either way). With ``spec.scale == 'pow2'`` ``alpha`` is then
    rounded by :func:`~tnquant.quant.binary.pow2_alpha` (``delta`` is not).

    Examples
    --------
    >>> w = torch.tensor([[1.0, -2.0, 0.1, 0.0], [0.5, 0.5, -0.5, 0.5]])
    >>> delta, alpha = twn_params(w, Ternary(granularity="channel"))
    >>> delta.flatten(), alpha.flatten()
    (tensor([0.5425, 0.3500]), tensor([1.5000, 0.5000]))
    >>> twn_params(w, Ternary(granularity="channel", scale="pow2"))[1].flatten()
    tensor([2.0000, 0.5000])
    """
    _check_spec(spec)
    _check_float(x, "x", finite=False)
    shape = tuple(x.shape)
    block = block_size(shape, spec.granularity, spec.axis)
    out_shape = qparam_shape(shape, block)
    acc = torch.promote_types(x.dtype, torch.float32)
    top = torch.finfo(x.dtype).max
    dims = block_reduce_dims(len(shape))
    if not dims:  # a 0-d tensor is its own block, and alpha = |x| either way
        _finite_flags(x, "x")
        a = x.to(acc).abs()
        delta, alpha = (spec.threshold * a).clamp(max=top).to(x.dtype), a.to(x.dtype)
    else:
        delta, alpha = _twn(to_blocks(x.to(acc).abs(), block), dims, spec.threshold, wide=False)
        if not all(_finite_flags(x, "x", delta, alpha)):
            delta, alpha = _twn(to_blocks(x.abs(), block), dims, spec.threshold, wide=True)
        delta = delta.reshape(out_shape).clamp(max=top).to(x.dtype)
        alpha = alpha.reshape(out_shape).to(x.dtype)
    return delta, (pow2_alpha(alpha) if spec.scale == "pow2" else alpha)


def _twn(a: Tensor, dims: tuple[int, ...], threshold: float, wide: bool) -> tuple[Tensor, Tensor]:
    """``(delta, alpha)`` of the blocks ``a = |x|`` (keepdim shapes).

    ``wide``: in float64, every mean taken over values divided by the block's
    maximum, so nothing overflows (the fallback where the plain sums do).
    """
    fallback = a.amax(dim=dims, keepdim=True)
    if wide:
        a, fallback = a.to(torch.float64), fallback.to(torch.float64)
        unit = torch.where(fallback > 0, fallback, torch.ones_like(fallback))
        delta = threshold * ((a / unit).mean(dim=dims, keepdim=True) * unit)
    else:
        unit = None
        delta = threshold * a.mean(dim=dims, keepdim=True)
    above = a > delta
    count = above.sum(dim=dims, keepdim=True)
    total = ((a if unit is None else a / unit) * above).sum(dim=dims, keepdim=True)
    mean_above = total / count.clamp(min=1)
    if unit is not None:
        mean_above = mean_above * unit
    return delta, torch.where(count > 0, mean_above, fallback)


def ternary_codes(x: Tensor, delta: Tensor) -> Tensor:
    """int8 codes: ``+1`` where ``x > delta``, ``-1`` where ``x < -delta``, else ``0``.

    Examples
    --------
    >>> ternary_codes(torch.tensor([0.5, -0.5, 0.2, -0.2]), torch.tensor(0.3))
    tensor([ 1, -1,  0,  0], dtype=torch.int8)
    """
    _check_float(x, "x")
    # arithmetic on masks, not nested torch.where (several times slower on CPU)
    return (x > delta).to(torch.int8) - (x < -delta).to(torch.int8)


def ternary_quantize(x: Tensor, spec: Ternary) -> tuple[Tensor, QParams]:
    """Ternarize ``x``: int8 codes in ``{-1, 0, 1}`` and their ``QParams``.

    ``qparams.scale`` is TWN's ``alpha`` (the positive side); for
    ``method='ttq'`` ``qparams.scale_neg`` is the negative-side scale,
    initialised to the same ``alpha`` (a separate tensor), else ``None``.
    Dequantize: ``scale`` where ``codes > 0``, ``-scale_neg`` (or ``-scale``)
    where ``codes < 0``, ``0`` elsewhere. ``qmin = -1``, ``qmax = 1``.

    Parameters
    ----------
    x
        A finite floating-point tensor.
    spec
        A :class:`~tnquant.specs.Ternary` spec.

    Returns
    -------
    codes, qparams

    Examples
    --------
    >>> w = torch.tensor([[1.0, -2.0, 0.1, 0.0], [0.5, 0.5, -0.5, 0.5]])
    >>> codes, qp = ternary_quantize(w, Ternary(granularity="channel", method="ttq"))
    >>> codes
    tensor([[ 1, -1,  0,  0],
            [ 1,  1, -1,  1]], dtype=torch.int8)
    >>> qp.scale.flatten(), qp.scale_neg.flatten()
    (tensor([1.5000, 0.5000]), tensor([1.5000, 0.5000]))
    """
    delta, alpha = twn_params(x, spec)
    shape = tuple(x.shape)
    qparams = QParams(
        scale=alpha,
        zero_point=None,
        qmin=-1,
        qmax=1,
        block_size=block_size(shape, spec.granularity, spec.axis),
        shape=shape,
        dtype=x.dtype,
        scale_neg=alpha.clone() if spec.method == "ttq" else None,
    )
    return ternary_codes(x, delta), qparams


class _TernarySTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, delta: Tensor, alpha_p: Tensor, alpha_n: Tensor) -> Tensor:
        pos = x > delta
        neg = x < -delta
        ctx.save_for_backward(pos, neg, alpha_p, alpha_n)
        # exact: alpha_p - 0, 0 - alpha_n or 0 - 0 (masks are 0/1)
        return pos.to(x.dtype) * alpha_p - neg.to(x.dtype) * alpha_n

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Any, ...]:
        pos, neg, alpha_p, alpha_n = ctx.saved_tensors
        grad_x = grad_p = grad_n = None
        p, n = pos.to(grad.dtype), neg.to(grad.dtype)
        if ctx.needs_input_grad[0]:
            # alpha_p on the positive region, alpha_n on the negative one, 1 in between
            factor = 1 + p * (alpha_p.to(grad.dtype) - 1) + n * (alpha_n.to(grad.dtype) - 1)
            grad_x = grad * factor
        if ctx.needs_input_grad[2]:
            grad_p = (grad * p).sum_to_size(alpha_p.shape)
        if ctx.needs_input_grad[3]:
            grad_n = -(grad * n).sum_to_size(alpha_n.shape)
        return grad_x, None, grad_p, grad_n


def ternary_fake_quantize(x: Tensor, delta: Tensor, alpha_p: Tensor, alpha_n: Tensor) -> Tensor:
    """``alpha_p`` where ``x > delta``, ``-alpha_n`` where ``x < -delta``, else 0.

    Parameters
    ----------
    x
        A floating-point tensor (values are not checked: this runs every step).
    delta
        Threshold(s) >= 0 broadcastable to ``x`` (e.g. from :func:`twn_params`).
    alpha_p, alpha_n
        Positive scales broadcastable to ``x``; ``alpha_n`` is the magnitude of
        the negative level. Either may require grad (TTQ).

    Returns
    -------
    A tensor of ``x``'s shape.

    Notes
    -----
    Backward as TTQ (see the module docs): ``dL/dx`` is ``alpha_p * g``,
    ``g`` or ``alpha_n * g`` in the positive, zero and negative regions;
    ``dL/dalpha_p = sum(g)`` over the positive region; ``dL/dalpha_n =
    -sum(g)`` over the negative region, each reduced to the scale's shape.

    Examples
    --------
    >>> x = torch.tensor([0.9, -0.8, 0.1], requires_grad=True)
    >>> ap = torch.tensor(2.0, requires_grad=True)
    >>> an = torch.tensor(3.0, requires_grad=True)
    >>> y = ternary_fake_quantize(x, torch.tensor(0.5), ap, an)
    >>> y.detach()
    tensor([ 2., -3.,  0.])
    >>> y.sum().backward()
    >>> x.grad, ap.grad, an.grad
    (tensor([2., 3., 1.]), tensor(1.), tensor(-1.))
    """
    _check_float(x, "x", finite=False)
    for name, t in (("delta", delta), ("alpha_p", alpha_p), ("alpha_n", alpha_n)):
        _check_float(t, name, finite=False)
        try:
            ok = torch.broadcast_shapes(x.shape, t.shape) == x.shape
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(
                f"{name} must broadcast to x's shape {tuple(x.shape)}, got shape {tuple(t.shape)}"
            )
    return _TernarySTE.apply(x, delta, alpha_p, alpha_n)
