"""hls4ml's table activations, bit for bit: the tables, ``sigmoid`` and ``tanh``.

``softmax`` (which reads the exp and inverse tables built here) is in
:mod:`tnquant.export.softmax`.

An exact numpy model of ``nnet_activation.h`` (hls4ml 1.3.0, Vivado/Vitis,
``io_parallel``) on int64 mantissas. Tables are built as the C builds them:
float32 where the C has a ``float``, double where it has a double, then
assigned to the table type with its rounding and overflow (``+inf`` from
``1 / 0.0f`` saturates under ``SAT``, wraps to 0 under ``WRAP``).
``std::exp``/``tanh`` on a ``float`` are the C library's ``expf``/``tanhf``,
called through ``ctypes`` (:data:`FLOAT_LIBRARY`): the float64 function
rounded to float32 differs from ``expf`` in about 1 float32 argument in
15,000 and from ``tanhf`` in 1 in 20, enough to change entries of wide tables.

Defaults are hls4ml's for a PyTorch model: ``table_size=1024``,
``table_t=ap_fixed<18,8>``; softmax ``'stable'``, ``exp_table_t = inv_table_t
= inv_inp_t = ap_fixed<18,8,RND,SAT>``, ``accum_t`` the model's default
precision ``ap_fixed<16,6>``, ``inp_norm_t = ap_ufixed<W-1,I-1>`` of the input
``ap_fixed<W,I>``. The exp table is addressed by the top 10 bits of
``inp_norm_t``: for a wide input (hls4ml's own ``ap_fixed<36,16>`` dense
result) ``x_max - x`` is read in steps of 32 and the output collapses to the
constant ``1/n``; the sum is read in steps of 1/4. :func:`softmax_types`
proposes types that follow the function.

Examples
--------
>>> import numpy as np
>>> from tnquant.specs import FixedPoint
>>> x_t = FixedPoint(8, 4)                        # 4 fractional bits
>>> sigmoid(np.array([-16, 0, 16, 127]), x_t, FixedPoint(8, 0, signed=False))
array([ 68, 128, 187, 255])
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from tnquant.quant.fixed_point import cast_mantissa, mantissa_bounds, to_mantissa, wrap
from tnquant.specs import FixedPoint

__all__ = [
    "DEFAULT_TABLE_T",
    "DEFAULT_SOFTMAX_T",
    "DEFAULT_ACCUM_T",
    "FLOAT_LIBRARY",
    "SOFTMAX_IMPLEMENTATIONS",
    "sigmoid_table",
    "tanh_table",
    "exp_table",
    "invert_table",
    "exp_table_legacy",
    "invert_table_legacy",
    "sigmoid",
    "tanh",
]

#: ``table_t`` of every table activation (``fpga_backend.py``, ``Activation``)
DEFAULT_TABLE_T = FixedPoint(18, 8)
#: ``exp_table_t``, ``inv_table_t`` and ``inv_inp_t`` of ``Softmax``
DEFAULT_SOFTMAX_T = FixedPoint(18, 8, rounding="RND", overflow="SAT")
#: ``accum_t`` of ``Softmax``: the model's default precision
DEFAULT_ACCUM_T = FixedPoint(16, 6)
SOFTMAX_IMPLEMENTATIONS = ("stable", "latency", "legacy", "argmax")

_F32 = np.float32

try:  # the C library's expf/tanhf: the functions the C simulation calls
    _LIBM: Any = ctypes.CDLL(ctypes.util.find_library("m") or "libm.so.6")
except OSError:  # pragma: no cover - no C math library
    _LIBM = None
#: where ``expf``/``tanhf`` come from: ``'libm'`` (the C library, as the C
#: simulation) or ``'numpy'`` (float64 rounded to float32, a fallback)
FLOAT_LIBRARY = "libm" if _LIBM is not None else "numpy"


def _float_function(name: str, fallback: Callable[[np.ndarray], np.ndarray]) -> Callable:
    """The C library's float32 ``name`` (``expf``, ``tanhf``), elementwise."""
    if _LIBM is None:  # pragma: no cover
        return lambda x: fallback(np.asarray(x, np.float64)).astype(_F32)
    fn = getattr(_LIBM, name)
    fn.restype, fn.argtypes = ctypes.c_float, [ctypes.c_float]

    def call(x: np.ndarray) -> np.ndarray:
        flat = np.asarray(x, _F32).ravel()
        return np.fromiter(map(fn, flat.tolist()), _F32, flat.size).reshape(np.shape(x))

    return call


