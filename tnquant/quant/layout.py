"""Storage layouts of frozen codes: which container each spec's codes take.

:func:`layout_of` maps a quantizer spec (through the one table
:data:`LAYOUTS`) to its :class:`Layout`: the storage kind (``'packed'``,
``'binary'``, ``'int16'``/``'int32'``/``'int64'``, ``'cast'``), the bits per
code, their signedness and range, and which qparam buffers a
:class:`~tnquant.quant.frozen.FrozenTensor` holds (see that module's docs for
the layouts). :func:`tensor_bits` and :func:`spec_summary` are the size and
name helpers shared by conversion and reports.

Examples
--------
>>> from tnquant import QuantSpec
>>> layout_of(QuantSpec(bits=4)).storage, spec_summary(QuantSpec(bits=4))
('packed', 'int4/tensor')
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from tnquant.quant.primitives import compute_dtype
from tnquant.quant.qparams import block_size
from tnquant.specs import FLOAT_DTYPES, Binary, Codebook, FixedPoint, QuantSpec, Ternary

__all__ = ["Layout", "LAYOUTS", "layout_of", "spec_summary", "tensor_bits"]

_CONTAINERS = (1, 2, 3, 4, 5, 6, 7, 8, 16, 32, 64)
_WIDE = {16: ("int16", torch.int16), 32: ("int32", torch.int32), 64: ("int64", torch.int64)}


def tensor_bits(t: Tensor) -> int:
    """Bits a tensor takes as stored: ``numel * element bits`` (bool: 8).

    Examples
    --------
    >>> tensor_bits(torch.zeros(3, dtype=torch.uint8)), tensor_bits(torch.zeros(2, 2))
    (24, 128)
    """
    if t.dtype == torch.bool:
        return t.numel() * 8
    return t.numel() * t.element_size() * 8


class Layout(NamedTuple):
    """How the codes of one spec are stored (see the module docs)."""

    storage: str
    code_bits: int
    signed: bool
    qmin: int
    qmax: int
    has_scale: bool
    has_zero_point: bool
    has_scale_neg: bool


def _container(qmin: int, qmax: int) -> tuple[int, bool]:
    """Smallest field of ``_CONTAINERS`` bits holding ``[qmin, qmax]``, and its signedness."""
    signed = qmin < 0
    for bits in _CONTAINERS:
        lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
        if lo <= qmin and qmax <= hi:
            return bits, signed
    return 64, signed


def _int_layout(qmin: int, qmax: int, scale: bool, zero_point: bool, scale_neg: bool) -> Layout:
    bits, signed = _container(qmin, qmax)
    storage = "packed" if bits <= 8 else _WIDE[bits][0]
    return Layout(storage, bits, signed, qmin, qmax, scale, zero_point, scale_neg)


def _layout_quantspec(spec: QuantSpec) -> Layout:
    if spec.dtype is not None:
        info = torch.finfo(FLOAT_DTYPES[spec.dtype])
        return Layout("cast", info.bits, True, int(info.min), int(info.max), False, False, False)
    return _int_layout(spec.qmin, spec.qmax, True, not spec.symmetric, False)


def _layout_binary(spec: Binary) -> Layout:
    return Layout("binary", 1, True, -1, 1, True, False, False)


def _layout_ternary(spec: Ternary) -> Layout:
    return _int_layout(-1, 1, True, False, spec.method == "ttq")


def _layout_fixed(spec: FixedPoint) -> Layout:
    return _int_layout(spec.qmin, spec.qmax, False, False, False)


def _layout_codebook(spec: Codebook) -> Layout:
    # unsigned indices 0..2^bits-1; the codebook buffer is FrozenTensor's own
    return _int_layout(spec.qmin, spec.qmax, True, False, False)


#: The one dispatch table from spec type to its storage layout.
LAYOUTS: dict[type, Callable[[Any], Layout]] = {
    QuantSpec: _layout_quantspec,
    Binary: _layout_binary,
    Ternary: _layout_ternary,
    FixedPoint: _layout_fixed,
    Codebook: _layout_codebook,
}


def layout_of(spec: Any) -> Layout:
    """The storage layout of codes quantized under ``spec``.

    Examples
    --------
    >>> from tnquant import QuantSpec, Ternary
    >>> layout_of(QuantSpec(bits=3)).code_bits, layout_of(Ternary()).storage
    (3, 'packed')
    >>> layout_of(QuantSpec(bits=12, symmetric=False)).storage
    'int16'
    """
    fn = LAYOUTS.get(type(spec))
    if fn is None:
        valid = [t.__name__ for t in LAYOUTS]
        raise TypeError(f"spec must be one of {valid}, got {type(spec).__name__}")
    return fn(spec)


def spec_summary(spec: Any) -> str:
    """A short name for a quantizer spec: ``'int4/channel'``, ``'ternary'``, ``'ap_fixed<8,3>'``.

    Examples
    --------
    >>> from tnquant import QuantSpec, Ternary, FixedPoint
    >>> spec_summary(QuantSpec(bits=8, symmetric=False, granularity=("group", 32), axis=1))
    'uint8/group32(axis=1)'
    >>> spec_summary(QuantSpec(bits=4, granularity=("group", 32)))  # the layer's input axis
    'int4/group32'
    >>> spec_summary(Ternary(method="ttq")), spec_summary(FixedPoint(8, 3))
    ('ternary-ttq', 'ap_fixed<8,3>')
    >>> from tnquant import Binary
    >>> spec_summary(Binary(granularity="channel", scale="pow2"))
    'binary/channel,pow2'
    """
    if spec is None:
        return "float"
    if isinstance(spec, FixedPoint):
        return str(spec)
    if isinstance(spec, QuantSpec) and spec.dtype is not None:
        return str(spec.dtype)
    if isinstance(spec, QuantSpec):
        base = f"{'int' if spec.symmetric else 'uint'}{spec.bits}"
    elif isinstance(spec, Codebook):
        base = spec.kind if spec.kind != "kmeans" else f"kmeans{spec.bits}"
    elif isinstance(spec, Binary):
        base = "binary"
    else:
        base = "ternary" if spec.method == "twn" else "ternary-ttq"
    gran = spec.granularity
    if gran != "tensor":
        text = "channel" if gran == "channel" else f"group{gran[1]}"
        shown = spec.axis is not None and (gran != "channel" or spec.axis != 0)
        base += f"/{text}" + (f"(axis={spec.axis})" if shown else "")
    elif isinstance(spec, QuantSpec):
        base += "/tensor"
    if isinstance(spec, Codebook):
        base += "/tensor" if gran == "tensor" else ""
        base += ",block-codebook" if spec.centroids == "block" else ""
        return base + (",learned" if spec.learnable else "")
    base += ",pow2" if spec.scale == "pow2" else ""
    if isinstance(spec, QuantSpec):
        base += ",lsq" if spec.learnable else ""
    return base


def _block(spec: Any, shape: tuple[int, ...]) -> tuple[int, ...]:
    if isinstance(spec, FixedPoint) or (isinstance(spec, QuantSpec) and spec.dtype is not None):
        return shape
    return block_size(shape, spec.granularity, spec.axis)


def _scale_dtype(spec: Any, dtype: torch.dtype) -> torch.dtype:
    """What the quantizers produce: QuantSpec scales in the compute dtype, else ``dtype``."""
    if isinstance(spec, Codebook):
        return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[
            spec.scale_dtype
        ]
    return compute_dtype(dtype) if isinstance(spec, QuantSpec) else dtype
