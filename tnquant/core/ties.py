"""Tied parameters: one ``nn.Parameter`` object held by two or more modules.

A tied language model (``LlamaConfig(tie_word_embeddings=True)``, GPT-2)
holds its embedding matrix once: ``lm_head.weight is embed_tokens.weight``.
The verbs ask here before they change a layer, so that a tie is kept or
refused, never broken silently: ``factorize`` refuses a tied member,
``quantize`` gives tied members one shared quantizer, ``convert`` one
shared frozen tensor, the size count and ``save`` count and store it once.

A module reachable under several names (the same module object) is not a
tie: it is one module, handled once.

Examples
--------
>>> from torch import nn
>>> emb, head = nn.Embedding(10, 4), nn.Linear(4, 10, bias=False)
>>> head.weight = emb.weight
>>> model = nn.ModuleDict({"emb": emb, "head": head})
>>> tied_names(model)
{'emb': ['head'], 'head': ['emb']}
>>> tie_groups(model)
[[('emb', 'weight'), ('head', 'weight')]]
"""

from __future__ import annotations

from torch import nn

__all__ = ["tie_groups", "tied_names", "untie_hint"]


def tie_groups(model: nn.Module) -> list[list[tuple[str, str]]]:
    """``[(module name, attribute), ...]`` per parameter held by two or more distinct modules.

    Each module object counts once (under its first name); the groups and
    their members are in ``named_modules`` order.

    Examples
    --------
    >>> from torch import nn
    >>> tie_groups(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)))
    []
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    holders: dict[int, list[tuple[str, str]]] = {}
    for name, module in model.named_modules():
        for attr, p in module._parameters.items():
            if p is not None:
                holders.setdefault(id(p), []).append((name, attr))
    return [group for group in holders.values() if len({module for module, _ in group}) > 1]


def tied_names(model: nn.Module) -> dict[str, list[str]]:
    """Module name -> the names of the other modules it shares a parameter with.

    Examples
    --------
    >>> from torch import nn
    >>> tied_names(nn.Linear(2, 2))
    {}
    """
    out: dict[str, list[str]] = {}
    for group in tie_groups(model):
        names = list(dict.fromkeys(module for module, _ in group))
        for name in names:
            others = out.setdefault(name, [])
            others.extend(n for n in names if n != name and n not in others)
    return out


def untie_hint(name: str, attr: str = "weight") -> str:
    """The line that gives module ``name`` its own copy of a tied parameter.

    Examples
    --------
    >>> untie_hint("lm_head")
    'model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())'
    """
    where = f"model.{name}.{attr}" if name else f"model.{attr}"
    return f"{where} = nn.Parameter({where}.detach().clone())"
