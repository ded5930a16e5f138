"""hls4ml's ``softmax``, bit for bit, on int64 mantissas (the tables: :mod:`tnquant.export.tables`).

The four implementations of ``nnet_activation.h`` (hls4ml 1.3.0):
``'stable'`` (hls4ml's default: ``x_max - x`` through ``inp_norm_t``, the exp
table, the balanced adder tree of ``nnet::reduce`` in ``accum_t``, the
inverse table addressed by the top bits of the sum), ``'latency'``,
``'legacy'`` and ``'argmax'``. :func:`softmax_types` proposes types that
follow the function (hls4ml's defaults collapse wide inputs to ``1/n``: see
:mod:`tnquant.export.tables`).

Examples
--------
>>> import numpy as np
>>> from tnquant.specs import FixedPoint
>>> x_t = FixedPoint(10, 4, rounding="RND", overflow="SAT")
>>> types = softmax_types(x_t, n_slice=3)
>>> y = softmax(np.array([[64, 0, -64]]), x_t, FixedPoint(18, 1, signed=False), **types)
>>> bool(y[0, 0] > y[0, 1] > y[0, 2])
True
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tnquant.export.tables import (
    DEFAULT_ACCUM_T,
    DEFAULT_SOFTMAX_T,
    DEFAULT_TABLE_T,
    SOFTMAX_IMPLEMENTATIONS,
    _address_bits,
    _check_size,
    _check_type,
    _lut_index,
    _mantissas,
    _top_bits,
    exp_table,
    exp_table_legacy,
    invert_table,
    invert_table_legacy,
)
from tnquant.quant.fixed_point import cast_mantissa
from tnquant.specs import FixedPoint

__all__ = ["softmax", "softmax_types"]


def _product(a: np.ndarray, a_t: FixedPoint, b: np.ndarray, b_t: FixedPoint, res_t: FixedPoint):
    """``(res_T)(a * b)``: the exact product of two ``ap_fixed`` cast to ``res_t``."""
    if a_t.width + b_t.width > 63:
        raise ValueError(f"{a_t} * {b_t} is wider than 63 bits; not modelled")
    return cast_mantissa(a * b, a_t.frac + b_t.frac, res_t)


def _reduce_add(x: np.ndarray, accum_t: FixedPoint) -> np.ndarray:
    """``nnet::reduce<accum_t, N, Op_add>`` over the last axis: the same balanced tree.

    Left part ``pow2(floorlog2(N - 1))`` elements, right part the rest; every
    ``a + b`` is exact and cast back to ``accum_t``.
    """
    n = x.shape[-1]
    if n == 1:
        return x[..., 0]
    if n == 2:
        return cast_mantissa(x[..., 0] + x[..., 1], accum_t.frac, accum_t)
    left = 1 << ((n - 1).bit_length() - 1)
    total = _reduce_add(x[..., :left], accum_t) + _reduce_add(x[..., left:], accum_t)
    return cast_mantissa(total, accum_t.frac, accum_t)


def _normalise(e: np.ndarray, res_type: FixedPoint, cfg: dict[str, Any]) -> np.ndarray:
    """``exp_sum = reduce(exp_res)``; ``res = exp_res * invert_table[top bits of exp_sum]``."""
    accum_t, inv_inp_t, inv_table_t = cfg["accum_t"], cfg["inv_inp_t"], cfg["inv_table_t"]
    size = cfg["inv_table_size"]
    total = cast_mantissa(_reduce_add(e, accum_t), accum_t.frac, inv_inp_t)
    table = invert_table(size, inv_table_t, inv_inp_t)
    inv = table[_top_bits(total, inv_inp_t, _address_bits(size, inv_inp_t, "inv_table_size"))]
    return _product(e, accum_t, inv[..., None], inv_table_t, res_type)


def _exp_lookup(idx_m: np.ndarray, idx_t: FixedPoint, cfg: dict[str, Any], neg: bool):
    """``exp_res[i] = exp_table[top bits]``, as ``accum_t`` mantissas."""
    size, table_t = cfg["exp_table_size"], cfg["exp_table_t"]
    table = exp_table(size, table_t, idx_t, exp_scale=cfg["exp_scale"], negative=neg)
    idx = _top_bits(idx_m, idx_t, _address_bits(size, idx_t, "exp_table_size"))
    return cast_mantissa(table[idx], table_t.frac, cfg["accum_t"])


def _legacy(x: np.ndarray, in_type: FixedPoint, res_type: FixedPoint, cfg: dict[str, Any]):
    """``softmax_legacy``: ``1 / sum_j exp(x_j - x_i)`` from two ``table_t`` tables."""
    t, n_exp, n_inv = cfg["table_t"], cfg["exp_table_size"], cfg["inv_table_size"]
    exp_tab, inv_tab = exp_table_legacy(n_exp, t), invert_table_legacy(n_inv, t)
    one = cast_mantissa(np.ones(1, np.int64), 0, t)[0]
    out = np.empty_like(x)
    for i in range(x.shape[-1]):
        acc = np.zeros(x.shape[:-1], np.int64)
        for j in range(x.shape[-1]):
            if i == j:
                term = np.full_like(acc, one)
            else:
                diff = x[..., j] - x[..., i]
                term = exp_tab[_lut_index(diff, in_type.frac, n_exp, 16, in_type.width + 1)]
            acc = cast_mantissa(acc + term, t.frac, t)
        index = _lut_index(acc, t.frac, n_inv, 64, t.width, centred=False)
        out[..., i] = cast_mantissa(inv_tab[index], t.frac, res_type)
    return out


def _softmax_config(in_type: FixedPoint, implementation: str, kw: dict[str, Any]) -> dict[str, Any]:
    """The C config hls4ml writes (``SoftmaxConfigTemplate``, ``FixSoftmaxTableSize``)."""
    cfg = dict(kw)
    for name in ("exp_table_t", "inv_table_t", "accum_t", "inv_inp_t", "table_t"):
        _check_type(cfg[name], name)
    table_size = _check_size(cfg.pop("table_size"), "table_size")
    if cfg["inv_table_size"] is None:  # FixSoftmaxTableSize
        table_size = min(table_size, 2 ** min(in_type.width, cfg["inv_table_t"].width))
        cfg["inv_table_size"] = table_size
    if cfg["exp_table_size"] is None:
        cfg["exp_table_size"] = table_size
    if implementation == "stable" and cfg["inp_norm_t"] is None:
        s = int(in_type.signed)
        if in_type.width - s < 1:
            raise ValueError(f"inp_norm_t cannot be derived from {in_type}; pass one")
        cfg["inp_norm_t"] = FixedPoint(in_type.width - s, in_type.integer - s, signed=False)
        if s:  # hls4ml overrides exp_table_size here, even one that was given
            cfg["exp_table_size"] = min(cfg["inv_table_size"], 2 ** (in_type.width - 1))
    if implementation == "stable":
        _check_type(cfg["inp_norm_t"], "inp_norm_t")
    return cfg


def softmax(
    m_rows: Any,
    in_type: FixedPoint,
    res_type: FixedPoint,
    *,
    implementation: str = "stable",
    table_size: int = 1024,
    exp_table_size: int | None = None,
    inv_table_size: int | None = None,
    exp_table_t: FixedPoint = DEFAULT_SOFTMAX_T,
    inv_table_t: FixedPoint = DEFAULT_SOFTMAX_T,
    accum_t: FixedPoint = DEFAULT_ACCUM_T,
    inv_inp_t: FixedPoint = DEFAULT_SOFTMAX_T,
    inp_norm_t: FixedPoint | None = None,
    exp_scale: float = 1.0,
    table_t: FixedPoint = DEFAULT_TABLE_T,
) -> np.ndarray:
    """hls4ml's ``nnet::softmax`` over the last axis of int64 mantissas of ``in_type``.

    ``stable`` (hls4ml's default): ``d = (inp_norm_t)(x_max - x)``,
    ``exp_res = (accum_t) exp_table[top bits of d]``, ``exp_sum =
    (inv_inp_t) reduce(exp_res)`` (a balanced adder tree in ``accum_t``),
    ``res = (res_T)(exp_res * invert_table[top bits of exp_sum])``.
    ``latency`` addresses the exp table with the top bits of ``x`` itself;
    ``legacy`` sums ``exp(x_j - x_i)`` from ``table_t`` tables and inverts;
    ``argmax`` gives 1 at the first maximum and 0 elsewhere.

    Parameters
    ----------
    m_rows
        Integer mantissas of ``in_type``, ``(..., n)``; each row is one softmax.
    in_type, res_type
        The layer's input and result types.
    implementation
        One of :data:`SOFTMAX_IMPLEMENTATIONS`.
    table_size, exp_table_size, inv_table_size
        As hls4ml derives them: without ``inv_table_size``, ``table_size`` is
        capped at ``2**min(W_in, W_inv_table_t)`` and both sizes default to
        it. Sliced sizes must be powers of two.
    exp_table_t, inv_table_t, accum_t, inv_inp_t, inp_norm_t, exp_scale, table_t
        The config; ``inp_norm_t=None`` is ``ap_ufixed<W-1, I-1>`` of a signed
        input, and then ``exp_table_size = min(inv_table_size, 2**(W-1))``
        (hls4ml overrides a given one too). ``table_t``: the ``legacy`` tables.

    Returns
    -------
    int64 mantissas of ``res_type``, shaped as ``m_rows``.

    Examples
    --------
    >>> x_t, y_t = FixedPoint(16, 6), FixedPoint(16, 6)
    >>> x = np.array([[0, 1024, 2048]])                   # 0, 1, 2
    >>> softmax(x, x_t, y_t)               # 0.0898 0.2451 0.6670 (exact: 0.0900 0.2447 0.6652)
    array([[ 92, 251, 683]])
    >>> softmax(x, x_t, y_t, implementation="argmax")
    array([[   0,    0, 1024]])
    """
    if implementation not in SOFTMAX_IMPLEMENTATIONS:
        raise ValueError(
            f"implementation must be one of {list(SOFTMAX_IMPLEMENTATIONS)}, got {implementation!r}"
        )
    x = _mantissas(m_rows, _check_type(in_type, "in_type"), "m_rows")
    _check_type(res_type, "res_type")
    if x.ndim == 0 or x.shape[-1] == 0:
        raise ValueError(f"m_rows must have a non-empty last axis, got shape {x.shape}")
    cfg = _softmax_config(in_type, implementation, dict(
        table_size=table_size, exp_table_size=exp_table_size, inv_table_size=inv_table_size,
        exp_table_t=exp_table_t, inv_table_t=inv_table_t, accum_t=accum_t, inv_inp_t=inv_inp_t,
        inp_norm_t=inp_norm_t, exp_scale=exp_scale, table_t=table_t,
    ))  # fmt: skip
    if implementation == "argmax":
        out = np.zeros_like(x)
        np.put_along_axis(
            out, x.argmax(axis=-1)[..., None], cast_mantissa(np.ones(1, np.int64), 0, res_type), -1
        )
        return out
    if implementation == "legacy":
        return _legacy(x, in_type, res_type, cfg)
    if implementation == "latency":
        return _normalise(_exp_lookup(x, in_type, cfg, neg=False), res_type, cfg)
    norm_t = cfg["inp_norm_t"]
    d = cast_mantissa(x.max(axis=-1, keepdims=True) - x, in_type.frac, norm_t)
    return _normalise(_exp_lookup(d, norm_t, cfg, neg=True), res_type, cfg)


def softmax_types(in_type: FixedPoint, *, n_slice: int = 16, exp_bits: int = 10) -> dict[str, Any]:
    """Softmax types (``stable``) that follow the function, for :func:`softmax` or hls4ml.

    * ``inp_norm_t = ap_ufixed<B, I_n, RND, SAT>`` with ``I_n = min(4,
      I_in)`` and ``B = I_n + min(F_in, exp_bits - I_n)``: ``x_max - x`` up to
      16 (``exp(-16)`` is below every table step; beyond, it saturates instead
      of wrapping back to ``exp ~ 1``), rounded to nearest, and
      ``exp_table_size = 2**B`` so every value of ``d`` has its own entry.
    * ``exp_table_t = inv_table_t = ap_ufixed<18, 1, RND, SAT>``: values in
      ``(0, 1]``, 17 fractional bits, 1.0 exact.
    * ``accum_t = ap_ufixed<17 + I_a, I_a>``, ``I_a = n_slice.bit_length()``:
      the sum (``1 <= S <= n``) is exact.
    * ``inv_inp_t = ap_ufixed<B_inv, I_a, RND, SAT>``, ``B_inv = max(10, I_a
      + 7)``, ``inv_table_size = 2**B_inv``: ``S`` rounded to a step of
      ``2**-7`` or finer (hls4ml's default reads it in steps of 1/4).

    ``n_slice`` is the softmax length (larger is safe, smaller overflows the
    accumulator). Pair with an unsigned result such as ``ap_ufixed<16, 0, RND, SAT>``.
    In an hls4ml layer config give the types and sizes as plain keys
    (``'inp_norm_t': 'ap_ufixed<10,4,AP_RND,AP_SAT>'``, ``'exp_table_size':
    1024``), except ``accum_t``: ``Precision: {'accum': ...}``. hls4ml 1.3.0
    ignores ``Precision`` entries for the table types.

    Examples
    --------
    >>> t = softmax_types(FixedPoint(16, 6), n_slice=5)
    >>> str(t["inp_norm_t"]), t["exp_table_size"], str(t["inv_inp_t"]), t["inv_table_size"]
    ('ap_ufixed<10,4,RND,SAT>', 1024, 'ap_ufixed<10,3,RND,SAT>', 1024)
    """
    _check_type(in_type, "in_type")
    n = _check_size(n_slice, "n_slice")
    bits = _check_size(exp_bits, "exp_bits")
    i_n = min(4, in_type.integer)
    width = max(1, i_n + min(in_type.frac, bits - i_n))
    i_a = n.bit_length()
    inv_bits = max(10, i_a + 7)
    unit = FixedPoint(18, 1, signed=False, rounding="RND", overflow="SAT")
    return {
        "implementation": "stable",
        "exp_table_size": 2**width,
        "inv_table_size": 2**inv_bits,
        "exp_table_t": unit,
        "inv_table_t": unit,
        "accum_t": FixedPoint(17 + i_a, i_a, signed=False),
        "inv_inp_t": FixedPoint(inv_bits, i_a, signed=False, rounding="RND", overflow="SAT"),
        "inp_norm_t": FixedPoint(width, i_n, signed=False, rounding="RND", overflow="SAT"),
    }
