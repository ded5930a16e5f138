"""The float64 torch graph hls4ml's PyTorch front end converts for an IR with merges.

A chain goes to hls4ml as an ``nn.Sequential`` (:func:`tnquant.export.hls.torch_chain`);
an IR whose ops name their inputs (:attr:`tnquant.export.ir.Op.inputs`: a
residual ``add``, a ``concat``) goes as a module whose ``forward`` runs the
ops in IR order, each reading its sources, with ``x + y`` and
``torch.cat((x, y), dim=1)`` for the merges: hls4ml's ``torch.fx`` trace
turns them into its ``Merge`` (``add``) and ``Concatenate`` layers, one
hls4ml layer per op, in the same order, so the configuration's layer names
match the ops by position.

As in the chain route, an ``nn.Flatten`` goes before a dense op that reads
a feature map (a layer of its own in hls4ml's configuration).

Examples
--------
>>> from tnquant.export.ir import Op
>>> from tnquant.specs import FixedPoint
>>> t = FixedPoint(8, 3)
>>> ops = [Op("r", "relu", "r", 4, 4, t, t),
...        Op("s", "add", "s", 4, 4, t, FixedPoint(9, 4), inputs=("r", "@input"),
...           merge_types=[t, t])]
>>> g = torch_graph(ops, lambda op: torch.nn.ReLU())
>>> g(torch.tensor([[-1.0, 2.0, 0.5, -0.5]])).tolist()
[[-1.0, 4.0, 1.0, -0.5]]
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from tnquant.export.ir import KEEPS_MAP, MERGES, SPATIAL, Op, sources

__all__ = ["torch_graph", "graph_layers"]


class _Graph(nn.Module):
    """Runs its entries in order; entry ``k`` reads the entries ``srcs[k]`` (``-1``: the input)."""

    def __init__(self, mods: list[nn.Module | None], kinds: list[str], srcs: list[list[int]]):
        super().__init__()
        self.layers = nn.ModuleList([m if m is not None else nn.Identity() for m in mods])
        self.kinds, self.srcs = kinds, srcs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs: list[torch.Tensor] = []
        for layer, kind, src in zip(self.layers, self.kinds, self.srcs, strict=True):
            ins = [outs[j] if j >= 0 else x for j in src]
            if kind == "add":
                outs.append(ins[0] + ins[1])
            elif kind == "concat":
                outs.append(torch.cat((ins[0], ins[1]), dim=1))
            else:
                outs.append(layer(ins[0]))
        return outs[-1]


def _entries(ops: list[Op]) -> tuple[list[Op | None], list[list[int]]]:
    """hls4ml's layers in order (``None``: an ``nn.Flatten`` before a dense op reading a map)
    and, for each, the entries it reads."""
    src = sources(ops)
    spatial: list[bool] = []
    entries: list[Op | None] = []
    reads: list[list[int]] = []
    where: dict[int, int] = {-1: -1}  # op index -> entry index
    for k, op in enumerate(ops):
        carries = op.kind in KEEPS_MAP and op.kind not in SPATIAL
        maps = [(spatial[j] if j >= 0 else bool(ops[0].in_shape)) for j in src[k]]
        spatial.append(op.kind in SPATIAL or (carries and any(maps)))
        ins = [where[j] for j in src[k]]
        if op.kind not in (*KEEPS_MAP, "concat") and maps[0]:
            entries.append(None)  # channels-first flat, as the emulator holds it
            reads.append([ins[0]])
            ins = [len(entries) - 1]
        where[k] = len(entries)
        entries.append(op)
        reads.append(ins)
    return entries, reads


def graph_layers(ops: list[Op]) -> list[Op | None]:
    """The ops in the order hls4ml's configuration names their layers (``None``: a Flatten)."""
    return _entries(ops)[0]


def torch_graph(ops: list[Op], op_module: Callable[[Op], nn.Module]) -> nn.Module:
    """The float64 module of ``ops`` (``op_module`` builds every op that is not a merge)."""
    entries, reads = _entries(ops)
    mods = [
        nn.Flatten() if op is None else None if op.kind in MERGES else op_module(op)
        for op in entries
    ]
    kinds = ["flatten" if op is None else op.kind for op in entries]
    return _Graph(mods, kinds, reads).double()
