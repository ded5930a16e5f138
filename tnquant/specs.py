"""Frozen dataclass specs: what to factorize into, and how to quantize.

Every spec validates itself in ``__post_init__`` and raises ``ValueError`` or
``TypeError`` naming what was expected and what came. Specs are plain data:
they hash, compare, and round-trip through :func:`spec_to_dict` /
:func:`spec_from_dict` (JSON-safe), so they can travel with the layers they
describe and be written next to saved models.

Examples
--------
>>> from tnquant import TT, QuantSpec, FixedPoint
>>> TT(ratio=0.1)
TT(rank=None, ratio=0.1, tol=None, order=3, in_shape=None, out_shape=None, svd='truncated')
>>> QuantSpec(bits=4, granularity="channel").qmax
7
>>> FixedPoint.from_string("ap_fixed<16,6,RND,SAT>").width
16
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from dataclasses import dataclass
from typing import Any, Literal, Union

import torch

from tnquant.spec_checks import (
    check_bool,
    check_choice,
    check_float,
    check_int,
    check_rank,
    check_shape,
    describe,
)

__all__ = [
    "TT",
    "Tucker",
    "CP",
    "LowRank",
    "QuantSpec",
    "Binary",
    "Ternary",
    "FixedPoint",
    "FactorizationSpec",
    "QuantizerSpec",
    "Granularity",
    "normalize_granularity",
    "spec_to_dict",
    "spec_from_dict",
]

Rank = Union[int, tuple[int, ...], Literal["full"], None]
Granularity = Union[str, tuple[str, int]]

SVD_METHODS = ("truncated", "randomized")
ROUNDING_MODES = ("nearest_even", "half_up", "floor", "stochastic")
SCALE_KINDS = ("float", "pow2")
POW2_ROUNDINGS = ("ceil", "round")
OBSERVERS = ("minmax", "ema", "percentile", "mse")
FLOAT_DTYPES = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "float8_e5m2": torch.float8_e5m2,
}
AP_ROUNDING = ("TRN", "TRN_ZERO", "RND", "RND_ZERO", "RND_MIN_INF", "RND_INF", "RND_CONV")
AP_OVERFLOW = ("WRAP", "SAT", "SAT_SYM", "SAT_ZERO")


# |integer| of a FixedPoint beyond this is refused (see FixedPoint)
MAX_INTEGER_BITS = 4096


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
            raise ValueError(f"granularity group size must be a positive int, got "
                             f"{describe(size)}")
        return ("group", int(size))
    raise ValueError(f"{expected}, got {describe(granularity)}")


# --------------------------------------------------------------------------- #
# Factorization specs
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class _Factorization:
    """Common fields of a factorization spec: exactly one of rank, ratio, tol.

    rank
        An int (the same for every bond), a tuple (one per bond/mode), or
        ``'full'`` (exact, capped by the shape).
    ratio
        Target fraction of the dense parameter count, in (0, 1].
    tol
        Target relative Frobenius error of the weight, in (0, 1).
    svd
        ``'truncated'`` (exact SVD, in float64) or ``'randomized'`` (for large
        layers).
    """

    rank: Rank = None
    ratio: float | None = None
    tol: float | None = None

    def __post_init__(self) -> None:
        given = [n for n in ("rank", "ratio", "tol") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError(
                f"{type(self).__name__} takes exactly one of rank=, ratio=, tol=; got "
                f"{given if given else 'none'}"
            )
        if self.rank is not None:
            object.__setattr__(self, "rank", check_rank(self.rank))
        if self.ratio is not None:
            object.__setattr__(self, "ratio", check_float("ratio", self.ratio, 0, 1,
                                                          lo_open=True))
        if self.tol is not None:
            object.__setattr__(self, "tol", check_float("tol", self.tol, 0, 1, lo_open=True,
                                                        hi_open=True))


@dataclass(frozen=True)
class _Tensorized(_Factorization):
    """A factorization of a tensorized weight: ``(out_1..out_d) x (in_1..in_d)``.

    order
        Number of factors ``d`` per side when shapes are chosen automatically.
    in_shape, out_shape
        Tensorized shapes, products >= the dimensions (zero padding fills the
        rest); chosen automatically (balanced factors) when omitted. Giving
        one sets ``order`` to its length.
    svd
        ``'truncated'`` (exact, float64) or ``'randomized'``.
    """

    order: int = 3
    in_shape: tuple[int, ...] | None = None
    out_shape: tuple[int, ...] | None = None
    svd: str = "truncated"

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "order", check_int("order", self.order, lo=1))
        in_shape = check_shape("in_shape", self.in_shape)
        out_shape = check_shape("out_shape", self.out_shape)
        if in_shape is not None and out_shape is not None and len(in_shape) != len(out_shape):
            raise ValueError(
                f"in_shape and out_shape must have the same length, got {in_shape} and {out_shape}"
            )
        given = in_shape or out_shape
        if given is not None:
            object.__setattr__(self, "order", len(given))
        object.__setattr__(self, "in_shape", in_shape)
        object.__setattr__(self, "out_shape", out_shape)
        check_choice("svd", self.svd, SVD_METHODS)


@dataclass(frozen=True)
class TT(_Tensorized):
    """Tensor-train matrix (MPO) factorization (Novikov et al. 2015).

    A weight of shape ``(out, in)`` is reshaped to ``(out_1..out_d) x
    (in_1..in_d)`` and split into ``d`` cores of shape ``(r_{k-1}, out_k,
    in_k, r_k)`` with ``r_0 = r_d = 1``. ``rank`` as a tuple gives the
    ``d - 1`` inner bond ranks. On an Embedding the weight is ``(num, dim)``
    and ``out``/``in`` stand for rows/columns (TT-Rec).

    Examples
    --------
    >>> TT(rank=8, order=2)
    TT(rank=8, ratio=None, tol=None, order=2, in_shape=None, out_shape=None, svd='truncated')
    """


@dataclass(frozen=True)
class Tucker(_Tensorized):
    """Tucker factorization.

    On a Linear weight with ``order=1`` (the default): Tucker-2,
    ``W = U_out @ G @ U_in^T``, a chain of three dense maps. With
    ``order=d > 1`` the weight is tensorized to ``(out_1..out_d, in_1..in_d)``
    and gets a full Tucker decomposition with ``2d`` factors (as
    TensorLy-Torch's tensorized Tucker). On a Conv2d kernel: Tucker-2 on the
    channel modes (Kim et al. 2016): a 1x1 conv in, the core conv, a 1x1
    conv out. ``rank`` as a tuple gives one rank per factor, output modes
    first: ``(r_out, r_in)`` for Tucker-2.

    Examples
    --------
    >>> Tucker(rank=(16, 8)).rank
    (16, 8)
    """

    order: int = 1


@dataclass(frozen=True)
class CP(_Factorization):
    """CP (canonical polyadic) factorization, Lebedev et al. 2015 for convs.

    ``rank`` is a single int (a tuple is refused).

    Examples
    --------
    >>> CP(rank=16).rank
    16
    """

    n_iter_max: int = 200

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.rank, tuple):
            raise ValueError(f"rank must be a single int for CP, got {self.rank!r}")
        object.__setattr__(self, "n_iter_max", check_int("n_iter_max", self.n_iter_max, lo=1))


@dataclass(frozen=True)
class LowRank(_Factorization):
    """Low-rank factorization ``W = U @ V`` (truncated SVD, the 2-core case).

    Examples
    --------
    >>> LowRank(ratio=0.1).ratio
    0.1
    """

    svd: str = "truncated"

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.rank, tuple):
            raise ValueError(f"rank must be a single int for LowRank, got {self.rank!r}")
        check_choice("svd", self.svd, SVD_METHODS)


FactorizationSpec = Union[TT, Tucker, CP, LowRank]


def _check_float_format(dtype: Any) -> str:
    """The name of a float format given by name or as a torch dtype."""
    if isinstance(dtype, torch.dtype):
        names = {v: k for k, v in FLOAT_DTYPES.items()}
        if dtype not in names:
            raise ValueError(f"dtype must be one of {list(FLOAT_DTYPES)}, got {dtype}")
        return names[dtype]
    if not isinstance(dtype, str):
        raise TypeError(f"dtype must be None, a str or a torch.dtype, one of "
                        f"{list(FLOAT_DTYPES)}, got {describe(dtype)}")
    return check_choice("dtype", dtype, tuple(FLOAT_DTYPES))


def _per_channel(granularity: Any, owner: str) -> Granularity:
    """``'tensor'`` or ``'channel'`` (Binary and Ternary have no groups)."""
    granularity = normalize_granularity(granularity)
    if granularity not in ("tensor", "channel"):
        raise ValueError(f"granularity must be 'tensor' or 'channel' for {owner}, got "
                         f"{granularity!r}")
    return granularity


# --------------------------------------------------------------------------- #
# Quantizer specs
# --------------------------------------------------------------------------- #


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
        The channel axis (``'channel'``) or the grouped axis (``('group', n)``).
        Negative values count from the end.
    scale
        ``'float'`` or ``'pow2'`` (``2^k``; see ``pow2_rounding``).
    pow2_rounding
        ``'ceil'`` (``k = ceil(log2 s)``: the range is never clipped) or
        ``'round'`` (nearest power of two in the log domain).
    observer
        How ranges are estimated during calibration: ``'minmax'``, ``'ema'``,
        ``'percentile'`` or ``'mse'``.
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
    """

    bits: int = 8
    symmetric: bool = True
    granularity: Granularity = "tensor"
    axis: int = 0
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
            raise ValueError("narrow_range leaves a 1-bit symmetric spec no non-zero code; "
                             "use Binary()")
        put(self, "granularity", normalize_granularity(self.granularity))
        put(self, "axis", check_int("axis", self.axis))
        check_choice("scale", self.scale, SCALE_KINDS)
        check_choice("pow2_rounding", self.pow2_rounding, POW2_ROUNDINGS)
        check_choice("observer", self.observer, OBSERVERS)
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

    Examples
    --------
    >>> Binary(granularity="channel").bits
    1
    """

    granularity: Granularity = "tensor"
    axis: int = 0
    learnable: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "granularity", _per_channel(self.granularity, "Binary"))
        object.__setattr__(self, "axis", check_int("axis", self.axis))
        check_bool("learnable", self.learnable)

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

    Examples
    --------
    >>> Ternary().threshold
    0.7
    """

    threshold: float = 0.7
    method: str = "twn"
    granularity: Granularity = "tensor"
    axis: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "threshold", check_float("threshold", self.threshold, 0, 2,
                                                          lo_open=True, hi_open=True))
        check_choice("method", self.method, ("twn", "ttq"))
        object.__setattr__(self, "granularity", _per_channel(self.granularity, "Ternary"))
        object.__setattr__(self, "axis", check_int("axis", self.axis))

    @property
    def bits(self) -> int:
        return 2

    @property
    def learnable(self) -> bool:
        return self.method == "ttq"