_expf = _float_function("expf", np.exp)
_tanhf = _float_function("tanhf", np.tanh)


# --- helpers: float -> ap_fixed, bit slices, checks ------------------------------------------


def _from_float(values: np.ndarray, spec: FixedPoint) -> np.ndarray:
    """``spec`` mantissas of float values, as ``ap_fixed_base(double)`` (``inf`` too)."""
    v = np.asarray(values, np.float64)
    if np.isnan(v).any():
        raise ValueError(f"a table value is NaN; cannot assign it to {spec}")
    inf = np.isinf(v)
    finite = torch.from_numpy(np.where(inf, 0.0, v))
    out = to_mantissa(finite, spec).numpy()
    if inf.any():  # 2**1024: wraps to 0, saturates to the bounds
        lo, hi = mantissa_bounds(spec)
        sat = 0 if spec.overflow in ("WRAP", "SAT_ZERO") else 1
        out = np.where(inf, np.where(v > 0, hi, lo) * sat, out)
    return out.astype(np.int64)


def _check_type(spec: Any, name: str) -> FixedPoint:
    if not isinstance(spec, FixedPoint):
        raise TypeError(f"{name} must be a FixedPoint, got {type(spec).__name__}")
    if spec.width > 62:
        raise ValueError(f"{name} {spec}: widths above 62 bits are not modelled")
    return spec


def _check_size(size: Any, name: str) -> int:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise ValueError(f"{name} must be an int >= 1, got {size!r}")
    return int(size)


def _address_bits(size: int, spec: FixedPoint, name: str) -> int:
    """``ceillog2(size)`` (``nnet_helpers.h``), checked against the addressing type."""
    if size < 2 or size & (size - 1):
        raise ValueError(
            f"{name} must be a power of two >= 2 (a bit slice addresses it), got {size}"
        )
    bits = size.bit_length() - 1
    if bits > spec.width:
        raise ValueError(
            f"{name} {size} needs {bits} address bits, more than {spec}'s {spec.width}"
        )
    return bits


def _mantissas(m: Any, spec: FixedPoint, name: str = "m") -> np.ndarray:
    arr = np.asarray(m)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{name} must hold integer mantissas, got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    if arr.size and (arr.min() < spec.qmin or arr.max() > spec.qmax):
        raise ValueError(
            f"{name} must be mantissas of {spec} in [{spec.qmin}, {spec.qmax}], "
            f"got [{arr.min()}, {arr.max()}]"
        )
    return arr


def _top_bits(m: np.ndarray, spec: FixedPoint, bits: int) -> np.ndarray:
    """``x(x.width - 1, x.width - bits)``: the top ``bits`` bits, unsigned."""
    raw = m & ((1 << spec.width) - 1)
    return raw >> (spec.width - bits)


def _slice_value(i: np.ndarray, spec: FixedPoint, bits: int) -> np.ndarray:
    """``softmax_real_val_from_idx``: ``x(0); x(W-1, W-bits) = i; (float)x``."""
    m = wrap(np.asarray(i, np.int64) << (spec.width - bits), spec.width, spec.signed)
    return np.ldexp(m.astype(np.float64), -spec.frac).astype(_F32)


def _wrap32(x: np.ndarray) -> np.ndarray:
    return (x + (1 << 31)) % (1 << 32) - (1 << 31)


def _trunc_div(a: np.ndarray, b: int) -> np.ndarray:
    q = abs(a) // b
    return np.where(a < 0, -q, q)


