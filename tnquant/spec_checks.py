"""Deprecated alias of :mod:`tnquant.specs.checks` (removed in the next release).

Import the field checkers from ``tnquant.specs.checks`` (or ``tnquant.specs``).
"""

import warnings

from tnquant.specs.checks import (  # noqa: F401
    __all__,
    _is_int,
    _range_text,
    check_bool,
    check_choice,
    check_float,
    check_int,
    check_rank,
    check_shape,
    describe,
)

warnings.warn(
    "tnquant.spec_checks is deprecated; import from tnquant.specs.checks instead",
    DeprecationWarning,
    stacklevel=2,
)
