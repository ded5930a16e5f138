"""Module names and module replacement: written once for every verb.

Examples
--------
>>> from torch import nn
>>> model = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
>>> old = replace_module(model, "0", nn.Identity())
>>> type(old).__name__, type(model[0]).__name__
('Linear', 'Identity')
>>> join("encoder", "fc"), join("", "fc")
('encoder.fc', 'fc')
"""

from __future__ import annotations

from torch import nn

__all__ = ["join", "find_module", "replace_module"]


def join(prefix: str, name: str) -> str:
    """``prefix.name``, or ``name`` when ``prefix`` is empty (the root)."""
    return f"{prefix}.{name}" if prefix else name


def find_module(model: nn.Module, name: str) -> nn.Module | None:
    """The submodule at ``name`` (``''`` is ``model``), or ``None`` when there is none.

    Examples
    --------
    >>> from torch import nn
    >>> find_module(nn.Sequential(nn.ReLU()), "0").__class__.__name__, find_module(nn.ReLU(), "x")
    ('ReLU', None)
    """
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def replace_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` at ``name`` inside ``model`` (in place); return the module it replaced.

    Indexed containers (``nn.Sequential``, ``nn.ModuleList``) are assigned by
    index, ``nn.ModuleDict`` by key, any other parent by attribute. The root
    (``name == ''``) cannot be replaced in place: callers hold the new root.

    Raises
    ------
    ValueError
        If ``name`` is empty or names no submodule of ``model``.
    """
    if not name:
        raise ValueError(
            "replace_module: the root module (name '') cannot be replaced in "
            "place; use the new module itself"
        )
    parent_name, _, attr = name.rpartition(".")
    parent = find_module(model, parent_name)
    old = find_module(model, name)
    if parent is None or old is None:
        raise ValueError(f"replace_module: the model has no module {name!r}")
    if isinstance(parent, (nn.Sequential, nn.ModuleList)) and attr.lstrip("-").isdigit():
        parent[int(attr)] = new
    elif isinstance(parent, nn.ModuleDict):
        parent[attr] = new
    else:
        setattr(parent, attr, new)
    return old
