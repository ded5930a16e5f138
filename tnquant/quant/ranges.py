"""Choosing quantization parameters: dtypes, checks, ranges -> scales.

The conventions are those of :mod:`tnquant.quant.primitives` (see its module
docs): ranges always contain 0, symmetric ``scale = amax / qmax``, affine
``scale = (hi - lo) / (qmax - qmin)`` with an integer zero point, degenerate
blocks get ``scale = 1``, pow2 scales by ``frexp``. Per-block scales span at
most :data:`SCALE_SPAN` octaves: a block whose range is below ``2^-24`` of the
tensor's largest block range is numerically zero, and takes the scale of that
bound instead of one as fine as its values (see :func:`qparams_from_range`).
"""

from __future__ import annotations

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
from tnquant.specs import FLOAT_DTYPES, QuantSpec

__all__ = [
    "code_dtype",
    "compute_dtype",
    "check_finite",
    "spec_block_size",
    "block_minmax",
    "qparams_from_range",
    "rebind_qparams",
    "cast_qparams",
    "count_nonfinite",
    "NonFiniteRange",
    "SCALE_SPAN",
]

#: octaves a per-block scale may lie below the tensor's coarsest (float32's significand)
SCALE_SPAN = 24

# --------------------------------------------------------------------------- #
# Dtypes and checks
# --------------------------------------------------------------------------- #


def code_dtype(qmin: int, qmax: int) -> torch.dtype:
    """Smallest signed integer dtype holding ``[qmin, qmax]``.

    Examples
    --------
    >>> code_dtype(-8, 7), code_dtype(0, 255), code_dtype(0, 65535)
    (torch.int8, torch.int16, torch.int32)
    """
    for dtype in (torch.int8, torch.int16, torch.int32):
        info = torch.iinfo(dtype)
        if info.min <= qmin and qmax <= info.max:
            return dtype
    return torch.int64


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The float dtype quantization arithmetic runs in: at least float32.

    Examples
    --------
    >>> import torch
    >>> compute_dtype(torch.bfloat16), compute_dtype(torch.float64)
    (torch.float32, torch.float64)
    """
    if not dtype.is_floating_point:
        raise TypeError(f"expected a floating point dtype, got {dtype}")
    return torch.promote_types(dtype, torch.float32)


def check_finite(x: Tensor, name: str = "tensor") -> None:
    """Raise ``TypeError`` for a non-float ``x`` and ``ValueError`` for NaN/Inf.

    Examples
    --------
    >>> import torch
    >>> check_finite(torch.ones(3), "w")
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating point tensor, got dtype {x.dtype}")
    if x.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)}); nothing to quantize")
    if not all_finite(x):
        n_nan, n_inf = count_nonfinite(x)
        raise ValueError(
            f"{name} contains {n_nan + n_inf} NaN or Inf value(s) ({n_nan} NaN, "
            f"{n_inf} Inf, out of {x.numel()}); expected finite values"
        )


def count_nonfinite(x: Tensor) -> tuple[int, int]:
    """How many NaN and how many +-Inf values ``x`` holds.

    Examples
    --------
    >>> import torch
    >>> count_nonfinite(torch.tensor([float("nan"), 1.0, -float("inf"), float("inf")]))
    (1, 2)
    """
    x = x.detach()
    return int(torch.isnan(x).sum()), int(torch.isinf(x).sum())


class NonFiniteRange(ValueError):
    """A range (``min_val``/``max_val``) holding NaN or Inf: the data it came from did.

    Distinct from a finite range whose scale overflows, so callers holding the
    data can say how many of its values were NaN or Inf.
    """


def spec_block_size(spec: QuantSpec, shape: tuple[int, ...]) -> tuple[int, ...]:
    """``block_size`` of ``spec`` for a tensor of ``shape`` (whole tensor for casts).

    Examples
    --------
    >>> from tnquant import QuantSpec
    >>> spec_block_size(QuantSpec(granularity=("group", 4), axis=-1), (2, 8))
    (1, 4)
    """
    if spec.dtype is not None:
        return tuple(shape)
    return block_size(tuple(shape), spec.granularity, spec.axis)


