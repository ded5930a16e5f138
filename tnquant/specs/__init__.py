"""Frozen dataclass specs: what to factorize into, and how to quantize.

Every spec validates itself in ``__post_init__`` and raises ``ValueError`` or
``TypeError`` naming what was expected and what came. Specs are plain data:
they hash, compare, and round-trip through :func:`spec_to_dict` /
:func:`spec_from_dict` (JSON-safe), so they can travel with the layers they
describe and be written next to saved models.

One module per kind: :mod:`~tnquant.specs.factorization` (``TT``, ``Tucker``,
``CP``, ``LowRank``), :mod:`~tnquant.specs.quantization` (``QuantSpec``,
``Binary``, ``Ternary``), :mod:`~tnquant.specs.fixed_point` (``FixedPoint``,
``ap_fixed`` strings), :mod:`~tnquant.specs.codebook` (``Codebook``: NF4, FP4,
k-means tables), :mod:`~tnquant.specs.serialize` (dicts) and
:mod:`~tnquant.specs.checks` (the field checkers they all use). Every name is
re-exported here.

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

from tnquant.specs.checks import (
    check_bool,
    check_choice,
    check_float,
    check_int,
    check_rank,
    check_shape,
    describe,
)
from tnquant.specs.codebook import (
    CODEBOOK_CENTROIDS,
    CODEBOOK_KINDS,
    CODEBOOK_SCALE_DTYPES,
    FP4_TABLE,
    NF4_TABLE,
    Codebook,
)
from tnquant.specs.factorization import (
    CP,
    SVD_METHODS,
    TT,
    FactorizationSpec,
    LowRank,
    Rank,
    Tucker,
)
from tnquant.specs.fixed_point import AP_OVERFLOW, AP_ROUNDING, MAX_INTEGER_BITS, FixedPoint
from tnquant.specs.quantization import (
    FLOAT_DTYPES,
    OBSERVERS,
    POW2_ROUNDINGS,
    ROUNDING_MODES,
    SCALE_KINDS,
    Binary,
    Granularity,
    QuantizerSpec,
    QuantSpec,
    Ternary,
    normalize_granularity,
)
from tnquant.specs.serialize import spec_from_dict, spec_to_dict

__all__ = [
    "TT",
    "Tucker",
    "CP",
    "LowRank",
    "QuantSpec",
    "Binary",
    "Ternary",
    "FixedPoint",
    "Codebook",
    "FactorizationSpec",
    "QuantizerSpec",
    "Granularity",
    "Rank",
    "normalize_granularity",
    "spec_to_dict",
    "spec_from_dict",
    "SVD_METHODS",
    "ROUNDING_MODES",
    "SCALE_KINDS",
    "POW2_ROUNDINGS",
    "OBSERVERS",
    "FLOAT_DTYPES",
    "AP_ROUNDING",
    "AP_OVERFLOW",
    "MAX_INTEGER_BITS",
    "CODEBOOK_KINDS",
    "CODEBOOK_CENTROIDS",
    "CODEBOOK_SCALE_DTYPES",
    "NF4_TABLE",
    "FP4_TABLE",
    "describe",
    "check_bool",
    "check_int",
    "check_float",
    "check_choice",
    "check_rank",
    "check_shape",
]
