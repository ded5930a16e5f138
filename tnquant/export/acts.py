"""Activation quantizers -> ``ap_fixed`` types (the export's input/result types).

An activation quantizer fixes the type of the value it quantizes, so the
export takes its type instead of deriving one:

``FixedPoint`` spec
    Its own ``ap_fixed<W,I,Q,O>``.
``QuantSpec(scale='pow2')``, frozen (calibrated or ``freeze()``-d), per tensor
    ``y = clamp(round(x / 2^e), qmin, qmax) * 2^e`` is the ``ap_fixed`` cast
    ``ap_fixed<bits, bits + e, Q, O>``: the ``2^e`` scale is the binary point;
    ``Q`` from the spec's rounding (``'nearest_even'`` -> ``RND_CONV``,
    ``'half_up'`` -> ``RND``, ``'floor'`` -> ``TRN``); ``O`` is ``SAT``
    (``SAT_SYM`` with ``narrow_range``, whose codes are ``[-qmax, qmax]``).
    An affine spec whose zero point is 0 gives ``ap_ufixed<bits, bits + e>``
    (codes ``[0, 2^bits - 1]``).

Everything else (float scales, dynamic scales, non-zero zero points,
stochastic rounding, per-channel activation scales, Binary/Ternary, float
formats) is refused with a ``ValueError`` that names the quantizer and the
fix.

Examples
--------
>>> import torch
>>> from tnquant import QuantSpec
>>> from tnquant.quant import Quantizer
>>> q = Quantizer(QuantSpec(bits=8, scale="pow2")).freeze(torch.tensor([-3.0, 2.0]))
>>> str(act_type(q, "0.output"))
'ap_fixed<8,3,RND_CONV,SAT>'
"""

from __future__ import annotations

from typing import Any

import torch

from tnquant.specs import FixedPoint, QuantSpec

__all__ = ["act_type", "ROUNDING_TO_AP"]

#: QuantSpec rounding -> the ap_fixed rounding mode that casts the same way
ROUNDING_TO_AP = {"nearest_even": "RND_CONV", "half_up": "RND", "floor": "TRN"}


def act_type(quantizer: Any, where: str) -> FixedPoint:
    """The ``ap_fixed`` type an activation quantizer casts to.

    Parameters
    ----------
    quantizer
        The module in ``act_quantizers`` (a :class:`~tnquant.quant.Quantizer`).
    where
        Its name (``'<layer>.<site>'``), for error messages.

    Returns
    -------
    FixedPoint
        With the quantizer's rounding and overflow modes, so casting to it is
        the fake quantization, bit for bit.

    Raises
    ------
    ValueError
        For a quantizer that is not a fixed-point cast (see the module docs).

    Examples
    --------
    >>> import torch
    >>> from tnquant import FixedPoint, QuantSpec
    >>> from tnquant.quant import Quantizer
    >>> act_type(Quantizer(FixedPoint(10, 4, rounding="RND", overflow="SAT")), "x")
    FixedPoint(width=10, integer=4, signed=True, rounding='RND', overflow='SAT')
    >>> spec = QuantSpec(bits=4, symmetric=False, scale="pow2", rounding="floor")
    >>> q = Quantizer(spec).freeze(torch.tensor([0.0, 3.0]))
    >>> str(act_type(q, "1.input"))
    'ap_ufixed<4,2,TRN,SAT>'
    >>> act_type(Quantizer(QuantSpec(bits=8, scale="pow2")), "1.input")
    Traceback (most recent call last):
    ...
    ValueError: activation quantizer 1.input has no stored scale (it would compute one \
per batch); calibrate() the model or freeze() the quantizer before exporting
    """
    spec = getattr(quantizer, "spec", None)
    if isinstance(spec, FixedPoint):
        return spec
    fix = "use a FixedPoint activation spec or QuantSpec(scale='pow2'), calibrated, per tensor"
    if not isinstance(spec, QuantSpec) or spec.dtype is not None:
        raise ValueError(f"activation quantizer {where} is {spec!r}, not a fixed-point cast; {fix}")
    if spec.scale != "pow2":
        raise ValueError(
            f"activation quantizer {where} has float scales (scale={spec.scale!r}); {fix}"
        )
    if spec.rounding not in ROUNDING_TO_AP:
        raise ValueError(
            f"activation quantizer {where} rounds {spec.rounding!r}, which no "
            f"ap_fixed type does; use one of {list(ROUNDING_TO_AP)}"
        )
    if not getattr(quantizer, "initialized", False):
        raise ValueError(
            f"activation quantizer {where} has no stored scale (it would "
            f"compute one per batch); calibrate() the model or freeze() the "
            f"quantizer before exporting"
        )
    qp = quantizer.qparams()
    scale = qp.scale.detach().to(torch.float64).cpu().flatten()
    if scale.numel() != 1:
        raise ValueError(
            f"activation quantizer {where} has {scale.numel()} scales; the "
            f"export needs one per tensor ({fix})"
        )
    mant, exp = torch.frexp(scale)
    if float(mant[0]) != 0.5:
        raise ValueError(
            f"activation quantizer {where} has scale {float(scale[0])!r}, not a power of two; {fix}"
        )
    e = int(exp[0]) - 1
    signed = spec.symmetric
    if not signed and qp.zero_point is not None and bool((qp.zero_point != 0).any()):
        raise ValueError(
            f"activation quantizer {where} has zero point "
            f"{qp.zero_point.flatten().tolist()}, not 0; use symmetric=True "
            f"(or an input range that starts at 0)"
        )
    overflow = "SAT_SYM" if signed and spec.narrow_range else "SAT"
    return FixedPoint(
        spec.bits,
        spec.bits + e,
        signed=signed,
        rounding=ROUNDING_TO_AP[spec.rounding],
        overflow=overflow,
    )
