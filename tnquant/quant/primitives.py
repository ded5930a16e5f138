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
``quantize(x, Binary())`` works as well as ``quantize(x, QuantSpec())``.

Examples
--------
>>> import torch
>>> from tnquant import QuantSpec
>>> codes, qp = quantize(torch.tensor([-1.0, 0.0, 0.25, 1.0]), QuantSpec(bits=4))
>>> codes.tolist(), round(qp.scale.item(), 6)
([-7, 0, 2, 7], 0.142857)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from tnquant.quant.binary import binary_fake_quantize, binary_quantize
from tnquant.quant.fixed_point import fixed_point_fake_quantize, fixed_point_quantize
from tnquant.quant.qparams import QParams, all_finite, expand, to_blocks
from tnquant.quant.ranges import (
    NonFiniteRange,
    block_minmax,
    cast_qparams,
    check_finite,
    code_dtype,
    compute_dtype,
    count_nonfinite,
    qparams_from_range,
    rebind_qparams,
    spec_block_size,
)
from tnquant.quant.rounding import (
    pow2_scale,
    round_tensor,
    saturating_cast,
    uniform_codes,
    uniform_values,
)
from tnquant.quant.ste import cast_fake_quantize, lsq_fake_quantize
from tnquant.quant.ternary import ternary_fake_quantize, ternary_quantize, twn_params
from tnquant.specs import Binary, FixedPoint, QuantSpec, Ternary

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

def choose_qparams(x: Tensor, spec: Any, *, min_val: Tensor | None = None,
                   max_val: Tensor | None = None) -> QParams:
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
    handler = _handler(spec)
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
# The shared uniform fake path (== dequantize(quantize))
# --------------------------------------------------------------------------- #


def fake_quantize_blocks(x: Tensor, scale: Tensor, zero_point: Tensor | None,
                         block: tuple[int, ...], qmin: int, qmax: int, *,
                         rounding: str = "nearest_even", generator: torch.Generator | None = None,
                         grad_scale: float = 1.0) -> Tensor:
    """Uniform fake quantization of ``x`` with qparam-shaped ``scale``/``zero_point``.

    Gradients: clipped straight-through to ``x``; LSQ to ``scale`` and LSQ+
    to a float ``zero_point`` (rounded in the forward pass) when they
    require grad, times ``grad_scale``. See :func:`tnquant.quant.ste.lsq_fake_quantize`.

    Examples
    --------
    >>> import torch
    >>> fake_quantize_blocks(torch.tensor([0.3, 4.0]), torch.tensor([0.5]), None, (2,),
    ...                      -4, 3).tolist()
    [0.5, 1.5]
    """
    shape = tuple(x.shape)
    cd = torch.promote_types(compute_dtype(x.dtype), scale.dtype)
    s = expand(scale.to(cd), shape, block)
    zp = None if zero_point is None else expand(zero_point.to(cd), shape, block)
    out = lsq_fake_quantize(to_blocks(x.to(cd), block), s, zp, qmin, qmax, grad_scale,
                            rounding=rounding, generator=generator)
    return out.reshape(shape).to(x.dtype)


# --------------------------------------------------------------------------- #
# Handlers, one per spec type
# --------------------------------------------------------------------------- #


def _check_qparams(qparams: Any, x: Tensor, spec: Any) -> QParams:
    if not isinstance(qparams, QParams):
        raise TypeError(f"qparams must be a QParams, got {type(qparams).__name__}")
    # Binary/Ternary give alpha = 0 to an all-zero block (its codes dequantize to 0)
    zero_ok = isinstance(spec, (Binary, Ternary))
    for label, scale in (("scale", qparams.scale), ("scale_neg", qparams.scale_neg)):
        if scale is None:
            continue
        ok = (scale >= 0) if zero_ok else (scale > 0)
        if not bool((torch.isfinite(scale) & ok).all()):
            kind = "non-negative" if zero_ok else "positive"
            raise ValueError(f"qparams.{label} must be {kind} and finite, got min "
                             f"{scale.min().item()} and max {scale.max().item()}")
    if isinstance(spec, QuantSpec) and spec.dtype is None:
        if (qparams.qmin, qparams.qmax) != (spec.qmin, spec.qmax):
            raise ValueError(f"qparams code range [{qparams.qmin}, {qparams.qmax}] does not match "
                             f"the spec's [{spec.qmin}, {spec.qmax}]")
        zp = qparams.zero_point
        if zp is not None and not bool(((zp == torch.round(zp.double())) & (zp >= spec.qmin)
                                        & (zp <= spec.qmax)).all()):
            raise ValueError(f"qparams.zero_point must be integers in [{spec.qmin}, {spec.qmax}]")
    return rebind_qparams(qparams, tuple(x.shape), x.dtype)


