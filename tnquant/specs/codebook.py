"""``Codebook``: non-uniform quantization, a table of ``2^bits`` values times a block scale.

A weight block ``w`` (one per tensor, channel or group) is stored as the
indices of the nearest entries of a codebook ``c`` to ``w / s``, with the
absmax scale ``s = max |w|`` of the block: ``w_hat = c[index] * s``.

Kinds
-----
``'nf4'``
    The 16 NormalFloat values of QLoRA (Dettmers, Pagnoni, Holtzman and
    Zettlemoyer 2023, "QLoRA: Efficient Finetuning of Quantized LLMs",
    arXiv:2305.14314, appendix E; the table bitsandbytes ships): quantiles of
    a standard normal, rescaled to ``[-1, 1]``, with an exact zero. 4 bits only.
``'fp4'``
    bitsandbytes' 4-bit float (E2M1: 1 sign, 2 exponent, 1 mantissa bit) as
    its ``dDequantizeFP4Tree`` table decodes it (magnitudes ``0``,
    ``0.0052083``, ``1/6``, ``1/4``, ``1/3``, ``1/2``, ``2/3``, ``1``, each
    with both signs; ``+0`` and ``-0`` both decode to 0). 4 bits only.
``'kmeans'``
    ``2^bits`` centroids learned by Lloyd iterations on the absmax-normalized
    weights: one table for the whole tensor (``centroids='tensor'``, the
    default; a few dozen bits per tensor) or one per block
    (``centroids='block'``, ``2^bits`` floats per block).

Examples
--------
>>> Codebook().entries, Codebook(kind="kmeans", bits=3).qmax
(16, 7)
>>> Codebook(kind="nf4", bits=3)
Traceback (most recent call last):
...
ValueError: bits must be 4 for kind='nf4', got 3
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

from tnquant.specs.checks import check_bool, check_choice, check_int, describe
from tnquant.specs.quantization import Granularity, normalize_granularity

__all__ = [
    "Codebook",
    "CODEBOOK_KINDS",
    "CODEBOOK_CENTROIDS",
    "CODEBOOK_SCALE_DTYPES",
    "NF4_TABLE",
    "FP4_TABLE",
]

CODEBOOK_KINDS = ("nf4", "fp4", "kmeans")
CODEBOOK_CENTROIDS = ("tensor", "block")
CODEBOOK_SCALE_DTYPES = ("float32", "float16", "bfloat16")

#: NormalFloat4 (QLoRA, arXiv:2305.14314; bitsandbytes' ``nf4`` table), ascending.
NF4_TABLE: tuple[float, ...] = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)

_FP4_MAGNITUDES = (0.0, 0.005208333333, 0.16666667, 0.25, 0.33333333, 0.5, 0.66666667, 1.0)
#: bitsandbytes' FP4 (E2M1) values, ascending (``-0`` and ``+0`` both 0).
FP4_TABLE: tuple[float, ...] = tuple(-m for m in reversed(_FP4_MAGNITUDES)) + _FP4_MAGNITUDES


@dataclass(frozen=True)
class Codebook:
    """Non-uniform quantization: ``w_hat = codebook[index] * absmax`` per block.

    Parameters
    ----------
    kind
        ``'nf4'``, ``'fp4'`` (published tables, see the module docs) or
        ``'kmeans'`` (centroids learned from the tensor by Lloyd iterations).
    bits
        Index width, 1..8 (``2^bits`` entries); 4 for ``'nf4'``/``'fp4'``.
    granularity
        ``'tensor'``, ``'channel'`` or ``('group', n)``: the blocks that share
        one absmax scale (the default ``('group', 64)`` is QLoRA's block).
    axis
        As for :class:`~tnquant.QuantSpec`: ``None`` lets the layer decide
        (a group runs along the input, reduction, axis).
    learnable
        The codebook entries and the block scales are ``nn.Parameter`` s
        trained by ``finetune`` (straight-through to the weight).
    scale_dtype
        How the block scales are stored: ``'float16'`` (the default, 16 bits
        per block), ``'bfloat16'`` or ``'float32'``. The fake-quant path
        uses the scale rounded to it, so converted == fake-quant exactly.
    centroids
        ``'tensor'``: one codebook for the whole tensor; ``'block'``: one per
        block (learned per block for ``'kmeans'``).
    iters
        Lloyd iterations of ``'kmeans'``, 1..1000.

    Examples
    --------
    >>> spec = Codebook(kind="kmeans", bits=3, granularity=("group", 64))
    >>> spec.entries, spec.granularity
    (8, ('group', 64))
    >>> Codebook(scale_dtype="float64")
    Traceback (most recent call last):
    ...
    ValueError: scale_dtype must be one of ['float32', 'float16', 'bfloat16'], got 'float64'
    """

    kind: str = "nf4"
    bits: int = 4
    granularity: Granularity = ("group", 64)
    axis: int | None = None
    learnable: bool = False
    scale_dtype: str = "float16"
    centroids: str = "tensor"
    iters: int = 25

    def __post_init__(self) -> None:
        put = object.__setattr__
        check_choice("kind", self.kind, CODEBOOK_KINDS)
        put(self, "bits", check_int("bits", self.bits, 1, 8))
        if self.kind in ("nf4", "fp4") and self.bits != 4:
            raise ValueError(f"bits must be 4 for kind={self.kind!r}, got {self.bits}")
        put(self, "granularity", normalize_granularity(self.granularity))
        if self.axis is not None:
            if isinstance(self.axis, bool) or not isinstance(self.axis, numbers.Integral):
                raise TypeError(f"axis must be an int or None, got {describe(self.axis)}")
            put(self, "axis", int(self.axis))
        check_bool("learnable", self.learnable)
        check_choice("scale_dtype", self.scale_dtype, CODEBOOK_SCALE_DTYPES)
        check_choice("centroids", self.centroids, CODEBOOK_CENTROIDS)
        put(self, "iters", check_int("iters", self.iters, 1, 1000))

    @property
    def entries(self) -> int:
        """Number of codebook entries, ``2^bits``."""
        return 1 << self.bits

    @property
    def qmin(self) -> int:
        """Smallest index (0)."""
        return 0

    @property
    def qmax(self) -> int:
        """Largest index, ``2^bits - 1``."""
        return (1 << self.bits) - 1

    @property
    def table(self) -> tuple[float, ...] | None:
        """The published values of ``'nf4'``/``'fp4'`` (ascending); ``None`` for ``'kmeans'``."""
        return {"nf4": NF4_TABLE, "fp4": FP4_TABLE}.get(self.kind)