def block_minmax(x: Tensor, block: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """Per-block minimum and maximum of ``x``, each of the qparam shape.

    Examples
    --------
    >>> import torch
    >>> lo, hi = block_minmax(torch.tensor([[1.0, -2.0], [3.0, 4.0]]), (1, 2))
    >>> lo.tolist(), hi.tolist()
    ([[-2.0], [3.0]], [[1.0], [4.0]])
    """
    xb = to_blocks(x, block)
    dims = block_reduce_dims(x.dim())
    lo, hi = torch.amin(xb, dim=dims), torch.amax(xb, dim=dims)
    shape = qparam_shape(tuple(x.shape), block)
    return lo.reshape(shape), hi.reshape(shape)


# --------------------------------------------------------------------------- #
# Choosing qparams
# --------------------------------------------------------------------------- #


def _finalize_scale(scale: Tensor, spec: QuantSpec) -> Tensor:
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    scale = scale.clamp_min(torch.finfo(scale.dtype).tiny)
    if spec.scale == "pow2":
        scale = pow2_scale(scale, spec.pow2_rounding)
    return scale


def _check_range(lo: Tensor, hi: Tensor, scale: Tensor, spec: QuantSpec) -> None:
    """One host sync: refuse a non-finite range, then a scale that overflows."""
    ok_range, ok_scale = torch.stack(
        [torch.isfinite(lo).all() & torch.isfinite(hi).all(), torch.isfinite(scale).all()]
    ).tolist()
    if not ok_range:
        bad = int((~(torch.isfinite(lo) & torch.isfinite(hi))).sum())
        nan = bool(torch.isnan(lo).any() | torch.isnan(hi).any())
        raise NonFiniteRange(
            f"min_val/max_val hold {'NaN' if nan else 'Inf'} in {bad} of "
            f"{lo.numel()} block(s): the tensor they came from held NaN or "
            f"Inf values; cannot choose a scale"
        )
    if not ok_scale:
        kind = "power-of-two scale" if spec.scale == "pow2" else "scale"
        raise ValueError(
            f"the range of the tensor overflows its dtype: the {kind} of "
            f"{spec.bits}-bit codes for [{float(lo.min()):.6g}, "
            f"{float(hi.max()):.6g}] is beyond {scale.dtype}'s largest value "
            f"{torch.finfo(scale.dtype).max:.6g}; cannot choose a scale"
        )


def cast_qparams(
    shape: tuple[int, ...], dtype: torch.dtype, device: Any, spec: QuantSpec
) -> QParams:
    cast = FLOAT_DTYPES[spec.dtype]
    info = torch.finfo(cast)
    ones = torch.ones((1,) * len(shape), dtype=compute_dtype(dtype), device=device)
    return QParams(
        ones, None, int(info.min), int(info.max), tuple(shape), tuple(shape), dtype, cast_dtype=cast
    )


def qparams_from_range(
    min_val: Tensor,
    max_val: Tensor,
    spec: QuantSpec,
    shape: tuple[int, ...],
    dtype: torch.dtype | None = None,
) -> QParams:
    """QParams of ``spec`` for per-block ranges ``[min_val, max_val]``.

    With several blocks (per channel or group), a block whose raw scale is
    below ``2^-SCALE_SPAN`` (``2^-24``, float32's significand) of the largest
    block's gets that bound instead: its values are numerically zero next to
    the tensor's largest (rows of ``1e-16`` that a decomposition leaves in a
    rank-deficient core), and its own scale (``2^-57``) would make the
    tensor's fixed-point type dozens of bits wide. Float and power-of-two
    scales are bounded alike, so ``pow2`` stays within a factor 2 of the
    float scale; all-zero blocks keep ``scale = 1``.

    Parameters
    ----------
    min_val, max_val
        Per-block minimum and maximum, of the qparam shape of ``shape``
        (as :func:`block_minmax` or an observer gives them).
    spec
        A :class:`~tnquant.QuantSpec` (see the module docs for the formulas).
    shape
        Shape of the tensor these qparams will quantize.
    dtype
        Float dtype of that tensor (default ``min_val.dtype``).

    Examples
    --------
    >>> import torch
    >>> from tnquant import QuantSpec
    >>> qp = qparams_from_range(torch.tensor(-1.0), torch.tensor(3.0),
    ...                         QuantSpec(bits=8, symmetric=False), ())
    >>> round(qp.scale.item() * 255, 6), qp.zero_point.item()
    (4.0, 64)
    >>> spec = QuantSpec(bits=8, granularity="channel", scale="pow2")
    >>> qp = qparams_from_range(-torch.tensor([[1.0], [1e-16]]), torch.tensor([[1.0], [1e-16]]),
    ...                         spec, (2, 4))
    >>> [int(e) - 1 for e in torch.frexp(qp.scale.flatten())[1]]    # not -60
    [-6, -30]
    """
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"spec must be a QuantSpec, got {type(spec).__name__}")
    shape = tuple(int(s) for s in shape)
    dtype = min_val.dtype if dtype is None else dtype
    if spec.dtype is not None:
        return cast_qparams(shape, dtype, min_val.device, spec)
    block = spec_block_size(spec, shape)
    qshape = qparam_shape(shape, block)
    for label, val in (("min_val", min_val), ("max_val", max_val)):
        if tuple(val.shape) != qshape:
            raise ValueError(
                f"{label} must have the qparam shape {qshape} for a tensor of shape "
                f"{shape}, got {tuple(val.shape)}"
            )
    cd = compute_dtype(dtype)
    lo = min_val.to(cd).clamp(max=0)
    hi = max_val.to(cd).clamp(min=0)
    zero_point = None
    if spec.symmetric:
        steps = spec.qmax if spec.qmax > 0 else -spec.qmin
        raw = torch.maximum(-lo, hi) / steps
    else:
        steps = spec.qmax - spec.qmin
        raw = (hi - lo) / steps
        # hi - lo may overflow cd where the scale itself fits: form it in float64 there only
        wide = ((hi.double() - lo.double()) / steps).to(cd)
        raw = torch.where(torch.isfinite(raw), raw, wide)
    if raw.numel() > 1:  # numerically-zero blocks: at most SCALE_SPAN octaves below the top
        floor = raw.amax() * 2.0**-SCALE_SPAN
        raw = torch.where(raw == 0, raw, torch.maximum(raw, floor))
    scale = _finalize_scale(raw, spec)
    if spec.symmetric and spec.scale == "float":
        # amax within an ulp of the dtype's largest: qmax * scale may round past it
        over = ~torch.isfinite((scale * steps).to(dtype))
        scale = torch.where(over, torch.nextafter(scale, torch.zeros_like(scale)), scale)
    _check_range(lo, hi, scale, spec)
    if not spec.symmetric:
        zp = (spec.qmin - torch.round(lo / scale)).clamp(spec.qmin, spec.qmax)
        zero_point = zp.to(code_dtype(spec.qmin, spec.qmax))
    return QParams(scale, zero_point, spec.qmin, spec.qmax, block, shape, dtype)


