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
import re
from dataclasses import dataclass
from typing import Any, Literal, Union

import torch

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


def _choice(name: str, value: Any, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ValueError(f"{name} must be one of {list(valid)}, got {value!r}")


def normalize_granularity(granularity: Any) -> Granularity:
    """Return ``'tensor'``, ``'channel'`` or ``('group', n)``, or raise.

    Accepts those, plus a list ``['group', n]`` (as JSON gives it back).

    Examples
    --------
    >>> normalize_granularity(["group", 32])
    ('group', 32)
    """
    if granularity in ("tensor", "channel"):
        return granularity
    if (
        isinstance(granularity, (tuple, list))
        and len(granularity) == 2
        and granularity[0] == "group"
    ):
        size = granularity[1]
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"group size must be a positive int, got {size!r}")
        return ("group", size)
    raise ValueError(
        f"granularity must be 'tensor', 'channel' or ('group', n), got {granularity!r}"
    )


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
        rank = self.rank
        if rank is not None:
            if isinstance(rank, list):
                rank = tuple(rank)
                object.__setattr__(self, "rank", rank)
            if rank == "full":
                pass
            elif isinstance(rank, bool) or not isinstance(rank, (int, tuple)):
                raise TypeError(f"rank must be an int, a tuple of ints or 'full', got {rank!r}")
            else:
                values = rank if isinstance(rank, tuple) else (rank,)
                if not values or any(
                    isinstance(r, bool) or not isinstance(r, int) or r <= 0 for r in values
                ):
                    raise ValueError(f"rank must be positive int(s), got {rank!r}")
        if self.ratio is not None:
            if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)):
                raise TypeError(f"ratio must be a float in (0, 1], got {self.ratio!r}")
            if not 0 < self.ratio <= 1:
                raise ValueError(f"ratio must be in (0, 1], got {self.ratio}")
            object.__setattr__(self, "ratio", float(self.ratio))
        if self.tol is not None:
            if isinstance(self.tol, bool) or not isinstance(self.tol, (int, float)):
                raise TypeError(f"tol must be a float in (0, 1), got {self.tol!r}")
            if not 0 < self.tol < 1:
                raise ValueError(f"tol must be in (0, 1), got {self.tol}")
            object.__setattr__(self, "tol", float(self.tol))


def _check_shape(name: str, shape: Any) -> tuple[int, ...] | None:
    if shape is None:
        return None
    shape = tuple(shape)
    if not shape or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in shape):
        raise ValueError(f"{name} must be a tuple of positive ints, got {shape!r}")
    return shape


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
        if isinstance(self.order, bool) or not isinstance(self.order, int) or self.order < 1:
            raise ValueError(f"order must be an int >= 1, got {self.order!r}")
        in_shape = _check_shape("in_shape", self.in_shape)
        out_shape = _check_shape("out_shape", self.out_shape)
        if in_shape is not None and out_shape is not None and len(in_shape) != len(out_shape):
            raise ValueError(
                f"in_shape and out_shape must have the same length, got {in_shape} and {out_shape}"
            )
        given = in_shape or out_shape
        if given is not None:
            object.__setattr__(self, "order", len(given))
        object.__setattr__(self, "in_shape", in_shape)
        object.__setattr__(self, "out_shape", out_shape)
        _choice("svd", self.svd, SVD_METHODS)


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
            raise ValueError(f"CP rank must be a single int, got {self.rank!r}")
        if self.n_iter_max < 1:
            raise ValueError(f"n_iter_max must be >= 1, got {self.n_iter_max}")


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
            raise ValueError(f"LowRank rank must be a single int, got {self.rank!r}")
        _choice("svd", self.svd, SVD_METHODS)


FactorizationSpec = Union[TT, Tucker, CP, LowRank]


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
        if self.dtype is not None:
            dtype = self.dtype
            if isinstance(dtype, torch.dtype):
                names = {v: k for k, v in FLOAT_DTYPES.items()}
                if dtype not in names:
                    raise ValueError(f"dtype must be one of {list(FLOAT_DTYPES)}, got {dtype}")
                dtype = names[dtype]
            _choice("dtype", dtype, tuple(FLOAT_DTYPES))
            object.__setattr__(self, "dtype", dtype)
            object.__setattr__(self, "bits", torch.finfo(FLOAT_DTYPES[dtype]).bits)
        if isinstance(self.bits, bool) or not isinstance(self.bits, int):
            raise TypeError(f"bits must be an int, got {self.bits!r}")
        if not 1 <= self.bits <= 16:
            raise ValueError(f"bits must be in 1..16, got {self.bits}")
        if self.bits == 1 and self.symmetric and self.narrow_range:
            raise ValueError("a 1-bit symmetric narrow range has no non-zero code; use Binary()")
        object.__setattr__(self, "granularity", normalize_granularity(self.granularity))
        if isinstance(self.axis, bool) or not isinstance(self.axis, int):
            raise TypeError(f"axis must be an int, got {self.axis!r}")
        _choice("scale", self.scale, SCALE_KINDS)
        _choice("pow2_rounding", self.pow2_rounding, POW2_ROUNDINGS)
        _choice("observer", self.observer, OBSERVERS)
        _choice("rounding", self.rounding, ROUNDING_MODES)
        if not 0 < self.percentile <= 100:
            raise ValueError(f"percentile must be in (0, 100], got {self.percentile}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")

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
        granularity = normalize_granularity(self.granularity)
        if granularity not in ("tensor", "channel"):
            raise ValueError(
                f"Binary granularity must be 'tensor' or 'channel', got {granularity!r}"
            )
        object.__setattr__(self, "granularity", granularity)

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
        if not 0 < self.threshold < 2:
            raise ValueError(f"threshold must be in (0, 2), got {self.threshold}")
        _choice("method", self.method, ("twn", "ttq"))
        granularity = normalize_granularity(self.granularity)
        if granularity not in ("tensor", "channel"):
            raise ValueError(
                f"Ternary granularity must be 'tensor' or 'channel', got {granularity!r}"
            )
        object.__setattr__(self, "granularity", granularity)

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
        ``W`` (1..64) and ``I``.
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
        for name in ("width", "integer"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {value!r}")
        if not 1 <= self.width <= 64:
            raise ValueError(f"width must be in 1..64, got {self.width}")
        _choice("rounding", self.rounding, AP_ROUNDING)
        _choice("overflow", self.overflow, AP_OVERFLOW)

    @property
    def bits(self) -> int:
        return self.width

    @property
    def frac(self) -> int:
        """Fractional bits ``W - I``."""
        return self.width - self.integer

    @property
    def scale(self) -> float:
        """The value of one mantissa step, ``2**-(W - I)``."""
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
    if type(spec).__name__ not in _SPEC_TYPES:
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

    Examples
    --------
    >>> spec_from_dict(spec_to_dict(TT(rank=(4, 4)))) == TT(rank=(4, 4))
    True
    """
    data = dict(data)
    name = data.pop("type", None)
    if name not in _SPEC_TYPES:
        raise ValueError(f"unknown spec type {name!r}; valid types are {sorted(_SPEC_TYPES)}")
    cls = _SPEC_TYPES[name]
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"unknown field(s) {sorted(unknown)} for {name}")
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    return cls(**kwargs)