def _choose_uniform(x: Tensor, spec: QuantSpec, name: str = "tensor") -> QParams:
    if spec.dtype is not None:
        return cast_qparams(tuple(x.shape), x.dtype, x.device, spec)
    lo, hi = block_minmax(x.detach(), spec_block_size(spec, tuple(x.shape)))
    try:
        return qparams_from_range(lo, hi, spec, tuple(x.shape), x.dtype)
    except NonFiniteRange:
        n_nan, n_inf = count_nonfinite(x)
        raise ValueError(f"{name} holds {n_nan} NaN and {n_inf} Inf value(s) out of "
                         f"{x.numel()}; cannot choose a scale") from None


def _grid_bound(qp: QParams) -> tuple[float, int]:
    """The largest scale of ``qp`` and ``|codes - zero_point|`` (one host sync)."""
    steps = max(-qp.qmin, qp.qmax) if qp.zero_point is None else qp.qmax - qp.qmin
    scales = [qp.scale] if qp.scale_neg is None else [qp.scale, qp.scale_neg]
    return max(float(s.detach().abs().max()) for s in scales), steps


def _check_grid(values: Callable[[], Tensor], qp: QParams, dtype: torch.dtype, name: str
                ) -> None:
    """Refuse values of ``qp`` that overflow ``dtype`` (computed only when the grid could)."""
    top = torch.finfo(dtype).max
    smax, steps = _grid_bound(qp)
    if smax * steps <= top * (1 - 2.0**-20):
        return
    out = values()
    if all_finite(out):
        return
    n_nan, n_inf = count_nonfinite(out)
    raise ValueError(f"{name}: {n_nan + n_inf} of {out.numel()} value(s) quantize to grid points "
                     f"beyond {dtype}'s largest value {top:.6g} (codes {qp.qmin}..{qp.qmax} "
                     f"times scales up to {smax:.6g}); quantize a "
                     f"float64 copy, or a tensor of smaller range")


def _cast_limit(cast: torch.dtype, dtype: torch.dtype) -> float | None:
    """The largest value of the format ``cast`` that stays finite in ``dtype``, when that is
    below ``cast``'s own largest value (a bfloat16 cast of float16 tensors); else ``None``."""
    if math.isfinite(torch.tensor(torch.finfo(cast).max, dtype=torch.float64).to(dtype).item()):
        return None
    digits = round(-math.log2(torch.finfo(cast).eps)) + 1
    mant, exp = math.frexp(torch.finfo(dtype).max)
    return math.ldexp(math.floor(math.ldexp(mant, digits)), exp - digits)


def _cast_input(x: Tensor, cast: torch.dtype) -> Tensor:
    """``x`` in its compute dtype (exact), clamped to what ``cast`` can give back in
    ``x.dtype``: the saturating cast then never rounds its bound in a narrow dtype."""
    xw = x.to(compute_dtype(x.dtype))
    limit = _cast_limit(cast, x.dtype)
    return xw if limit is None else xw.clamp(-limit, limit)


def _quantize_uniform(x: Tensor, spec: QuantSpec, qparams: QParams | None,
                      generator: torch.Generator | None, name: str = "tensor"
                      ) -> tuple[Tensor, QParams]:
    qp = _choose_uniform(x, spec, name) if qparams is None else qparams
    if qp.cast_dtype is not None:
        return saturating_cast(_cast_input(x.detach(), qp.cast_dtype), qp.cast_dtype), qp
    cd = torch.promote_types(compute_dtype(x.dtype), qp.scale.dtype)
    zp = qp.expanded_zero_point()
    zp = None if zp is None else zp.to(cd)
    scale = qp.expanded_scale().to(cd)
    q, _ = uniform_codes(to_blocks(x.detach().to(cd), qp.block_size), scale, zp, qp.qmin,
                         qp.qmax, spec.rounding, generator)
    _check_grid(lambda: uniform_values(q, scale, zp).to(x.dtype), qp, x.dtype, name)
    return q.reshape(qp.shape).to(code_dtype(qp.qmin, qp.qmax)), qp


def _fake_uniform(x: Tensor, spec: QuantSpec, qparams: QParams | None,
                  generator: torch.Generator | None, name: str = "tensor") -> Tensor:
    qp = _choose_uniform(x, spec, name) if qparams is None else qparams
    if qp.cast_dtype is not None:
        return cast_fake_quantize(_cast_input(x, qp.cast_dtype), qp.cast_dtype).to(x.dtype)
    out = fake_quantize_blocks(x, qp.scale, qp.zero_point, qp.block_size, qp.qmin, qp.qmax,
                               rounding=spec.rounding, generator=generator)
    _check_grid(lambda: out, qp, x.dtype, name)
    return out


def _quantize_binary(x: Tensor, spec: Binary, qparams: QParams | None,
                     generator: torch.Generator | None, name: str = "tensor"
                     ) -> tuple[Tensor, QParams]:
    codes, qp = binary_quantize(x.detach(), spec)
    return codes, qp if qparams is None else qparams


