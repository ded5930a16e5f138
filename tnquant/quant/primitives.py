"""Pure quantization functions: qparams, quantize, dequantize, fake_quantize.

The rounding arithmetic they share with the straight-through estimators
(:func:`round_tensor`, :func:`pow2_scale`, ``uniform_codes``/``uniform_values``)
lives in :mod:`tnquant.quant.rounding`; ``round_tensor`` and ``pow2_scale`` are
re-exported here.

Conventions (uniform :class:`~tnquant.QuantSpec`)
-------------------------------------------------
- **Range.** ``lo = min(min_x, 0)`` and ``hi = max(max_x, 0)`` per block: the
  range always contains 0, so zero is exactly representable.
- **Symmetric scale.** ``scale = max(-lo, hi) / qmax`` (``/ -qmin`` in the
  1-bit symmetric case, where ``qmax == 0``): ``[-amax, amax]`` is never
  clipped, and ``|x - fake_quantize(x)| <= scale / 2`` on it. In full range
  the code ``qmin = -2^(b-1)`` is only reached by given qparams.
- **Affine scale.** ``scale = (hi - lo) / (qmax - qmin)`` and the integer
  zero point ``zp = clamp(qmin - round(lo / scale), qmin, qmax)``.
- **Huge ranges.** A symmetric float scale whose ``qmax * scale`` would
  round past the dtype's largest value (``amax`` within an ulp of it) is
  lowered by one ulp; any other grid point beyond the dtype that the data
  reaches is refused (``ValueError``), never returned as an infinity. An
  affine ``hi - lo`` that overflows is formed in float64.
- **Degenerate blocks.** A block whose range is 0 (all zeros) gets
  ``scale = 1``, so zeros dequantize exactly; a scale below the smallest
  normal number is raised to it. A constant ``c != 0`` dequantizes to
  ``round(c / scale) * scale``, which is ``c`` up to one float rounding.
- **Span.** With several blocks, a block whose scale would be below
  ``2^-24`` of the largest block's (:data:`~tnquant.quant.ranges.SCALE_SPAN`)
  gets that bound: its values are numerically zero next to the tensor's
  largest, and would otherwise make its fixed-point type dozens of bits wide.
- **pow2.** ``scale = 2^k`` with ``k = ceil(log2 s)`` (``'ceil'``: never
  clips) or ``k = round(log2 s)`` (``'round'``), computed exactly with
  :func:`torch.frexp`; the affine zero point is then recomputed.
- **Arithmetic.** ``q = clamp(round(x / scale) + zp, qmin, qmax)`` and
  ``x_hat = (q - zp) * scale``, in ``compute_dtype(x.dtype)`` (at least
  float32, float64 stays float64), then cast back to ``x.dtype``. The fake
  path and ``dequantize(quantize(x))`` run the same operations in the same
  order, so they agree bitwise.
- **Codes** are stored in the smallest signed integer dtype that holds
  ``[qmin, qmax]`` (:func:`code_dtype`): int8 for symmetric <= 8 bits, int16
  for affine 8-bit (0..255) and symmetric <= 16 bits, int32 for affine
  16-bit. Zero points use the same dtype. Float formats (``spec.dtype``)
  store the saturated cast tensor as codes, with ``scale`` all ones.

Every spec type goes through the one table :data:`HANDLERS`, so
``quantize(x, Binary())`` works as well as ``quantize(x, QuantSpec())``; the
handlers (and :func:`fake_quantize_blocks`, the shared uniform fake path)
live in :mod:`tnquant.quant.handlers` and are re-exported here.

Examples
--------
>>> import torch
>>> from tnquant import QuantSpec
>>> codes, qp = quantize(torch.tensor([-1.0, 0.0, 0.25, 1.0]), QuantSpec(bits=4))
>>> codes.tolist(), round(qp.scale.item(), 6)
([-7, 0, 2, 7], 0.142857)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from tnquant.quant.codebook import codebook_dequantize
from tnquant.quant.handlers import HANDLERS, fake_quantize_blocks, handler_of
from tnquant.quant.qparams import QParams, expand, to_blocks
from tnquant.quant.ranges import (
    block_minmax,
    check_finite,
    code_dtype,
    compute_dtype,
    qparams_from_range,
    rebind_qparams,
    spec_block_size,
)
from tnquant.quant.rounding import pow2_scale, round_tensor, uniform_values
from tnquant.specs import Binary, Codebook, QuantSpec, Ternary

__all__ = [
    "HANDLERS",
    "round_tensor",
    "code_dtype",
    "compute_dtype",
    "check_finite",
    "spec_block_size",
    "block_minmax",
    "pow2_scale",
    "qparams_from_range",
    "choose_qparams",
    "rebind_qparams",
    "fake_quantize_blocks",
    "quantize",
    "dequantize",
    "fake_quantize",
]


def choose_qparams(
    x: Tensor, spec: Any, *, min_val: Tensor | None = None, max_val: Tensor | None = None
) -> QParams:
    """QParams for ``x`` under ``spec``, from its min/max (or the given ones).

    Parameters
    ----------
    x
        The tensor to quantize (its shape and dtype are used; its values too
        unless ``min_val``/``max_val`` are given).
    spec
        Any quantizer spec. For :class:`~tnquant.QuantSpec` see the module
        docs; ``Binary``/``Ternary``/``FixedPoint`` return the qparams of
        :func:`quantize`.
    min_val, max_val
        Per-block ranges of the qparam shape (both or neither); QuantSpec only.

    Examples
    --------
    >>> import torch
    >>> from tnquant import QuantSpec
    >>> w = torch.tensor([[1.0, -2.0], [0.5, 0.25]])
    >>> choose_qparams(w, QuantSpec(bits=8, granularity="channel")).scale.flatten().tolist()
    [0.015748031437397003, 0.003937007859349251]
    """
    handler = handler_of(spec)
    if min_val is None or max_val is None:
        if min_val is not None or max_val is not None:
            raise ValueError("give both min_val and max_val, or neither")
        check_finite(x, "x")
        return handler.choose(x, spec)
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"min_val/max_val apply to a QuantSpec only, got {type(spec).__name__}")
    check_finite(min_val, "min_val")
    check_finite(max_val, "max_val")
    if bool((min_val > max_val).any()):
        raise ValueError("min_val must be <= max_val in every block")
    return qparams_from_range(min_val, max_val, spec, tuple(x.shape), x.dtype)


# --------------------------------------------------------------------------- #
# Checks of given qparams
# --------------------------------------------------------------------------- #


def _check_qparams(qparams: Any, x: Tensor, spec: Any) -> QParams:
    if not isinstance(qparams, QParams):
        raise TypeError(f"qparams must be a QParams, got {type(qparams).__name__}")
    # Binary/Ternary give alpha = 0 to an all-zero block (its codes dequantize to 0)
    # (and a Codebook 0 to an all-zero block)
    zero_ok = isinstance(spec, (Binary, Ternary, Codebook))
    for label, scale in (("scale", qparams.scale), ("scale_neg", qparams.scale_neg)):
        if scale is None:
            continue
        ok = (scale >= 0) if zero_ok else (scale > 0)
        if not bool((torch.isfinite(scale) & ok).all()):
            kind = "non-negative" if zero_ok else "positive"
            raise ValueError(
                f"qparams.{label} must be {kind} and finite, got min "
                f"{scale.min().item()} and max {scale.max().item()}"
            )
    if isinstance(spec, QuantSpec) and spec.dtype is None:
        if (qparams.qmin, qparams.qmax) != (spec.qmin, spec.qmax):
            raise ValueError(
                f"qparams code range [{qparams.qmin}, {qparams.qmax}] does not match "
                f"the spec's [{spec.qmin}, {spec.qmax}]"
            )
        zp = qparams.zero_point
        if zp is not None and not bool(
            ((zp == torch.round(zp.double())) & (zp >= spec.qmin) & (zp <= spec.qmax)).all()
        ):
            raise ValueError(f"qparams.zero_point must be integers in [{spec.qmin}, {spec.qmax}]")
    return rebind_qparams(qparams, tuple(x.shape), x.dtype)


# --------------------------------------------------------------------------- #
# Public verbs
# --------------------------------------------------------------------------- #


def quantize(
    x: Tensor,
    spec: Any,
    qparams: QParams | None = None,
    *,
    name: str = "tensor",
    generator: torch.Generator | None = None,
) -> tuple[Tensor, QParams]:
    """Quantize ``x`` to integer codes (or cast codes) and their qparams.

    Parameters
    ----------
    x
        A finite float tensor.
    spec
        ``QuantSpec``, ``Binary``, ``Ternary`` or ``FixedPoint``.
    qparams
        Use these instead of choosing them from ``x`` (e.g. calibrated). Their
        block layout is rebound to ``x``'s shape (see :func:`rebind_qparams`).
    name
        Named in error messages (``'layer1.weight'``).
    generator
        For ``rounding='stochastic'``.

    Returns
    -------
    codes, qparams
        ``dequantize(codes, qparams)`` gives the quantized values.

    Examples
    --------
    >>> import torch
    >>> from tnquant import QuantSpec
    >>> codes, qp = quantize(torch.tensor([-1.0, 0.0, 3.0]), QuantSpec(bits=8, symmetric=False))
    >>> codes.tolist(), qp.zero_point.item(), codes.dtype
    ([0, 64, 255], 64, torch.int16)
    """
    handler = handler_of(spec)
    check_finite(x, name)
    if qparams is not None:
        qparams = _check_qparams(qparams, x, spec)
    return handler.quantize(x, spec, qparams, generator, name)  # type: ignore[call-arg]


def dequantize(codes: Tensor, qparams: QParams) -> Tensor:
    """``(codes - zero_point) * scale`` block-wise, in ``qparams.dtype``.

    Negative codes use ``qparams.scale_neg`` when set (TTQ); cast codes are
    cast back.

    Examples
    --------
    >>> import torch
    >>> from tnquant import QuantSpec
    >>> codes, qp = quantize(torch.tensor([1.5, -1.0, 0.3]), QuantSpec(bits=3))
    >>> codes.tolist(), dequantize(codes, qp).tolist()
    ([3, -2, 1], [1.5, -1.0, 0.5])
    """
    if not isinstance(qparams, QParams):
        raise TypeError(f"qparams must be a QParams, got {type(qparams).__name__}")
    if tuple(codes.shape) != qparams.shape:
        raise ValueError(
            f"codes of shape {tuple(codes.shape)} do not match qparams for shape {qparams.shape}"
        )
    if qparams.cast_dtype is not None:
        return codes.to(qparams.dtype)
    if qparams.codebook is not None:
        return codebook_dequantize(codes, qparams)
    cd = torch.promote_types(compute_dtype(qparams.dtype), qparams.scale.dtype)
    q = to_blocks(codes.to(cd), qparams.block_size)
    zp = qparams.expanded_zero_point()
    zp = None if zp is None else zp.to(cd)
    out = uniform_values(q, qparams.expanded_scale().to(cd), zp)
    if qparams.scale_neg is not None:
        neg = expand(qparams.scale_neg.to(cd), qparams.shape, qparams.block_size)
        out = torch.where(q < 0, uniform_values(q, neg, zp), out)
    return out.reshape(qparams.shape).to(qparams.dtype)


def fake_quantize(
    x: Tensor,
    spec: Any,
    qparams: QParams | None = None,
    *,
    name: str = "tensor",
    generator: torch.Generator | None = None,
) -> Tensor:
    """``dequantize(quantize(x))`` in value, with a straight-through gradient.

    The gradient to ``x`` is the identity where the code was not clipped and
    zero where it was (a float format: where ``|x|`` fits the format); a
    given ``qparams.scale`` that requires grad gets the LSQ gradient. The
    value equals ``dequantize(*quantize(x, spec, qparams))`` bitwise.
    Binary, Ternary and FixedPoint use their own estimators (see their
    modules).

    Examples
    --------
    >>> import torch
    >>> from tnquant import QuantSpec
    >>> x = torch.tensor([0.2, -1.0, 0.9], requires_grad=True)
    >>> y = fake_quantize(x, QuantSpec(bits=2))
    >>> y.tolist()
    [0.0, -1.0, 1.0]
    >>> y.sum().backward(); x.grad.tolist()
    [1.0, 1.0, 1.0]
    """
    handler = handler_of(spec)
    check_finite(x, name)
    if qparams is not None:
        qparams = _check_qparams(qparams, x, spec)
    return handler.fake_quantize(x, spec, qparams, generator, name)  # type: ignore[call-arg]
