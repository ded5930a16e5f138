"""The package version, in a module of its own so that any module can import it.

``tnquant/__init__.py`` re-exports it; modules inside the package import it
from here (importing the package root from inside would be an import cycle).

Examples
--------
>>> from tnquant._version import __version__
>>> __version__.count(".")
2
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
