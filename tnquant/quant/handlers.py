"""The per-spec handlers behind :func:`~tnquant.quant.primitives.quantize`.

One :class:`Handler` per spec type (``QuantSpec``, ``Binary``, ``Ternary``,
``FixedPoint``, ``Codebook``) in the one table :data:`HANDLERS`: how it chooses qparams,
quantizes to codes and fake-quantizes. The uniform handlers share
:func:`fake_quantize_blocks` (the fake path, equal bitwise to
``dequantize(quantize(x))``) and refuse grid points past the dtype; the
conventions are those of :mod:`tnquant.quant.primitives`, which holds the
public functions that check their arguments and dispatch here.

Examples
--------
>>> import torch
>>> from tnquant import QuantSpec
>>> codes, qp = HANDLERS[QuantSpec].quantize(torch.tensor([-1.0, 0.5]), QuantSpec(bits=4),
...                                          None, None)
>>> codes.tolist()
[-7, 3]
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from tnquant.quant.binary import binary_fake_quantize, binary_quantize
from tnquant.quant.codebook import (
    codebook_codes,
    codebook_fake_quantize,
    codebook_qparams,
    codebook_shape,
)
from tnquant.quant.fixed_point import fixed_point_fake_quantize, fixed_point_quantize
from tnquant.quant.qparams import QParams, all_finite, expand, to_blocks
from tnquant.quant.ranges import (
    NonFiniteRange,
    block_minmax,
    cast_qparams,
    code_dtype,
    compute_dtype,
    count_nonfinite,
    qparams_from_range,
    spec_block_size,
)
from tnquant.quant.rounding import saturating_cast, uniform_codes, uniform_values
from tnquant.quant.ste import cast_fake_quantize, lsq_fake_quantize
from tnquant.quant.ternary import ternary_fake_quantize, ternary_quantize, twn_params
from tnquant.specs import Binary, Codebook, FixedPoint, QuantSpec, Ternary

__all__ = ["HANDLERS", "Handler", "fake_quantize_blocks", "handler_of"]


# --------------------------------------------------------------------------- #
# The shared uniform fake path (== dequantize(quantize))
# --------------------------------------------------------------------------- #


def fake_quantize_blocks(
    x: Tensor,
    scale: Tensor,
    zero_point: Tensor | None,
    block: tuple[int, ...],
    qmin: int,
    qmax: int,
    *,
    rounding: str = "nearest_even",
    generator: torch.Generator | None = None,
    grad_scale: float = 1.0,
) -> Tensor:
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
    out = lsq_fake_quantize(
        to_blocks(x.to(cd), block),
        s,
        zp,
        qmin,
        qmax,
        grad_scale,
        rounding=rounding,
        generator=generator,
    )
    return out.reshape(shape).to(x.dtype)


# --------------------------------------------------------------------------- #
# Handlers, one per spec type
# --------------------------------------------------------------------------- #


def _choose_uniform(x: Tensor, spec: QuantSpec, name: str = "tensor") -> QParams:
    if spec.dtype is not None:
        return cast_qparams(tuple(x.shape), x.dtype, x.device, spec)
    lo, hi = block_minmax(x.detach(), spec_block_size(spec, tuple(x.shape)))
    try:
        return qparams_from_range(lo, hi, spec, tuple(x.shape), x.dtype)
    except NonFiniteRange:
        n_nan, n_inf = count_nonfinite(x)
        raise ValueError(
            f"{name} holds {n_nan} NaN and {n_inf} Inf value(s) out of "
            f"{x.numel()}; cannot choose a scale"
        ) from None


def _grid_bound(qp: QParams) -> tuple[float, int]:
    """The largest scale of ``qp`` and ``|codes - zero_point|`` (one host sync)."""
    steps = max(-qp.qmin, qp.qmax) if qp.zero_point is None else qp.qmax - qp.qmin
    scales = [qp.scale] if qp.scale_neg is None else [qp.scale, qp.scale_neg]
    return max(float(s.detach().abs().max()) for s in scales), steps


def _check_grid(values: Callable[[], Tensor], qp: QParams, dtype: torch.dtype, name: str) -> None:
    """Refuse values of ``qp`` that overflow ``dtype`` (computed only when the grid could)."""
    top = torch.finfo(dtype).max
    smax, steps = _grid_bound(qp)
    if smax * steps <= top * (1 - 2.0**-20):
        return
    out = values()
    if all_finite(out):
        return
    n_nan, n_inf = count_nonfinite(out)
    raise ValueError(
        f"{name}: {n_nan + n_inf} of {out.numel()} value(s) quantize to grid points "
        f"beyond {dtype}'s largest value {top:.6g} (codes {qp.qmin}..{qp.qmax} "
        f"times scales up to {smax:.6g}); quantize a "
        f"float64 copy, or a tensor of smaller range"
    )


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


def _quantize_uniform(
    x: Tensor,
    spec: QuantSpec,
    qparams: QParams | None,
    generator: torch.Generator | None,
    name: str = "tensor",
) -> tuple[Tensor, QParams]:
    qp = _choose_uniform(x, spec, name) if qparams is None else qparams
    if qp.cast_dtype is not None:
        return saturating_cast(_cast_input(x.detach(), qp.cast_dtype), qp.cast_dtype), qp
    cd = torch.promote_types(compute_dtype(x.dtype), qp.scale.dtype)
    zp = qp.expanded_zero_point()
    zp = None if zp is None else zp.to(cd)
    scale = qp.expanded_scale().to(cd)
    q, _ = uniform_codes(
        to_blocks(x.detach().to(cd), qp.block_size),
        scale,
        zp,
        qp.qmin,
        qp.qmax,
        spec.rounding,
        generator,
    )
    _check_grid(lambda: uniform_values(q, scale, zp).to(x.dtype), qp, x.dtype, name)
    return q.reshape(qp.shape).to(code_dtype(qp.qmin, qp.qmax)), qp


def _fake_uniform(
    x: Tensor,
    spec: QuantSpec,
    qparams: QParams | None,
    generator: torch.Generator | None,
    name: str = "tensor",
) -> Tensor:
    qp = _choose_uniform(x, spec, name) if qparams is None else qparams
    if qp.cast_dtype is not None:
        return cast_fake_quantize(_cast_input(x, qp.cast_dtype), qp.cast_dtype).to(x.dtype)
    out = fake_quantize_blocks(
        x,
        qp.scale,
        qp.zero_point,
        qp.block_size,
        qp.qmin,
        qp.qmax,
        rounding=spec.rounding,
        generator=generator,
    )
    _check_grid(lambda: out, qp, x.dtype, name)
    return out


def _quantize_binary(
    x: Tensor,
    spec: Binary,
    qparams: QParams | None,
    generator: torch.Generator | None,
    name: str = "tensor",
) -> tuple[Tensor, QParams]:
    codes, qp = binary_quantize(x.detach(), spec)
    return codes, qp if qparams is None else qparams


def _fake_binary(
    x: Tensor,
    spec: Binary,
    qparams: QParams | None,
    generator: torch.Generator | None,
    name: str = "tensor",
) -> Tensor:
    qp = binary_quantize(x.detach(), spec)[1] if qparams is None else qparams
    return binary_fake_quantize(x, qp.scale)


def _quantize_ternary(
    x: Tensor,
    spec: Ternary,
    qparams: QParams | None,
    generator: torch.Generator | None,
    name: str = "tensor",
) -> tuple[Tensor, QParams]:
    codes, qp = ternary_quantize(x.detach(), spec)
    return codes, qp if qparams is None else qparams


def _fake_ternary(
    x: Tensor,
    spec: Ternary,
    qparams: QParams | None,
    generator: torch.Generator | None,
    name: str = "tensor",
) -> Tensor:
    delta, alpha = twn_params(x.detach(), spec)
    if qparams is None:
        return ternary_fake_quantize(x, delta, alpha, alpha)
    alpha_n = qparams.scale if qparams.scale_neg is None else qparams.scale_neg
    return ternary_fake_quantize(x, delta, qparams.scale, alpha_n)


def _check_fixed_qparams(qparams: QParams | None, spec: FixedPoint) -> None:
    if qparams is not None and not bool((qparams.scale == spec.scale).all()):
        raise ValueError(
            f"a FixedPoint {spec} has scale {spec.scale}; got qparams with scale "
            f"{qparams.scale.flatten()[:4].tolist()}"
        )


def _quantize_fixed(
    x: Tensor,
    spec: FixedPoint,
    qparams: QParams | None,
    generator: torch.Generator | None,
    name: str = "tensor",
) -> tuple[Tensor, QParams]:
    _check_fixed_qparams(qparams, spec)
    return fixed_point_quantize(x.detach(), spec)


def _fake_fixed(
    x: Tensor,
    spec: FixedPoint,
    qparams: QParams | None,
    generator: torch.Generator | None,
    name: str = "tensor",
) -> Tensor:
    _check_fixed_qparams(qparams, spec)
    return fixed_point_fake_quantize(x, spec)


def _check_codebook_qparams(qp: QParams, spec: Codebook, name: str) -> None:
    want = codebook_shape(spec, qp.shape)
    if qp.codebook is None or tuple(qp.codebook.shape) != want:
        got = None if qp.codebook is None else tuple(qp.codebook.shape)
        raise ValueError(
            f"{name}: a {spec.kind} Codebook needs a codebook of shape {want}, got {got}"
        )
    if (qp.qmin, qp.qmax) != (spec.qmin, spec.qmax):
        raise ValueError(
            f"{name}: qparams code range [{qp.qmin}, {qp.qmax}] does not match the "
            f"spec's [{spec.qmin}, {spec.qmax}]"
        )


def _quantize_codebook(
    x: Tensor,
    spec: Codebook,
    qparams: QParams | None,
    generator: torch.Generator | None,
    name: str = "tensor",
) -> tuple[Tensor, QParams]:
    qp = codebook_qparams(x, spec) if qparams is None else qparams
    _check_codebook_qparams(qp, spec, name)
    return codebook_codes(x, qp), qp


def _fake_codebook(
    x: Tensor,
    spec: Codebook,
    qparams: QParams | None,
    generator: torch.Generator | None,
    name: str = "tensor",
) -> Tensor:
    qp = codebook_qparams(x, spec) if qparams is None else qparams
    _check_codebook_qparams(qp, spec, name)
    return codebook_fake_quantize(x, qp)


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
    Codebook: Handler(codebook_qparams, _quantize_codebook, _fake_codebook),
}


def handler_of(spec: Any) -> Handler:
    """The handler of ``spec``'s type (``TypeError`` for any other type).

    Examples
    --------
    >>> from tnquant import Binary
    >>> handler_of(Binary()) is HANDLERS[Binary]
    True
    """
    handler = HANDLERS.get(type(spec))
    if handler is None:
        valid = [t.__name__ for t in HANDLERS]
        raise TypeError(f"spec must be one of {valid}, got {type(spec).__name__}")
    return handler
