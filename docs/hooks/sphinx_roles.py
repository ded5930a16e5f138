"""MkDocs hook: render the Sphinx roles of the numpydoc docstrings as plain code.

The docstrings say ``:func:`fixed_point``` or ``:class:`~tnquant.quant.Quantizer```
(numpydoc/Sphinx style). mkdocstrings renders those as ``:func:<code>...</code>``;
this hook drops the role and, for ``~a.b.C``, keeps only ``C``, as Sphinx does.
"""

from __future__ import annotations

import re
from typing import Any

_ROLE = re.compile(r":(?:func|class|mod|meth|attr|data|exc|obj|const):<code>(~?)([^<]*)</code>")


def _plain(match: re.Match[str]) -> str:
    tilde, target = match.groups()
    return f"<code>{target.rsplit('.', 1)[-1] if tilde else target}</code>"


def on_page_content(html: str, **kwargs: Any) -> str:
    return _ROLE.sub(_plain, html)
