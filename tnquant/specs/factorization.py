"""Factorization specs: what a layer is factorized into (``TT``, ``Tucker``, ``CP``, ``LowRank``).

Each spec takes exactly one of ``rank=``, ``ratio=``, ``tol=`` and checks
every field in ``__post_init__`` (:mod:`tnquant.specs.checks`).

Examples
--------
>>> TT(ratio=0.1)
TT(rank=None, ratio=0.1, tol=None, order=3, in_shape=None, out_shape=None, svd='truncated')
>>> CP(rank=(2, 3))
Traceback (most recent call last):
...
ValueError: rank must be a single int for CP, got (2, 3)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Union

from tnquant.specs.checks import check_choice, check_float, check_int, check_rank, check_shape

__all__ = ["TT", "Tucker", "CP", "LowRank", "FactorizationSpec", "Rank", "SVD_METHODS"]

Rank = Union[int, tuple[int, ...], Literal["full"], None]

SVD_METHODS = ("truncated", "randomized")


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
            object.__setattr__(self, "ratio", check_float("ratio", self.ratio, 0, 1, lo_open=True))
        if self.tol is not None:
            object.__setattr__(
                self, "tol", check_float("tol", self.tol, 0, 1, lo_open=True, hi_open=True)
            )


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
