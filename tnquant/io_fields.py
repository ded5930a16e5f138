"""Deprecated alias of :mod:`tnquant.io.fields` and :mod:`tnquant.registry.fields` (one release).

The field schemas moved to the layer registry (``tnquant.registry.fields``),
the file-structure checks to ``tnquant.io.fields``.
"""

import warnings
from collections.abc import Mapping

from tnquant.io.fields import (  # noqa: F401
    IntegrityError,
    check_config,
    check_entry,
    check_modules,
    check_node,
    check_tied,
    check_tied_kinds,
    check_tied_values,
)
from tnquant.registry.fields import (  # noqa: F401
    ACTS,
    BOOL,
    CONV_FIELDS,
    DENSE_SLOTS,
    EMBEDDING_FIELDS,
    FACTORIZED_SLOTS,
    FROZEN_FIELDS,
    LEAVES,
    LINEAR_FIELDS,
    MAX_CORES,
    MAX_DIM,
    MAX_NAME,
    MAX_NDIM,
    QCONV_FIELDS,
    QEMBEDDING_FIELDS,
    QUANT_SPECS,
    QUANTIZER_FIELDS,
    SIZE,
    Field,
    is_int,
    parse_spec,
    show,
    spec_field,
)
from tnquant.registry.fields import factorized_fields as _factorized_fields
from tnquant.specs import CP, TT, LowRank, Tucker

#: class name -> the spec types it takes (the registry reads each class's ``spec_type``)
FACTORIZATION_SPECS = {
    "LowRankLinear": (LowRank,),
    "TTLinear": (TT,),
    "TuckerLinear": (Tucker,),
    "TuckerConv2d": (Tucker,),
    "CPConv2d": (CP,),
    "TTEmbedding": (TT,),
}


def factorized_fields(cls_name: str, sizes: Mapping[str, Field]) -> dict[str, Field]:
    """The config schema of the factorized layer ``cls_name``: common fields plus ``sizes``."""
    return _factorized_fields(FACTORIZATION_SPECS[cls_name][0], sizes)


__all__ = [
    "IntegrityError",
    "Field",
    "check_config",
    "parse_spec",
    "spec_field",
    "factorized_fields",
    "check_modules",
    "check_entry",
    "check_node",
    "check_tied",
    "check_tied_kinds",
    "check_tied_values",
    "MAX_DIM",
    "MAX_NDIM",
    "MAX_CORES",
    "SIZE",
    "BOOL",
]

warnings.warn(
    "tnquant.io_fields is deprecated; import from tnquant.io.fields (checks) or "
    "tnquant.registry.fields (schemas) instead",
    DeprecationWarning,
    stacklevel=2,
)
