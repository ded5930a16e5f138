"""Tied weights in a search: one searched member per tied parameter, the others follow it.

A parameter held by several searched layers (an LM head tied to its token
embedding) is one tensor, so it gets one choice. The first member in model
order is searched; the others are taken out of the search and take its
choice in the plan (``quantize`` then gives them one shared quantizer, and
the size counts the tensor once). Factorizing a tied member would untie it
(``factorize`` refuses), so the searched member keeps only its
quantize-only candidates.

Its error is measured as that member's alone: with ``metric='layer'`` or
``'output'`` the followers keep the float weight while it is measured
(``'hessian'`` sees every use of the parameter).

Examples
--------
>>> from torch import nn
>>> from tnquant import QuantSpec
>>> from tnquant.planning.plan import Choice
>>> emb, head = nn.Embedding(6, 2), nn.Linear(2, 6, bias=False)
>>> head.weight = emb.weight
>>> model = nn.ModuleDict({"emb": emb, "head": head})
>>> opts = [[Choice(None, QuantSpec(bits=8))], [Choice(None, QuantSpec(bits=4))]]
>>> targets, opts, tied, rows = split_ties(model, [(["emb"], emb), (["head"], head)], opts)
>>> [n for n, _ in targets], tied, rows[0][:2]
([['emb']], {'emb': ['head']}, ('head', 'all'))
"""

from __future__ import annotations

from torch import nn

from tnquant.conversion import weight_ties
from tnquant.planning.plan import Choice

__all__ = ["split_ties"]

Targets = list[tuple[list[str], nn.Module]]


def split_ties(
    model: nn.Module, targets: Targets, options: list[list[Choice]]
) -> tuple[Targets, list[list[Choice]], dict[str, list[str]], list[tuple[str, str, str]]]:
    """Targets and options with tied followers taken out; ``{leader: followers}``; skip rows.

    A tied target (a follower or not) loses its factorized candidates, with
    one row saying why.
    """
    index = {id(m): k for k, (_, m) in enumerate(targets)}
    followers: dict[int, list[int]] = {}
    partners: dict[int, list[str]] = {}
    for members in weight_ties(model).values():
        ks = sorted({index[id(m)] for _, _, m in members if id(m) in index})
        if not ks:
            continue
        lead = ks[0]
        followers.setdefault(lead, []).extend(k for k in ks[1:] if k not in followers[lead])
        names = [f"{n}.{t}" if n else t for n, t, m in members if m is not targets[lead][1]]
        partners.setdefault(lead, []).extend(names)
    dropped = {k for ks in followers.values() for k in ks}
    rows: list[tuple[str, str, str]] = []
    tied: dict[str, list[str]] = {}
    kept_targets: Targets = []
    kept_options: list[list[Choice]] = []
    for k, (names, module) in enumerate(targets):
        if k in dropped:
            lead = next(j for j, ks in followers.items() if k in ks)
            rows.append((names[0], "all", f"tied to {targets[lead][0][0]!r}: takes its choice"))
            continue
        opts = options[k]
        if k in followers:
            if followers[k]:
                tied[names[0]] = [targets[j][0][0] for j in followers[k]]
            quantize_only = [c for c in opts if c.factorization is None]
            if len(quantize_only) < len(opts):
                rows.append(
                    (
                        names[0],
                        "factorized",
                        f"tied to {', '.join(partners[k])}: factorizing one member would "
                        f"untie them, so it is searched quantize-only",
                    )
                )
            opts = quantize_only
        if opts:
            kept_targets.append((names, module))
            kept_options.append(opts)
    return kept_targets, kept_options, tied, rows
