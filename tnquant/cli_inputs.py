"""Deprecated alias of :mod:`tnquant.cli.inputs` (removed in the next release).

``import tnquant.cli_inputs`` warns with a ``DeprecationWarning``; import :mod:`tnquant.cli.inputs`.
"""

import warnings

from tnquant.cli.inputs import *  # noqa: F403
from tnquant.cli.inputs import __all__ as _all
from tnquant.cli.report import export_inputs as capture_inputs  # noqa: F401

__all__ = [*_all, "capture_inputs"]

warnings.warn(
    "tnquant.cli_inputs is deprecated and will be removed in the next release; "
    "import tnquant.cli.inputs instead",
    DeprecationWarning,
    stacklevel=2,
)
