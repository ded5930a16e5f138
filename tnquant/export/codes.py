"""Quantized tensors -> integer mantissas and ``ap_fixed`` types; lossless accumulators.

:func:`fixed_codes` reads the codes of a ``FixedPoint`` or power-of-two
quantizer as exact mantissas; :func:`lossless_accum` is the accumulator type
hls4ml's ``infer_precision`` derives. :mod:`tnquant.export.graph` builds the
IR from them, and :mod:`tnquant.export.manifest` re-derives the accumulators
of a loaded manifest with the same function.

Examples
--------
>>> str(lossless_accum(FixedPoint(8, 3), FixedPoint(6, 2), 16))
'ap_fixed<18,9>'
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from tnquant.quant.fixed_point import to_mantissa
from tnquant.quant.frozen import FrozenTensor
from tnquant.quant.quantizer import Quantizer
from tnquant.specs import FixedPoint

__all__ = ["fixed_codes", "lossless_accum", "auto_accum", "MAX_WIDTH"]

#: widest accumulator the int64 emulator takes (a sum of two stays below 2**63)
MAX_WIDTH = 62


def _signed_width(lo: int, hi: int) -> int:
    """Smallest signed width holding ``[lo, hi]``."""
    return max(int(hi).bit_length(), int(-lo - 1).bit_length() if lo < 0 else 0) + 1


def _expand(q: Tensor, shape: tuple[int, ...]) -> Tensor:
    """A qparam tensor repeated block-wise to the full ``shape``."""
    q = q.reshape(q.shape + (1,) * (len(shape) - q.ndim)) if q.ndim < len(shape) else q
    for d, n in enumerate(shape):
        if q.shape[d] != n:
            q = torch.repeat_interleave(q, n // q.shape[d], dim=d)
    return q


def fixed_codes(
    quantizer: Any, tensor: Tensor, where: str
) -> tuple[np.ndarray, FixedPoint, list[int]]:
    """Integer mantissas, their ``ap_fixed`` type and the scale exponents of a quantized tensor.

    Parameters
    ----------
    quantizer
        A :class:`~tnquant.quant.Quantizer` or a converted
        :class:`~tnquant.quant.frozen.FrozenTensor`.
    tensor
        The float tensor (ignored for a ``FrozenTensor``).
    where
        The tensor's name, for error messages.

    Returns
    -------
    (mantissas, spec, exponents)
        int64 mantissas (``value = m * 2**-spec.frac`` exactly), the type, and
        the distinct ``log2`` of the scales.

    Raises
    ------
    ValueError
        For a float scale that is not a power of two, an affine zero point,
        or a float-format spec.

    Examples
    --------
    >>> import torch
    >>> from tnquant import QuantSpec
    >>> from tnquant.quant import Quantizer
    >>> q = Quantizer(QuantSpec(bits=4, scale="pow2"))
    >>> m, spec, exps = fixed_codes(q, torch.tensor([0.5, -1.0, 0.25]), "w")
    >>> m.tolist(), str(spec), exps
    ([2, -4, 1], 'ap_fixed<4,2>', [-2])
    """
    how = f"quantize {where} with QuantSpec(scale='pow2', symmetric=True) or a FixedPoint spec"
    if isinstance(quantizer, FrozenTensor):
        spec = quantizer.spec
        codes, qp = quantizer.codes(), quantizer.qparams()
    elif isinstance(quantizer, Quantizer):
        spec = quantizer.spec
        if isinstance(spec, FixedPoint):
            m = to_mantissa(tensor.detach(), spec).cpu().numpy()
            return m, FixedPoint(spec.width, spec.integer, spec.signed), [-spec.frac]
        codes, qp = quantizer.quantize_codes(tensor.detach(), name=where)
    else:
        raise ValueError(f"{where} has no quantizer; {how}")
    if isinstance(spec, FixedPoint):
        m = codes.to(torch.int64).cpu().numpy()
        return m, FixedPoint(spec.width, spec.integer, spec.signed), [-spec.frac]
    if qp.cast_dtype is not None:
        raise ValueError(f"{where} is cast to {qp.cast_dtype}, not fixed point; {how}")
    if qp.zero_point is not None and bool((qp.zero_point != 0).any()):
        raise ValueError(f"{where} has an affine zero point; {how}")
    if qp.scale_neg is not None and not torch.equal(qp.scale_neg, qp.scale):
        raise ValueError(f"{where} has separate positive/negative scales (TTQ); {how}")
    scale = qp.scale.detach().to(torch.float64).cpu()
    mant, exp = torch.frexp(scale)
    if not bool((mant == 0.5).all()):
        bad = float(scale[mant != 0.5].flatten()[0])
        raise ValueError(f"{where} has scale {bad!r}, not a power of two; {how}")
    exps = (exp - 1).to(torch.int64)
    frac = int(-exps.min())
    shift = _expand(frac + exps, tuple(qp.shape)).numpy()
    c = codes.to(torch.int64).cpu().numpy()
    reach = np.where(c != 0, np.frexp(np.abs(c).astype(np.float64))[1] + shift, 0)
    if reach.size and int(reach.max()) >= MAX_WIDTH:
        raise ValueError(
            f"{where}: its power-of-two scales span {int(shift.max())} octaves, so "
            f"the aligned mantissas need {int(reach.max()) + 1} bits, more than "
            f"{MAX_WIDTH}; {how} per tensor, or with scales closer together"
        )
    m = c << shift
    width = max(
        _signed_width(qp.qmin, qp.qmax), _signed_width(int(m.min()), int(m.max())) if m.size else 1
    )
    return m, FixedPoint(width, width - frac), sorted({int(e) for e in exps.flatten().tolist()})


def lossless_accum(
    input_type: FixedPoint, weight_type: FixedPoint, n: int, bias_type: FixedPoint | None = None
) -> FixedPoint:
    """The accumulator of ``n`` products (plus a bias) that can never overflow.

    Examples
    --------
    >>> str(lossless_accum(FixedPoint(8, 3), FixedPoint(6, 2), 16))
    'ap_fixed<18,9>'
    >>> str(lossless_accum(FixedPoint(8, 3), FixedPoint(6, 2), 16, FixedPoint(12, 3)))
    'ap_fixed<19,10>'
    """
    width, integer = _lossless(input_type, weight_type, n, bias_type)
    if width > 64:
        raise ValueError(
            f"the lossless accumulator of {n} products of {input_type} and "
            f"{weight_type} needs {width} bits; FixedPoint holds at most 64"
        )
    return FixedPoint(width, integer)


def _lossless(
    input_type: FixedPoint, weight_type: FixedPoint, n: int, bias_type: FixedPoint | None
) -> tuple[int, int]:
    """``(width, integer)`` of :func:`lossless_accum`, as hls4ml's ``infer_precision``."""
    width = input_type.width + weight_type.width
    frac = input_type.frac + weight_type.frac
    integer = width - frac + max(0, math.ceil(math.log2(n)))
    if bias_type is not None:
        integer = max(integer, bias_type.integer) + 1
        frac = max(frac, bias_type.frac)
    return integer + frac, integer


