"""HQQ: half-quadratic fitting of an affine grid's zero point (and scale), no data.

Badri and Shaji 2023, "Half-Quadratic Quantization of Large Machine Learning
Models" (the HQQ blog/paper and its ``optimize_weights_proximal``): the
weight error is measured in an ``l_p`` norm, ``p < 1`` (robust to the
outliers that make min-max and MSE ranges too wide), and minimised by
splitting it with an auxiliary error ``W_e``; each iteration is

1. ``Q = clamp(round(W / s + z))`` and ``W_r = (Q - z) s``;
2. ``W_e = shrink_p(W - W_r, beta)``, the generalized soft threshold
   ``sign(e) max(|e| - |e|^(p-1) / beta, 0)``;
3. ``z = mean(Q - (W - W_e) / s)`` per block (closed form); with
   ``fit_scale`` (the variant that also moves the scale), then
   ``s = <Q - z, W - W_e> / <Q - z, Q - z>``;
4. ``beta *= kappa``.

tnquant stores integer zero points, so every iterate's zero point is
rounded and the grid kept is, per block, the one of least squared weight
error among min-max and the rounded iterates: never worse than min-max.
The result is a range ``(lo, hi)`` whose qparams
(:func:`~tnquant.quant.ranges.qparams_from_range`) are that scale and zero
point.

Examples
--------
>>> import torch
>>> from tnquant import QuantSpec
>>> x = torch.cat([torch.randn(255), torch.tensor([12.0])]).reshape(1, -1)
>>> lo, hi = hqq_range(x, QuantSpec(bits=4, symmetric=False))
>>> float(hi) < 12.0 or float(lo) > x.min()
True
"""

from __future__ import annotations

import torch
from torch import Tensor

from tnquant.quant.codebook import from_rows, to_rows
from tnquant.quant.qparams import qparam_shape
from tnquant.quant.ranges import compute_dtype, spec_block_size
from tnquant.specs import QuantSpec

__all__ = ["hqq_range", "shrink_lp"]


def shrink_lp(e: Tensor, beta: float, p: float) -> Tensor:
    """The generalized soft threshold of HQQ: ``sign(e) relu(|e| - |e|^(p-1) / beta)``.

    Examples
    --------
    >>> shrink_lp(torch.tensor([-2.0, 0.01, 3.0]), 10.0, 1.0).tolist()
    [-1.899999976158142, 0.0, 2.9000000953674316]
    """
    a = e.abs()
    return torch.sign(e) * torch.relu(a - a.clamp_min(1e-12).pow(p - 1) / beta)


def _fake(w: Tensor, s: Tensor, z: Tensor, qmin: int, qmax: int) -> tuple[Tensor, Tensor]:
    q = torch.round(w / s + z).clamp(qmin, qmax)
    return q, (q - z) * s


def hqq_range(
    x: Tensor,
    spec: QuantSpec,
    iters: int = 20,
    p: float = 0.7,
    beta: float = 10.0,
    kappa: float = 1.01,
    fit_scale: bool = True,
) -> tuple[Tensor, Tensor]:
    """Per-block range of an affine ``spec`` fitted by HQQ (see the module docs).

    Parameters
    ----------
    x
        The tensor (a weight); no data is needed.
    spec
        An affine (``symmetric=False``) integer ``QuantSpec``.
    iters, p, beta, kappa
        HQQ's iterations, ``l_p`` exponent, initial penalty and its growth
        (their published defaults).
    fit_scale
        Also update the scale in closed form each iteration.

    Examples
    --------
    >>> import torch
    >>> lo, hi = hqq_range(torch.tensor([[-1.0, 0.0, 0.5, 3.0]]), QuantSpec(2, symmetric=False))
    >>> lo.shape, bool(lo <= 0 <= hi)
    (torch.Size([1, 1]), True)
    """
    if spec.symmetric or spec.dtype is not None:
        raise ValueError(
            f"observer='hqq' fits the zero point of an affine integer grid: it needs "
            f"symmetric=False and dtype=None, got symmetric={spec.symmetric}, dtype={spec.dtype}"
        )
    shape = tuple(x.shape)
    block = spec_block_size(spec, shape)
    w = to_rows(x.detach().to(compute_dtype(x.dtype)), block)
    qmin, qmax = spec.qmin, spec.qmax
    lo = w.amin(dim=1, keepdim=True).clamp(max=0)
    hi = w.amax(dim=1, keepdim=True).clamp(min=0)
    s = (hi - lo) / (qmax - qmin)
    s = torch.where(s > 0, s, torch.ones_like(s))
    z = qmin - lo / s
    best_s, best_z = s, torch.round(z).clamp(qmin, qmax)
    best_err = (_fake(w, best_s, best_z, qmin, qmax)[1] - w).square().sum(dim=1, keepdim=True)
    for _ in range(iters):
        q, w_r = _fake(w, s, z, qmin, qmax)
        target = w - shrink_lp(w - w_r, beta, p)
        z = (q - target / s).mean(dim=1, keepdim=True)
        if fit_scale:
            d = q - z
            den = d.square().sum(dim=1, keepdim=True)
            new = (d * target).sum(dim=1, keepdim=True) / den.clamp_min(1e-30)
            s = torch.where((den > 0) & (new > 0), new, s)
        beta *= kappa
        zi = torch.round(z).clamp(qmin, qmax)
        err = (_fake(w, s, zi, qmin, qmax)[1] - w).square().sum(dim=1, keepdim=True)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s = torch.where(better, s, best_s)
        best_z = torch.where(better, zi, best_z)
    qshape = qparam_shape(shape, block)
    ones = (1,) * len(shape)
    lo_out = from_rows((qmin - best_z) * best_s, qshape, ones)
    hi_out = from_rows((qmax - best_z) * best_s, qshape, ones)
    return lo_out, hi_out
