"""Deprecated alias of :mod:`tnquant.cli.checks` (removed in the next release).

``import tnquant.cli_checks`` warns with a ``DeprecationWarning``; import :mod:`tnquant.cli.checks`.
"""

import warnings

from tnquant.cli.checks import *  # noqa: F403
from tnquant.cli.checks import __all__  # noqa: F401

warnings.warn(
    "tnquant.cli_checks is deprecated and will be removed in the next release; "
    "import tnquant.cli.checks instead",
    DeprecationWarning,
    stacklevel=2,
)