def auto_accum(
    op: str,
    in_type: FixedPoint,
    w_type: FixedPoint,
    n: int,
    bias_type: FixedPoint | None,
    prev: str | None,
) -> FixedPoint:
    """:func:`lossless_accum` for op ``op``, refused past ``MAX_WIDTH`` with how to narrow it.

    ``prev`` names the op whose result feeds ``op`` (``None`` for the model
    input); the ``ValueError`` suggests a ``result=`` for it.

    Examples
    --------
    >>> str(auto_accum("0", FixedPoint(8, 3), FixedPoint(6, 2), 16, None, None))
    'ap_fixed<18,9>'
    >>> auto_accum("2", FixedPoint(52, 13), FixedPoint(11, 2), 64, None, "0.1")
    Traceback (most recent call last):
    ...
    ValueError: op '2' needs a 69-bit lossless accumulator (64 products of its input \
ap_fixed<52,13> and weights ap_fixed<11,2>), wider than 62 bits (the int64 emulator's limit); \
narrow it with result={'0.1': FixedPoint(24, 13, rounding='RND', overflow='SAT')} (the op \
before; lossless widths add up along the chain), or give this op's accumulator with \
accum={'2': FixedPoint(...)}
    """
    width, integer = _lossless(in_type, w_type, n, bias_type)
    if width <= MAX_WIDTH:
        return FixedPoint(width, integer)
    i = max(1, in_type.integer)
    fix = (
        f"result={{'{prev}': FixedPoint({max(24, i + 8)}, {i}, rounding='RND', "
        f"overflow='SAT')}} (the op before; lossless widths add up along the chain)"
        if prev is not None
        else f"a narrower input_spec than {in_type}"
    )
    raise ValueError(
        f"op {op!r} needs a {width}-bit lossless accumulator ({n} products of its "
        f"input {in_type} and weights {w_type}"
        f"{' plus a bias' if bias_type is not None else ''}), wider than "
        f"{MAX_WIDTH} bits (the int64 emulator's limit); narrow it with {fix}, or "
        f"give this op's accumulator with accum={{'{op}': FixedPoint(...)}}"
    )