def rebind_qparams(
    qparams: QParams, shape: tuple[int, ...], dtype: torch.dtype | None = None
) -> QParams:
    """The same qparams applied to a tensor of another ``shape`` (or dtype).

    Dims whose block spans the whole axis (per-tensor, the non-channel axes)
    follow ``shape``; the others must keep their size. Used for activations
    whose batch size changes after calibration.

    Examples
    --------
    >>> import torch
    >>> from tnquant import QuantSpec
    >>> from tnquant.quant.primitives import choose_qparams
    >>> qp = choose_qparams(torch.ones(4, 3), QuantSpec(granularity="channel", axis=1))
    >>> rebind_qparams(qp, (7, 3)).block_size
    (7, 1)
    """
    shape = tuple(int(s) for s in shape)
    dtype = qparams.dtype if dtype is None else dtype
    old = qparams.shape
    if shape == old:
        return qparams if dtype == qparams.dtype else qparams.replace(dtype=dtype)
    per_tensor = qparams.block_size == old
    if per_tensor:
        ones = (1,) * len(shape)
        return qparams.replace(
            scale=qparams.scale.reshape(ones),
            shape=shape,
            block_size=shape,
            dtype=dtype,
            zero_point=None if qparams.zero_point is None else qparams.zero_point.reshape(ones),
            scale_neg=None if qparams.scale_neg is None else qparams.scale_neg.reshape(ones),
        )
    if len(shape) != len(old):
        raise ValueError(f"qparams for shape {old} cannot quantize a tensor of shape {shape}")
    block = []
    for d, (new, was, b) in enumerate(zip(shape, old, qparams.block_size, strict=True)):
        if b == was:
            block.append(new)
        elif new == was:
            block.append(b)
        else:
            raise ValueError(
                f"qparams for shape {old} cannot quantize a tensor of shape {shape}: "
                f"axis {d} has {was} elements in blocks of {b}, got {new}"
            )
    return qparams.replace(shape=shape, block_size=tuple(block), dtype=dtype)