_AP_RE = re.compile(r"^\s*(ap_u?fixed)\s*<\s*([^>]*)>\s*$")


@dataclass(frozen=True)
class FixedPoint:
    """``ap_fixed<W,I,Q,O>`` (signed) or ``ap_ufixed<W,I,Q,O>`` (unsigned).

    A value is ``mantissa * 2**-(W - I)`` with a ``W``-bit mantissa.
    ``integer`` may be negative or exceed ``width`` (as in Vivado HLS).

    Parameters
    ----------
    width, integer
        ``W`` (1..64) and ``I`` (-4096..4096: beyond +-2100 or so every
        finite float64 already maps to zero or out of range). Mantissas
        (:func:`~tnquant.quant.to_mantissa`) work for every such type; the
        float values of a type whose step or range is beyond a float dtype
        are refused where they are formed (``scale``, ``from_mantissa``,
        ``fake_quantize``).
    signed
        ``ap_fixed`` (two's complement) or ``ap_ufixed``.
    rounding
        One of ``TRN`` (floor, the default), ``TRN_ZERO``, ``RND`` (ties to
        +inf), ``RND_ZERO``, ``RND_MIN_INF``, ``RND_INF``, ``RND_CONV`` (ties
        to even).
    overflow
        One of ``WRAP`` (the default), ``SAT``, ``SAT_SYM``, ``SAT_ZERO``.

    Examples
    --------
    >>> fp = FixedPoint(8, 3, rounding="RND", overflow="SAT")
    >>> str(fp)
    'ap_fixed<8,3,RND,SAT>'
    >>> fp.scale
    0.03125
    >>> FixedPoint.from_string("ap_ufixed<4,4>") == FixedPoint(4, 4, signed=False)
    True
    """

    width: int
    integer: int
    signed: bool = True
    rounding: str = "TRN"
    overflow: str = "WRAP"

    def __post_init__(self) -> None:
        object.__setattr__(self, "width", check_int("width", self.width, 1, 64))
        object.__setattr__(self, "integer", check_int("integer", self.integer,
                                                      -MAX_INTEGER_BITS, MAX_INTEGER_BITS))
        check_bool("signed", self.signed)
        check_choice("rounding", self.rounding, AP_ROUNDING)
        check_choice("overflow", self.overflow, AP_OVERFLOW)

    @property
    def bits(self) -> int:
        return self.width

    @property
    def frac(self) -> int:
        """Fractional bits ``W - I``."""
        return self.width - self.integer

    @property
    def scale(self) -> float:
        """The value of one mantissa step, ``2**-(W - I)``.

        Raises ``ValueError`` when that step is not a float64 (``W - I``
        outside ``-1023..1074``).
        """
        if not -1023 <= self.frac <= 1074:
            raise ValueError(f"integer {self.integer} with width {self.width} gives {self} a step "
                             f"2**{-self.frac}, beyond float64 (2**-1074 .. 2**1023)")
        return math.ldexp(1.0, -self.frac)

    @property
    def qmin(self) -> int:
        return -(2 ** (self.width - 1)) if self.signed else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.width - 1) - 1 if self.signed else 2**self.width - 1

    def __str__(self) -> str:
        name = "ap_fixed" if self.signed else "ap_ufixed"
        args = [str(self.width), str(self.integer)]
        if self.rounding != "TRN" or self.overflow != "WRAP":
            args.append(self.rounding)
        if self.overflow != "WRAP":
            args.append(self.overflow)
        return f"{name}<{','.join(args)}>"

    def to_string(self) -> str:
        """The ``ap_fixed<...>`` type string (defaults left out, as HLS writes it)."""
        return str(self)

    @classmethod
    def from_string(cls, text: str) -> FixedPoint:
        """Parse ``ap_fixed<W,I[,Q[,O[,N]]]>`` or ``ap_ufixed<...>``.

        The saturation-bits argument ``N`` is accepted only as 0.
        """
        if not isinstance(text, str):
            raise TypeError(f"expected an 'ap_fixed<W,I,...>' str, got {describe(text)}")
        match = _AP_RE.match(text)
        if not match:
            raise ValueError(f"expected 'ap_fixed<W,I,...>' or 'ap_ufixed<W,I,...>', got {text!r}")
        args = [a.strip() for a in match.group(2).split(",")]
        if not 2 <= len(args) <= 5:
            raise ValueError(
                f"ap_fixed takes 2 to 5 template arguments, got {len(args)} in {text!r}"
            )
        try:
            width, integer = int(args[0]), int(args[1])
        except ValueError:
            raise ValueError(f"W and I must be integers in {text!r}") from None
        rounding = args[2] if len(args) > 2 else "TRN"
        overflow = args[3] if len(args) > 3 else "WRAP"
        if len(args) > 4 and args[4] != "0":
            raise ValueError(f"saturation bits N != 0 are not supported, got {text!r}")
        rounding = rounding.replace("AP_", "")
        overflow = overflow.replace("AP_", "")
        return cls(
            width,
            integer,
            signed=match.group(1) == "ap_fixed",
            rounding=rounding,
            overflow=overflow,
        )


