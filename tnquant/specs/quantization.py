"""Quantizer specs: uniform integer or float-format (``QuantSpec``), ``Binary``, ``Ternary``.

``FixedPoint`` (``ap_fixed``) lives in :mod:`tnquant.specs.fixed_point`;
:data:`QuantizerSpec` is the union of all four.

Examples
--------
>>> QuantSpec(bits=4, granularity="channel").qmax
7
>>> Binary(granularity=("group", 4))
Traceback (most recent call last):
...
ValueError: granularity must be 'tensor' or 'channel' for Binary, got ('group', 4)
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any, Union

import torch

from tnquant.specs.checks import check_bool, check_choice, check_float, check_int, describe
from tnquant.specs.fixed_point import FixedPoint

__all__ = [
    "QuantSpec",
    "Binary",
    "Ternary",
    "QuantizerSpec",
    "Granularity",
    "normalize_granularity",
    "ROUNDING_MODES",
    "SCALE_KINDS",
    "POW2_ROUNDINGS",
    "OBSERVERS",
    "FLOAT_DTYPES",
]

Granularity = Union[str, tuple[str, int]]

ROUNDING_MODES = ("nearest_even", "half_up", "floor", "stochastic")
SCALE_KINDS = ("float", "pow2")
POW2_ROUNDINGS = ("ceil", "round")
OBSERVERS = ("minmax", "ema", "percentile", "mse", "hqq")
FLOAT_DTYPES = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "float8_e5m2": torch.float8_e5m2,
}


def normalize_granularity(granularity: Any) -> Granularity:
    """Return ``'tensor'``, ``'channel'`` or ``('group', n)``, or raise.

    Accepts those, plus a list ``['group', n]`` (as JSON gives it back).

    Examples
    --------
    >>> normalize_granularity(["group", 32])
    ('group', 32)
    """
    expected = "granularity must be 'tensor', 'channel' or ('group', n)"
    if isinstance(granularity, str):
        if granularity in ("tensor", "channel"):
            return granularity
        raise ValueError(f"{expected}, got {granularity!r}")
    if not isinstance(granularity, (tuple, list)):
        raise TypeError(f"{expected}, got {describe(granularity)}")
    if len(granularity) == 2 and isinstance(granularity[0], str) and granularity[0] == "group":
        size = granularity[1]
        if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 1:
            raise ValueError(f"granularity group size must be a positive int, got {describe(size)}")
        return ("group", int(size))
    raise ValueError(f"{expected}, got {describe(granularity)}")


def _check_float_format(dtype: Any) -> str:
    """The name of a float format given by name or as a torch dtype."""
    if isinstance(dtype, torch.dtype):
        names = {v: k for k, v in FLOAT_DTYPES.items()}
        if dtype not in names:
            raise ValueError(f"dtype must be one of {list(FLOAT_DTYPES)}, got {dtype}")
        return names[dtype]
    if not isinstance(dtype, str):
        raise TypeError(
            f"dtype must be None, a str or a torch.dtype, one of "
            f"{list(FLOAT_DTYPES)}, got {describe(dtype)}"
        )
    return check_choice("dtype", dtype, tuple(FLOAT_DTYPES))


def _per_channel(granularity: Any, owner: str) -> Granularity:
    """``'tensor'`` or ``'channel'`` (Binary and Ternary have no groups)."""
    granularity = normalize_granularity(granularity)
    if granularity not in ("tensor", "channel"):
        raise ValueError(
            f"granularity must be 'tensor' or 'channel' for {owner}, got {granularity!r}"
        )
    return granularity


@dataclass(frozen=True)
class QuantSpec:
    """Uniform integer quantization (or a cast to a float format).

    Parameters
    ----------
    bits
        Code width, 1..16. Ignored (set from the format) when ``dtype`` is given.
    symmetric
        Symmetric (zero point 0) or affine (zero point learned from the range).
    granularity
        ``'tensor'``, ``'channel'`` (one scale per index of ``axis``) or
        ``('group', n)`` (one scale per ``n`` consecutive elements along
        ``axis``, for every index of the other axes).
    axis
        The channel axis (``'channel'``) or the grouped axis (``('group', n)``);
        negative values count from the end. ``None`` (the default): the
        layer decides. Per channel is per output channel (axis 0 of a
        Linear/conv weight, per row of an Embedding); a group runs along the
        input (reduction) axis, as in torchao, GPTQ and optimum-quanto: a
        Linear weight's ``in`` (axis 1; Hugging Face's ``Conv1D``, stored
        ``(in, out)``, is quantized through its ``(out, in)`` view), a conv
        weight's input channels (axis 1 of ``(out, in, kh, kw)``), an
        Embedding row's ``dim`` (axis 1). Cores of factorized layers:
        ``LowRankLinear``'s ``U (out, r)`` and ``V (r, in)`` group along
        axis 1 (each one's reduction axis), the other cores along axis 0.
        A bare tensor (``tnquant.quant.quantize``): axis 0 per channel,
        axis 1 per group (axis 0 of a 1-d tensor). In 0.1.0 an unset axis
        meant 0 for groups too; pass ``axis=0`` for that layout.
    scale
        ``'float'`` or ``'pow2'`` (``2^k``; see ``pow2_rounding``).
    pow2_rounding
        ``'ceil'`` (``k = ceil(log2 s)``: the range is never clipped) or
        ``'round'`` (nearest power of two in the log domain).
    observer
        How ranges are estimated during calibration: ``'minmax'``, ``'ema'``,
        ``'percentile'``, ``'mse'`` or ``'hqq'`` (affine grids only: HQQ's
        half-quadratic fit of the zero point and scale, no data; see
        :mod:`tnquant.quant.hqq`).
    learnable
        LSQ: the scale (and, for affine, the offset, LSQ+) is a learned
        parameter.
    narrow_range
        Symmetric codes in ``[-(2^(b-1) - 1), 2^(b-1) - 1]`` instead of
        ``[-2^(b-1), 2^(b-1) - 1]``.
    rounding
        ``'nearest_even'``, ``'half_up'``, ``'floor'`` or ``'stochastic'``.
    dtype
        A float format name or torch dtype (``float16``, ``bfloat16``,
        ``float8_e4m3fn``, ``float8_e5m2``): quantization is then a cast.
    percentile
        Percentile of ``|x|`` (or of each tail, affine) for ``'percentile'``.
    ema_decay
        Decay of the ``'ema'`` observer.

    Examples
    --------
    >>> spec = QuantSpec(bits=4, symmetric=True)
    >>> spec.qmin, spec.qmax
    (-8, 7)
    >>> QuantSpec(bits=8, symmetric=False).qmin
    0
    >>> QuantSpec(dtype="bfloat16").bits
    16
    >>> QuantSpec(bits=4, granularity=("group", 32)).axis is None  # the layer decides
    True
    """

    bits: int = 8
    symmetric: bool = True
    granularity: Granularity = "tensor"
    axis: int | None = None
    scale: str = "float"
    pow2_rounding: str = "ceil"
    observer: str = "minmax"
    learnable: bool = False
    narrow_range: bool = False
    rounding: str = "nearest_even"
    dtype: Any = None
    percentile: float = 99.99
    ema_decay: float = 0.9

    def __post_init__(self) -> None:
        put = object.__setattr__
        if self.dtype is None:
            put(self, "bits", check_int("bits", self.bits, 1, 16))
        else:  # bits is set from the format, but must still be an int
            check_int("bits", self.bits)
            put(self, "dtype", _check_float_format(self.dtype))
            put(self, "bits", torch.finfo(FLOAT_DTYPES[self.dtype]).bits)
        for name in ("symmetric", "learnable", "narrow_range"):
            check_bool(name, getattr(self, name))
        if self.bits == 1 and self.symmetric and self.narrow_range:
            raise ValueError(
                "narrow_range leaves a 1-bit symmetric spec no non-zero code; use Binary()"
            )
        put(self, "granularity", normalize_granularity(self.granularity))
        if self.axis is not None:
            if isinstance(self.axis, bool) or not isinstance(self.axis, numbers.Integral):
                raise TypeError(f"axis must be an int or None, got {describe(self.axis)}")
            put(self, "axis", int(self.axis))
        check_choice("scale", self.scale, SCALE_KINDS)
        check_choice("pow2_rounding", self.pow2_rounding, POW2_ROUNDINGS)
        check_choice("observer", self.observer, OBSERVERS)
        if self.observer == "hqq" and (self.symmetric or self.dtype is not None):
            raise ValueError(
                "observer='hqq' fits the zero point of an affine integer grid: it needs "
                f"symmetric=False and dtype=None, got symmetric={self.symmetric}, "
                f"dtype={self.dtype!r}"
            )
        check_choice("rounding", self.rounding, ROUNDING_MODES)
        put(self, "percentile", check_float("percentile", self.percentile, 0, 100, lo_open=True))
        put(self, "ema_decay", check_float("ema_decay", self.ema_decay, 0, 1, hi_open=True))

    @property
    def torch_dtype(self) -> torch.dtype | None:
        """The torch float dtype of a cast spec, else ``None``."""
        return None if self.dtype is None else FLOAT_DTYPES[self.dtype]

    @property
    def qmin(self) -> int:
        """Smallest integer code."""
        if not self.symmetric:
            return 0
        if self.narrow_range:
            return -(2 ** (self.bits - 1) - 1)
        return -(2 ** (self.bits - 1))

    @property
    def qmax(self) -> int:
        """Largest integer code."""
        if not self.symmetric:
            return 2**self.bits - 1
        return 2 ** (self.bits - 1) - 1


@dataclass(frozen=True)
class Binary:
    """Binary weights ``alpha * sign(W)`` (XNOR-Net).

    ``alpha = mean|W|`` per tensor or per channel (along ``axis``), derived
    from the data, or learned when ``learnable``. ``sign(0)`` is ``+1``.

    Parameters
    ----------
    granularity
        ``'tensor'`` or ``'channel'`` (one ``alpha`` per index of ``axis``).
    axis
        The channel axis; negative values count from the end.
    learnable
        ``alpha`` is a trained parameter (initialised from ``mean|W|``).
    scale
        ``'float'`` (``alpha`` as it comes) or ``'pow2'``: ``alpha`` rounded
        to ``2^k``, ``k = round(log2 alpha)`` (``QuantSpec``'s
        ``pow2_rounding='round'``), so the weights are ``codes * 2^k``, a
        shift in fixed point. A learned ``alpha`` is rounded in the forward
        pass with a straight-through gradient; an all-zero block keeps
        ``alpha = 0``.

    Examples
    --------
    >>> Binary(granularity="channel").bits
    1
    >>> Binary(scale="pow3")
    Traceback (most recent call last):
    ...
    ValueError: scale must be one of ['float', 'pow2'], got 'pow3'
    """

    granularity: Granularity = "tensor"
    axis: int = 0
    learnable: bool = False
    scale: str = "float"

    def __post_init__(self) -> None:
        object.__setattr__(self, "granularity", _per_channel(self.granularity, "Binary"))
        object.__setattr__(self, "axis", check_int("axis", self.axis))
        check_bool("learnable", self.learnable)
        check_choice("scale", self.scale, SCALE_KINDS)

    @property
    def bits(self) -> int:
        return 1


@dataclass(frozen=True)
class Ternary:
    """Ternary weights in ``{-alpha_n, 0, alpha_p}``.

    ``method='twn'`` (Li et al. 2016): ``delta = threshold * mean|W|``,
    ``alpha = mean(|W| where |W| > delta)``, one symmetric scale.
    ``method='ttq'`` (Zhu et al. 2017): the same threshold, separate learned
    positive and negative scales, initialised from the TWN values.

    Parameters
    ----------
    threshold
        ``delta = threshold * mean|W|``, in ``(0, 2)``.
    method
        ``'twn'`` (one scale from the data) or ``'ttq'`` (two learned scales).
    granularity
        ``'tensor'`` or ``'channel'`` (one threshold and scale per index of
        ``axis``).
    axis
        The channel axis; negative values count from the end.
    scale
        ``'float'`` or ``'pow2'``: the scale(s) rounded to ``2^k``,
        ``k = round(log2 alpha)`` (``QuantSpec``'s ``pow2_rounding='round'``),
        so the levels are ``{-2^k_n, 0, 2^k_p}``; the threshold ``delta``
        stays TWN's. TTQ's learned scales are rounded, each on its own, in
        the forward pass with a straight-through gradient.

    Examples
    --------
    >>> Ternary().threshold
    0.7
    >>> Ternary(method="ttq", scale="pow2").learnable
    True
    """

    threshold: float = 0.7
    method: str = "twn"
    granularity: Granularity = "tensor"
    axis: int = 0
    scale: str = "float"

    def __post_init__(self) -> None:
        object.__setattr__(
            self,
            "threshold",
            check_float("threshold", self.threshold, 0, 2, lo_open=True, hi_open=True),
        )
        check_choice("method", self.method, ("twn", "ttq"))
        object.__setattr__(self, "granularity", _per_channel(self.granularity, "Ternary"))
        object.__setattr__(self, "axis", check_int("axis", self.axis))
        check_choice("scale", self.scale, SCALE_KINDS)

    @property
    def bits(self) -> int:
        return 2

    @property
    def learnable(self) -> bool:
        return self.method == "ttq"


QuantizerSpec = Union[QuantSpec, Binary, Ternary, FixedPoint]
