"""Quantized tensors -> integer mantissas and ``ap_fixed`` types; lossless accumulators.

:func:`fixed_codes` reads the codes of a ``FixedPoint`` or power-of-two
quantizer as exact mantissas; :func:`lossless_accum` is the accumulator type
hls4ml's ``infer_precision`` derives. :mod:`tnquant.export.graph` builds the
IR from them, and :mod:`tnquant.export.manifest` re-derives the accumulators
of a loaded manifest with the same function.

Per-channel (or per-group) power-of-two scales are aligned to one binary
point, that of the finest block holding a non-zero code (an all-zero block
needs none). The quantizer never puts a block more than ``2^-24`` below the
tensor's coarsest (:data:`tnquant.quant.ranges.SCALE_SPAN`: a row of ``1e-16``
left by a rank-deficient Tucker core is numerically zero, and gets that floor
instead of ``2^-57``), so an aligned ``b``-bit tensor needs at most ``b + 24``
bits; :func:`fixed_codes` notes the blocks at that floor for the export
report.

Every type too wide for the int64 emulator (:data:`MAX_WIDTH` bits) is
refused before it is built, with a ``ValueError`` that names the op, the
tensor (input, weights, bias, accumulator or result) and the override that
narrows it (:func:`too_wide`).

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
from tnquant.quant.ranges import SCALE_SPAN
from tnquant.specs import FixedPoint, QuantSpec

__all__ = ["fixed_codes", "lossless_accum", "auto_accum", "too_wide", "narrower", "MAX_WIDTH"]

#: widest accumulator the int64 emulator takes (a sum of two stays below 2**63)
MAX_WIDTH = 62


def narrower(integer: int, overflow: str = "SAT") -> str:
    """A ``FixedPoint(...)`` to suggest for a type with ``integer`` integer bits that is too wide.

    It keeps the integer bits (so it does not overflow where the wide type
    did not) and rounds the fractional bits away; ``overflow='WRAP'`` (for an
    accumulator, whose lossless integer bits cannot overflow, and which
    hls4ml may sum in any order then) is left out, the default.

    Examples
    --------
    >>> narrower(6)
    "FixedPoint(24, 6, rounding='RND', overflow='SAT')"
    >>> narrower(30, "WRAP")
    "FixedPoint(38, 30, rounding='RND')"
    """
    i = min(max(1, integer), MAX_WIDTH - 1)
    mode = "" if overflow == "WRAP" else f", overflow={overflow!r}"
    return f"FixedPoint({min(MAX_WIDTH, max(24, i + 8))}, {i}, rounding='RND'{mode})"


def too_wide(op: str, tensor: str, width: int, why: str, fix: str) -> ValueError:
    """The ``ValueError`` for a ``width``-bit type past :data:`MAX_WIDTH`.

    Parameters
    ----------
    op
        The op (or TT step) name, as in the ``accum=``/``result=``/``bias=`` globs.
    tensor
        Which tensor: ``'input'``, ``'weights <name>'``, ``'bias'``,
        ``'accumulator'`` or ``'result'``.
    width
        The bits it would need.
    why
        Where the width comes from (may be empty).
    fix
        The override (or the quantizer change) that narrows it.

    Examples
    --------
    >>> str(too_wide("0.1", "result", 70, "", "narrow it with result={'0.1': ...}"))
    "op '0.1': its result needs 70 bits, wider than 62 bits (the int64 emulator's limit); \
narrow it with result={'0.1': ...}"
    """
    plural = tensor.startswith("products") or "weights" in tensor.split()[:3]
    return ValueError(
        f"op {op!r}: its {tensor} need{'' if plural else 's'} {width} bits"
        f"{f' ({why})' if why else ''}, wider than {MAX_WIDTH} bits (the int64 "
        f"emulator's limit); {fix}"
    )


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


def _floor_note(where: str, spec: Any, c: np.ndarray, full: np.ndarray, exps: Tensor) -> str | None:
    """The report note for the blocks of ``where`` at the quantizer's ``SCALE_SPAN`` floor."""
    if exps.numel() < 2 or not (c != 0).any():
        return None
    top = int(full[c != 0].max())
    floor = top - SCALE_SPAN
    blocks = exps.flatten() == floor
    k = int(blocks.sum())
    if k == 0:
        return None
    live = int(np.count_nonzero((full == floor) & (c != 0)))
    kind = "channels" if getattr(spec, "granularity", None) == "channel" else "blocks"
    rest = "all their codes are 0" if live == 0 else f"{live} of their codes are not 0"
    return (
        f"{where}: {k} of {exps.numel()} {kind} floored to 2^{floor} (their values are "
        f"below 2^-{SCALE_SPAN} of the tensor's largest, numerically zero; {rest})"
    )


