"""The include / exclude name filter shared by factorize, quantize, rotate and the search."""

from __future__ import annotations

import pytest

from tnquant.core.globs import selected


@pytest.mark.parametrize(
    ("name", "include", "exclude", "expected"),
    [
        ("fc", None, None, True),
        ("enc.layer.0.q", ["enc.*"], None, True),  # '*' crosses dots
        ("dec.q", ["enc.*"], None, False),
        ("enc.k", ["enc.*"], ["*.k"], False),  # exclude wins
        ("enc.q", None, ["*.k"], True),
        ("enc.q", [], None, False),  # an empty include selects nothing
        ("Enc.q", ["enc.*"], None, False),  # case-sensitive
    ],
)
def test_selected(name, include, exclude, expected):
    assert selected(name, include, exclude) is expected


def test_the_old_import_path_warns():
    import importlib
    import sys

    sys.modules.pop("tnquant.names", None)
    with pytest.warns(DeprecationWarning, match="tnquant.core.globs"):
        old = importlib.import_module("tnquant.names")
    assert old.selected is selected
