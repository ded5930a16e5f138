"""Deprecated alias of :mod:`tnquant.cli.recipe` (removed in the next release).

``import tnquant.recipe`` warns with a ``DeprecationWarning``; import :mod:`tnquant.cli.recipe`.
"""

import warnings

from tnquant.cli.recipe import *  # noqa: F403
from tnquant.cli.recipe import __all__  # noqa: F401

warnings.warn(
    "tnquant.recipe is deprecated and will be removed in the next release; "
    "import tnquant.cli.recipe instead",
    DeprecationWarning,
    stacklevel=2,
)