QuantizerSpec = Union[QuantSpec, Binary, Ternary, FixedPoint]

_SPEC_TYPES: dict[str, type] = {
    cls.__name__: cls for cls in (TT, Tucker, CP, LowRank, QuantSpec, Binary, Ternary, FixedPoint)
}


def spec_to_dict(spec: Any) -> dict[str, Any]:
    """A JSON-safe dict of a spec, with its type under ``'type'``.

    Examples
    --------
    >>> spec_to_dict(QuantSpec(bits=4, granularity=("group", 32)))["granularity"]
    ['group', 32]
    """
    if _SPEC_TYPES.get(type(spec).__name__) is not type(spec):
        raise TypeError(f"expected a tnquant spec, got {type(spec).__name__}")
    out: dict[str, Any] = {"type": type(spec).__name__}
    for f in dataclasses.fields(spec):
        value = getattr(spec, f.name)
        if isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return out


def spec_from_dict(data: dict[str, Any]) -> Any:
    """Inverse of :func:`spec_to_dict`.

    Safe on dicts from untrusted files: anything but a dict of a known
    ``'type'`` and that type's fields, each of the right type, raises
    ``TypeError`` or ``ValueError`` (never ``KeyError`` or ``AttributeError``);
    nothing is imported or called but the spec's own checks.

    Examples
    --------
    >>> spec_from_dict(spec_to_dict(TT(rank=(4, 4)))) == TT(rank=(4, 4))
    True
    >>> spec_from_dict({"type": "QuantSpec", "symmetric": "false"})
    Traceback (most recent call last):
    ...
    TypeError: symmetric must be a bool, got 'false' (str)
    """
    if not isinstance(data, dict):
        raise TypeError(f"a spec must be a dict with a 'type', got {describe(data)}")
    if "type" not in data:
        raise ValueError(f"a spec dict needs a 'type', one of {sorted(_SPEC_TYPES)}; got keys "
                         f"{sorted(map(str, data))}")
    data = dict(data)
    name = data.pop("type")
    if not isinstance(name, str):
        raise TypeError(f"spec type must be a str, one of {sorted(_SPEC_TYPES)}, got "
                        f"{describe(name)}")
    if name not in _SPEC_TYPES:
        raise ValueError(f"unknown spec type {name!r}; valid types are {sorted(_SPEC_TYPES)}")
    cls = _SPEC_TYPES[name]
    fields = dataclasses.fields(cls)
    names = {f.name for f in fields}
    unknown = [k for k in data if k not in names]
    if unknown:
        raise ValueError(f"unknown field(s) {sorted(map(repr, unknown))} for {name}; expected "
                         f"some of {sorted(names)}")
    missing = [f.name for f in fields if f.name not in data
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ValueError(f"{name} needs field(s) {missing}")
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    return cls(**kwargs)
