"""Pure range estimators of one tensor: percentile, MSE, HQQ, and the dispatch by observer.

Split from :mod:`tnquant.quant.observers` (which re-exports every name): the
observers run these on each batch; :func:`estimate_qparams` applies one to a
single tensor (a weight's dynamic qparams).

Examples
--------
>>> import torch
>>> from tnquant import QuantSpec
>>> lo, hi = estimate_range(torch.tensor([-3.0, 1.0]), QuantSpec())
>>> lo.item(), hi.item()
(-3.0, 1.0)
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from tnquant.quant.hqq import hqq_range
from tnquant.quant.primitives import (
    block_minmax,
    choose_qparams,
    compute_dtype,
    qparams_from_range,
    spec_block_size,
)
from tnquant.quant.qparams import QParams, block_reduce_dims, qparam_shape, to_blocks
from tnquant.quant.ranges import NonFiniteRange, count_nonfinite
from tnquant.quant.rounding import uniform_codes, uniform_values
from tnquant.specs import QuantSpec

__all__ = ["percentile_range", "mse_range", "hqq_range", "estimate_range", "estimate_qparams"]


# --------------------------------------------------------------------------- #
# Pure range estimators
# --------------------------------------------------------------------------- #


def _finite_or_wide(value: Tensor, wide: Any) -> Tensor:
    """``value`` where finite, else ``wide()`` (the same formula in float64) cast back.

    Ranges of finite data stay finite: ``hi - lo`` or ``d * a + (1 - d) * b``
    can overflow the compute dtype where their result does not. Sync-free;
    ``wide`` runs on qparam-sized tensors only.
    """
    return torch.where(torch.isfinite(value), value, wide().to(value.dtype))


def _rows(x: Tensor, block: tuple[int, ...]) -> Tensor:
    """``x`` as ``(n_blocks, block_numel)``, blocks in qparam-shape order."""
    nd = x.dim()
    xb = to_blocks(x, block)
    perm = [2 * d for d in range(nd)] + [2 * d + 1 for d in range(nd)]
    return xb.permute(perm).reshape(-1, math.prod(block))


def _row_percentile(rows: Tensor, q: float) -> Tensor:
    """``numpy.percentile(rows, q, axis=1)`` (linear) via two ``kthvalue`` s."""
    n = rows.shape[1]
    pos = q / 100.0 * (n - 1)
    low = math.floor(pos)
    frac = pos - low
    v_low = rows.kthvalue(low + 1, dim=1).values
    if frac == 0 or low + 1 >= n:
        return v_low
    v_high = rows.kthvalue(low + 2, dim=1).values
    return _finite_or_wide(
        v_low + (v_high - v_low) * frac,
        lambda: v_low.double() + (v_high.double() - v_low.double()) * frac,
    )


def percentile_range(
    x: Tensor, block: tuple[int, ...], percentile: float, symmetric: bool
) -> tuple[Tensor, Tensor]:
    """Per-block clipping range from percentiles (linear interpolation, as numpy).

    Symmetric: ``(-a, a)`` with ``a`` the ``percentile``-th percentile of
    ``|x|``; affine: the ``(100 - percentile)``-th and ``percentile``-th
    percentiles of ``x``. Uses :meth:`torch.Tensor.kthvalue` (no size limit,
    unlike :func:`torch.quantile`).

    Examples
    --------
    >>> import torch
    >>> lo, hi = percentile_range(torch.arange(101.0), (101,), 90.0, symmetric=False)
    >>> lo.item(), hi.item()
    (10.0, 90.0)
    """
    if not 0 < percentile <= 100:
        raise ValueError(f"percentile must be in (0, 100], got {percentile}")
    qshape = qparam_shape(tuple(x.shape), block)
    rows = _rows(x.to(compute_dtype(x.dtype)), block)
    if symmetric:
        amax = _row_percentile(rows.abs(), percentile).reshape(qshape)
        return -amax, amax
    low = _row_percentile(rows, 100.0 - percentile).reshape(qshape)
    high = _row_percentile(rows, percentile).reshape(qshape)
    return low, high


def _block_mse(x: Tensor, lo: Tensor, hi: Tensor, spec: QuantSpec) -> Tensor:
    qp = qparams_from_range(lo, hi, spec, tuple(x.shape), x.dtype)
    xb = to_blocks(x, qp.block_size)
    zp = qp.expanded_zero_point()
    zp = None if zp is None else zp.to(xb.dtype)
    s = qp.expanded_scale()
    q, _ = uniform_codes(xb, s, zp, qp.qmin, qp.qmax)
    err = (uniform_values(q, s, zp) - xb).square()
    return err.mean(dim=block_reduce_dims(x.dim())).reshape(lo.shape)


def mse_range(
    x: Tensor, spec: QuantSpec, n_grid: int = 100, low: float = 0.3
) -> tuple[Tensor, Tensor]:
    """Per-block range ``(r * min, r * max)`` with the clip ratio ``r`` minimising MSE.

    ``r`` runs over ``n_grid`` values evenly spaced in ``[low, 1]`` (1
    included, so the result is never worse than min-max); ties keep the
    smaller ratio. Rounding is to nearest even for the search.

    Examples
    --------
    >>> import torch
    >>> from tnquant import QuantSpec
    >>> x = torch.cat([torch.linspace(-1, 1, 999), torch.tensor([20.0])])
    >>> lo, hi = mse_range(x, QuantSpec(bits=4))
    >>> hi.item() < 20
    True
    """
    if n_grid < 1 or not 0 < low <= 1:
        raise ValueError(f"need n_grid >= 1 and low in (0, 1], got n_grid={n_grid}, low={low}")
    x = x.detach().to(compute_dtype(x.dtype))
    mn, mx = block_minmax(x, spec_block_size(spec, tuple(x.shape)))
    ratios = torch.linspace(low, 1.0, n_grid, dtype=x.dtype, device=x.device)
    ratios[-1] = 1.0
    best_err = torch.full_like(mn, math.inf)
    best = torch.ones_like(mn)
    for i in range(n_grid):
        r = ratios[i]
        err = _block_mse(x, mn * r, mx * r, spec)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, r, best)
    return mn * best, mx * best


def estimate_range(x: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor]:
    """Per-block range of one tensor by ``spec.observer`` (EMA of one batch = min-max).

    Examples
    --------
    >>> import torch
    >>> from tnquant import QuantSpec
    >>> lo, hi = estimate_range(torch.tensor([-3.0, 1.0]), QuantSpec())
    >>> lo.item(), hi.item()
    (-3.0, 1.0)
    """
    x = x.detach()
    block = spec_block_size(spec, tuple(x.shape))
    if spec.observer == "percentile":
        return percentile_range(x, block, spec.percentile, spec.symmetric)
    if spec.observer == "mse":
        return mse_range(x, spec)
    if spec.observer == "hqq":
        return hqq_range(x, spec)
    cd = compute_dtype(x.dtype)
    lo, hi = block_minmax(x, block)
    return lo.to(cd), hi.to(cd)


def estimate_qparams(x: Tensor, spec: QuantSpec) -> QParams:
    """QParams of ``x`` with its range chosen by ``spec.observer``.

    Examples
    --------
    >>> import torch
    >>> from tnquant import QuantSpec
    >>> estimate_qparams(torch.tensor([-1.0, 1.0]), QuantSpec(bits=2)).scale.item()
    1.0
    """
    if spec.dtype is not None:
        return choose_qparams(x, spec)
    try:
        lo, hi = estimate_range(x, spec)
        return qparams_from_range(lo, hi, spec, tuple(x.shape), x.dtype)
    except NonFiniteRange:
        n_nan, n_inf = count_nonfinite(x)
        raise ValueError(
            f"tensor holds {n_nan} NaN and {n_inf} Inf value(s) out of "
            f"{x.numel()}; cannot choose a scale"
        ) from None
