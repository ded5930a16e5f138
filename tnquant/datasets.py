"""Deprecated alias of :mod:`tnquant.cli.datasets` (removed in the next release).

``import tnquant.datasets`` warns with a ``DeprecationWarning``; import :mod:`tnquant.cli.datasets`.
"""

import warnings

from tnquant.cli.datasets import *  # noqa: F403
from tnquant.cli.datasets import __all__  # noqa: F401

warnings.warn(
    "tnquant.datasets is deprecated and will be removed in the next release; "
    "import tnquant.cli.datasets instead",
    DeprecationWarning,
    stacklevel=2,
)
