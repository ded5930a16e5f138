"""Deprecated alias of :mod:`tnquant.io.nodes` and :mod:`tnquant.registry.serialize`.

The handlers are part of the layer registry now (``tnquant.registry``);
``HANDLERS`` is a live view of it. Removed in the next release.
"""

import warnings

from tnquant.io.nodes import (  # noqa: F401
    HANDLERS,
    BuildContext,
    Handler,
    __all__,
    build_node,
    describe_entries,
    describe_node,
)

warnings.warn(
    "tnquant.io_modules is deprecated; import from tnquant.io.nodes or tnquant.registry instead",
    DeprecationWarning,
    stacklevel=2,
)
