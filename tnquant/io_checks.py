"""Deprecated alias of :mod:`tnquant.io.checks` (removed in the next release)."""

import warnings

from tnquant.io.checks import (  # noqa: F401
    MAX_HEADER_BYTES,
    MAX_JSON_BYTES,
    SAFETENSORS_DTYPES,
    IntegrityError,
    TensorInfo,
    __all__,
    check_base_state,
    check_listing,
    check_meta,
    check_planned,
    check_replaced,
    check_replaces,
    check_states,
    finish_layer,
    read_header,
    read_regular,
)
from tnquant.io.files import dtype_name  # noqa: F401

warnings.warn(
    "tnquant.io_checks is deprecated; import from tnquant.io.checks instead",
    DeprecationWarning,
    stacklevel=2,
)