def _fake_binary(x: Tensor, spec: Binary, qparams: QParams | None,
                 generator: torch.Generator | None, name: str = "tensor") -> Tensor:
    qp = binary_quantize(x.detach(), spec)[1] if qparams is None else qparams
    return binary_fake_quantize(x, qp.scale)


def _quantize_ternary(x: Tensor, spec: Ternary, qparams: QParams | None,
                      generator: torch.Generator | None, name: str = "tensor"
                      ) -> tuple[Tensor, QParams]:
    codes, qp = ternary_quantize(x.detach(), spec)
    return codes, qp if qparams is None else qparams


def _fake_ternary(x: Tensor, spec: Ternary, qparams: QParams | None,
                  generator: torch.Generator | None, name: str = "tensor") -> Tensor:
    delta, alpha = twn_params(x.detach(), spec)
    if qparams is None:
        return ternary_fake_quantize(x, delta, alpha, alpha)
    alpha_n = qparams.scale if qparams.scale_neg is None else qparams.scale_neg
    return ternary_fake_quantize(x, delta, qparams.scale, alpha_n)


def _check_fixed_qparams(qparams: QParams | None, spec: FixedPoint) -> None:
    if qparams is not None and not bool((qparams.scale == spec.scale).all()):
        raise ValueError(f"a FixedPoint {spec} has scale {spec.scale}; got qparams with scale "
                         f"{qparams.scale.flatten()[:4].tolist()}")


def _quantize_fixed(x: Tensor, spec: FixedPoint, qparams: QParams | None,
                    generator: torch.Generator | None, name: str = "tensor"
                    ) -> tuple[Tensor, QParams]:
    _check_fixed_qparams(qparams, spec)
    return fixed_point_quantize(x.detach(), spec)


def _fake_fixed(x: Tensor, spec: FixedPoint, qparams: QParams | None,
                generator: torch.Generator | None, name: str = "tensor") -> Tensor:
    _check_fixed_qparams(qparams, spec)
    return fixed_point_fake_quantize(x, spec)


class Handler(NamedTuple):
    """How one spec type chooses qparams, quantizes and fake-quantizes.

    ``quantize`` and ``fake_quantize`` take ``(x, spec, qparams, generator)`` and
    optionally the tensor's ``name`` for messages.
    """

    choose: Callable[[Tensor, Any], QParams]
    quantize: Callable[[Tensor, Any, QParams | None, Any], tuple[Tensor, QParams]]
    fake_quantize: Callable[[Tensor, Any, QParams | None, Any], Tensor]


def _choose_via(quantize_fn: Callable[..., tuple[Tensor, QParams]]) -> Callable[..., QParams]:
    return lambda x, spec: quantize_fn(x, spec, None, None)[1]


#: The one dispatch table from spec type to handler.
HANDLERS: dict[type, Handler] = {
    QuantSpec: Handler(_choose_uniform, _quantize_uniform, _fake_uniform),
    Binary: Handler(_choose_via(_quantize_binary), _quantize_binary, _fake_binary),
    Ternary: Handler(_choose_via(_quantize_ternary), _quantize_ternary, _fake_ternary),
    FixedPoint: Handler(_choose_via(_quantize_fixed), _quantize_fixed, _fake_fixed),
}


def _handler(spec: Any) -> Handler:
    handler = HANDLERS.get(type(spec))
    if handler is None:
        valid = [t.__name__ for t in HANDLERS]
        raise TypeError(f"spec must be one of {valid}, got {type(spec).__name__}")
    return handler


# --------------------------------------------------------------------------- #
# Public verbs
# --------------------------------------------------------------------------- #


def quantize(x: Tensor, spec: Any, qparams: QParams | None = None, *, name: str = "tensor",
             generator: torch.Generator | None = None) -> tuple[Tensor, QParams]:
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
    handler = _handler(spec)
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
        raise ValueError(f"codes of shape {tuple(codes.shape)} do not match qparams for shape "
                         f"{qparams.shape}")
    if qparams.cast_dtype is not None:
        return codes.to(qparams.dtype)
    cd = torch.promote_types(compute_dtype(qparams.dtype), qparams.scale.dtype)
    q = to_blocks(codes.to(cd), qparams.block_size)
    zp = qparams.expanded_zero_point()
    zp = None if zp is None else zp.to(cd)
    out = uniform_values(q, qparams.expanded_scale().to(cd), zp)
    if qparams.scale_neg is not None:
        neg = expand(qparams.scale_neg.to(cd), qparams.shape, qparams.block_size)
        out = torch.where(q < 0, uniform_values(q, neg, zp), out)
    return out.reshape(qparams.shape).to(qparams.dtype)


def fake_quantize(x: Tensor, spec: Any, qparams: QParams | None = None, *, name: str = "tensor",
                  generator: torch.Generator | None = None) -> Tensor:
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
    handler = _handler(spec)
    check_finite(x, name)
    if qparams is not None:
        qparams = _check_qparams(qparams, x, spec)
    return handler.fake_quantize(x, spec, qparams, generator, name)  # type: ignore[call-arg]
