"""Deprecated alias of :func:`tnquant.core.globs.selected` (removed in the next release).

Import ``selected`` from ``tnquant.core.globs`` (or ``tnquant.core``): every
verb's glob patterns go through that one table.
"""

import warnings

from tnquant.core.globs import selected

__all__ = ["selected"]

warnings.warn(
    "tnquant.names is deprecated; import selected from tnquant.core.globs instead",
    DeprecationWarning,
    stacklevel=2,
)
