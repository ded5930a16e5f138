"""Module-name patterns: the ``include`` / ``exclude`` filter shared by the model-wide verbs.

Examples
--------
>>> selected("encoder.layer.0.query", ["encoder.*"], ["*.key"])
True
>>> selected("encoder.layer.0.key", ["encoder.*"], ["*.key"])
False
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable

__all__ = ["selected"]


def selected(name: str, include: Iterable[str] | None, exclude: Iterable[str] | None) -> bool:
    """Whether ``name`` matches an ``include`` glob (or ``include`` is None) and no ``exclude`` one.

    Globs are :func:`fnmatch.fnmatchcase` patterns (``*`` also crosses dots).
    """
    if include is not None and not any(fnmatch.fnmatchcase(name, p) for p in include):
        return False
    return exclude is None or not any(fnmatch.fnmatchcase(name, p) for p in exclude)