def fixed_codes(
    quantizer: Any,
    tensor: Tensor,
    where: str,
    *,
    op: str | None = None,
    notes: list[str] | None = None,
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
    op
        The op it belongs to, for error messages.
    notes
        When given, a line is appended for blocks at the quantizer's
        ``2^-24`` floor (see the module docs).

    Returns
    -------
    (mantissas, spec, exponents)
        int64 mantissas (``value = m * 2**-spec.frac`` exactly), the type, and
        the distinct ``log2`` of the scales of the blocks with a non-zero
        code (of all blocks when every code is 0); the first is ``-spec.frac``.

    Raises
    ------
    ValueError
        For a float scale that is not a power of two, an affine zero point,
        a float-format spec, or aligned mantissas wider than :data:`MAX_WIDTH`.

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
    full = _expand(exps, tuple(qp.shape)).numpy()
    c = codes.to(torch.int64).cpu().numpy()
    used = full[c != 0] if (c != 0).any() else full.flatten()  # all-zero blocks need no bits
    frac = int(-used.min()) if used.size else 0
    shift = np.maximum(frac + full, 0)
    reach = np.where(c != 0, np.frexp(np.abs(c).astype(np.float64))[1] + shift, 0)
    if reach.size and int(reach.max()) >= MAX_WIDTH:
        raise too_wide(
            op or where,
            f"weights {where}",
            int(reach.max()) + 1,
            f"power-of-two scales {int(shift.max())} octaves apart, aligned to one binary point",
            f"{how} per tensor, with fewer bits, or with scales closer together",
        )
    m = np.where(c != 0, c << shift, 0)
    width = max(
        _signed_width(qp.qmin, qp.qmax), _signed_width(int(m.min()), int(m.max())) if m.size else 1
    )
    note = _floor_note(where, spec, c, full, exps) if isinstance(spec, QuantSpec) else None
    if notes is not None and note is not None:
        notes.append(note)
    return m, FixedPoint(width, width - frac), sorted({int(e) for e in used.tolist()})


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
            f"{weight_type} needs {width} bits; FixedPoint holds at most 64 (narrow "
            f"the input with result= on the op before, or give accum=)"
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
    ValueError: op '2': its accumulator needs 69 bits (lossless: 64 products of its input \
ap_fixed<52,13> and weights ap_fixed<11,2>), wider than 62 bits (the int64 emulator's limit); \
narrow the input with result={'0.1': FixedPoint(24, 13, rounding='RND', overflow='SAT')} \
(the op before; lossless widths add up along the chain), or give this op's accumulator \
with accum={'2': FixedPoint(29, 21, rounding='RND')}
    """
    width, integer = _lossless(in_type, w_type, n, bias_type)
    if width <= MAX_WIDTH:
        return FixedPoint(width, integer)
    fix = (
        f"result={{'{prev}': {narrower(in_type.integer)}}} (the op before; lossless "
        f"widths add up along the chain)"
        if prev is not None
        else f"a narrower input_spec than {in_type}"
    )
    wide_w = (
        f"; its weights alone take {w_type.width} bits: quantize them with fewer bits"
        if w_type.width > in_type.width
        else ""
    )
    raise too_wide(
        op,
        "accumulator",
        width,
        f"lossless: {n} products of its input {in_type} and weights {w_type}"
        f"{' plus a bias' if bias_type is not None else ''}",
        f"narrow the input with {fix}, or give this op's accumulator with "
        f"accum={{'{op}': {narrower(integer, 'WRAP')}}}{wide_w}",
    )