def _lut_index(
    m: np.ndarray, frac: int, size: int, span: int, width: int, centred: bool = True
) -> np.ndarray:
    """``int i = x * size / span; i += (span / 2) * size / span``, clamped, as the C does.

    ``x * size`` is exact (``ap_fixed * unsigned``), ``/ span`` an integer
    division of the mantissa truncating toward zero (``sdiv``), the ``int``
    conversion truncates toward zero (``to_int``) and keeps 32 bits; the
    offset is unsigned arithmetic (none for the legacy inverse table).
    """
    a = m.astype(object) if width + size.bit_length() + max(0, -frac) > 62 else m
    q = _trunc_div(a * size, span)
    q = _trunc_div(q, 1 << frac) if frac > 0 else q * (1 << -frac)
    offset = (span // 2 * size) % (1 << 32) // span if centred else 0
    index = _wrap32(_wrap32(q) + offset).astype(np.int64)
    return np.clip(index, 0, size - 1)


# --- tables (int64 mantissas of their type) --------------------------------------------------


def _table(fn: Callable[..., np.ndarray]) -> Callable[..., np.ndarray]:
    """Cache a table builder (arguments are hashable specs); hand out copies."""
    cached = functools.lru_cache(maxsize=64)(fn)

    @functools.wraps(fn)
    def fresh(*args: Any, **kwargs: Any) -> np.ndarray:
        return cached(*args, **kwargs).copy()

    return fresh


def _grid(size: Any, half: float) -> np.ndarray:
    """``float in_val = 2 * half * (ii - float(N) / 2.0) / float(N)`` (double, then float)."""
    n = float(_F32(_check_size(size, "table_size")))
    return ((2 * half * (np.arange(int(n)) - n / 2.0)) / n).astype(_F32)


@_table
def sigmoid_table(table_size: int = 1024, table_t: FixedPoint = DEFAULT_TABLE_T) -> np.ndarray:
    """``init_sigmoid_table``: ``1.0 / (1 + expf(-x))`` on ``[-8, 8)``, as ``table_t`` mantissas.

    Examples
    --------
    >>> sigmoid_table(8, FixedPoint(10, 1))[[0, 4, 7]]       # x = -8, 0, 6
    array([  0, 256, 510])
    """
    e = _expf(-_grid(table_size, 8.0))
    real = (1.0 / (_F32(1) + e).astype(np.float64)).astype(_F32)  # float + float, then double
    return _from_float(real, _check_type(table_t, "table_t"))


@_table
def tanh_table(table_size: int = 1024, table_t: FixedPoint = DEFAULT_TABLE_T) -> np.ndarray:
    """``init_tanh_table``: ``tanhf(x)`` on ``[-4, 4)``, as ``table_t`` mantissas.

    Examples
    --------
    >>> tanh_table(8, FixedPoint(10, 1))[[0, 4, 7]]          # x = -4, 0, 3
    array([-512,    0,  509])
    """
    return _from_float(_tanhf(_grid(table_size, 4.0)), _check_type(table_t, "table_t"))


@_table
def exp_table(
    table_size: int,
    table_t: FixedPoint,
    index_t: FixedPoint,
    *,
    exp_scale: float = 1.0,
    negative: bool = False,
) -> np.ndarray:
    """``init_exp_table<index_t>``: ``expf(+-x * exp_scale)`` at each top-bits value ``x``.

    Entry ``i`` is at the ``index_t`` value whose top ``log2(table_size)`` bits
    are ``i`` and the rest 0 (the bottom of the slice, not its centre).
    ``negative=True`` is the ``stable`` softmax's ``exp(-(x_max - x))``.

    Examples
    --------
    >>> exp_table(4, FixedPoint(8, 2, rounding="RND", overflow="SAT"),
    ...           FixedPoint(4, 2, signed=False), negative=True)          # x = 0, 1, 2, 3
    array([64, 24,  9,  3])
    """
    size = _check_size(table_size, "exp_table_size")
    index_t = _check_type(index_t, "index_t")
    x = _slice_value(np.arange(size), index_t, _address_bits(size, index_t, "exp_table_size"))
    x = x * _F32(exp_scale)
    return _from_float(_expf(-x if negative else x), _check_type(table_t, "exp_table_t"))


@_table
def invert_table(table_size: int, table_t: FixedPoint, index_t: FixedPoint) -> np.ndarray:
    """``init_invert_table<index_t>``: ``1 / x`` (float) at each top-bits value ``x``.

    Entry 0 is ``1 / 0.0f = inf``: the largest value under ``SAT``, 0 under ``WRAP``.

    Examples
    --------
    >>> invert_table(4, FixedPoint(8, 2, rounding="RND", overflow="SAT"),
    ...              FixedPoint(4, 3, signed=False))                   # x = 0, 2, 4, 6
    array([127,  32,  16,  11])
    """
    size = _check_size(table_size, "inv_table_size")
    index_t = _check_type(index_t, "index_t")
    x = _slice_value(np.arange(size), index_t, _address_bits(size, index_t, "inv_table_size"))
    with np.errstate(divide="ignore"):
        return _from_float(_F32(1) / x, _check_type(table_t, "inv_table_t"))


@_table
def exp_table_legacy(table_size: int = 1024, table_t: FixedPoint = DEFAULT_TABLE_T) -> np.ndarray:
    """``init_exp_table_legacy``: ``expf(x)`` on ``[-8, 8)``, as ``table_t`` mantissas.

    Examples
    --------
    >>> exp_table_legacy(4, FixedPoint(12, 10, overflow="SAT"))       # x = -8, -4, 0, 4
    array([  0,   0,   4, 218])
    """
    return _from_float(_expf(_grid(table_size, 8.0)), _check_type(table_t, "table_t"))


@_table
def invert_table_legacy(
    table_size: int = 1024, table_t: FixedPoint = DEFAULT_TABLE_T
) -> np.ndarray:
    """``init_invert_table_legacy``: ``1.0 / x`` (double) on ``[0, 64)``, 0 at ``x = 0``.

    Examples
    --------
    >>> invert_table_legacy(4, FixedPoint(12, 2))                     # x = 0, 16, 32, 48
    array([ 0, 64, 32, 21])
    """
    n = float(_F32(_check_size(table_size, "table_size")))
    x = (64.0 * np.arange(int(n)) / n).astype(_F32).astype(np.float64)
    with np.errstate(divide="ignore"):
        return _from_float(np.where(x > 0, 1.0 / x, 0.0), _check_type(table_t, "table_t"))


# --- sigmoid, tanh ---------------------------------------------------------------------------


def _lookup(
    table: np.ndarray,
    m: Any,
    in_type: FixedPoint,
    res_type: FixedPoint,
    table_t: FixedPoint,
    span: int,
) -> np.ndarray:
    """``(res_T) table[int(x * N / span) + N / 2]`` (``sigmoid``, ``tanh``)."""
    x = _mantissas(m, _check_type(in_type, "in_type"))
    index = _lut_index(x, in_type.frac, len(table), span, in_type.width)
    return cast_mantissa(table[index], table_t.frac, _check_type(res_type, "res_type"))


def sigmoid(
    m: Any,
    in_type: FixedPoint,
    res_type: FixedPoint,
    table_size: int = 1024,
    table_type: FixedPoint = DEFAULT_TABLE_T,
) -> np.ndarray:
    """hls4ml's ``nnet::sigmoid`` on int64 mantissas of ``in_type``.

    ``index = int(x * table_size / 16) + table_size / 2`` (truncated toward
    zero, clamped to the table), then ``(res_T) table[index]``.

    Parameters
    ----------
    m
        Integer mantissas of ``in_type``, any shape.
    in_type, res_type
        The layer's input and result types.
    table_size, table_type
        ``table_size`` and ``table_t`` (hls4ml's defaults 1024, ``ap_fixed<18,8>``).

    Returns
    -------
    int64 mantissas of ``res_type``, shaped as ``m``.

    Examples
    --------
    >>> sigmoid(np.array([-200, 0, 5]), FixedPoint(10, 5), FixedPoint(10, 1))
    array([  0, 256, 275])
    """
    return _lookup(sigmoid_table(table_size, table_type), m, in_type, res_type, table_type, 16)


def tanh(
    m: Any,
    in_type: FixedPoint,
    res_type: FixedPoint,
    table_size: int = 1024,
    table_type: FixedPoint = DEFAULT_TABLE_T,
) -> np.ndarray:
    """hls4ml's ``nnet::tanh`` on int64 mantissas: as :func:`sigmoid`, ``/ 8`` on ``[-4, 4)``.

    Examples
    --------
    >>> tanh(np.array([-200, 0, 5]), FixedPoint(10, 5), FixedPoint(10, 1))
    array([-512,    0,   79])
    """
    return _lookup(tanh_table(table_size, table_type), m, in_type, res_type, table_type, 8)
