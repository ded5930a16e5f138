"""Binary/Ternary weights with power-of-two scales as integers: codes and exponents.

:func:`pow2_codes` gives, for a ``Binary(scale='pow2')`` or
``Ternary(scale='pow2')`` quantizer (fake-quant or converted), the codes and
the integer exponents of its scales, such that the weight is exactly

``codes * 2**exponents`` where ``codes > 0``, ``-2**exponents_neg`` where
``codes < 0``, and 0 elsewhere

(``exponents_neg`` equals ``exponents`` except for TTQ, whose negative scale
is learned on its own). The exponents have the qparam shape (ones except along
the channel axis), so they broadcast against the codes. This is what a
fixed-point export emits: a sign (and zero) per weight, a shift per channel.

Examples
--------
>>> import torch
>>> from tnquant import Binary
>>> from tnquant.quant import Quantizer
>>> w = torch.tensor([[0.5, -0.7], [0.1, -0.2]])
>>> q = Quantizer(Binary(granularity="channel", scale="pow2"))
>>> codes, exps, _ = pow2_codes(q, w)
>>> codes.tolist(), exps.flatten().tolist()
([[1, -1], [1, -1]], [-1, -3])
>>> torch.equal(codes * 2.0**exps, q(w))
True
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from tnquant.quant.frozen import FrozenTensor, spec_summary
from tnquant.quant.qparams import QParams, expand, to_blocks
from tnquant.quant.quantizer import Quantizer
from tnquant.specs import Binary, Ternary

__all__ = ["Pow2Codes", "pow2_codes"]


class Pow2Codes(NamedTuple):
    """What :func:`pow2_codes` returns (see the module docs for the value rule)."""

    codes: Tensor
    """int8 codes of the weight's shape: ``{-1, +1}`` (Binary; 0 only in an
    all-zero block) or ``{-1, 0, +1}`` (Ternary)."""
    exponents: Tensor
    """int32 ``k`` of the (positive-side) scale ``2^k``, in the qparam shape."""
    exponents_neg: Tensor
    """int32 ``k`` of the negative-side scale; ``exponents`` but for TTQ."""


def _exponents(scale: Tensor, which: str, where: str) -> tuple[Tensor, Tensor]:
    """``(k, zero)``: ``scale == 2**k`` where ``scale > 0``; ``zero`` marks ``scale == 0``."""
    s = scale.detach()
    mant, exp = torch.frexp(s.to(torch.promote_types(s.dtype, torch.float32)))
    zero = s == 0
    bad = ~(zero | ((mant == 0.5) & torch.isfinite(s)))
    if bool(bad.any()):
        value = float(s[bad].flatten()[0])
        raise ValueError(
            f"{where} has {which} {value!r}, not a power of two (nor 0); a "
            f"scale='pow2' quantizer stores only powers of two (were its buffers edited?)"
        )
    return torch.where(zero, torch.zeros_like(exp), exp - 1).to(torch.int32), zero


def _codes_and_qparams(quantizer: Any, weight: Tensor | None) -> tuple[Any, Tensor, QParams]:
    if isinstance(quantizer, FrozenTensor):
        return quantizer.spec, quantizer.codes(), quantizer.qparams()
    if isinstance(quantizer, Quantizer):
        if not isinstance(weight, Tensor):
            raise ValueError(
                "pow2_codes of a Quantizer needs the weight tensor it quantizes, got "
                f"{type(weight).__name__}"
            )
        with torch.no_grad():
            codes, qp = quantizer.quantize_codes(weight.detach(), name="weight")
        return quantizer.spec, codes, qp
    raise TypeError(
        f"quantizer must be a Quantizer or a FrozenTensor, got {type(quantizer).__name__}"
    )


def pow2_codes(quantizer: Quantizer | FrozenTensor, weight: Tensor | None = None) -> Pow2Codes:
    """The codes and integer scale exponents of a power-of-two Binary/Ternary weight.

    Parameters
    ----------
    quantizer
        A :class:`~tnquant.quant.Quantizer` (dynamic, calibrated or learned)
        or a converted :class:`~tnquant.quant.frozen.FrozenTensor` of a
        ``Binary(scale='pow2')`` or ``Ternary(scale='pow2')`` spec (any
        granularity, learnable or not: learned scales are read as the forward
        pass rounds them).
    weight
        The tensor a ``Quantizer`` quantizes (its codes depend on it); ignored
        for a ``FrozenTensor``, which holds its codes.

    Returns
    -------
    Pow2Codes
        ``(codes, exponents, exponents_neg)``: the weight the quantizer gives
        is exactly ``2**exponents`` where ``codes > 0``,
        ``-2**exponents_neg`` where ``codes < 0``, 0 elsewhere (for Binary and
        TWN, simply ``codes * 2**exponents``). A block whose scale is 0 (an
        all-zero block, whose weights are 0) gets code 0 everywhere and
        exponent 0.

    Raises
    ------
    TypeError
        For another quantizer type or spec type.
    ValueError
        For ``scale='float'`` (the scales are not powers of two), a missing
        ``weight``, or a stored scale that is not a power of two.

    Examples
    --------
    >>> import torch
    >>> from tnquant import Ternary
    >>> from tnquant.quant import Quantizer
    >>> from tnquant.quant.frozen import FrozenTensor, spec_summary
    >>> w = torch.tensor([[0.9, -0.8, 0.05, 0.7]])
    >>> q = Quantizer(Ternary(scale="pow2"))
    >>> frozen = FrozenTensor.from_quantizer(q, w)
    >>> codes, exps, exps_neg = pow2_codes(frozen)
    >>> codes.tolist(), exps.item(), exps_neg.item()  # alpha = 0.8 -> 2**0
    ([[1, -1, 0, 1]], 0, 0)
    >>> pow2_codes(Quantizer(Ternary()), w)
    Traceback (most recent call last):
    ...
    ValueError: pow2_codes needs a Ternary spec with scale='pow2', got scale='float'
    """
    spec, codes, qp = _codes_and_qparams(quantizer, weight)
    if not isinstance(spec, (Binary, Ternary)):
        raise TypeError(f"pow2_codes needs a Binary or Ternary spec, got {type(spec).__name__}")
    if spec.scale != "pow2":
        raise ValueError(
            f"pow2_codes needs a {type(spec).__name__} spec with scale='pow2', "
            f"got scale={spec.scale!r}"
        )
    where = f"a {spec_summary(spec)} quantizer"
    exps, zero = _exponents(qp.scale, "scale", where)
    exps_neg, zero_neg = exps, zero
    if qp.scale_neg is not None:
        exps_neg, zero_neg = _exponents(qp.scale_neg, "scale_neg", where)
    codes = codes.to(torch.int8)
    if bool((zero | zero_neg).any()):  # a zero scale gives zero weights: code 0
        shape, block = tuple(codes.shape), tuple(qp.block_size)
        c = to_blocks(codes, block)
        dead = (c > 0) & expand(zero, shape, block) | (c < 0) & expand(zero_neg, shape, block)
        codes = torch.where(dead, torch.zeros_like(c), c).reshape(shape)
    return Pow2Codes(codes, exps, exps_neg)
